"""RUN/report.html: self-contained (every picture inlined, nothing outside the file), with each
section a person reads; opened in headless Chromium with the network off, no console errors."""
from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

import transferkit
from transferkit.pipelines.evaluate.page import THUMB, write_page
from transferkit.pipelines.rundir import RunDir

FAST = dict(image_size=40, workers=0, batch_size=16, patience=0, backbone="test_resnet")
SECTIONS = ("id='data'", "id='strategy'", "id='curves'", "id='quality'", "id='losses'", "id='calibration'",
            "id='tta'", "id='config'")


@pytest.fixture(scope="module")
def run(tmp_path_factory, weights):
    """EMA, snapshots and a TTA x ensemble evaluation; a few val images coloured as another class."""
    from conftest import COLORS, color_image, make_color_folder

    root = tmp_path_factory.mktemp("page")
    data = root / "data"
    make_color_folder(data / "train", classes=("red", "blue"), per_class=16)
    make_color_folder(data / "val", classes=("red", "blue"), per_class=8, seed=1)
    rng = np.random.default_rng(1)
    for i in range(3):  # red-looking images filed under blue: misclassified, so the page shows them
        color_image(COLORS["red"], 40, rng).save(data / "val" / "blue" / f"odd_{i}.png")
    (data / "train" / "red" / "broken.png").write_bytes(b"not a png")  # left out at the scan, listed
    r = transferkit.fit(data, out=root / "run", weights=str(weights), finetune="freeze", head_solver="sgd",
                        epochs=4, ema=True, snapshots=2, **FAST)
    r.evaluate(tta="plain,hflip", ensemble="none,ema,snapshots")
    return r


def _page(run) -> str:
    return (run.path / "report.html").read_text(encoding="utf-8")


def test_the_page_has_every_section_and_nothing_from_outside(run):
    page = _page(run)
    for section in SECTIONS:
        assert section in page, section
    assert "ema" in page and "snapshots" in page and "hflip" in page  # the TTA x ensemble table
    assert "broken.png" in page and "scan" in page  # the skipped file with its stage
    assert f"transferkit fit --config {run.path / 'config.yaml'}" in page
    # Nothing outside the file: no script, stylesheet link, font, frame or URL; every picture a data URI.
    text = re.sub(r"data:image/[a-z]+;base64,[A-Za-z0-9+/=]+", "", page)
    assert not re.search(r"<script|<link|<iframe|@import|url\(|https?://|=['\"]//", text, re.I)
    sources = re.findall(r"src='([^']*)'|src=\"([^\"]*)\"", page)
    assert sources and all((a or b).startswith("data:image/") for a, b in sources)
    thumbs = [Image.open(io.BytesIO(base64.b64decode(s.split(",", 1)[1])))
              for s in (a or b for a, b in sources) if s.startswith("data:image/jpeg")]
    assert thumbs and all(max(t.size) <= THUMB for t in thumbs)
    assert len(page) < 2_000_000


def test_the_misclassified_images_are_shown_and_the_matrix_links_to_them(run):
    page = _page(run)
    worst = run.report["top_losses"]
    assert {r["path"].rsplit("/", 1)[1] for r in worst} >= {"odd_0.png", "odd_1.png", "odd_2.png"}
    for r in worst:
        assert f'title="{r["path"]}"' in page
    pair = run.report["most_confused"][0]
    anchors = re.findall(r"<a href='#(cm-\d+)'>(\d+)</a>", page)
    assert anchors and all(f"id='{a}'" in page for a, _ in anchors)
    assert pair["count"] in [int(n) for _, n in anchors]


def test_evaluate_refreshes_the_page(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run.path, copy)
    (copy / "report.html").unlink()
    (copy / "evaluation.json").unlink()
    write_page(RunDir(copy))
    assert "id='tta'" not in (copy / "report.html").read_text()  # no evaluation yet: no TTA section
    transferkit.Run(copy).evaluate(tta="plain,ten-crop")
    assert "ten-crop" in (copy / "report.html").read_text()


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip("no Chromium on this machine (`apt-get install chromium`, as .ci/run does)")


def _open(browser: str, page, tmp_path, name: str) -> tuple[str, str]:
    """Screenshot and rendered DOM of a file with every outside request failing; Chromium's log."""
    offline = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--enable-logging=stderr",
               "--v=0", "--proxy-server=http://127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND",
               f"--user-data-dir={tmp_path / 'profile'}"]
    shot = subprocess.run([browser, *offline, "--window-size=1280,4000", f"--screenshot={tmp_path / name}",
                           page.as_uri()], capture_output=True, text=True, timeout=120)
    dom = subprocess.run([browser, *offline, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                         timeout=120)
    return dom.stdout, shot.stderr + dom.stderr


def test_chromium_renders_it_offline_without_console_errors(run, tmp_path):
    browser = _chromium()
    # The check can fail: a page that logs to the console is caught.
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>console.error('broken page')</script></body></html>")
    _, log = _open(browser, bad, tmp_path, "bad.png")
    assert "CONSOLE" in log and "broken page" in log

    dom, log = _open(browser, run.path / "report.html", tmp_path, "page.png")
    assert "CONSOLE" not in log, log
    for section in ("Data", "Strategy: freeze", "Training", "Per class", "Top losses", "Calibration",
                    "Test-time augmentation", "Config"):
        assert section in dom, section
    shot = Image.open(tmp_path / "page.png")
    assert shot.size == (1280, 4000)
    assert len(set(shot.convert("L").resize((64, 200)).getdata())) > 20  # rendered, not a blank page
