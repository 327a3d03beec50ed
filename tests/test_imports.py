"""Import direction: serving never pulls in training code or Lightning."""

from __future__ import annotations

import subprocess
import sys


def test_web_and_inference_do_not_import_training() -> None:
    code = ("import sys, pneumoscan.web, pneumoscan.inference, pneumoscan.cli, pneumoscan.evaluation; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning') "
            "or m.startswith('pneumoscan.training')]; print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
