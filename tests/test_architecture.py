"""The import rule of docs/architecture.md: each layer imports only the layers it
may, wherever the import is (module level or inside a function)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Folder of the repository (and module, for the command line) -> the bpfexec
# packages its imports may name: docs/architecture.md's table.
VM = {"bpfexec.vm"}
LIBRARY = {"bpfexec._pb", "bpfexec.client"}
ALLOWED: dict[str, set[str]] = {
    "vm": VM | {"bpfexec"},  # vm/jit/worker.py finds the import root through `bpfexec`
    "server": VM | {"bpfexec._pb", "bpfexec.server"},
    "client": LIBRARY,
    "client/cli.py": VM | LIBRARY | {"bpfexec", "bpfexec.server"},
    "client/cli_remote.py": VM | LIBRARY | {"bpfexec.server"},
    "client/cli_batch.py": VM | LIBRARY,  # --inputs runs locally too
    "client/cli_test_run.py": VM | LIBRARY,  # test-run runs packet programs locally
    "client/capture_chunks.py": VM | LIBRARY,  # ...reading its capture natively for it
    "bpfexec": {"bpfexec.client"},  # __main__: the command line
}


def layer(path: Path) -> str:
    relative = path.relative_to(ROOT).as_posix()
    return relative if relative in ALLOWED else relative.split("/", 1)[0]


def imports(path: Path) -> list[tuple[int, str, bool]]:
    """(line, bpfexec package imported, at module level) of every import in `path`."""
    tree = ast.parse(path.read_text(), str(path))
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name == "bpfexec" or name.startswith("bpfexec."):
                found.append((node.lineno, name, id(node) in top))
    return found


def package(name: str) -> str:
    """The package of the table a dotted name falls in (`bpfexec.vm.jit.x` -> `bpfexec.vm`)."""
    parts = name.split(".")
    if len(parts) == 1 or parts[1] not in ("vm", "server", "client", "_pb"):
        return "bpfexec"
    return ".".join(parts[:2])


SOURCES = sorted(
    path
    for folder in ("vm", "server", "client", "bpfexec")
    for path in (ROOT / folder).rglob("*.py")
    if "_pb" not in path.relative_to(ROOT).parts
)


def test_every_layer_has_modules() -> None:
    assert {layer(path) for path in SOURCES} == set(ALLOWED)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_imports_follow_the_layers(path: Path) -> None:
    allowed = ALLOWED[layer(path)]
    wrong = [
        f"{path.relative_to(ROOT)}:{line}: imports {name}"
        for line, name, _ in imports(path)
        if package(name) not in allowed
    ]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize(
    "path",
    [p for p in SOURCES if layer(p) == "vm" and "jit" not in p.relative_to(ROOT).parts],
    ids=lambda p: p.relative_to(ROOT).as_posix(),
)
def test_only_the_jit_imports_the_jit_at_import_time(path: Path) -> None:
    # llvmlite is optional: the rest of the VM imports the JIT when asked for it.
    eager = [
        f"{path.relative_to(ROOT)}:{line}: imports {name} at import time"
        for line, name, top in imports(path)
        if top and name.startswith("bpfexec.vm.jit")
    ]
    assert not eager, "\n".join(eager)


def test_the_rule_catches_a_wrong_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from bpfexec.server.cache import ModuleCache\n")
    found = [entry for entry in imports(bad) if entry[1].endswith("cache")]
    assert found == [(2, "bpfexec.server.cache", False)]
    assert package("bpfexec.server.cache") not in ALLOWED["vm"]
