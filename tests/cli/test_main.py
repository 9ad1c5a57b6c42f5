"""The command line stays light: help and a bad flag are answered before torch is imported."""
from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "pytorch_lightning", "timm", "sklearn", "matplotlib", "nlpaug")


def _modules_after(code: str) -> list[str]:
    probe = f"import sys\n{code}\nprint('MODULES:' + ','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("MODULES:"))
    return [m for m in line[len("MODULES:"):].split(",") if m]


def test_import_and_help_load_nothing_heavy():
    assert _modules_after("import transferkit") == []
    assert _modules_after("from transferkit.cli.main import main\ntry: main(['fit', '--help'])\n"
                          "except SystemExit: pass") == []


def test_a_bad_flag_is_one_line_and_exit_2_before_any_heavy_import(tmp_path):
    code = ("from transferkit.cli.main import main\n"
            f"rc = main(['fit', {str(tmp_path)!r}, '--epochs', '0'])\nassert rc == 2, rc")
    assert _modules_after(code) == []
    proc = subprocess.run([sys.executable, "-m", "transferkit.cli.main", "fit", str(tmp_path), "--epochs", "0"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr == "transferkit: error: --epochs: 0 is out of range; expected an integer >= 1\n"
