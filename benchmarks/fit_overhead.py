"""`transferkit fit` against a hand-written PyTorch loop doing the same training, as whole commands.

    python benchmarks/fit_overhead.py [--data ../shared/data/hymenoptera] [--epochs 3] [--repeats 3]

For each strategy (partial, full) and each repeat, three commands run one after the other (warm
file caches, alternating): the hand loop (``--hand``: this file, ~60 lines of torch DataLoader,
torchvision transforms equal to fit's default preset, AdamW with fit's per-group rates, warmup
then cosine per step, label smoothing, validation every epoch), ``transferkit fit`` with its
defaults (but ``--patience 0``: the same number of epochs as the loop), and ``transferkit fit
--decode-cache off``. Both sides train the real MobileNetV1 x0.25
of ../shared/weights with batch 32; the hand loop's DataLoader has ``--workers`` (2, fit's default
on two cores), fit decides its own. Printed: medians of whole-command
wall time and of training throughput (images/s inside training epochs, from an epoch's start to
its last batch), and the ratios hand / fit (>= 1.0: fit is at least as fast).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
PLUGIN = SHARED / "weights" / "mobilenetv1_025.py"
LR = {"partial": 3e-3, "full": 1e-3}  # fit's DEFAULT_LR for adamw (strategies.py)


def hand(data: Path, strategy: str, epochs: int, workers: int, out: Path) -> None:
    """The hand-written loop: what a careful practitioner writes for the same job."""
    t_start = time.perf_counter()
    import importlib.util
    import math

    import timm
    import torch
    import torch.nn.functional as F
    from timm.models import group_parameters
    from torchvision import datasets, transforms as T

    spec = importlib.util.spec_from_file_location("mobilenetv1_025", PLUGIN)
    sys.modules["mobilenetv1_025"] = plugin = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plugin)
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv1_025", pretrained=True, num_classes=2)
    norm = T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    train_tf = T.Compose([T.RandomResizedCrop(224, scale=(0.2, 1.0)), T.RandomHorizontalFlip(),
                          T.RandomApply([T.ColorJitter(0.3, 0.3, 0.3, 0.05)], p=0.8), T.ToTensor(), norm])
    eval_tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), norm])
    train = torch.utils.data.DataLoader(datasets.ImageFolder(data / "train", train_tf), batch_size=32,
                                        shuffle=True, num_workers=workers, drop_last=False)
    val = torch.utils.data.DataLoader(datasets.ImageFolder(data / "val", eval_tf), batch_size=32,
                                      num_workers=workers)
    # Layer groups as timm's coarse matcher gives them; the head trains at the full rate, each
    # group below it at half the rate of the one above; partial trains the top two groups.
    groups = [names for _, names in sorted(group_parameters(model, model.group_matcher(coarse=True)).items())]
    head = {n for n, _ in model.named_parameters() if n.startswith("classifier.")}
    groups = [[n for n in g if n not in head] for g in groups]
    groups = [g for g in groups if g]
    trainable = range(len(groups) - 2, len(groups)) if strategy == "partial" else range(len(groups))
    named = dict(model.named_parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    param_groups = [(1.0, sorted(head))] + [(0.5 ** (len(groups) - i), groups[i]) for i in trainable]
    opt_groups = []
    for scale, names in param_groups:
        for wd, keep in ((0.05, lambda n: named[n].ndim > 1), (0.0, lambda n: named[n].ndim <= 1)):
            params = [named[n] for n in names if keep(n)]
            for p in params:
                p.requires_grad_(True)
            if params:
                opt_groups.append({"params": params, "lr": LR[strategy] * scale, "weight_decay": wd})
    opt = torch.optim.AdamW(opt_groups)
    steps, warm = epochs * len(train), len(train)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warm if s < warm else
                                              0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))
    frozen = [m for m in model.modules() if list(m.parameters()) and not any(p.requires_grad for p in m.parameters())]
    images, inside, accs = 0, 0.0, []
    for _ in range(epochs):
        model.train()
        for m in frozen:
            m.eval()  # frozen layers keep their BatchNorm statistics, as fit does
        t = last = time.perf_counter()
        for x, y in train:
            loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            images += len(x)
            last = time.perf_counter()
        inside += last - t
        model.eval()
        correct = 0
        with torch.inference_mode():
            for x, y in val:
                correct += int((model(x).argmax(1) == y).sum())
        accs.append(correct / len(val.dataset))
    out.write_text(json.dumps({"accuracy": accs[-1], "best_accuracy": max(accs), "images_per_second": images / inside,
                               "seconds": time.perf_counter() - t_start}))


def timed(cmd: list[str], env: dict) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=SHARED / "data" / "hymenoptera")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--strategies", default="partial,full")
    ap.add_argument("--hand", metavar="STRATEGY", help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.hand:
        hand(args.data, args.hand, args.epochs, args.workers, args.result)
        return 0
    if not args.data.is_dir() or not PLUGIN.is_file():
        print(f"needs {args.data} and {PLUGIN} (see ../shared/README.md)", file=sys.stderr)
        return 1
    env = {**os.environ, "TQDM_DISABLE": "1"}
    cli = [str(Path(sys.executable).with_name("transferkit"))]
    rows = []
    with tempfile.TemporaryDirectory(prefix="fit-overhead-") as tmp:
        tmp = Path(tmp)
        for strategy in args.strategies.split(","):
            runs: dict[str, list[dict]] = {"hand": [], "fit": [], "fit --decode-cache off": []}
            for r in range(args.repeats):
                res = tmp / f"hand-{strategy}-{r}.json"
                wall = timed([sys.executable, __file__, "--hand", strategy, "--data", str(args.data), "--epochs",
                              str(args.epochs), "--workers", str(args.workers), "--result", str(res)], env)
                h = json.loads(res.read_text())
                runs["hand"].append({"wall": wall, "rate": h["images_per_second"], "acc": h["accuracy"]})
                for name, extra in (("fit", []), ("fit --decode-cache off", ["--decode-cache", "off"])):
                    out = tmp / f"{name.replace(' ', '_')}-{strategy}-{r}"
                    wall = timed(cli + ["fit", str(args.data), "--backbone", "mobilenetv1_025", "--backbone-plugin",
                                        str(PLUGIN), "--finetune", strategy, "--epochs", str(args.epochs),
                                        "--patience", "0", "--out", str(out), *extra], env)
                    rep = json.loads((out / "report.json").read_text())
                    runs[name].append({"wall": wall, "rate": rep["timings"]["train_images_per_second"],
                                       "acc": rep["accuracy"], "timings": rep["timings"]})
                print(f"{strategy} repeat {r + 1}: " + ", ".join(
                    f"{k} {v[-1]['wall']:.1f} s {v[-1]['rate']:.1f} img/s acc {v[-1]['acc']:.3f}"
                    for k, v in runs.items()), flush=True)
            med = {k: {m: statistics.median(x[m] for x in v) for m in ("wall", "rate", "acc")} for k, v in runs.items()}
            for name in ("fit", "fit --decode-cache off"):
                rows.append((strategy, name, med[name], med["hand"]["wall"] / med[name]["wall"],
                             med[name]["rate"] / med["hand"]["rate"]))
            rows.append((strategy, "hand loop", med["hand"], 1.0, 1.0))
            last = runs["fit"][-1]["timings"]
            print(f"{strategy}: fit's last timings: " + ", ".join(f"{k} {v}" for k, v in last.items()), flush=True)
    print(f"\n{args.data.name}, mobilenetv1_025, {args.epochs} epochs, batch 32, hand loop with {args.workers}"
          f" workers, medians of {args.repeats}")
    print(f"| strategy | command | wall s | train img/s | val acc | wall ratio (hand / this) | throughput ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for strategy, name, m, wall_ratio, rate_ratio in rows:
        print(f"| {strategy} | {name} | {m['wall']:.1f} | {m['rate']:.1f} | {m['acc']:.3f} | {wall_ratio:.2f} |"
              f" {rate_ratio:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
