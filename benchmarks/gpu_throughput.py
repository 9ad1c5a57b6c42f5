"""Training images/s of `transferkit fit` on a GPU against a hand-written loop with the same settings.

    python benchmarks/gpu_throughput.py [--data DIR] [--backbone resnet50] [--epochs 3]
        [--precision bf16-mixed] [--channels-last] [--compile] [--batch-size 128] [--workers 8]

Both sides train the same timm backbone (random weights: throughput does not depend on them) with
full fine-tuning, AdamW, random resized crops and flips, under the same precision (autocast),
memory format and torch.compile setting; fit with its defaults otherwise (the decode cache
included). Throughput is images over the time inside training epochs after the first (the first
pays for compiling and for filling the decode cache). Without a GPU it says so and exits 0;
``--device cpu`` runs the same comparison on the CPU (small settings check the script itself).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def hand(args: argparse.Namespace, out: Path) -> None:
    import timm
    import torch
    import torch.nn.functional as F
    from torchvision import datasets, transforms as T

    device = torch.device(args.device)
    model = timm.create_model(args.backbone, pretrained=False, num_classes=len(list((args.data / "train").iterdir())))
    cfg = timm.data.resolve_data_config({}, model=model)
    size = args.image_size or cfg["input_size"][1]
    tf = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize(cfg["mean"], cfg["std"])])
    loader = torch.utils.data.DataLoader(datasets.ImageFolder(args.data / "train", tf), batch_size=args.batch_size,
                                         shuffle=True, num_workers=args.workers, pin_memory=device.type == "cuda",
                                         drop_last=True, persistent_workers=args.workers > 0)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    run = torch.compile(model) if args.compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(args.precision)
    scaler = torch.amp.GradScaler(enabled=dtype is torch.float16)
    images, inside = 0, 0.0
    for epoch in range(args.epochs):
        model.train()
        t = time.perf_counter()
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = F.cross_entropy(run(x), y, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            if epoch > 0:
                images += len(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if epoch > 0:
            inside += time.perf_counter() - t
    out.write_text(json.dumps({"images_per_second": images / inside if inside else None}))


def fit_rate(args: argparse.Namespace, out: Path) -> float | None:
    cmd = [str(Path(sys.executable).with_name("transferkit")), "fit", str(args.data), "--backbone", args.backbone,
           "--no-pretrained", "--finetune", "full", "--epochs", str(args.epochs), "--patience", "0",
           "--batch-size", str(args.batch_size), "--workers", str(args.workers), "--augment", "light",
           "--precision", args.precision, "--accelerator", "gpu" if args.device == "cuda" else "cpu",
           "--out", str(out)]
    cmd += (["--image-size", str(args.image_size)] if args.image_size else [])
    cmd += (["--channels-last"] if args.channels_last else []) + (["--compile"] if args.compile else [])
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    later = json.loads((out / "report.json").read_text())["timings"]["train_epochs"][1:]  # as the hand loop
    seconds = sum(e["seconds"] for e in later)
    return sum(e["images"] for e in later) / seconds if seconds else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=SHARED / "data" / "hymenoptera")
    ap.add_argument("--backbone", default="resnet50")
    ap.add_argument("--image-size", type=int)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--precision", default="bf16-mixed")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--hand", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.hand:
        hand(args, args.hand)
        return 0
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no GPU here: gpu_throughput.py measures GPU training; nothing to do")
        return 0
    if not (args.data / "train").is_dir():
        print(f"needs DATA/train/<class>/ images: {args.data}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="gpu-throughput-") as tmp:
        res = Path(tmp) / "hand.json"
        subprocess.run([sys.executable, __file__, *sys.argv[1:], "--hand", str(res)], check=True)
        hand_rate = json.loads(res.read_text())["images_per_second"]
        fit = fit_rate(args, Path(tmp) / "fit")
    flags = f"{args.precision}" + (", channels-last" if args.channels_last else "") + (", compile" if args.compile else "")
    print(f"{args.backbone} on {args.device} ({flags}), batch {args.batch_size}, {args.workers} workers,"
          f" epochs 2..{args.epochs}:")
    print(f"  hand loop {hand_rate:.1f} images/s, transferkit fit {fit:.1f} images/s: ratio fit / hand {fit / hand_rate:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
