"""The fuzz targets of `fuzz/` in the suite.

1. Regression: every file of `fuzz/corpus/<target>/` (the seeds and every
   finding, fixed since) goes through its target.
2. A short structure-aware search per target with hypothesis: committed
   objects with corrupted headers, section headers and bytes; instruction
   words; assembly lines; the differential suite's program generator; framed
   protocol requests.
3. When atheris is installed, a short coverage-guided run of every target.

`BPFEXEC_FUZZ_EXAMPLES=N` sets the examples of each hypothesis search
(default 40); docs/fuzzing.md has the long runs.
"""

from __future__ import annotations

import importlib.util
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import committed_object
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `fuzz` lives next to the packages, not in them
    sys.path.insert(0, str(ROOT))

from bpfexec._pb.bpfexec.v1 import executor_pb2 as pb  # noqa: E402
from bpfexec.vm import isa  # noqa: E402
from bpfexec.vm.disassembler import format_instruction  # noqa: E402
from bpfexec.vm.isa import Instruction  # noqa: E402
from bpfexec.vm.program import Function, Program  # noqa: E402
from fuzz import targets  # noqa: E402
from fuzz.targets import DELETE, EXECUTE, GET, LOAD, STREAM, encode_frames  # noqa: E402

CORPUS = ROOT / "fuzz" / "corpus"
EXAMPLES = int(os.environ.get("BPFEXEC_FUZZ_EXAMPLES", "40"))
SEARCH = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

KNOWN = {f"{known.target}/{known.reproducer}": known for known in targets.KNOWN_FAILURES}


@pytest.fixture(scope="module", autouse=True)
def stop_protocol_server() -> Iterator[None]:
    yield
    targets.ProtocolHarness.stop()


def corpus_files() -> list[Path]:
    return sorted(p for p in CORPUS.glob("*/*") if p.is_file())


def test_every_target_has_a_corpus() -> None:
    assert {p.name for p in CORPUS.iterdir() if p.is_dir()} == set(targets.TARGETS)
    assert all(any((CORPUS / name).iterdir()) for name in targets.TARGETS)
    assert sum(p.stat().st_size for p in corpus_files()) < 1 << 20


@pytest.mark.parametrize(
    "path", corpus_files(), ids=[f"{p.parent.name}/{p.name}" for p in corpus_files()]
)
def test_corpus(path: Path) -> None:
    known = KNOWN.get(f"{path.parent.name}/{path.name}")
    if known is None:
        targets.run(path.parent.name, path.read_bytes(), ignore_known=False)
        return
    with pytest.raises(targets.Finding) as finding:
        targets.run(path.parent.name, path.read_bytes(), ignore_known=False)
    assert known.matches(path.parent.name, finding.value), "another failure than the known one"
    pytest.skip(f"known failure: {known.reason}")


def test_known_failures_have_reproducers() -> None:
    for name, known in KNOWN.items():
        assert (CORPUS / name).is_file() and known.reproducer.startswith("known-failure-")
    assert {f"{p.parent.name}/{p.name}" for p in CORPUS.glob("*/known-failure-*")} == set(KNOWN)


def test_a_finding_is_reported() -> None:
    """The targets do fail: a multi-line message and a foreign exception are findings."""
    with pytest.raises(targets.Finding, match="not one non-empty line"):
        targets.check_message(ValueError("two\nlines"))
    invalid = Program((Instruction(isa.OP_CALL, src=3),), (Function("main", 0, 1),))
    with pytest.raises(targets.Finding, match="listing of a verified program does not assemble"):
        targets.check_round_trip(invalid)


# -- elf: committed objects, corrupted -------------------------------------------------

OBJECTS = ["example", "globals", "strings", "multi_section", "local_calls", "helper_prototypes"]
HEADER_FIELDS = [(4, "<B"), (5, "<B"), (16, "<H"), (18, "<H"), (40, "<Q"), (58, "<H"),
                 (60, "<H"), (62, "<H")]  # fmt: skip
SECTION_FIELDS = [(4, "<I"), (8, "<Q"), (24, "<Q"), (32, "<Q"), (40, "<I"), (44, "<I"),
                  (48, "<Q"), (56, "<Q")]  # fmt: skip
INTERESTING = st.sampled_from([0, 1, 2, 3, 7, 8, 16, 24, 64, 0x7F, 0xFF, 0xFFFF, 1 << 31,
                               0xFFFFFFFF, 1 << 40, 1 << 63, (1 << 64) - 1])  # fmt: skip


def _put(data: bytearray, offset: int, fmt: str, value: int) -> None:
    size = struct.calcsize(fmt)
    if offset + size <= len(data):
        data[offset : offset + size] = struct.pack(fmt, value & ((1 << (8 * size)) - 1))


