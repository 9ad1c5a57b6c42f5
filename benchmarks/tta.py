"""Cost of test-time augmentation: ten-crop evaluation over plain evaluation, measured side by side.

Three ways to evaluate the same model on the same images, taking turns ``--repeats`` times (median):

- plain: the center crop, one forward pass per batch (the baseline, ratio 1);
- ten-crop, batched: ``TTA("ten-crop").predict_proba``, all ten views in one forward pass;
- ten-crop, batched, sized: the same, over batches of batch // 10 images, so that one pass holds
  about `batch` views, as `transferkit evaluate` batches them;
- ten-crop, naive loop: the same ten views, one forward pass per view.

Batched views should cost about ten times plain, not more. Weights are random (timing only).

    python benchmarks/tta.py [--model mobilenetv3_small_100] [--images 32] [--batch 16]
"""
from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch

from transferkit.augment.tta import TTA, merge_probs, prepared_size


def _naive_ten_crop(model, x, tta: TTA) -> torch.Tensor:
    views = tta.views(x).split(x.shape[0])  # the same views, one forward pass each
    probs = [torch.softmax(model(view), -1) for view in views]
    return merge_probs(torch.stack(probs), "mean")


def _time_interleaved(fns: dict, loader, repeats: int, sync) -> dict[str, float]:
    """Median seconds per pass over ``loader`` for each function. The methods take turns within
    each repeat, so load from other processes on a shared machine hits all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            with torch.inference_mode():
                for x in loader:
                    fn(x)
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenetv3_small_100")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    torch.manual_seed(0)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    model = timm.create_model(args.model, pretrained=False, num_classes=10).eval().to(device)
    side = prepared_size(args.size)  # what tta_prepare hands over: 256 px for 224
    images = torch.randn(args.images, 3, *side, device=device)
    loader = list(images.split(args.batch))

    plain, ten = TTA("plain", args.size), TTA("ten-crop", args.size)
    fns = {
        "plain": lambda x: plain.predict_proba(model, x),
        "batched": lambda x: ten.predict_proba(model, x),
        "naive": lambda x: _naive_ten_crop(model, x, ten),
        # what `transferkit evaluate` does: loader batches of batch // views images, so each
        # single forward pass holds about `batch` views
        "sized": lambda x: torch.cat([ten.predict_proba(model, c)
                                      for c in x.split(max(1, args.batch // ten.num_views))]),
    }
    _time_interleaved(fns, loader[:1], 1, sync)  # warm-up: allocations, kernel choice
    median = _time_interleaved(fns, loader, args.repeats, sync)
    base, batched, naive, sized = median["plain"], median["batched"], median["naive"], median["sized"]

    print(
        f"{args.model}, {args.images} images of {side[0]} px -> {args.size} px, batch {args.batch}, "
        f"{device}, {torch.get_num_threads()} threads, median of {args.repeats}"
    )
    print(f"{'method':<28}{'forward passes / batch':>24}{'time / plain':>14}")
    print(f"{'plain (baseline)':<28}{1:>24}{1.0:>14.2f}")
    print(f"{'ten-crop, batched (TTA)':<28}{1:>24}{batched / base:>14.2f}")
    print(f"{'ten-crop, batched, sized':<28}{1:>24}{sized / base:>14.2f}")
    print(f"{'ten-crop, naive loop':<28}{10:>24}{naive / base:>14.2f}")
    print(f"{'batched / naive':<28}{'':>24}{batched / naive:>14.2f}")


if __name__ == "__main__":
    main()
