"""Cost of comparing TTA specs x ensembles in one `evaluate` call, against one call per combination.

Fits a small run once (random weights, frozen backbone, ``--ema --snapshots 3``: five models that
differ only in their classifier), then evaluates ``--tta plain,hflip,ten-crop`` x
``--ensemble none,ema,snapshots`` (9 combinations) three ways, taking turns ``--repeats`` times:

- one combination at a time (the baseline, ratio 1): what nine separate `evaluate` calls compute;
- one pass, model by model: every model runs once per batch on the union of the views;
- one pass, shared backbone: the members of a frozen run share one backbone pass per batch
  (what `evaluate` does for them).

Timings exclude image decoding (batches are prepared once), so the ratios are about the models.

    python benchmarks/ensemble_eval.py [--model mobilenetv3_small_100] [--size 96] [--images 48]
"""
from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from transferkit.cli.main import main as cli
from transferkit.pipelines.data.datasets import ImageDataset
from transferkit.pipelines.data.splits import read_split_csv
from transferkit.pipelines.evaluate.predictor import Predictor
from transferkit.pipelines.rundir import RunDir

SPECS = ["plain", "hflip", "ten-crop"]
ENSEMBLES = ["none", "ema", "snapshots"]


def _images(root: Path, per_class: int, size: int) -> Path:
    rng = np.random.default_rng(0)
    for name, rgb in {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (50, 70, 210)}.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            arr = np.clip(np.array(rgb, np.float32) + rng.normal(0, 30, (size, size, 3)), 0, 255)
            Image.fromarray(arr.astype(np.uint8)).save(root / name / f"{i}.png")
    return root


def _time(fns: dict, repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():  # taking turns: load from other processes hits all alike
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenetv3_small_100")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--images", type=int, default=48, help="images per class (a fifth is validation)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.disable(logging.INFO)

    with tempfile.TemporaryDirectory() as tmp:
        data = _images(Path(tmp) / "data", args.images, args.size + args.size // 4)
        out = Path(tmp) / "run"
        rc = cli(["fit", str(data), "--out", str(out), "--backbone", args.model, "--no-pretrained",
                  "--finetune", "freeze", "--image-size", str(args.size), "--epochs", "3", "--snapshots", "3",
                  "--ema", "--patience", "0", "--workers", "0"])
        assert rc == 0
        run = RunDir(out)
        probe = Predictor.for_run(run, SPECS, ENSEMBLES, accelerator="cpu")
        samples = read_split_csv(run.splits / "val.csv", run.classes())
        batches = [b[0] for b in DataLoader(ImageDataset(samples, probe.transform), batch_size=32)]

        def engine(shared: bool):
            p = Predictor.for_run(run, SPECS, ENSEMBLES, accelerator="cpu")
            p.shared_backbone = None if shared else False
            return lambda: [p.merged(x) for x in batches]

        singles = []
        for e in ENSEMBLES:
            for s in SPECS:
                p = Predictor.for_run(run, s, e, accelerator="cpu")
                p.shared_backbone = False
                singles.append(p)

        fns = {"one combination at a time": lambda: [p.merged(x) for p in singles for x in batches],
               "one pass, model by model": engine(False),
               "one pass, shared backbone": engine(True)}
        _time({k: (lambda f=f: f()) for k, f in fns.items()}, 1)  # warm-up
        median = _time(fns, args.repeats)

    base = median["one combination at a time"]
    print(f"{args.model} at {args.size} px, {len(samples)} val images, {len(SPECS)} TTA specs x"
          f" {len(ENSEMBLES)} ensembles (5 models), {torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"{'method':<30}{'time / baseline':>16}{'speed-up':>10}")
    for name, t in median.items():
        print(f"{name:<30}{t / base:>16.3f}{base / t:>10.1f}")


if __name__ == "__main__":
    main()
