"""`--decode-cache auto` against `--decode-cache off`: epoch time and val accuracy, seed by seed.

    python benchmarks/decode_cache.py [--datasets hymenoptera,breastmnist] [--seeds 0,1,2] [--epochs 6]

A partial fine-tune (the real MobileNetV1 x0.25 of ../shared/weights, fit's defaults otherwise:
DataLoader workers as fit chooses them)
runs with the decode cache and without it for each dataset and seed, one after the other.
Printed: each run's val accuracy, the seconds of epoch 1 and of epochs 2.. inside training
(report.json's ``timings.train_epochs``), and the speed-up of epochs 2.. (off / cache). One
image of val is 1/153 = 0.0065 of hymenoptera's accuracy and 1/234 = 0.0043 of BreastMNIST's
(its val and test splits together, as in advisor_grid.py).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from advisor_grid import sources  # noqa: E402
from freeze_head import SHARED  # noqa: E402


def run(data: Path, out: Path, seed: int, epochs: int, cache: str) -> dict:
    import transferkit

    report = transferkit.fit(data, out=out, backbone="mobilenetv1_025",
                             backbone_plugin=str(SHARED / "weights" / "mobilenetv1_025.py"), finetune="partial",
                             epochs=epochs, patience=0, seed=seed, decode_cache=cache, progress=False).report
    epochs_ = report["timings"]["train_epochs"]
    return {"acc": report["accuracy"], "first": epochs_[0]["seconds"],
            "later": sum(e["seconds"] for e in epochs_[1:]), "kept": report["decode_cache"]["kept"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default="hymenoptera,breastmnist")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=6)
    args = ap.parse_args()
    if not (SHARED / "weights" / "mobilenetv1_025.py").is_file():
        print("needs ../shared (see its README)", file=sys.stderr)
        return 1
    seeds = [int(s) for s in args.seeds.split(",")]
    results = {}
    with tempfile.TemporaryDirectory(prefix="decode-cache-") as tmp:
        tmp = Path(tmp)
        for name, data in sources(tmp, args.datasets.split(",")).items():
            for seed in seeds:
                for cache in ("auto", "off"):
                    r = run(data, tmp / f"{name}-{seed}-{cache}", seed, args.epochs, cache)
                    results[(name, seed, cache)] = r
                    print(f"{name} seed {seed} --decode-cache {cache}: {json.dumps(r)}", flush=True)
    print(f"\npartial fine-tune, mobilenetv1_025, {args.epochs} epochs, fit's default workers")
    print("| data | seed | val acc cache / off | epoch 1 s cache / off | epochs 2.. s cache / off | speed-up 2.. |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in args.datasets.split(","):
        ups = []
        for seed in seeds:
            c, o = results[(name, seed, "auto")], results[(name, seed, "off")]
            ups.append(o["later"] / c["later"])
            print(f"| {name} | {seed} | {c['acc']:.4f} / {o['acc']:.4f} | {c['first']:.1f} / {o['first']:.1f} |"
                  f" {c['later']:.1f} / {o['later']:.1f} | {ups[-1]:.2f}x |")
        mc = statistics.mean(results[(name, s, "auto")]["acc"] for s in seeds)
        mo = statistics.mean(results[(name, s, "off")]["acc"] for s in seeds)
        print(f"| {name} | mean | {mc:.4f} / {mo:.4f} | | | {statistics.median(ups):.2f}x (median) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
