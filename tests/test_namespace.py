"""One package namespace: everything is imported as `bpfexec.*`, and the server
never depends on the client.

In the repository the code of `bpfexec.vm`, `bpfexec.server` and
`bpfexec.client` lives in the top-level folders vm/, server/ and client/
(pyproject.toml's package-dir). Run from the repository root, `import vm` would
still succeed and load a second copy of the code beside `bpfexec.vm`: its own
classes, registries and caches, which `isinstance` and identity checks would
not recognise. So no file of the project may name those folders as top-level
modules, whether it imports them, runs them (`python -m vm...`) or imports them
by name at run time.
"""

from __future__ import annotations

import ast
import itertools
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

import bpfexec

ROOT = Path(__file__).resolve().parent.parent
THIS = str(Path(__file__).resolve().relative_to(ROOT))
FOLDERS = ("vm", "server", "client")  # bpfexec.vm, bpfexec.server, bpfexec.client
SKIPPED_DIRS = {".git", ".venv", "venv", "build", "dist", "node_modules", "__pycache__"}
# Python code blocks of the Markdown files, fenced and possibly indented (in a list).
CODE_BLOCK = re.compile(r"^([ \t]*)```python\n(.*?)^\1```", re.M | re.S)
# Calls whose first argument is a module name.
NAME_TAKERS = {"import_module", "__import__", "getLogger", "find_spec"}
# An import line inside a string: code a test writes to a file, a docstring example.
IMPORT_LINE = re.compile(r"\s*(?:>>> )?(?:from|import) (?:vm|server|client)\b")


def python_files() -> list[Path]:
    files = []
    for directory, subdirs, names in os.walk(ROOT):
        subdirs[:] = [d for d in subdirs if d not in SKIPPED_DIRS and not d.endswith(".egg-info")]
        files += [Path(directory, name) for name in names if name.endswith(".py")]
    return sorted(files)


def code_blocks() -> Iterator[tuple[str, str]]:
    """(where, source) of every Python code block of the project's Markdown files."""
    for path in sorted([*ROOT.glob("*.md"), *ROOT.glob("docs/**/*.md")]):
        text = path.read_text()
        for match in CODE_BLOCK.finditer(text):
            line = text.count("\n", 0, match.start()) + 2
            where = f"{path.relative_to(ROOT)}:{line}"
            yield where, textwrap.dedent(match.group(2))


def sources() -> Iterator[tuple[str, str]]:
    for path in python_files():
        yield str(path.relative_to(ROOT)), path.read_text()
    yield from code_blocks()


def _is_folder_module(name: object, folders: tuple[str, ...] = FOLDERS) -> bool:
    return isinstance(name, str) and name.split(".")[0] in folders


def top_level_uses(tree: ast.AST, strings: bool = True) -> Iterator[tuple[int, str]]:
    """(line, what) for every use of vm, server or client as a top-level module."""
    for node in ast.walk(tree):
        if strings and isinstance(node, ast.Constant) and isinstance(node.value, str):
            for line in node.value.splitlines():
                if IMPORT_LINE.match(line):
                    yield node.lineno, line.strip()
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _is_folder_module(alias.name):
                    yield node.lineno, f"import {alias.name}"
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and _is_folder_module(node.module):
                yield node.lineno, f"from {node.module} import ..."
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            first = node.args[0]
            if called in NAME_TAKERS and _is_folder_module(getattr(first, "value", None)):
                yield node.lineno, f"{called}({first.value!r})"
        elif isinstance(node, (ast.List, ast.Tuple)):  # a command line: ..., "-m", "vm.x", ...
            values = [getattr(element, "value", None) for element in node.elts]
            for option, module in itertools.pairwise(values):
                if option == "-m" and _is_folder_module(module):
                    yield node.lineno, f"-m {module}"


def test_the_checks_see_what_they_look_for():
    source = """
import vm
import server.app as app
from client.cli import main
importlib.import_module("vm.jit")
cmd = [sys.executable, "-m", "client.cli", "serve"]
from bpfexec import vm
from bpfexec.client import Client
log = logging.getLogger("bpfexec.vm.jit.runtime")
open("server.log")
path.write_text("from client import Client\\n")
"""
    found = {what for _, what in top_level_uses(ast.parse(source))}
    assert found == {
        "from client import Client",
        "import vm",
        "import server.app",
        "from client.cli import ...",
        "import_module('vm.jit')",
        "-m client.cli",
    }
    assert len(list(code_blocks())) >= 5  # README, docs/*.md: the blocks are found
    assert ROOT / "vm" / "jit" / "worker.py" in python_files()


def test_no_file_imports_the_package_folders_as_top_level_modules():
    found = [
        f"{where}:{line}: {what}"
        for where, source in sources()
        # This file's own examples are strings: only its code is checked.
        for line, what in top_level_uses(ast.parse(source, where), strings=where != THIS)
    ]
    assert not found, "import these as bpfexec.vm, bpfexec.server, bpfexec.client:\n" + "\n".join(
        found
    )


def server_modules() -> list[str]:
    return sorted(
        "bpfexec.server." + ".".join(path.relative_to(ROOT / "server").with_suffix("").parts)
        for path in (ROOT / "server").rglob("*.py")
        if path.name != "__init__.py"
    )


def test_the_server_never_imports_the_client():
    found = []
    for path in sorted((ROOT / "server").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                module = node.module or ""
                if node.level:  # relative: resolve from the module's package
                    package = ["bpfexec", *path.parent.relative_to(ROOT).parts]
                    base = package[: len(package) - node.level + 1]
                    module = ".".join([*base, module] if module else base)
                names = [module] + [f"{module}.{alias.name}" for alias in node.names]
            if any(
                name == "bpfexec.client" or name.startswith("bpfexec.client.") for name in names
            ):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not found, f"the server imports the client package: {found}"


def test_importing_the_whole_server_loads_no_client_module():
    """The same at run time, transitive imports included."""
    code = (
        "import importlib, sys\n"
        f"for name in {server_modules()!r}:\n"
        "    importlib.import_module(name)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[:2] == ['bpfexec', 'client']))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT / "tests", capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_version_and_python_m_bpfexec():
    from importlib.metadata import version

    assert bpfexec.__version__ == version("bpfexec")
    proc = subprocess.run(
        [sys.executable, "-m", "bpfexec", "--version"],
        cwd=ROOT / "tests", capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"bpfexec {bpfexec.__version__}"


def test_the_folders_are_the_installed_package():
    """The editable install maps bpfexec.vm onto vm/ (no copy elsewhere)."""
    from bpfexec import client, server, vm

    if Path(bpfexec.__file__).resolve() != ROOT / "bpfexec" / "__init__.py":
        pytest.skip("bpfexec is not an editable install of this checkout")

    for folder, module in zip(FOLDERS, (vm, server, client), strict=True):
        assert Path(module.__file__).resolve() == ROOT / folder / "__init__.py"


@pytest.mark.parametrize("name", ["nope", "__version_info__"])
def test_unknown_attributes_are_attribute_errors(name):
    with pytest.raises(AttributeError, match=name):
        getattr(bpfexec, name)