@st.composite
def corrupted_objects(draw: st.DrawFn) -> bytes:
    name = draw(st.sampled_from(OBJECTS))
    data = bytearray(committed_object(name, debug=draw(st.booleans())).read_bytes())
    shoff, shnum = struct.unpack_from("<Q", data, 40)[0], struct.unpack_from("<H", data, 60)[0]
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["header", "section", "section", "byte", "word", "cut"]))
        if kind == "header":
            _put(data, *draw(st.sampled_from(HEADER_FIELDS)), draw(INTERESTING))
        elif kind == "section":
            at, fmt = draw(st.sampled_from(SECTION_FIELDS))
            _put(data, shoff + 64 * draw(st.integers(0, shnum)) + at, fmt, draw(INTERESTING))
        elif kind == "byte":
            _put(data, draw(st.integers(0, len(data))), "<B", draw(st.integers(0, 255)))
        elif kind == "word":
            _put(data, draw(st.integers(0, len(data))), "<Q", draw(INTERESTING))
        else:
            del data[draw(st.integers(0, len(data))) :]
    return bytes(data)


@SEARCH
@given(corrupted_objects())
def test_elf_search(data: bytes) -> None:
    targets.run("elf", data)


# -- bytecode: instruction words -------------------------------------------------------

VALID_OPCODES = sorted(
    {cls | op | src for cls in (isa.ALU, isa.ALU64) for op in range(0, 0xE0, 0x10)
     for src in (isa.K, isa.X)}
    | {cls | op | src for cls in (isa.JMP, isa.JMP32) for op in range(0, 0xE0, 0x10)
       for src in (isa.K, isa.X)}
    | {cls | mode | size for cls in (isa.LD, isa.LDX, isa.ST, isa.STX)
       for mode in (isa.IMM, isa.MEM, isa.MEMSX, isa.ATOMIC) for size in isa.SIZE_BYTES}
)  # fmt: skip
INSTRUCTIONS = st.builds(
    Instruction,
    opcode=st.one_of(st.sampled_from(VALID_OPCODES), st.integers(0, 255)),
    dst=st.one_of(st.integers(0, 10), st.integers(0, 15)),
    src=st.one_of(st.integers(0, 2), st.integers(0, 15)),
    offset=st.one_of(st.integers(-3, 3), st.sampled_from([-(1 << 15), (1 << 15) - 1, 8, 16, 32])),
    imm=st.one_of(st.integers(-3, 70), st.integers(-(1 << 31), (1 << 31) - 1)),
)


@SEARCH
@given(st.lists(INSTRUCTIONS, min_size=1, max_size=10), st.booleans(), st.binary(max_size=7))
def test_bytecode_search(code: list[Instruction], exit_last: bool, tail: bytes) -> None:
    data = isa.encode([*code, Instruction(isa.OP_EXIT)] if exit_last else code)
    targets.run("bytecode", data + (tail if len(tail) % 8 else b""))


# -- assembler: lines of text ------------------------------------------------------------

LABELS = ["a", "b", "main", "f", ".Ltmp", "max"]


@st.composite
def assembly(draw: st.DrawFn) -> str:
    lines = []
    for _ in range(draw(st.integers(1, 12))):
        kind = draw(st.sampled_from(["insn", "insn", "insn", "label", "jump", "call", "noise"]))
        if kind == "insn":
            lines.append(format_instruction(draw(INSTRUCTIONS)))
        elif kind == "label":
            lines.append(draw(st.sampled_from(LABELS)) + ":")
        elif kind == "jump":
            condition = draw(st.sampled_from(["", "if r1 > 3 ", "if w2 s< w3 ", "if r1 & 1 "]))
            lines.append(f"{condition}{draw(st.sampled_from(['goto', 'gotol']))} "
                         f"{draw(st.sampled_from([*LABELS, '+1', '-2']))}")  # fmt: skip
        elif kind == "call":
            lines.append(
                f"call {draw(st.sampled_from([*LABELS, 'helper', '7', '-1', 'local +1']))}"
            )
        else:
            lines.append(draw(st.sampled_from([".globl main", ".text", "; comment", "exit",
                                               "r0 = 1 ll", ".section .data", "\t"]))
                         + draw(st.sampled_from(["", " ", " # tail", "\r"])))  # fmt: skip
    if draw(st.booleans()):
        lines.append("exit")
    return "\n".join(lines)


@SEARCH
@given(st.one_of(assembly(), st.text(max_size=80)))
def test_assembler_search(text: str) -> None:
    targets.run("assembler", text.encode("utf-8", "surrogatepass"))


# -- engines: the differential suite's generator ---------------------------------------------

EXIT = [Instruction(isa.OP_EXIT)]
if importlib.util.find_spec("llvmlite") is not None:
    import test_differential  # needs llvmlite, as the comparison does

    ENGINE_PROGRAMS = st.one_of(
        test_differential.programs().map(lambda generated: list(generated[0].instructions)),
        st.lists(test_differential.RAW, min_size=1, max_size=10).map(lambda code: code + EXIT),
    )
else:  # the interpreter alone: the target still checks that nothing escapes
    ENGINE_PROGRAMS = st.lists(INSTRUCTIONS, min_size=1, max_size=10).map(lambda code: code + EXIT)


@SEARCH
@given(ENGINE_PROGRAMS)
def test_engines_search(code: list[Instruction]) -> None:
    targets.run("engines", isa.encode(code))


