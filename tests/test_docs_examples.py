"""Every example of README.md and docs/*.md, extracted from the Markdown and run as
written, so that the docs cannot drift from the code.

- Python blocks run in a subprocess, in a scratch directory that holds the files
  the docs name (and `tests/`, linked, for the fixtures an example runs): a block
  whose first line is `# NAME.py` is also the file NAME.py
  (the README's `myhelpers.py`), a C block whose first line is
  `// NAME.c — COMMAND` is NAME.c, and NAME.o is built by COMMAND (clang; without
  clang, a committed object of the same program stands in).
- Shell blocks (indented, or fenced as sh/console/...): every command must be a
  `bpfexec` command, run through the installed console script. A `$ ` prompt
  marks commands; the lines after one are its output, compared as JSON (an
  object a line) without `duration_ns`. `bpfexec serve ... &` starts a server
  the block's later commands talk to; a foreground `bpfexec serve` runs until
  it is SERVING, then gets SIGTERM and must exit 0; a usage synopsis
  (`[--flag X]`) must name flags that `--help` lists, and runs without its
  optional parts.
- C blocks compile with clang (skipped without it).
- Mermaid blocks are diagrams, not examples.

The only rewrite: the address `localhost:50051` becomes the test's server on a
free 127.0.0.1 port, and `bpfexec serve` gets `--port` and `--metrics-port` on
free ports (the defaults may be taken on a shared machine).

A block that cannot run here (a fragment, a placeholder, docker, kubectl,
grpcurl, `pip install`, hour-long runs) is marked in the Markdown by an HTML
comment just before it, `<!-- not run: REASON -->`; it shows up as a skip with
that reason. An unmarked block that cannot run fails until it is fixed or
marked. The Node.js example is run by tests/test_node_client.py.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import free_port, wait_until

from bpfexec.client.cli_remote import check_health
from bpfexec.vm import load

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
OBJECTS = ROOT / "tests" / "fixtures" / "obj"
CLANG = shutil.which("clang")
DOC_ADDRESS = "localhost:50051"
TIMEOUT = 30.0  # no single command of an example may take longer

# The installed console script next to this interpreter, else `python -m bpfexec`.
_SCRIPT = Path(sys.executable).with_name("bpfexec")
BPFEXEC = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "bpfexec"]

# Without clang, the committed object of the same C program stands in for the
# docs' own: tests/fixtures/c/helper_prototypes.c is the README's prog.c.
STAND_INS = {"prog.o": OBJECTS / "helper_prototypes-O2.o"}

SHELL = {"", "sh", "shell", "console", "bash", "indented"}
DIAGRAMS = {"mermaid"}
MARKER = re.compile(r"^\s*<!--\s*not run:\s*(?P<reason>.*?)\s*-->\s*$")
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)")
NAMED_FILE = re.compile(r"^(?:#|//)\s*(?P<name>[\w.-]+\.(?:py|c))\b(?:\s*—\s*(?P<command>.*))?")


@dataclass(frozen=True)
class Block:
    path: str  # relative to the repository root
    line: int  # of the opening fence, or of the first indented line
    lang: str  # the fence's language, "indented" for an indented block
    text: str  # dedented
    not_run: str | None  # the reason of a `<!-- not run: ... -->` marker before it

    @property
    def id(self) -> str:
        return f"{self.path}:{self.line}"

    @property
    def file_name(self) -> str | None:
        """NAME.py or NAME.c when the block's first line names the file it is."""
        match = NAMED_FILE.match(self.text)
        return match["name"] if match else None


def parse(path: Path) -> tuple[list[Block], list[str]]:
    """The code blocks of a Markdown file, and the markers that precede no block."""
    rel = path.relative_to(ROOT).as_posix()
    lines = path.read_text().splitlines()
    blocks: list[Block] = []
    orphans: list[str] = []
    marker: tuple[int, str] | None = None
    previous_blank = True
    i = 0
    while i < len(lines):
        line = lines[i]
        fence = FENCE.match(line)
        if fence:
            indent, mark = fence["indent"], fence["fence"]
            end = i + 1
            while end < len(lines) and not lines[end].strip().startswith(mark):
                end += 1
            body = "".join(f"{text.removeprefix(indent)}\n" for text in lines[i + 1 : end])
            reason = marker and marker[1]
            blocks.append(Block(rel, i + 1, fence["lang"].lower(), body, reason))
            marker, previous_blank, i = None, False, end + 1
            continue
        if line.startswith("    ") and line.strip() and previous_blank:
            end = i
            while end < len(lines) and (lines[end].startswith("    ") or not lines[end].strip()):
                end += 1
            text = textwrap.dedent("\n".join(lines[i:end])).strip("\n") + "\n"
            blocks.append(Block(rel, i + 1, "indented", text, marker and marker[1]))
            marker, previous_blank, i = None, True, end
            continue
        found = MARKER.match(line)
        if found:
            if marker:
                orphans.append(f"{rel}:{marker[0]}")
            marker, previous_blank = (i + 1, found["reason"]), True
        elif line.strip():
            if marker:
                orphans.append(f"{rel}:{marker[0]}")
            marker, previous_blank = None, False
        else:
            previous_blank = True
        i += 1
    if marker:
        orphans.append(f"{rel}:{marker[0]}")
    return blocks, orphans


