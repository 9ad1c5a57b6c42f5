"""`transferkit predict` at scale: rows reach the CSV as their batch is predicted, memory stays
bounded over 100,000 files, corrupt files are reported in their rows, an interrupt leaves no
partial CSV."""
from __future__ import annotations

import csv
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import transferkit
from transferkit.pipelines.evaluate.prediction import predict_paths
from transferkit.pipelines.evaluate.predictor import Predictor

# The peak resident memory allowed to `transferkit predict` on 100,000 images. Importing torch and
# loading the model already take about 0.9 GB here; holding every row would come on top.
PEAK_RSS_LIMIT_MB = 1536
PER_FOLDER = 1000
DISTINCT = 256


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, weights) -> Path:
    from conftest import make_color_folder

    root = tmp_path_factory.mktemp("scale")
    data = make_color_folder(root / "data", per_class=8, size=32)
    # 16 px: the network's cost per image is a quarter of 32 px, the files stay 32 px
    transferkit.fit(data, out=root / "run", weights=str(weights), finetune="freeze", epochs=1, image_size=16,
                    workers=0, batch_size=16, patience=0, backbone="test_resnet", progress=False)
    return root / "run"


def _png(rng: np.random.Generator) -> bytes:
    from conftest import COLORS, color_image

    buf = io.BytesIO()
    color_image(list(COLORS.values())[int(rng.integers(len(COLORS)))], 32, rng).save(buf, "PNG")
    return buf.getvalue()


def image_folder(root: Path, n: int) -> tuple[list[str], set[str]]:
    """`n` 32 px image files under `root` (folders of 1,000), fast: `DISTINCT` PNGs, the rest hard
    links to them; and the corrupt ones planted among them (truncated, empty, not an image)."""
    rng = np.random.default_rng(0)
    blobs = [_png(rng) for _ in range(DISTINCT)]
    corrupt_at = {  # position -> (name, bytes)
        n // 7: ("truncated.png", blobs[0][: len(blobs[0]) // 2]),
        n // 3: ("empty.png", b""),
        n // 2: ("text.jpg", b"this is not an image\n"),
        n - 3: ("garbage.jpg", b"\xff\xd8\xff\xe0" + bytes(rng.integers(0, 256, 500, dtype=np.uint8))),
    }
    files, bad = [], set()
    first: dict[int, Path] = {}  # blob -> the file written with it, which later files link to
    for i in range(n):
        folder = root / f"{i // PER_FOLDER:03d}"
        if i % PER_FOLDER == 0:
            folder.mkdir(parents=True)
        if i in corrupt_at:
            name, body = corrupt_at[i]
            path = folder / f"{i:06d}-{name}"
            path.write_bytes(body)
            bad.add(str(path))
        else:
            path, blob = folder / f"{i:06d}.png", i % DISTINCT
            try:
                os.link(first[blob], path)
            except (KeyError, OSError):  # the blob's first file, or no hard links on this file system
                path.write_bytes(blobs[blob])
                first.setdefault(blob, path)
        files.append(str(path))
    return files, bad


def predict_in_a_process(run: Path, folder: Path, out: Path, *flags: str) -> tuple[float, float, str]:
    """`transferkit predict` as a user runs it: its wall time, the peak resident memory (MB) of the
    predicting process, and its stderr. The peak is the process's own VmHWM, read as it ends: the
    rusage of a child forked from a large test process would start at that process's size."""
    code = ("import sys\nfrom transferkit.cli.main import main\nrc = main(sys.argv[1:])\n"
            "hwm = next(ln for ln in open('/proc/self/status') if ln.startswith('VmHWM:')).split()[1]\n"
            "sys.stderr.write(f'PEAK-KB {hwm}\\n')\nsys.exit(rc)\n")
    args = [sys.executable, "-c", code, "predict", str(run), str(folder), "--out", str(out), *flags]
    log = out.with_suffix(".log")
    with log.open("w") as err:
        start = time.perf_counter()
        proc = subprocess.run(args, stdout=subprocess.DEVNULL, stderr=err)
        seconds = time.perf_counter() - start
    stderr = log.read_text()
    assert proc.returncode == 0, stderr
    peak = next(int(ln.split()[1]) for ln in stderr.splitlines() if ln.startswith("PEAK-KB "))
    return seconds, peak / 1024, stderr