# -- protocol: framed requests ---------------------------------------------------------------

PROGRAMS = [
    b"r0 = r1\nr0 *= r2\nexit\n",
    b"r6 = r1\ncall 1\nr1 = r6\ncall mul\nr0 = *(u8 *)(r6 + 0)\nexit\n",
    b"l:\ngoto l\n",
    committed_object("example").read_bytes(),
    isa.encode([Instruction(isa.OP_CALL, imm=7), Instruction(isa.OP_EXIT)]),
    b"\x7fELF",
    b"",
    b"\x95\0\0\0",
]
TEXT = st.one_of(
    st.sampled_from(["", "foo", "main", "max", "x\ny", "sha256:00"]), st.text(max_size=8)
)
U64 = st.one_of(
    st.sampled_from([0, 1, 3, 10**6, 1 << 40, (1 << 64) - 1]), st.integers(0, (1 << 64) - 1)
)
ARGUMENTS = st.lists(
    st.one_of(
        st.builds(pb.Argument, value=U64),
        st.builds(pb.Argument, buffer=st.binary(max_size=32)),
        st.just(pb.Argument()),
    ),
    max_size=6,
)
IDS = st.one_of(st.sampled_from(["", "", "sha256:1"]), TEXT)
EXECUTES = st.builds(pb.ExecuteRequest, module_id=IDS,
                     function=TEXT, args=ARGUMENTS, fuel=U64)  # fmt: skip
CALL_IDS = st.integers(0, 4)
STREAM_MESSAGES = st.one_of(
    st.builds(pb.ExecuteStreamRequest, start=st.builds(
        pb.ExecuteStart, request=EXECUTES, helper_numbers=st.lists(st.integers(0, 50), max_size=3),
        helper_names=st.lists(TEXT, max_size=3))),
    st.builds(pb.ExecuteStreamRequest, helper_result=st.one_of(
        st.builds(pb.HelperResult, call_id=CALL_IDS, value=U64),
        st.builds(pb.HelperResult, call_id=CALL_IDS, error=TEXT),
        st.builds(pb.HelperResult, call_id=CALL_IDS))),
    st.builds(pb.ExecuteStreamRequest, memory_read=st.builds(
        pb.MemoryRead, call_id=CALL_IDS, address=U64, size=st.integers(0, 1 << 20),
        until_nul=st.booleans())),
    st.builds(pb.ExecuteStreamRequest, memory_write=st.builds(
        pb.MemoryWrite, call_id=CALL_IDS, address=U64, data=st.binary(max_size=16))),
    st.builds(pb.ExecuteStreamRequest, log=st.builds(pb.HelperLog, call_id=CALL_IDS, text=TEXT)),
    st.just(pb.ExecuteStreamRequest()),
)  # fmt: skip
FRAMES = st.one_of(
    st.tuples(
        st.just(LOAD), st.builds(pb.LoadModuleRequest, code=st.sampled_from(PROGRAMS), name=TEXT)
    ),
    st.tuples(st.just(EXECUTE), EXECUTES),
    st.tuples(st.just(STREAM), STREAM_MESSAGES),
    st.tuples(st.just(GET), st.builds(pb.GetModuleRequest, id=IDS)),
    st.tuples(st.just(DELETE), st.builds(pb.DeleteModuleRequest, id=IDS)),
    st.tuples(st.integers(0, 4), st.binary(max_size=24)),
)


@SEARCH
@given(st.lists(FRAMES, min_size=1, max_size=targets.MAX_FRAMES))
def test_protocol_search(frames: list[tuple[int, object]]) -> None:
    targets.run("protocol", encode_frames(frames))


def test_protocol_server_still_serves_afterwards() -> None:
    harness = targets.ProtocolHarness.get()
    module = harness.stub.LoadModule(pb.LoadModuleRequest(code=PROGRAMS[0]), timeout=10)
    request = pb.ExecuteRequest(module_id=module.id, args=[pb.Argument(value=6)] * 2)
    assert harness.stub.Execute(request, timeout=10).return_value == 36


# -- atheris ---------------------------------------------------------------------------------


def atheris_command(name: str, directory: Path) -> list[str]:
    """A short, seeded run of one target, its new inputs and crashes kept in `directory`."""
    (directory / "corpus").mkdir(parents=True)
    flags = ["-max_total_time=3", "-runs=500", "-seed=1", f"-artifact_prefix={directory}/"]
    return [sys.executable, "-m", "fuzz.run", name, str(directory / "corpus"), *flags]


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris not installed")
def test_atheris_runs_every_target_briefly(tmp_path: Path) -> None:
    runs = {
        name: subprocess.Popen(
            atheris_command(name, tmp_path / name),
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in targets.TARGETS
    }
    for name, proc in runs.items():
        _, stderr = proc.communicate(timeout=120)
        tail = "\n".join(stderr.splitlines()[-30:])
        assert proc.returncode == 0 and "Done" in stderr, f"{name}:\n{tail}"
        assert not list((tmp_path / name).glob("crash-*")), f"{name}:\n{tail}"
