"""What the hostile suite's modules share: the fast settings, the CLI in a real process, and
the checks every case makes of what the command printed."""
from __future__ import annotations

import csv
import textwrap
import subprocess
import sys
from pathlib import Path

FAST = ["--backbone", "test_resnet", "--no-pretrained", "--image-size", "32", "--workers", "0",
        "--batch-size", "8", "--epochs", "1", "--patience", "0"]


def error_line(err: str) -> str:
    """The one ``transferkit: error:`` line of `err`; fails on a traceback or on more than one."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("transferkit: error:")]
    assert len(lines) == 1, err
    return lines[0]


def cli(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`transferkit ARGS` in a new interpreter: only a real process shows that nothing else escapes."""
    return subprocess.run([sys.executable, "-m", "transferkit.cli.main", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=timeout, check=False)


def rows(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8", errors="surrogateescape") as f:
        return list(csv.DictReader(f))


_PLUGIN = """import os
import time

import timm
from timm.models import register_model


@register_model
def {name}(pretrained=False, **kwargs):
    for k in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(k, None)
    model = timm.create_model("test_resnet", pretrained=False, **kwargs)
    plain, calls = model.forward, [0]

    def forward(x):
{body}

    model.forward = forward
    return model
"""


def resnet_plugin(path: Path, name: str, body: str) -> Path:
    """A --backbone-plugin file registering `name`: timm's test_resnet whose forward runs `body`
    (Python with `model`, `plain` (the real forward), `calls` (a one-item counter) and `x`)."""
    indented = "\n".join("        " + ln if ln else "" for ln in textwrap.dedent(body).strip("\n").splitlines())
    path.write_text(_PLUGIN.format(name=name, body=indented))
    return path
