"""A held-out corpus of malformed input, through the command line, locally and uploaded.

The corpus is generated here, deterministically, from the committed objects of
`tests/fixtures/obj` and from hand-made bytecode: ELF files truncated at many
offsets, with corrupted header fields, section headers, symbols and
relocation records, of the wrong class, byte order or machine, or claiming
huge sizes; bytecode of the wrong length, with unknown opcodes, truncated
`lddw`, jumps and calls that land nowhere, invalid registers, broken
reserved fields; assembly text that does not assemble; random bytes. (A
division by an immediate zero is not in it: RFC 9669 defines its result.)

Every file is refused by `bpfexec run FILE` and by `bpfexec run --server ADDR
FILE` alike: exit status 2 and exactly one non-empty line on stderr, naming the
file or the pc; no traceback, no crash, no hang. (A corrupted section, symbol
or relocation can turn out harmless; such a file may run instead, cleanly and
with the same output on both sides.) The bulk runs in-process through
`bpfexec.client.cli.main`, a sample as real subprocesses. Afterwards the server still
holds the module it had and still computes the right results.
"""

from __future__ import annotations

import functools
import io
import random
import signal
import struct
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import committed_object
from elftools.elf.elffile import ELFFile
from support import free_port

from bpfexec.client import Client
from bpfexec.client.cli import main
from bpfexec.server.app import serve_in_thread
from bpfexec.server.settings import Settings
from bpfexec.vm import HelperRegistry, isa
from bpfexec.vm.isa import Instruction as I

SECONDS_PER_FILE = 10  # far above the few milliseconds each takes: a hang, not slowness

# -- ELF structure (Elf64, little-endian) -------------------------------------------------

E_TYPE, E_MACHINE, E_SHOFF, E_SHENTSIZE, E_SHNUM, E_SHSTRNDX = 16, 18, 40, 58, 60, 62
EI_CLASS, EI_DATA = 4, 5
SH = {"name": (0, "<I"), "type": (4, "<I"), "flags": (8, "<Q"), "offset": (24, "<Q"),
      "size": (32, "<Q"), "link": (40, "<I"), "info": (44, "<I"), "addralign": (48, "<Q"),
      "entsize": (56, "<Q")}  # fmt: skip
SYM_SIZE, REL_SIZE = 24, 16


