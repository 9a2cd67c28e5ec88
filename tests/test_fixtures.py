"""The committed objects are fit to commit: built by the fixtures' build scripts,
which keep paths of the build machine out of their debug information."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def committed_objects() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files", "*.o"], cwd=ROOT, capture_output=True, text=True, check=False
    ).stdout.split()
    return [ROOT / name for name in listed] or sorted(ROOT.glob("tests/fixtures/**/*.o"))


def test_committed_objects_name_no_directory_of_the_build_machine() -> None:
    objects = committed_objects()
    assert objects
    here = str(ROOT).encode()
    found = [str(path.relative_to(ROOT)) for path in objects if here in path.read_bytes()]
    assert found == [], "rebuild with the folder's build.sh (tests/fixtures/build_libbpf.sh)"
