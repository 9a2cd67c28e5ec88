"""The code stays ruff-clean (lint and format) and mypy-clean, with the configuration
in pyproject.toml."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.skipif(importlib.util.find_spec("ruff") is None, reason="ruff is not installed")
@pytest.mark.parametrize("command", [["check"], ["format", "--check"]])
def test_ruff(command):
    proc = subprocess.run(
        [sys.executable, "-m", "ruff", *command, "--exclude", ".venv", "."],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_typecheck_root_links_the_whole_package():
    """mypy checks `bpfexec` through .typecheck/bpfexec (pyproject.toml's [tool.mypy]):
    links to bpfexec/'s entries and to the folders package-dir maps, and nothing else."""
    tomllib = pytest.importorskip("tomllib")
    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-dir"
    ]
    expected = {
        name: f"../../bpfexec/{name}"
        for name in os.listdir(ROOT / "bpfexec")
        if name != "__pycache__"
    }
    for module, folder in package_dir.items():
        parent, _, name = module.rpartition(".")
        if parent == "bpfexec":
            expected[name] = f"../../{folder}"
    root = ROOT / ".typecheck" / "bpfexec"
    found = {path.name: os.readlink(path) for path in root.iterdir() if path.is_symlink()}
    assert found == expected
    assert sorted(path.name for path in root.iterdir()) == sorted(expected)
    assert all((root / name).exists() for name in expected)  # none dangles


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy is not installed")
def test_mypy():
    proc = subprocess.run(
        [sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
