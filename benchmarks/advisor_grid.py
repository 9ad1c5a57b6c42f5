"""Does the advisor pick well? Every strategy, trained on a grid of dataset sizes, against its pick.

    python benchmarks/advisor_grid.py [--sizes 10 30 100 all] [--epochs 8] [--json grid.json]

Datasets: ../shared/data/hymenoptera (photos close to ImageNet) and ../shared/data/breastmnist.npz
(breast ultrasound, far from it), each with the real MobileNetV1 x0.25 from ../shared/weights. For
every cell (dataset x images per class) the training split is a stratified subsample (same seed);
freeze, partial (top 2 groups), full and lp-ft train with the same epochs, seed and defaults, and
are scored by val accuracy of their best checkpoint. The advisor sees only the cell's training
images. A pick counts as good when it is the best or within 1 point of the best.

BreastMNIST's val split has 78 images; its val and test splits together (234) are the evaluation
set here, so that one image is not half a point.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
PLUGIN = SHARED / "weights" / "mobilenetv1_025.py"
STRATEGIES = ("freeze", "partial", "full", "lp-ft")
BREAST_CLASSES = ("malignant", "normal_or_benign")


def breastmnist_folder(root: Path) -> Path:
    import numpy as np
    from PIL import Image

    z = np.load(SHARED / "data" / "breastmnist.npz")
    for split, parts in (("train", ("train",)), ("val", ("val", "test"))):
        for part in parts:
            for i, (img, label) in enumerate(zip(z[f"{part}_images"], z[f"{part}_labels"].reshape(-1))):
                d = root / split / BREAST_CLASSES[int(label)]
                d.mkdir(parents=True, exist_ok=True)
                Image.fromarray(img).save(d / f"{part}_{i:04d}.png")
    return root


def subsample(src: Path, dst: Path, per_class: int | None, seed: int) -> Path:
    """dst/train: `per_class` images of each class (all when None); dst/val: all of src/val."""
    rng = random.Random(seed)
    for cls in sorted(p for p in (src / "train").iterdir() if p.is_dir()):
        files = sorted(cls.iterdir())
        chosen = files if per_class is None or per_class >= len(files) else rng.sample(files, per_class)
        (dst / "train" / cls.name).mkdir(parents=True)
        for f in chosen:
            (dst / "train" / cls.name / f.name).symlink_to(f.resolve())
    (dst / "val").symlink_to((src / "val").resolve())
    return dst


def pick(data: Path, seed: int, workers: int) -> dict:
    from transferkit.pipelines.advise import advise

    advice, info = advise(str(data), "mobilenetv1_025", backbone_plugin=str(PLUGIN), seed=seed, workers=workers,
                          progress=False)
    return {"pick": advice.strategy, "pick_groups": advice.trainable_groups, "reasons": advice.reasons,
            "measurements": advice.measurements.to_dict(), "train_images": info["train_images"]}


def score(res: dict) -> dict:
    best = max(res["accuracy"].values())
    res["best"] = [s for s, a in res["accuracy"].items() if a == best]
    res["pick_accuracy"] = res["accuracy"][res["pick"]]
    res["good"] = res["pick_accuracy"] >= best - 0.01
    return res


def cell(data: Path, out: Path, epochs: int, seed: int, workers: int, accuracy: dict | None = None) -> dict:
    """The advisor's pick and, unless `accuracy` is given (from an earlier run), every strategy trained."""
    import transferkit

    res = {**pick(data, seed, workers), "accuracy": {}, "seconds": {}}
    if accuracy is not None:
        res["accuracy"] = accuracy
        return score(res)
    for s in STRATEGIES:
        t0 = time.perf_counter()
        report = transferkit.fit(data, out=out / s, backbone="mobilenetv1_025", backbone_plugin=str(PLUGIN),
                                 finetune=s, epochs=epochs, patience=0, seed=seed, workers=workers, overwrite=True,
                                 progress=False).report
        res["accuracy"][s] = report["accuracy"]
        res["seconds"][s] = round(time.perf_counter() - t0, 1)
    return score(res)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="*", default=["10", "30", "100", "all"])
    ap.add_argument("--datasets", nargs="*", default=["hymenoptera", "breastmnist"])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None, help="also write every number here")
    ap.add_argument("--picks-only", type=Path, default=None, metavar="JSON",
                    help="reuse the accuracies of an earlier --json run and only ask the advisor again"
                         " (after its thresholds change: training is the slow part, advice is seconds)")
    args = ap.parse_args()
    earlier = {}
    if args.picks_only:
        earlier = {(r["dataset"], str(r["per_class"])): r["accuracy"] for r in json.loads(args.picks_only.read_text())}
    if not (SHARED / "data").is_dir() or not PLUGIN.is_file():
        print(f"needs {SHARED / 'data'} and {PLUGIN}", file=sys.stderr)
        return 2
    import logging

    logging.basicConfig(level=logging.WARNING)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sources = {"hymenoptera": SHARED / "data" / "hymenoptera"}
        if "breastmnist" in args.datasets:
            sources["breastmnist"] = breastmnist_folder(tmp / "breastmnist")
        for name in args.datasets:
            for size in args.sizes:
                per_class = None if size == "all" else int(size)
                data = subsample(sources[name], tmp / f"{name}-{size}", per_class, args.seed)
                t0 = time.perf_counter()
                if args.picks_only and (name, size) not in earlier:
                    continue
                r = cell(data, tmp / f"runs-{name}-{size}", args.epochs, args.seed, args.workers,
                         accuracy=earlier.get((name, size)))
                r.update(dataset=name, per_class=size)
                results.append(r)
                print(f"{name:<12} {size:>4}/class  pick {r['pick']:<8} "
                      + "  ".join(f"{s} {a:.3f}" for s, a in r["accuracy"].items())
                      + f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    print(f"\nval accuracy of each strategy ({args.epochs} epochs, seed {args.seed}); * = advisor's pick,"
          " ^ = best")
    print(f"{'dataset':<12} {'per class':>9} {'train':>6} " + " ".join(f"{s:>9}" for s in STRATEGIES)
          + "   pick ok")
    for r in results:
        cells = []
        for s in STRATEGIES:
            mark = ("*" if s == r["pick"] else " ") + ("^" if s in r["best"] else " ")
            cells.append(f"{r['accuracy'][s]:>7.3f}{mark}")
        print(f"{r['dataset']:<12} {r['per_class']:>9} {r['train_images']:>6} " + " ".join(cells)
              + f"   {'yes' if r['good'] else 'no'}")
    good = sum(r["good"] for r in results)
    print(f"\nthe pick is the best or within 1 point of the best in {good} of {len(results)} cells"
          f" ({100 * good / max(1, len(results)):.0f}%)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