def check_rows(out: Path, files: list[str], bad: set[str], classes: list[str]) -> None:
    with out.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == files  # one row per file, in the folder's order
    assert {r["path"] for r in rows if r["error"]} == bad
    for r in rows:
        if r["path"] in bad:
            assert r["error"].startswith("cannot read:") and r["label"] == "" and r["probability"] == ""
        else:
            assert r["label"] in classes and 0 < float(r["probability"]) <= 1


def _predict_and_check(run: Path, tmp_path: Path, n: int) -> tuple[float, float]:
    files, bad = image_folder(tmp_path / "images", n)
    out = tmp_path / "predictions.csv"
    seconds, peak_mb, stderr = predict_in_a_process(run, tmp_path / "images", out, "--batch-size", "256",
                                                    "--workers", "2")
    check_rows(out, files, bad, transferkit.Run(run).classes)
    assert all(f"could not read {path}" in stderr for path in bad)
    with out.open(newline="") as f:
        print(*(f"{r['path']}: {r['error']}" for r in csv.DictReader(f) if r["error"]), sep="\n")
    assert peak_mb < PEAK_RSS_LIMIT_MB, f"peak resident memory {peak_mb:.0f} MB"
    print(f"{n} images: predicted in {seconds:.1f} s ({n / seconds:.0f} images/s), peak RSS {peak_mb:.0f} MB")
    return seconds, peak_mb


def test_a_folder_with_corrupt_files_is_predicted_in_a_process(tiny_run, tmp_path):
    _predict_and_check(tiny_run, tmp_path, 2_000)


@pytest.mark.slow
def test_100k_images_stream_in_bounded_memory_with_the_corrupt_ones_in_their_rows(tiny_run, tmp_path):
    _predict_and_check(tiny_run, tmp_path, 100_000)


def _spy_on_batches(monkeypatch, out: Path, interrupt_at: int | None = None) -> list[int]:
    """Before each batch is predicted: the bytes written so far to `out`'s temporary file (-1: none)."""
    seen: list[int] = []
    real = Predictor.merged
    before = out.read_bytes() if out.exists() else None

    def merged(self, x):
        tmp = list(out.parent.glob(f".{out.name}.*.tmp"))
        seen.append(tmp[0].stat().st_size if tmp else -1)
        assert (out.read_bytes() if out.exists() else None) == before  # nothing at `out` changes meanwhile
        if len(seen) == interrupt_at:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C
        return real(self, x)

    monkeypatch.setattr(Predictor, "merged", merged)
    return seen


def test_rows_reach_the_csv_while_later_batches_are_predicted(tiny_run, tmp_path, monkeypatch):
    files, bad = image_folder(tmp_path / "images", 1_200)
    out = tmp_path / "p.csv"
    seen = _spy_on_batches(monkeypatch, out)
    predict_paths(tiny_run, [tmp_path / "images"], out, batch_size=50, workers=0, progress=False,
                  accelerator="cpu")
    assert len(seen) == 24 and seen[0] >= 0  # the temporary file is open from the first batch
    assert seen[-1] > 50_000 and seen == sorted(seen)  # written as the batches come (past the file buffer)
    check_rows(out, files, bad, transferkit.Run(tiny_run).classes)


def test_an_interrupted_predict_leaves_the_old_csv_and_no_partial_one(tiny_run, tmp_path, monkeypatch):
    image_folder(tmp_path / "images", 600)
    out = tmp_path / "p.csv"
    out.write_text("the previous predictions\n")
    seen = _spy_on_batches(monkeypatch, out, interrupt_at=3)
    with pytest.raises(KeyboardInterrupt):
        predict_paths(tiny_run, [tmp_path / "images"], out, batch_size=50, workers=0, progress=False,
                      accelerator="cpu")
    assert len(seen) == 3  # the interrupt stopped it there, not after the last batch
    assert out.read_text() == "the previous predictions\n"
    assert not list(tmp_path.glob(".p.csv.*"))
