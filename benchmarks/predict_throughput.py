"""Throughput of `transferkit predict` against a hand-written inference loop, measured side by side.

Run from the repository root:  .venv/bin/python benchmarks/predict_throughput.py [--images 1000]

One run's model predicts the same image files, each way writing a CSV of labels:

- hand-written loop (the baseline, ratio 1): a torch Dataset that opens each file with PIL
  (``convert("RGB")``) and applies the run's eval transform (``augment.image.eval_transform`` from
  its data config: the pixels of transferkit's plain view), a DataLoader with the same batch size
  and workers, the same network in eval mode under ``inference_mode``, softmax, and
  ``csv.writer`` rows ``path,label,probability``;
- transferkit: ``predict_paths``, what `transferkit predict` runs after parsing its flags (the
  file walk, loading the run's weights, ``load_rgb``, the Predictor, rows streamed to the CSV
  through ``atomic_write``), where the hand-written loop is handed the model and the file list;
- the CLI: `transferkit predict` in a fresh process, interpreter start, imports and model
  loading included (what a person waits for).

The model is the real MobileNetV1 x0.25 of ../shared/weights at 224 px when it is there, else
timm's ``test_resnet`` (random weights); its head is solved on a small generated set (one
frozen epoch: timing only). The images are ``--images`` generated JPEGs of ``--size`` px, or the
files under ``--data``. The methods take turns ``--repeats`` times after a warm-up (which also
brings the files into the page cache); the median of each is printed as images/s and as a ratio
to the baseline, with the share of files on which both CSVs agree on the label.
"""
from __future__ import annotations

import argparse
import csv
import logging
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

import transferkit
from transferkit.augment.image import eval_transform
from transferkit.pipelines.evaluate.prediction import default_workers, expand_inputs, predict_paths
from transferkit.pipelines.evaluate.predictor import Predictor
from transferkit.pipelines.rundir import RunDir

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
PLUGIN = SHARED / "weights" / "mobilenetv1_025.py"


class PilFiles(Dataset):
    """What one writes by hand: open with PIL, RGB, the eval transform."""

    def __init__(self, paths: list[str], transform):
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        with Image.open(self.paths[i]) as im:
            return self.transform(im.convert("RGB")), i


def hand_loop(model, transform, classes: list[str], paths: list[str], out: Path, batch: int, workers: int) -> None:
    loader = DataLoader(PilFiles(paths, transform), batch_size=batch, num_workers=workers)
    with out.open("w", newline="") as f, torch.inference_mode():
        w = csv.writer(f)
        w.writerow(["path", "label", "probability"])
        for x, idx in loader:
            p, label = torch.softmax(model(x), -1).max(-1)
            for i, lab, prob in zip(idx.tolist(), label.tolist(), p.tolist()):
                w.writerow([paths[i], classes[lab], f"{prob:.6f}"])


