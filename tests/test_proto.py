"""The generated code in bpfexec/_pb never drifts from proto/: regenerate and compare."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "bpfexec" / "_pb"


def _generator():
    spec = importlib.util.spec_from_file_location("generate", ROOT / "proto" / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts
    }


def test_generated_code_matches_proto(tmp_path):
    _generator().generate(tmp_path)
    fresh, committed = _tree(tmp_path), _tree(COMMITTED)
    assert sorted(fresh) == sorted(committed), "run `python proto/generate.py`"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"{stale} differ from proto/: run `python proto/generate.py`"


def test_descriptor_keeps_its_proto_path():
    from bpfexec._pb.bpfexec.v1 import executor_pb2

    assert executor_pb2.DESCRIPTOR.name == "bpfexec/v1/executor.proto"
    assert executor_pb2.DESCRIPTOR.package == "bpfexec.v1"
