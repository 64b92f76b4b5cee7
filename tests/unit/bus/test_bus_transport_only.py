"""``bus/`` is transport only: importing every module of it pulls in neither torch nor training code."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import bus


def test_importing_every_bus_module_loads_neither_torch_nor_training() -> None:
    names = [f"bus.{m.name}" for m in pkgutil.iter_modules([str(Path(bus.__file__).parent)])]
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}: importlib.import_module(name)\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('services.train'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(bus.__file__).parent.parent)
