"""Which learning rate each optimizer wants, relative to AdamW's measured defaults.

    python benchmarks/optimizer_lr.py [--data ../shared/data/hymenoptera] [--epochs 4] [--finetune partial]

Trains the real MobileNetV1 x0.25 with `--finetune partial` (the strategy that moves pretrained
weights and a new head at once) on hymenoptera, for every optimizer at a few multiples of the
strategy's AdamW head rate, same seed and epochs, and prints val accuracy per multiple; the best
multiple per optimizer (ties: the one nearer the middle of its grid) is what
`backbones/strategies.py` OPTIMIZER_LR_FACTOR holds.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared"
BACKBONE = "mobilenetv1_025"
GRID = {"adamw": (0.3, 1, 3), "adam": (0.3, 1, 3), "rmsprop": (0.1, 0.3, 1), "adagrad": (1, 3, 10),
        "momentum": (3, 10, 30), "nesterov": (3, 10, 30), "sgd": (30, 100, 300)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=SHARED / "data" / "hymenoptera")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--finetune", default="partial")
    ap.add_argument("--optimizers", nargs="*", default=list(GRID))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    plugin = SHARED / "weights" / f"{BACKBONE}.py"
    if not args.data.is_dir() or not plugin.is_file():
        print(f"needs {args.data} and {plugin}", file=sys.stderr)
        return 2
    import logging

    import transferkit
    from transferkit.backbones.strategies import DEFAULT_LR

    logging.basicConfig(level=logging.WARNING)
    base = DEFAULT_LR[args.finetune]
    results: dict[str, dict[float, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for opt in args.optimizers:
            results[opt] = {}
            for factor in GRID[opt]:
                t0 = time.perf_counter()
                run = transferkit.fit(args.data, out=Path(tmp) / f"{opt}-{factor}", backbone=BACKBONE,
                                      backbone_plugin=str(plugin), finetune=args.finetune, optimizer=opt,
                                      lr=base * factor, epochs=args.epochs, patience=0, seed=0, workers=2,
                                      progress=False)
                results[opt][factor] = run.report["accuracy"]
                print(f"{opt:<9} lr {base * factor:<8.3g} ({factor:>5g} x AdamW's) val {run.report['accuracy']:.3f}"
                      f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    print(f"\n{args.finetune}, {args.epochs} epochs, {BACKBONE} on {args.data.name}: best multiple of AdamW's rate")
    best = {}
    for opt, by in results.items():
        grid = list(by)
        top = max(by.values())
        ties = [f for f in grid if by[f] == top]
        best[opt] = min(ties, key=lambda f: abs(grid.index(f) - (len(grid) - 1) / 2))
        print(f"  {opt:<9} x{best[opt]:<5g} " + "  ".join(f"x{f:g}: {by[f]:.3f}" for f in grid))
    if args.json:
        args.json.write_text(json.dumps({"results": {o: {str(f): a for f, a in by.items()} for o, by in results.items()},
                                         "best": best, "epochs": args.epochs, "finetune": args.finetune}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
