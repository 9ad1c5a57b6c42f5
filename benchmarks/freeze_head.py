"""Is `fit --finetune freeze` as good as a careful linear probe? Both, side by side, on real data.

    python benchmarks/freeze_head.py [--sizes 10 100] [--datasets ...] [--backbones ...] [--json out.json]

For every image dataset in ../shared/data (hymenoptera, breastmnist, cub_birds40, rsscn7), each
real backbone in ../shared/weights, and 10 and 100 training images per class (all, where a class
has fewer; a stratified subsample, seed 0): `transferkit.fit(..., finetune="freeze")` with its
defaults, scored on the held-out split (BreastMNIST's test split; the others' val), against
scikit-learn's `make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=13 values 1e-4..1e2))`
on the very same frozen features (the backbone's eval transform, pooled pre-logits). Prints both,
the difference in points, and the solver's seconds; then the solve time on all of hymenoptera
with 4 cached views per image.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
BACKBONES = ("mobilenetv1_025", "effnet_lite0", "mobilenetv2_100_tf")
DATASETS = ("hymenoptera", "breastmnist", "cub_birds40", "rsscn7")
BREAST_CLASSES = ("malignant", "normal_or_benign")


def breastmnist_folder(root: Path) -> Path:
    """The npz as DATA/{train,val,test}/<class>/*.png."""
    import numpy as np
    from PIL import Image

    z = np.load(SHARED / "data" / "breastmnist.npz")
    for split in ("train", "val", "test"):
        for i, (img, label) in enumerate(zip(z[f"{split}_images"], z[f"{split}_labels"].reshape(-1))):
            d = root / split / BREAST_CLASSES[int(label)]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(d / f"{i:04d}.png")
    return root


def subsample(src: Path, dst: Path, per_class: int, seed: int) -> Path:
    """dst/train: `per_class` images of each class (all when fewer); the other splits linked whole."""
    rng = random.Random(seed)
    for cls in sorted(p for p in (src / "train").iterdir() if p.is_dir()):
        files = sorted(cls.iterdir())
        chosen = files if per_class >= len(files) else rng.sample(files, per_class)
        (dst / "train" / cls.name).mkdir(parents=True)
        for f in chosen:
            (dst / "train" / cls.name / f.name).symlink_to(f.resolve())
    for split in ("val", "test"):
        if (src / split).is_dir():
            (dst / split).symlink_to((src / split).resolve())
    return dst


def features(name: str, plugin: Path, folder: Path, split: str, classes: int):
    """Pooled pre-logits features of a split through the backbone's eval transform, and labels."""
    import numpy as np

    from transferkit.augment.image import eval_transform
    from transferkit.backbones import factory
    from transferkit.pipelines.data.features import extract
    from transferkit.pipelines.data.folders import scan_folder

    model, dc = factory.create(name, classes, pretrained=True, plugin=str(plugin), quiet=True)
    samples = scan_folder(folder, progress=False, quiet=True).splits[split]
    tf = eval_transform(dc.input_size[1:], dc.mean, dc.std, dc.crop_pct, dc.interpolation)
    f = extract(model, samples, tf, batch_size=64, workers=2, progress=False)[0].numpy()
    return f, np.array([s.label for s in samples])


def sklearn_probe(train, test) -> float:
    import numpy as np
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    (xtr, ytr), (xte, yte) = train, test
    folds = int(min(5, np.bincount(ytr).min()))
    clf = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=np.logspace(-4, 2, 13), max_iter=5000, scoring="accuracy",
                                                               cv=StratifiedKFold(folds, shuffle=True, random_state=0)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # scikit-learn's notices of future defaults
        clf.fit(xtr, ytr)
    return float((clf.predict(xte) == yte).mean())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="*", type=int, default=[10, 100])
    ap.add_argument("--datasets", nargs="*", default=list(DATASETS))
    ap.add_argument("--backbones", nargs="*", default=list(BACKBONES))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if not (SHARED / "data").is_dir():
        print(f"needs {SHARED / 'data'} and {SHARED / 'weights'}", file=sys.stderr)
        return 2
    import logging

    import transferkit

    logging.basicConfig(level=logging.WARNING)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sources = {n: SHARED / "data" / n for n in args.datasets if n != "breastmnist"}
        if "breastmnist" in args.datasets:
            sources["breastmnist"] = breastmnist_folder(tmp / "breastmnist")
        for name in args.datasets:
            held = "test" if (sources[name] / "test").is_dir() else "val"
            classes = len([p for p in (sources[name] / "train").iterdir() if p.is_dir()])
            for backbone in args.backbones:
                plugin = SHARED / "weights" / f"{backbone}.py"
                test = features(backbone, plugin, sources[name], held, classes) if held == "test" else None
                for size in args.sizes:
                    data = subsample(sources[name], tmp / f"{name}-{backbone}-{size}", size, 0)
                    t0 = time.perf_counter()
                    run = transferkit.fit(data, backbone=backbone, backbone_plugin=str(plugin), finetune="freeze",
                                          out=tmp / f"run-{name}-{backbone}-{size}", workers=2, progress=False)
                    seconds = time.perf_counter() - t0
                    ours = (run.evaluate(split="test")[0]["accuracy"] if held == "test"
                            else run.report["accuracy"])
                    train = features(backbone, plugin, data, "train", classes)
                    theirs = sklearn_probe(train, test if held == "test" else features(backbone, plugin, data, "val",
                                                                                         classes))
                    solved = run.report["head_solver"] or {}
                    row = {"dataset": name, "backbone": backbone, "per_class": size, "train": len(train[1]),
                           "held_out": held, "transferkit": ours, "sklearn": theirs,
                           "points": round(100 * (ours - theirs), 1), "l2": solved.get("l2"),
                           "solve_seconds": solved.get("seconds"), "fit_seconds": round(seconds, 1)}
                    rows.append(row)
                    print(f"{name:<12} {backbone:<19} {size:>4}/class  freeze {ours:.3f}  sklearn {theirs:.3f}"
                          f"  ({row['points']:+.1f} points; solve {row['solve_seconds']} s, fit {seconds:.0f} s)",
                          flush=True)
        hym = SHARED / "data" / "hymenoptera"
        if "hymenoptera" in args.datasets:
            run = transferkit.fit(hym, backbone=BACKBONES[0], backbone_plugin=str(SHARED / "weights" / "mobilenetv1_025.py"),
                                  finetune="freeze", cache_views=4, out=tmp / "views4", workers=2, progress=False)
            s = run.report["head_solver"]
            print(f"\nhymenoptera, all {run.report['images']['train']} train images x 4 cached views: head solved in"
                  f" {s['seconds']:.1f} s ({s['iterations']} iterations, L2 {s['l2']:g}), val accuracy"
                  f" {run.report['accuracy']:.3f}")
    worst = min(r["points"] for r in rows)
    print(f"\nfreeze minus scikit-learn, in points: worst {worst:+.1f}, mean"
          f" {sum(r['points'] for r in rows) / len(rows):+.2f} over {len(rows)} cells;"
          f" {sum(r['points'] >= -0.5 for r in rows)} of {len(rows)} within 0.5 points or better")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
