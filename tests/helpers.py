"""Helpers shared by test modules (plain functions; the fixtures live in ``conftest.py``)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml


def run_python(
    *args: str, root: Path, cwd: Path, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``python *args`` in a subprocess as a user runs it: in ``cwd``, with ``root`` as the data
    root (``RALIS_GYM_DATA``), one OpenMP thread, ``env`` on top.

    stdout and stderr are decoded as written: carriage returns stay (text mode would turn them into
    newlines), so a test can tell a progress bar that a terminal overwrites from a line of output.
    """
    full_env = {**os.environ, "RALIS_GYM_DATA": str(root), "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=full_env, capture_output=True, timeout=600)
    return subprocess.CompletedProcess(
        proc.args, proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
    )


def write_yaml(path: Path, data: Mapping[str, Any]) -> Path:
    """Write ``data`` as a YAML file (e.g. a ``--config`` for a script); returns ``path``."""
    path.write_text(yaml.safe_dump(dict(data)))
    return path