def _images(folder: Path, n: int, size: int) -> Path:
    """`n` photo-like JPEGs: smooth colour fields with noise, 4:3, the longer side `size` px."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    h, w = size * 3 // 4, size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(n):
        a, b, c = rng.uniform(0, 2 * np.pi, 3)
        base = 127 + 100 * np.stack([np.sin(xx / 40 + a), np.sin(yy / 30 + b), np.sin((xx + yy) / 50 + c)], -1)
        arr = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"{i:05d}.jpg", quality=90)
    return folder


def _run(root: Path) -> tuple[Path, str]:
    """A run to predict with: mobilenetv1_025 (real weights) when ../shared has it, else test_resnet."""
    data = root / "train"
    rng = np.random.default_rng(1)
    for name, rgb in {"warm": (210, 120, 60), "cool": (60, 120, 210)}.items():
        (data / name).mkdir(parents=True)
        for i in range(12):
            arr = np.clip(np.array(rgb, np.float32) + rng.normal(0, 30, (96, 96, 3)), 0, 255)
            Image.fromarray(arr.astype(np.uint8)).save(data / name / f"{i}.png")
    common = dict(out=root / "run", finetune="freeze", epochs=1, workers=0, patience=0, progress=False)
    if PLUGIN.is_file():
        transferkit.fit(data, backbone="mobilenetv1_025", backbone_plugin=str(PLUGIN), **common)
        return root / "run", "mobilenetv1_025 (ImageNet weights, ../shared)"
    transferkit.fit(data, backbone="test_resnet", pretrained=False, image_size=64, **common)
    return root / "run", "test_resnet (random weights; ../shared/weights is absent)"


def _labels(path: Path) -> dict[str, str]:
    with path.open(newline="") as f:
        return {r["path"]: r["label"] for r in csv.DictReader(f)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000, help="generated JPEGs (left out with --data)")
    parser.add_argument("--size", type=int, default=320, help="longer side of the generated JPEGs, px")
    parser.add_argument("--data", type=Path, help="predict the image files under this folder instead")
    parser.add_argument("--batch-size", type=int, default=32, help="as `transferkit predict --batch-size`")
    parser.add_argument("--workers", type=int, default=None, help="loader workers (default: predict's default)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-cli", action="store_true", help="leave out the CLI in a fresh process")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore", module="pytorch_lightning")
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run, model_name = _run(tmp)
        folder = args.data if args.data else _images(tmp / "images", args.images, args.size)
        paths = [str(p) for p in expand_inputs([folder])]
        predictor = Predictor.for_run(RunDir(run), accelerator="cpu")
        model, dc, classes = predictor.models[0], predictor.data_cfg, RunDir(run).classes()
        transform = eval_transform(tuple(dc.input_size[1:]), dc.mean, dc.std, dc.crop_pct, dc.interpolation)
        per_batch = predictor.images_per_batch(args.batch_size)
        workers = default_workers(len(paths), per_batch) if args.workers is None else args.workers
        outs = {"hand": tmp / "hand.csv", "transferkit": tmp / "transferkit.csv", "cli": tmp / "cli.csv"}
        methods = {
            "hand": lambda: hand_loop(model, transform, classes, paths, outs["hand"], args.batch_size, workers),
            "transferkit": lambda: predict_paths(run, [folder], outs["transferkit"], batch_size=args.batch_size,
                                                 workers=workers, progress=False, accelerator="cpu"),
            "cli": lambda: subprocess.run(
                [sys.executable, "-m", "transferkit.cli.main", "predict", str(run), str(folder), "--out",
                 str(outs["cli"]), "--batch-size", str(args.batch_size), "--workers", str(workers),
                 "--accelerator", "cpu"], check=True, capture_output=True),
        }
        if args.no_cli:
            del methods["cli"]
        for fn in methods.values():  # warm-up: the page cache, allocations, kernel choice
            fn()
        times: dict[str, list[float]] = {name: [] for name in methods}
        for _ in range(args.repeats):
            for name, fn in methods.items():  # taking turns: load from other processes hits all alike
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        median = {name: statistics.median(t) for name, t in times.items()}
        hand, ours = _labels(outs["hand"]), _labels(outs["transferkit"])
        agree = sum(hand[p] == ours.get(p) for p in hand) / len(hand)

    n = len(paths)
    source = f"files under {args.data}" if args.data else f"generated {args.size} px JPEGs"
    print(f"{model_name}, input {dc.input_size[1]} px; {n} {source}; batch {args.batch_size}, {workers} workers,"
          f" {torch.get_num_threads()} threads, cpu; median of {args.repeats}")
    print(f"{'method':<44}{'images/s':>10}{'seconds':>10}{'/ hand':>8}")
    labels = {"hand": "hand-written loop (baseline)", "transferkit": "transferkit predict_paths",
              "cli": "transferkit predict (CLI, fresh process)"}
    for name, seconds in median.items():
        print(f"{labels[name]:<44}{n / seconds:>10.0f}{seconds:>10.2f}{(n / seconds) / (n / median['hand']):>8.2f}")
    print(f"labels agree on {agree:.1%} of the files")


if __name__ == "__main__":
    main()