PARSED = [parse(doc) for doc in DOCS]
BLOCKS = [block for blocks, _ in PARSED for block in blocks]


def test_every_marker_precedes_a_block_and_gives_a_reason():
    orphans = [orphan for _, orphans in PARSED for orphan in orphans]
    assert not orphans, f"`<!-- not run: ... -->` markers followed by no code block: {orphans}"
    assert all(block.not_run for block in BLOCKS if block.not_run is not None), "empty reason"


def test_the_docs_have_examples_to_run():
    """The parser finds the blocks: a change of style in the docs must not silently
    turn this file into a test of nothing."""
    run = [block for block in BLOCKS if block.not_run is None and block.lang not in DIAGRAMS]
    langs = {block.lang for block in run}
    assert {"python", "c", "indented"} <= langs, langs
    assert len(run) >= 8, [block.id for block in run]


# --- servers -------------------------------------------------------------------


def clean_env() -> dict[str, str]:
    """This environment without BPFEXEC_* variables, which would change the servers."""
    return {k: v for k, v in os.environ.items() if not k.startswith("BPFEXEC_")}


class Server:
    """`bpfexec serve ARGS` as a real process, on free ports, SERVING once built."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log = cwd / f"serve-{self.port}.log"
        # The only change to the documented command: free ports, not 50051 and 9090.
        command = [*BPFEXEC, "serve", *args, "--port", str(self.port)]
        command += ["--metrics-port", str(free_port())]
        with open(self.log, "w") as output:
            self.process = subprocess.Popen(
                command, cwd=cwd, stdout=output, stderr=subprocess.STDOUT, env=clean_env()
            )
        try:
            wait_until(self.serving, timeout=TIMEOUT, what=f"`bpfexec serve {shlex.join(args)}`")
        except BaseException:
            self.stop()
            raise

    def serving(self) -> bool:
        assert self.process.poll() is None, f"the server exited:\n{self.output()}"
        return check_health(self.address, timeout=0.5) == "SERVING"

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def stop(self) -> int:
        """SIGTERM, then SIGKILL if it lingers; the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(TIMEOUT)
        return self.process.returncode


class Servers:
    """Servers shared by the examples, one per `bpfexec serve` command line."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self.running: dict[tuple[str, ...], Server] = {}

    def get(self, args: list[str]) -> Server:
        key = tuple(args)
        if key not in self.running:
            self.running[key] = Server(args, self.cwd)
        return self.running[key]

    def for_block(self, text: str) -> Server:
        """A block that answers helpers itself (`helpers=` in Python, `--remote-helpers`
        on the command line) needs a server that does not have them in-process, as
        the docs say; every other runs against the README's
        `bpfexec serve --helpers myhelpers:registry`."""
        if "helpers=" in text or "--remote-helpers" in text:
            return self.get([])
        return self.get(["--helpers", "myhelpers:registry"])

    def stop(self) -> None:
        for server in self.running.values():
            server.stop()


# --- the files the examples use --------------------------------------------------


def compile_command(block: Block) -> list[str]:
    """The command in the block's first line (`// prog.c — clang ...`), else the
    usual one."""
    match = NAMED_FILE.match(block.text)
    if match and match["command"]:
        command = shlex.split(match["command"])
    else:
        command = ["clang", "-O2", "-target", "bpf", "-ffreestanding", "-c", "example.c"]
    assert command[0] == "clang", f"{block.id}: not a clang command: {command}"
    return [CLANG or "clang", *command[1:]]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with every file the docs name: NAME.py, NAME.c and NAME.o."""
    directory = tmp_path_factory.mktemp("docs-workspace")
    for block in BLOCKS:
        name = block.file_name
        if name is None:
            continue
        assert not (directory / name).exists(), f"{block.id}: a second {name}"
        (directory / name).write_text(block.text)
        if name.endswith(".c"):
            obj = name[:-2] + ".o"
            if CLANG:
                subprocess.run(
                    compile_command(block), cwd=directory, check=True, capture_output=True
                )
            else:
                shutil.copy(STAND_INS[obj], directory / obj)
    return directory


@pytest.fixture(scope="module")
def servers(workspace: Path) -> Iterator[Servers]:
    running = Servers(workspace)
    yield running
    running.stop()


def scratch(workspace: Path, tmp_path: Path) -> Path:
    """A fresh copy of the workspace for one example, and the repository's `tests/`
    (read-only by convention), whose fixtures some examples run."""
    for path in workspace.iterdir():
        if path.suffix in {".py", ".c", ".o"}:
            shutil.copy(path, tmp_path / path.name)
    (tmp_path / "tests").symlink_to(ROOT / "tests")
    return tmp_path


