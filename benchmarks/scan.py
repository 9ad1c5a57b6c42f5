"""How fast `scan_folder` checks a large folder of small images, against listing it alone.

    python benchmarks/scan.py                    # 100,000 images of 32x32 px in 10 classes
    python benchmarks/scan.py --n 20000 --dir /tmp/scan-bench

The folder is generated once (PNG and JPEG alternating) and cached under --dir; a few broken
files are planted so that the scan has something to find. One table compares, in the same run:

- listing: os.walk over the folder, the least any scan must do;
- scan_folder: listing + decoding every image (what `transferkit fit` runs first);
- PIL loop: a hand-written sequential `Image.open(p).load()` over every file, the baseline a
  user would write;
- thread pool: the same checks as scan_folder spread over threads (its earlier design), which
  shows why it uses processes: decoding small files keeps the GIL busy between decoder calls.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

BAD = {"zero.jpg": b"", "text.png": b"not an image at all"}


def _make_chunk(args: tuple[str, int, int, int]) -> None:
    root, classes, start, stop = args
    rng = np.random.default_rng(start)
    for i in range(start, stop):
        cls = Path(root) / f"class_{i % classes:02d}"
        arr = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(arr).save(cls / f"{i:06d}.{'png' if i % 2 else 'jpg'}")


def generate(root: Path, n: int, classes: int = 10) -> Path:
    done = root / ".complete"
    if done.exists() and done.read_text() == str(n):
        return root
    for c in range(classes):
        (root / f"class_{c:02d}").mkdir(parents=True, exist_ok=True)
    step = 2000
    chunks = [(str(root), classes, s, min(n, s + step)) for s in range(0, n, step)]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(os.cpu_count() or 1) as pool:
        for k, _ in enumerate(pool.map(_make_chunk, chunks), 1):
            print(f"\rgenerating {root}: {min(n, k * step)}/{n}", end="", file=sys.stderr)
    for name, body in BAD.items():
        (root / "class_00" / name).write_bytes(body)
    print(f" ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    done.write_text(str(n))
    return root


def list_files(root: Path) -> int:
    count = 0
    for _, dirnames, files in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        count += sum(not f.startswith(".") for f in files)
    return count


def pil_loop(root: Path) -> int:
    bad = 0
    for dirpath, dirnames, files in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for f in files:
            if f.startswith("."):
                continue
            try:
                with Image.open(os.path.join(dirpath, f)) as im:
                    im.load()
            except (OSError, SyntaxError, ValueError):
                bad += 1
    return bad


def thread_pool(root: Path, workers: int) -> int:
    from concurrent.futures import ThreadPoolExecutor

    from transferkit.pipelines.data.images import probe_image

    paths = [os.path.join(d, f) for d, _, files in os.walk(root) for f in files if not f.startswith(".")]
    with ThreadPoolExecutor(workers) as pool:
        return sum(r is not None for r in pool.map(probe_image, paths))


def _cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def timed(fn, *args):
    """Wall seconds and the result; CPU seconds (worker processes included) go to CPU_SECONDS."""
    c0, t0 = _cpu(), time.perf_counter()
    out = fn(*args)
    wall = time.perf_counter() - t0
    CPU_SECONDS[getattr(fn, "__name__", "?")] = _cpu() - c0
    return wall, out


CPU_SECONDS: dict[str, float] = {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000, help="number of images")
    ap.add_argument("--dir", type=Path, default=None, help="cache folder (default /tmp/transferkit-scan-<n>)")
    ap.add_argument("--skip-baselines", action="store_true", help="time only listing and scan_folder")
    args = ap.parse_args()
    root = generate(args.dir or Path(f"/tmp/transferkit-scan-{args.n}"), args.n)

    from transferkit.pipelines.data.folders import scan_folder

    list_files(root)  # warm the directory cache so that every row sees the same file system state
    t_list, files = timed(list_files, root)
    def scan_folder_quiet():
        return scan_folder(root, progress=False)

    t_scan, scan = timed(scan_folder_quiet)
    found_bad = {Path(p).name for p, _ in scan.skipped}
    assert found_bad == set(BAD), f"scan_folder found {sorted(found_bad)}, planted {sorted(BAD)}"
    assert len(scan.splits["train"]) == files - len(BAD)
    rows = [("os.walk listing", t_list, "list_files"), ("scan_folder", t_scan, "scan_folder_quiet")]
    if not args.skip_baselines:
        t_pil, pil_bad = timed(pil_loop, root)
        assert pil_bad == len(BAD)
        rows.append(("PIL open+load loop", t_pil, "pil_loop"))
        workers = min(8, (os.cpu_count() or 1) * 2)
        t_threads, thread_bad = timed(thread_pool, root, workers)
        assert thread_bad == len(BAD)
        rows.append((f"thread pool ({workers})", t_threads, "thread_pool"))

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{files} files in {root} ({os.cpu_count()} CPUs, load average {load:.1f} at the end)")
    print("time x: wall time relative to the row named; CPU s: this process and its workers")
    print(f"{'method':<20} {'wall s':>8} {'files/s':>10} {'x listing':>10} {'x scan_folder':>14} {'CPU s':>7}")
    for name, t, fn in rows:
        print(f"{name:<20} {t:>8.2f} {files / t:>10.0f} {t / t_list:>10.1f} {t / t_scan:>14.2f}"
              f" {CPU_SECONDS[fn]:>7.2f}")


if __name__ == "__main__":
    main()