def put(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    size = struct.calcsize(fmt)
    return data[:offset] + struct.pack(fmt, value) + data[offset + size :]


def sections(data: bytes) -> list[tuple[str, int, int, int]]:
    """(name, header offset, contents offset, contents size) of every section."""
    elf = ELFFile(io.BytesIO(data))
    return [
        (s.name, elf["e_shoff"] + i * elf["e_shentsize"], s["sh_offset"], s["sh_size"])
        for i, s in enumerate(elf.iter_sections())
    ]


def truncations(name: str, data: bytes, edges: bool = True) -> Iterator[tuple[str, bytes]]:
    """The object cut inside its header, at 8 even steps, and at the edges of every section."""
    cuts = {1, 4, 5, 16, 20, 40, 52, 63, 64, len(data) - 1}
    cuts |= {len(data) * k // 8 for k in range(8)}
    for _, header, offset, size in sections(data) if edges else ():
        cuts |= {header + 32, offset, offset + size - 1}
    for cut in sorted(c for c in cuts if 0 < c < len(data)):
        yield f"{name}-truncated-at-{cut}.o", data[:cut]


def header_corruptions(name: str, data: bytes) -> Iterator[tuple[str, bytes]]:
    fields = {
        "class": (EI_CLASS, "<B", (0, 1, 3)),  # none, 32-bit, invalid
        "byte-order": (EI_DATA, "<B", (0, 2)),  # none, big-endian
        "type": (E_TYPE, "<H", (0, 2, 3, 0xFFFF)),  # none, executable, shared object
        "machine": (E_MACHINE, "<H", (0, 62, 0xFFFF)),  # none, x86-64
        "shoff": (E_SHOFF, "<Q", (0, len(data), len(data) - 32, 1 << 40, (1 << 64) - 1)),
        "shnum": (E_SHNUM, "<H", (1, 0x7F, 0xFFFF)),
        "shstrndx": (E_SHSTRNDX, "<H", (0, 2, 0xFF00, 0xFFFF)),
        "shentsize": (E_SHENTSIZE, "<H", (0, 1, 65, 0xFFFF)),
    }
    for field, (at, fmt, values) in fields.items():
        for value in values:
            yield f"{name}-header-{field}-{value:#x}.o", put(data, at, fmt, value)
    # e_shnum 0 means "the count is in section 0": claim 2**40 sections there.
    extended = put(data, E_SHNUM, "<H", 0)
    yield (
        f"{name}-header-shnum-extended-huge.o",
        put(extended, sections(data)[0][1] + 32, "<Q", 1 << 40),
    )


def section_corruptions(name: str, data: bytes) -> Iterator[tuple[str, bytes]]:
    for section, header, _, size in sections(data)[1:]:
        if section == ".llvm_addrsig":
            continue
        tag = f"{name}-section-{section.strip('.').replace('.', '_') or 'unnamed'}"
        changes = {
            "offset": ((len(data), (1 << 64) - 8), "<Q"),
            "size": ((size + 8, 1 << 40), "<Q"),
            "link": ((0xFFFF,), "<I"),
            "info": ((0xFFFF,), "<I"),
            "name": ((0xFFFFFFFF,), "<I"),
            "entsize": ((1,), "<Q"),
            "type": ((8,), "<I"),  # NOBITS
            "flags": ((0x6,), "<Q"),  # executable
        }
        for field, (values, fmt) in changes.items():
            for value in values:
                at = header + SH[field][0]
                yield f"{tag}-{field}-{value:#x}.o", put(data, at, fmt, value)


def symbol_corruptions(name: str, data: bytes) -> Iterator[tuple[str, bytes]]:
    _, _, offset, size = next(s for s in sections(data) if s[0] == ".symtab")
    changes = {
        "name": (0, "<I", (0xFFFFFFF0,)),
        "info": (4, "<B", (0x12,)),  # global function
        "shndx": (6, "<H", (0, 0xFFF1, 0x7FFF)),  # undefined, absolute, no such section
        "value": (8, "<Q", (3,)),
    }
    for index in range(1, size // SYM_SIZE):
        at = offset + index * SYM_SIZE
        for field, (delta, fmt, values) in changes.items():
            for value in values:
                corrupted = put(data, at + delta, fmt, value)
                yield f"{name}-symbol-{index}-{field}-{value:#x}.o", corrupted


def relocation_corruptions(name: str, data: bytes) -> Iterator[tuple[str, bytes]]:
    for section, _, offset, size in sections(data):
        if not section.startswith(".rel"):
            continue
        for index in range(size // REL_SIZE):
            at = offset + index * REL_SIZE
            tag = f"{name}-{section.strip('.').replace('.', '_')}-{index}"
            (info,) = struct.unpack_from("<Q", data, at + 8)
            for value in (3, 1 << 40):
                yield f"{tag}-offset-{value:#x}.o", put(data, at, "<Q", value)
            for kind in (0, 3, 0xFFFFFFFF):  # NONE, ABS32, unknown
                new = (info & ~0xFFFFFFFF) | kind
                yield f"{tag}-type-{kind:#x}.o", put(data, at + 8, "<Q", new)
            new = (0xFFFF << 32) | (info & 0xFFFFFFFF)
            yield f"{tag}-symbol-0xffff.o", put(data, at + 8, "<Q", new)


def name_corruptions(name: str, data: bytes) -> Iterator[tuple[str, bytes]]:
    """Symbol and section names that are empty or hold a line break."""
    _, _, offset, size = next(s for s in sections(data) if s[0] == ".strtab")
    table = data[offset : offset + size]
    for word in table.split(b"\0"):
        if len(word) < 3 or (word.startswith(b".") and word != b".text"):
            continue
        at = offset + table.index(b"\0" + word + b"\0") + 1
        label = word.decode().strip(".").replace(".", "_")
        for tag, bytes_ in (
            ("empty", b"\0"),
            ("newline", b"\n"),
            ("line-separator", b"\xe2\x80\xa8"),
        ):
            yield f"{name}-strtab-{label}-{tag}.o", data[:at] + bytes_ + data[at + len(bytes_) :]


def elf_corpus() -> tuple[dict[str, bytes], dict[str, bytes]]:
    """(files that must be refused, files that may also load), from the committed objects.

    A truncated object or a broken ELF header can never load. Corrupted section
    names, sections, symbols or relocations can be harmless (a symbol nothing uses, a
    relocation type that happens to fit), so those files may also run.
    """
    refused: dict[str, bytes] = {}
    either: dict[str, bytes] = {}
    for base in ("example", "strings", "globals", "helper_prototypes", "multi_section"):
        data = committed_object(base).read_bytes()
        refused.update(truncations(base, data))
        if base in ("example", "globals"):
            for file, corrupted in header_corruptions(base, data):
                # Without section names (e_shstrndx 0) an object with code alone still loads.
                (either if "-shstrndx-" in file else refused)[file] = corrupted
        if base in ("strings", "globals"):
            either.update(section_corruptions(base, data))
        if base in ("globals", "helper_prototypes"):
            either.update(symbol_corruptions(base, data))
        if base != "example":
            either.update(relocation_corruptions(base, data))
        if base in ("helper_prototypes", "multi_section"):
            either.update(name_corruptions(base, data))
    debug = committed_object("local_calls", debug=True).read_bytes()
    refused.update(truncations("local_calls-g", debug, edges=False))
    return refused, either


# -- bytecode -----------------------------------------------------------------------------

EXIT = I(isa.OP_EXIT)
MOV0 = I(isa.ALU64 | isa.MOV | isa.K, 0, imm=0)


def code(*instructions: I) -> bytes:
    return isa.encode(list(instructions))


INVALID_OPCODES = (0x00, 0x08, 0x10, 0x20, 0x28, 0x40, 0x48, 0x58, 0x80, 0x8E, 0x86, 0x96,
                   0xE4, 0xE7, 0xE5, 0xEC, 0xF4, 0xF5, 0xFF, 0xDF, 0x8F, 0x98, 0xA3,
                   0xD3, 0xE1)  # fmt: skip


def bytecode_corpus() -> dict[str, bytes]:
    corpus = {f"length-{n}.bin": (code(MOV0, EXIT) * 2)[:n] for n in (1, 2, 7, 9, 15, 17, 31)}
    corpus.update(
        {f"opcode-{op:#04x}.bin": code(MOV0, I(op, 1, 2, 0, 0), EXIT) for op in INVALID_OPCODES}
    )
    lddw = isa.lddw_pair(1, 0x1122334455667788)
    corpus |= {
        "lddw-truncated.bin": code(MOV0, EXIT, lddw[0]),
        "lddw-truncated-only.bin": code(lddw[0]),
        "lddw-second-slot-opcode.bin": code(lddw[0], I(isa.OP_EXIT), MOV0, EXIT),
        "lddw-second-slot-registers.bin": code(lddw[0], I(0, 3, 4), MOV0, EXIT),
        "lddw-map-fd.bin": code(I(isa.LDDW, 1, 1), lddw[1], MOV0, EXIT),
        "lddw-src-7.bin": code(I(isa.LDDW, 1, 7), lddw[1], MOV0, EXIT),
        "lddw-into-r10.bin": code(isa.lddw_pair(10, 5)[0], lddw[1], MOV0, EXIT),
        "jump-past-end.bin": code(I(isa.OP_JA, offset=100), MOV0, EXIT),
        "jump-before-start.bin": code(MOV0, I(isa.OP_JA, offset=-5), EXIT),
        "jump-to-self-minus-2.bin": code(I(isa.OP_JA, offset=-2), EXIT),
        "jump-into-lddw.bin": code(I(isa.JMP | isa.JEQ, 1, 0, 1, 0), *lddw, MOV0, EXIT),
        "gotol-past-end.bin": code(I(isa.OP_JA32, imm=1 << 30), MOV0, EXIT),
        "gotol-negative.bin": code(I(isa.OP_JA32, imm=-(1 << 31)), EXIT),
        "jump32-past-end.bin": code(I(isa.JMP32 | isa.JGT, 1, 0, 0x7FFF, 3), MOV0, EXIT),
        "call-local-past-end.bin": code(I(isa.OP_CALL, src=1, imm=100), MOV0, EXIT),
        "call-local-before-start.bin": code(MOV0, I(isa.OP_CALL, src=1, imm=-10), EXIT),
        "call-local-into-lddw.bin": code(I(isa.OP_CALL, src=1, imm=1), *lddw, EXIT),
        "call-src-3.bin": code(I(isa.OP_CALL, src=3, imm=1), MOV0, EXIT),
        "call-src-15.bin": code(I(isa.OP_CALL, src=15, imm=1), MOV0, EXIT),
        "call-with-offset.bin": code(I(isa.OP_CALL, offset=1, imm=1), MOV0, EXIT),
        "call-unknown-helper.bin": code(I(isa.OP_CALL, imm=77), MOV0, EXIT),
        "call-helper-0xffffffff.bin": code(I(isa.OP_CALL, imm=-1), MOV0, EXIT),
        "callx-imm-register-11.bin": code(I(isa.OP_CALLX, imm=11), MOV0, EXIT),
        "exit-with-fields.bin": code(MOV0, I(isa.OP_EXIT, 1, 2, 3, 4)),
        "falls-off-the-end.bin": code(MOV0),
        "falls-off-after-jump.bin": code(I(isa.JMP | isa.JEQ, 1, 0, 1, 0), EXIT, MOV0),
        "ends-in-lddw.bin": code(MOV0, *lddw),
        "dst-register-11.bin": code(I(isa.ALU64 | isa.MOV | isa.K, 11, imm=1), EXIT),
        "dst-register-15.bin": code(I(isa.ALU64 | isa.ADD | isa.K, 15, imm=1), EXIT),
        "src-register-12.bin": code(I(isa.ALU64 | isa.MOV | isa.X, 0, 12), EXIT),
        "load-base-register-13.bin": code(I(isa.LDX | isa.MEM | isa.DW, 0, 13), EXIT),
        "store-src-register-14.bin": code(I(isa.STX | isa.MEM | isa.W, 10, 14, -8), MOV0, EXIT),
        "jump-src-register-11.bin": code(I(isa.JMP | isa.JEQ | isa.X, 0, 11, 0), MOV0, EXIT),
        "write-r10.bin": code(I(isa.ALU64 | isa.MOV | isa.K, 10, imm=0), MOV0, EXIT),
        "load-into-r10.bin": code(I(isa.LDX | isa.MEM | isa.DW, 10, 10, -8), MOV0, EXIT),
        "alu-offset-nonzero.bin": code(I(isa.ALU64 | isa.ADD | isa.K, 0, 0, 3, 1), EXIT),
        "alu-x-imm-nonzero.bin": code(I(isa.ALU64 | isa.ADD | isa.X, 0, 1, 0, 5), EXIT),
        "alu-k-src-nonzero.bin": code(I(isa.ALU64 | isa.ADD | isa.K, 0, 1, 0, 5), EXIT),
        "signed-div-offset-2.bin": code(I(isa.ALU64 | isa.DIV | isa.K, 0, 0, 2, 3), EXIT),
        "movsx-offset-24.bin": code(I(isa.ALU64 | isa.MOV | isa.X, 0, 1, 24), EXIT),
        "movsx32-from-s32.bin": code(I(isa.ALU | isa.MOV | isa.X, 0, 1, 32), EXIT),
        "neg-with-imm.bin": code(I(isa.ALU64 | isa.NEG, 0, imm=1), EXIT),
        "byte-swap-width-24.bin": code(I(isa.ALU | isa.END, 0, imm=24), EXIT),
        "bswap64-to-be.bin": code(I(isa.ALU64 | isa.END | isa.TO_BE, 0, imm=16), EXIT),
        "atomic-byte.bin": code(I(isa.STX | isa.ATOMIC | isa.B, 10, 1, -8, 0), MOV0, EXIT),
        "atomic-op-0x02.bin": code(I(isa.STX | isa.ATOMIC | isa.DW, 10, 1, -8, 2), MOV0, EXIT),
        "atomic-fetch-into-r10.bin": code(
            I(isa.STX | isa.ATOMIC | isa.DW, 1, 10, 0, isa.ATOMIC_ADD | isa.FETCH), MOV0, EXIT
        ),
        "ldxsx-dw.bin": code(I(isa.LDX | isa.MEMSX | isa.DW, 0, 10, -8), EXIT),
        "ld-abs-dw.bin": code(I(isa.LD | isa.ABS | isa.DW, 0, 0, 0, 4), EXIT),
        "ld-ind-dst.bin": code(I(isa.LD | isa.IND | isa.B, 3, 1, 0, 4), EXIT),
        "store-imm-with-src.bin": code(I(isa.ST | isa.MEM | isa.W, 10, 3, -8, 1), MOV0, EXIT),
        "zeros-64-bytes.bin": bytes(64),
        "ones-64-bytes.bin": b"\xff" * 64,
    }
    generator = random.Random(20261124)
    for n in range(40):
        size = generator.choice([8, 16, 24, 40, 64, 128, 256, 1000, 4096])
        data = bytearray(generator.randbytes(size))
        data[generator.randrange(size)] = 0  # a NUL: bytes, not text
        corpus[f"random-{n:02d}-{size}.bin"] = bytes(data)
    return corpus


ASSEMBLY = {
    "unknown-mnemonic.s": "r0 = 1\nfrobnicate r0\nexit\n",
    "register-11.s": "r11 = 1\nexit\n",
    "unknown-label.s": "goto nowhere\nexit\n",
    "immediate-too-wide.s": "r0 += 0x100000000\nexit\n",
    "duplicate-label.s": "a:\nr0 = 0\na:\nexit\n",
    "data-section.s": '.section .data,"aw"\nr0 = 0\nexit\n',
    "falls-off.s": "r0 = 1\n",
    "jump-far.s": "if r1 > 0 goto +40000\nexit\n",
    "number-huge.s": "r0 = " + "9" * 60 + " ll\nexit\n",
    "comments-only.s": "; nothing\n# at all\n",
}


@functools.cache
def corpus() -> tuple[dict[str, bytes], dict[str, bytes]]:
    """(files every run must refuse, files that may run): about 800 in all."""
    refused, either = elf_corpus()
    refused |= bytecode_corpus()
    refused |= {name: text.encode() for name, text in ASSEMBLY.items()}
    return refused, either


# What the corrupted objects call, so that they link and run as far as they can.
HELPERS = HelperRegistry()
for number, helper in enumerate(("max", "mul", "print"), start=1):
    HELPERS.register(lambda ctx, a, b, c, d, e: a ^ b, id=100 + number, name=helper)
HELPERS_SPEC = f"{__name__}:HELPERS"


# -- running them -------------------------------------------------------------------------

VALID = b"r0 = r1\nr0 *= r2\nr0 += 1\nexit\n"  # (a, b) -> a * b + 1
# r1..r5 = 0 as when no --arg is given, but said: a run reading them warns otherwise.
FUEL = ["--fuel", "100000", *["--arg", "0"] * 5]


class Hang(BaseException):
    """Raised by the alarm; a BaseException, so that the CLI's handlers cannot swallow it."""


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    def expire(signum: int, frame: object) -> None:
        raise Hang(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def check_refusal(name: str, status: int, stderr: str) -> str:
    """Exit 2 and one line on stderr that names the file or the pc; returns the line."""
    context = f"{name}: exit {status}, stderr {stderr!r}"
    assert status == 2, context
    assert "Traceback" not in stderr, context
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), context
    assert lines[0].startswith("bpfexec run: error: "), context
    assert name in lines[0] or "pc " in lines[0], context
    return lines[0]


def check_outcome(name: str, must_refuse: bool, status: int, out: str, err: str) -> str:
    """A clean refusal, or (when the file may load) a clean run: what the user sees."""
    if must_refuse or status not in (0, 3):
        return check_refusal(name, status, err)
    assert err == "", f"{name}: exit {status}, stderr {err!r}"
    assert out.startswith("return_value: "), f"{name}: {out!r}"
    return out


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with deadline(SECONDS_PER_FILE):
        status = main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("malformed")
    for files in corpus():
        for name, data in files.items():
            (directory / name).write_bytes(data)
    return directory


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    settings = Settings(
        port=free_port(),
        metrics_port=0,
        entry_point_helpers=False,
        helpers=(HELPERS_SPEC,),
        engine="interpreter",
    )
    with serve_in_thread(settings) as running:
        yield running.address


def check_server(client: Client, kept: str) -> None:
    """The module `kept` is still there and right, and a new upload runs right."""
    assert kept in {module.id for module in client.list_modules()}
    assert client.get_module(kept).id == kept
    assert client.execute(kept, None, [6, 7]).return_value == 43
    module = client.load(VALID + b"; again\n", "again.s")
    assert client.execute(module, None, [2, 3]).return_value == 7


def test_the_corpus_is_varied() -> None:
    refused, either = corpus()
    assert 600 < len(refused) + len(either) < 1200
    kinds = {name.split("-")[1] for name in [*refused, *either] if name.endswith(".o")}
    assert {"truncated", "header", "section", "symbol", "rel_text", "strtab"} <= kinds
    assert len([name for name in refused if name.endswith((".bin", ".s"))]) > 100


def test_each_file_is_refused_alike_locally_and_uploaded(
    server: str, corpus_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    refused, either = corpus()
    with Client(server, timeout=10) as client:
        kept = client.load(VALID, "valid.s").id
        check_server(client, kept)
        loaded = 0
        for name in [*refused, *either]:
            path = str(corpus_dir / name)
            local = run_cli(["run", path, *FUEL, "--helpers", HELPERS_SPEC], capsys)
            remote = run_cli(["run", path, *FUEL, "--server", server], capsys)
            seen = check_outcome(name, name in refused, *local)
            assert check_outcome(name, name in refused, *remote) == seen, name
            loaded += local[0] != 2
        check_server(client, kept)
    # Some corruptions were harmless: those files ran, alike on both sides.
    assert 0 < loaded < len(either)


def test_a_file_name_with_a_line_break(
    server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The name starts most messages: escaped, it keeps them on one line, on both sides."""
    path = tmp_path / "two\nlines.bin"
    path.write_bytes(b"\x95\0\0")
    for where in ([], ["--server", server]):
        status, _, stderr = run_cli(["run", str(path), *where], capsys)
        assert "two\\nlines.bin: raw bytecode length 3" in check_refusal(
            "two\\nlines.bin", status, stderr
        )


def test_subprocesses(server: str, corpus_dir: Path) -> None:
    """A sample as the user runs it: a fresh process, locally and uploaded."""
    refused, _ = corpus()
    names = sorted(refused)
    sample = names[:: len(names) // 4]
    commands = [
        [sys.executable, "-m", "bpfexec.client.cli", "run", str(corpus_dir / name), *where]
        for name in sample
        for where in ([], ["--server", server])
    ]
    procs = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for command in commands
    ]
    for command, proc in zip(commands, procs, strict=True):
        try:
            _, stderr = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            pytest.fail(f"{command}: no answer within 60 s")
        check_refusal(Path(command[4]).name, proc.returncode, stderr)
    with Client(server, timeout=10) as client:
        module = client.load(VALID, "valid.s")
        assert client.execute(module, None, [6, 7]).return_value == 43