# --- running a block --------------------------------------------------------------


def run_python(block: Block, cwd: Path, servers: Servers) -> None:
    text = block.text
    if DOC_ADDRESS in text:
        text = text.replace(DOC_ADDRESS, servers.for_block(text).address)
    script = cwd / (block.file_name or "example.py")
    script.write_text(text)
    proc = subprocess.run(
        [sys.executable, script.name],
        cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT, env=clean_env(),
    )  # fmt: skip
    assert proc.returncode == 0, f"{block.id} failed:\n{proc.stdout}{proc.stderr}"


def run_c(block: Block, tmp_path: Path) -> None:
    if CLANG is None:
        pytest.skip("clang is not installed")
    command = compile_command(block)
    source = block.file_name or "example.c"
    (tmp_path / source).write_text(block.text)
    proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, f"{block.id}: {shlex.join(command)}:\n{proc.stderr}"
    load((tmp_path / (source[:-2] + ".o")).read_bytes())


def shell_commands(text: str) -> list[tuple[list[str], bool, list[str]]]:
    """(words, in the background, the output shown) of each command of a shell block."""
    lines = text.replace("\\\n", " ").splitlines()
    prompted = any(line.startswith("$ ") for line in lines)
    commands: list[tuple[list[str], bool, list[str]]] = []
    for line in lines:
        if prompted and not line.startswith("$ "):
            if line.strip() and commands:
                commands[-1][2].append(line)
            continue
        words = shlex.split(line.removeprefix("$ "), comments=True)
        if not words:
            continue
        background = words[-1] == "&"
        commands.append((words[:-1] if background else words, background, []))
    return commands


def usage_flags() -> str:
    proc = subprocess.run(
        [*BPFEXEC, "serve", "--help"], capture_output=True, text=True, timeout=TIMEOUT
    )
    return proc.stdout


def run_serve_briefly(args: list[str], cwd: Path) -> None:
    """A foreground `bpfexec serve`: SERVING, then SIGTERM, then exit status 0."""
    server = Server(args, cwd)
    assert server.stop() == 0, server.output()


def run_shell(block: Block, cwd: Path, servers: Servers) -> None:
    server: Server | None = None  # started by `bpfexec serve ... &` in this block
    for words, background, shown in shell_commands(block.text):
        if words[0] != "bpfexec":
            pytest.fail(
                f"{block.id}: `{shlex.join(words)}` is not a bpfexec command this test can run:"
                " make it one, or mark the block `<!-- not run: REASON -->`"
            )
        args = words[1:]
        optional = [i for i, word in enumerate(args) if word.startswith("[")]
        if optional:  # a usage synopsis: its flags exist, and it runs without them
            flags = re.findall(r"--[\w-]+", " ".join(args[optional[0] :]))
            help_text = usage_flags()
            assert flags and all(flag in help_text for flag in flags), (block.id, flags)
            args = args[: optional[0]]
        if args[0] == "serve":
            if background:
                server = servers.get(args[1:])
            else:
                run_serve_briefly(args[1:], cwd)
            continue
        assert not background, f"{block.id}: only `bpfexec serve` runs in the background"
        if any(DOC_ADDRESS in word for word in args):
            address = (server or servers.for_block(block.text)).address
            args = [word.replace(DOC_ADDRESS, address) for word in args]
        proc = subprocess.run(
            [*BPFEXEC, *args], cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT,
            env=clean_env(),
        )  # fmt: skip
        assert proc.returncode == 0, f"{block.id}: `{shlex.join(words)}`:\n{proc.stderr}"
        if shown:
            expected, actual = "\n".join(shown), proc.stdout.strip()
            if expected.startswith("{"):  # JSON, an object a line
                expected_json = [json.loads(line) for line in shown]
                actual_json = [json.loads(line) for line in actual.splitlines()]
                for line in (*expected_json, *actual_json):
                    line.pop("duration_ns", None)
                assert actual_json == expected_json, f"{block.id}: `{shlex.join(words)}`"
            else:
                assert actual == expected, f"{block.id}: `{shlex.join(words)}`"


@pytest.mark.parametrize("block", BLOCKS, ids=[block.id for block in BLOCKS])
def test_example(block: Block, workspace: Path, servers: Servers, tmp_path: Path):
    if block.not_run is not None:
        pytest.skip(f"{block.id} not run: {block.not_run}")
    if block.lang in DIAGRAMS:
        pytest.skip(f"{block.id} is a {block.lang} diagram")
    cwd = scratch(workspace, tmp_path)
    if block.lang == "python":
        run_python(block, cwd, servers)
    elif block.lang == "c":
        run_c(block, cwd)
    elif block.lang in SHELL:
        run_shell(block, cwd, servers)
    else:
        pytest.fail(
            f"{block.id}: no rule runs a {block.lang!r} block; mark it `<!-- not run: REASON -->`"
        )
