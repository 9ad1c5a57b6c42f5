"""Frozen-backbone fit with cached features against the same fit running the backbone every epoch.

    python benchmarks/frozen_cache.py [--data ../shared/data/hymenoptera] [--epochs 10]

Both runs train the same head (freeze, same seed, same epochs, no early stopping) on the real
MobileNetV1 x0.25 backbone in ../shared/weights; the table gives wall time, val accuracy and the
ratio. Times are measured in this process, one run after the other.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def run(data: Path, out: Path, epochs: int, cache_views: int, workers: int) -> tuple[float, float]:
    import transferkit

    t0 = time.perf_counter()
    report = transferkit.fit(data, out=out, backbone="mobilenetv1_025",
                             backbone_plugin=str(SHARED / "weights" / "mobilenetv1_025.py"), finetune="freeze",
                             epochs=epochs, patience=0, cache_views=cache_views, workers=workers, overwrite=True,
                             progress=False).report
    return time.perf_counter() - t0, report["accuracy"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=SHARED / "data" / "hymenoptera")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--views", type=int, nargs="*", default=[1, 4], help="cache_views settings to compare")
    args = ap.parse_args()
    if not args.data.is_dir() or not (SHARED / "weights").is_dir():
        print(f"needs {args.data} and {SHARED / 'weights'}", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base_t, base_acc = run(args.data, Path(tmp) / "uncached", args.epochs, 0, args.workers)
        rows.append(("backbone every epoch", 0, base_t, base_acc))
        for k in args.views:
            t, acc = run(args.data, Path(tmp) / f"cached{k}", args.epochs, k, args.workers)
            rows.append(("cached features", k, t, acc))
    print(f"\nfreeze, {args.epochs} epochs on {args.data.name}, mobilenetv1_025")
    print(f"{'run':<22} {'views':>5} {'wall s':>8} {'val acc':>8} {'speed-up':>9} {'acc diff':>9}")
    for name, k, t, acc in rows:
        print(f"{name:<22} {k:>5} {t:>8.1f} {acc:>8.4f} {base_t / t:>8.1f}x {100 * (acc - base_acc):>+8.1f}pt")
    print(json.dumps({"rows": [dict(zip(("run", "views", "seconds", "accuracy"), r)) for r in rows]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
