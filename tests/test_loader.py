"""Loading: ELF objects from clang, raw bytecode, and every input the loader must refuse.

Running programs is not tested here; only what `bpfexec.vm.loader.load` builds (functions,
relocations, helper calls, data images, line info) and what it rejects.
"""

from __future__ import annotations

import io
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from conftest import C_SOURCES, CLANG, CompileC, clang_flags, committed_object
from elftools.elf.elffile import ELFFile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bpfexec.vm import isa
from bpfexec.vm.errors import LimitError, LoadError
from bpfexec.vm.isa import Instruction
from bpfexec.vm.limits import Limits
from bpfexec.vm.loader import load
from bpfexec.vm.memory import DATA_BASE, RODATA_BASE
from bpfexec.vm.program import HelperRef, Program, content_id

FIXTURES = sorted(path.stem for path in C_SOURCES.glob("*.c"))
OPTIMIZATIONS = ["-O0", "-O1", "-O2", "-O3"]
needs_clang = pytest.mark.skipif(CLANG is None, reason="clang is not installed")


def load_fixture(compile_c: CompileC, name: str, opt: str = "-O2", debug: bool = False) -> Program:
    path = compile_c(name, opt, debug)
    return load(path.read_bytes(), path.name)


def compile_source(tmp_path: Path, source: str, target: str = "bpf") -> bytes:
    """An object built from C text written in the test (needs clang)."""
    if CLANG is None:
        pytest.skip("clang is not installed")
    c_file = tmp_path / "input.c"
    c_file.write_text("#include <stdint.h>\n" + source)
    out = tmp_path / "input.o"
    flags = clang_flags("-O2", False)
    flags[flags.index("-target") + 1] = target
    subprocess.run([CLANG, *flags, "-c", str(c_file), "-o", str(out)], check=True)
    return out.read_bytes()


def call_targets(program: Program) -> dict[int, str]:
    """pc of each local call -> name of the function it lands on."""
    targets = {}
    for pc, insn in enumerate(program.instructions):
        if insn.opcode == isa.OP_CALL and insn.src == isa.CALL_LOCAL:
            fn = program.function_at(pc + 1 + insn.imm)
            assert fn is not None and fn.pc == pc + 1 + insn.imm, f"call at pc {pc} misses"
            targets[pc] = fn.name
    return targets


def lddw_values(program: Program) -> list[int]:
    code = program.instructions
    return [
        isa.lddw_value(code[pc], code[pc + 1])
        for pc in range(len(code) - 1)
        if code[pc].opcode == isa.LDDW and (pc == 0 or code[pc - 1].opcode != isa.LDDW)
    ]


def assert_one_line(error: Exception) -> str:
    text = str(error)
    assert text and "\n" not in text
    return text


# -- every fixture at every optimization level ----------------------------------------


@pytest.mark.parametrize("debug", [False, True], ids=["nodebug", "debug"])
@pytest.mark.parametrize("opt", OPTIMIZATIONS)
@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_loads(compile_c: CompileC, name: str, opt: str, debug: bool) -> None:
    path = compile_c(name, opt, debug)
    data = path.read_bytes()
    program = load(data, name)
    assert program.id == content_id(data) and program.name == name
    covered = [pc for fn in program.functions for pc in range(fn.pc, fn.pc + fn.size)]
    assert covered == list(range(len(program.instructions)))
    call_targets(program)  # every local call lands on a function start
    for pc, ref in program.helper_calls.items():
        assert program.instructions[pc].opcode == isa.OP_CALL
        assert program.instructions[pc].src == isa.CALL_HELPER
        assert ref.name is not None or ref.number is not None
    assert bool(program.lines) == debug


@pytest.mark.parametrize("name", FIXTURES)
def test_committed_objects_exist(name: str) -> None:
    for debug in (False, True):
        assert committed_object(name, debug).exists(), "run tests/fixtures/build.sh"


# -- what each fixture turns into -------------------------------------------------------

EXPECTED_FUNCTIONS = {
    "example": [("example", True)],
    "infinite_loop": [("infinite_loop", True)],
    "local_calls": [("max", True), ("foo", True), ("mul", True)],
    "helper_prototypes": [("foo", True)],
    "helper_pointers": [("foo", True)],
    "globals": [("greeting_byte", True), ("bump", True), ("first_letter", True)],
    "multi_section": [("add_one", False), ("entry", True), ("twice", True), ("entry2", True)],
    "loops": [("sum", True), ("fib_iter", True), ("fib_rec", True), ("byte_sum", True)],
    "strings": [("hello", True)],
}


@pytest.mark.parametrize("name", sorted(EXPECTED_FUNCTIONS))
def test_functions(compile_c: CompileC, name: str) -> None:
    program = load_fixture(compile_c, name)
    assert [(fn.name, fn.exported) for fn in program.functions] == EXPECTED_FUNCTIONS[name]


@pytest.mark.parametrize(
    ("name", "helpers"),
    [
        ("helper_prototypes", [HelperRef(name="max"), HelperRef(name="mul")]),
        ("helper_pointers", [HelperRef(number=1), HelperRef(number=42)]),
        ("strings", [HelperRef(name="print"), HelperRef(name="print")]),
        ("local_calls", []),
        ("multi_section", []),
    ],
)
def test_helper_calls(compile_c: CompileC, name: str, helpers: list[HelperRef]) -> None:
    program = load_fixture(compile_c, name)
    assert [program.helper_calls[pc] for pc in sorted(program.helper_calls)] == helpers


@pytest.mark.parametrize(
    ("name", "calls"),
    [
        # The seed's listing: foo calls max (defined before) and mul (after).
        ("local_calls", {"max", "mul"}),
        ("loops", {"fib_rec"}),
        # Calls across sections, by named symbol and by section symbol + addend.
        ("multi_section", {"add_one", "twice"}),
    ],
)
def test_local_calls(compile_c: CompileC, name: str, calls: set[str]) -> None:
    program = load_fixture(compile_c, name)
    assert set(call_targets(program).values()) == calls


def test_calls_across_sections_land_on_the_right_function(compile_c: CompileC) -> None:
    program = load_fixture(compile_c, "multi_section")
    by_caller: dict[str, list[str]] = {}
    for pc, callee in call_targets(program).items():
        caller = program.function_at(pc)
        assert caller is not None
        by_caller.setdefault(caller.name, []).append(callee)
    assert by_caller == {
        "entry": ["twice", "add_one"],
        "twice": ["add_one"],
        "entry2": ["add_one", "twice"],
    }


def test_global_data_images(compile_c: CompileC) -> None:
    program = load_fixture(compile_c, "globals")
    assert program.rodata.startswith(b"hello, eBPF\0")
    # .data (counter = 40, greeting_ptr -> greeting) then .bss (zeroed), 8-aligned.
    counter = (40).to_bytes(8, "little")
    pointer = RODATA_BASE.to_bytes(8, "little")
    assert len(program.data) == 24
    assert sorted([program.data[0:8], program.data[8:16]]) == sorted([counter, pointer])
    assert program.data[16:] == bytes(8)
    # greeting, counter, zeroed, greeting_ptr
    assert set(lddw_values(program)) == {RODATA_BASE, DATA_BASE, DATA_BASE + 8, DATA_BASE + 16}


def test_string_literals_are_addressed_in_rodata(compile_c: CompileC) -> None:
    program = load_fixture(compile_c, "strings")
    for address in lddw_values(program):
        offset = address - RODATA_BASE
        assert 0 <= offset < len(program.rodata)
    strings = [program.rodata[a - RODATA_BASE :].split(b"\0")[0] for a in lddw_values(program)]
    assert strings == [b"hello from eBPF", b"second line"]


# -- line info ------------------------------------------------------------------------


def objdump_lines(path: Path) -> dict[tuple[str, int], str]:
    """(section, slot) -> "file:line" where `llvm-objdump -dl` prints a line annotation."""
    out = subprocess.run(
        ["llvm-objdump", "-dl", str(path)], capture_output=True, text=True, check=True
    ).stdout
    found: dict[tuple[str, int], str] = {}
    section, pending = "", None
    for line in out.splitlines():
        if m := re.match(r"Disassembly of section (\S+):", line):
            section = m.group(1)
        elif m := re.match(r"; (\S+):(\d+)$", line):
            pending = f"{Path(m.group(1)).name}:{m.group(2)}"
        elif (m := re.match(r"\s+(\d+):\t", line)) and pending is not None:
            found[(section, int(m.group(1)))] = pending
            pending = None
    return found


@pytest.mark.skipif(shutil.which("llvm-objdump") is None, reason="llvm-objdump is not installed")
@pytest.mark.parametrize("opt", OPTIMIZATIONS)
@pytest.mark.parametrize("name", ["loops", "globals", "local_calls", "strings"])
def test_lines_match_llvm_objdump(compile_c: CompileC, name: str, opt: str) -> None:
    path = compile_c(name, opt, debug=True)
    program = load(path.read_bytes(), name)
    expected = objdump_lines(path)
    assert expected
    for (section, slot), location in expected.items():
        assert section == ".text"  # one section: its slots are our pcs
        assert program.lines[slot] == location, f"pc {slot}"


def source_span(source: str, function: str) -> range:
    """Lines of a function's definition: from its header to the closing brace."""
    lines = source.splitlines()
    start = next(i for i, text in enumerate(lines) if re.search(rf"\b{function}\(.*\{{\s*$", text))
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("}"))
    return range(start + 1, end + 2)


@pytest.mark.parametrize("opt", OPTIMIZATIONS)
def test_lines_of_several_sections(compile_c: CompileC, opt: str) -> None:
    # Every section starts at address 0 in an object: the loader must still put
    # each line sequence into its own section.
    program = load_fixture(compile_c, "multi_section", opt, debug=True)
    source = (C_SOURCES / "multi_section.c").read_text()
    for fn in program.functions:
        span = source_span(source, fn.name)
        for pc in range(fn.pc, fn.pc + fn.size):
            file, line = program.lines[pc].split(":")
            assert file == "multi_section.c" and int(line) in span, (fn.name, pc)


# -- raw bytecode -----------------------------------------------------------------------


def raw(*instructions: Instruction) -> bytes:
    return isa.encode(list(instructions))


EXIT = Instruction(isa.OP_EXIT)


def test_raw_bytecode_functions_and_helpers() -> None:
    code = raw(
        Instruction(isa.OP_CALL, src=isa.CALL_LOCAL, imm=3),  # -> pc 4
        Instruction(isa.OP_CALL, imm=7),
        Instruction(isa.OP_CALL, imm=-1),
        EXIT,
        Instruction(isa.OP_CALL, src=isa.CALL_LOCAL, imm=1),  # -> pc 6
        EXIT,
        EXIT,
    )
    program = load(code, "raw")
    assert [(f.name, f.pc, f.size, f.exported) for f in program.functions] == [
        ("main", 0, 4, True),
        ("fn_4", 4, 2, False),
        ("fn_6", 6, 1, False),
    ]
    assert dict(program.helper_calls) == {1: HelperRef(number=7), 2: HelperRef(number=0xFFFFFFFF)}
    assert program.id == content_id(code)


def test_raw_lddw_second_slot_is_not_a_call() -> None:
    # The second slot's imm happens to spell `call`: it is data, not code.
    first, second = isa.lddw_pair(0, 0x0000_0001_0000_0000)
    second = Instruction(isa.OP_CALL, imm=second.imm)
    with pytest.raises(LoadError):
        load(raw(first, second, EXIT))
    program = load(raw(*isa.lddw_pair(0, 1 << 40), EXIT))
    assert not program.helper_calls


# -- what must be refused ------------------------------------------------------------------


def patched(data: bytes, offset: int, value: bytes) -> bytes:
    return data[:offset] + value + data[offset + len(value) :]


def example_object() -> bytes:
    return committed_object("example").read_bytes()


def section_header_offset(data: bytes, name: str) -> int:
    elf = ELFFile(io.BytesIO(data))
    index = next(i for i, s in enumerate(elf.iter_sections()) if s.name == name)
    return elf["e_shoff"] + index * elf["e_shentsize"]


def with_unknown_relocation(data: bytes) -> bytes:
    elf = ELFFile(io.BytesIO(data))
    rel = elf.get_section_by_name(".rel.text")
    assert rel is not None
    info_at = rel["sh_offset"] + 8  # Elf64_Rel: r_offset, then r_info
    (info,) = struct.unpack_from("<Q", data, info_at)
    return patched(data, info_at, struct.pack("<Q", (info & ~0xFFFFFFFF) | 99))


REJECTED_BYTES = {
    "empty": (b"", "empty module"),
    "not a multiple of 8": (
        b"\x95\0\0\0\0\0\0\0\0\0",
        "raw bytecode length 10 is not a multiple of 8",
    ),
    "magic only": (b"\x7fELF", "corrupt or truncated ELF"),
    "header cut short": (example_object()[:40], "corrupt or truncated ELF"),
    "section headers cut off": (example_object()[:-1], "corrupt or truncated ELF"),
    "wrong machine": (
        patched(example_object(), 18, struct.pack("<H", 62)),
        "wrong machine EM_X86_64",
    ),
    "32-bit": (patched(example_object(), 4, b"\x01"), "32-bit ELF"),
    "big-endian header": (patched(example_object(), 5, b"\x02"), "big-endian"),
    "shared object": (
        patched(example_object(), 16, struct.pack("<H", 3)),
        "ET_DYN is not supported",
    ),
    "unknown relocation": (
        with_unknown_relocation(committed_object("strings").read_bytes()),
        "unknown relocation type 99 in '.rel.text' at offset 0x0 of '.text'",
    ),
}


@pytest.mark.parametrize(("data", "message"), REJECTED_BYTES.values(), ids=REJECTED_BYTES.keys())
def test_rejected_bytes(data: bytes, message: str) -> None:
    with pytest.raises(LoadError) as caught:
        load(data, "input.o")
    assert message in assert_one_line(caught.value)


@pytest.mark.parametrize("cut", [4, 16, 52, 64, 100, 200, 400, 560])
def test_truncated_objects_are_load_errors(cut: int) -> None:
    for data in (example_object(), committed_object("loops", debug=True).read_bytes()):
        with pytest.raises(LoadError) as caught:
            load(data[:cut], "input.o")
        assert_one_line(caught.value)


def test_huge_bss_is_a_limit_error() -> None:
    data = committed_object("globals").read_bytes()
    size_at = section_header_offset(data, ".bss") + 32  # Elf64_Shdr.sh_size
    with pytest.raises(LimitError, match=r"image of \d+ bytes exceeds the limit"):
        load(patched(data, size_at, struct.pack("<Q", 1 << 40)))


def test_truncated_code_section() -> None:
    data = example_object()
    size_at = section_header_offset(data, ".text") + 32
    with pytest.raises(LoadError, match="truncated"):
        load(patched(data, size_at, struct.pack("<Q", 1 << 20)))


REJECTED_SOURCES = {
    "maps section": (
        'struct { int type; } m __attribute__((section("maps")));\nuint64_t f(void) { return 0; }',
        "map 'm': unknown type 0 is not supported",
    ),
    "BTF maps section": (
        'struct { int type; } m __attribute__((section(".maps")));\nuint64_t f(void) { return 0; }',
        "section '.maps' needs the object's BTF to read its map definitions (compile with -g)",
    ),
    "extern variable": (
        "extern uint64_t ext;\nuint64_t f(void) { return ext; }",
        "refers to symbol 'ext', undefined",
    ),
    "unsupported section": (
        'char lic[] __attribute__((section("license"))) = "GPL";\n'
        "uint64_t f(void) { return lic[0]; }",
        "in unsupported section 'license'",
    ),
    "function pointer in data": (
        "uint64_t f(uint64_t x) { return x; }\nuint64_t (*fp)(uint64_t) = f;",
        "takes the address of 'f' in '.text' (function pointers are callbacks of the kernel's "
        "helpers, in objects with maps or a license)",
    ),
    "no code": ("const int x = 1;", "no code"),
}


@pytest.mark.parametrize(
    ("source", "message"), REJECTED_SOURCES.values(), ids=REJECTED_SOURCES.keys()
)
def test_rejected_sources(tmp_path: Path, source: str, message: str) -> None:
    with pytest.raises(LoadError) as caught:
        load(compile_source(tmp_path, source), "input.o")
    assert message in assert_one_line(caught.value)


@needs_clang
def test_big_endian_object(tmp_path: Path) -> None:
    data = compile_source(tmp_path, "uint64_t f(void) { return 1; }", target="bpfeb")
    with pytest.raises(LoadError, match="big-endian ELF file"):
        load(data, "input.o")


# -- limits -------------------------------------------------------------------------------


def test_module_size_limit() -> None:
    data = example_object()
    with pytest.raises(LimitError, match=f"module of {len(data)} bytes exceeds"):
        load(data, limits=Limits(max_module_bytes=len(data) - 1))
    load(data, limits=Limits(max_module_bytes=len(data)))


@pytest.mark.parametrize("data", [example_object(), raw(EXIT, EXIT, EXIT)], ids=["elf", "raw"])
def test_instruction_limit(data: bytes) -> None:
    count = len(load(data).instructions)
    with pytest.raises(LimitError, match=f"{count} instructions exceed the limit of {count - 1}"):
        load(data, limits=Limits(max_instructions=count - 1))
    load(data, limits=Limits(max_instructions=count))


# -- hostile input never escapes as anything but a load or limit error ----------------------

ALLOWED = (LoadError, LimitError)  # VerifyError is a LoadError


def load_or_refuse(data: bytes) -> None:
    try:
        load(data, "fuzz")
    except ALLOWED as error:
        assert_one_line(error)


@settings(max_examples=300, deadline=None)
@given(st.tuples(st.binary(max_size=128), st.binary(max_size=128)).map(b"\0".join))
def test_random_bytes(data: bytes) -> None:
    # A NUL keeps the bytes off the assembly-text path, which the assembler's tests cover.
    load_or_refuse(data)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.builds(
            Instruction,
            opcode=st.integers(0, 255),
            dst=st.integers(0, 15),
            src=st.integers(0, 15),
            offset=st.integers(-4, 4),
            imm=st.integers(-4, 70),
        ),
        min_size=1,
        max_size=12,
    )
)
def test_random_instructions(instructions: list[Instruction]) -> None:
    data = isa.encode(instructions)
    if b"\0" in data:
        load_or_refuse(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=512))
def test_random_bytes_after_an_elf_header(tail: bytes) -> None:
    load_or_refuse(example_object()[:64] + tail)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_objects(data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(["example", "globals", "multi_section", "strings"]))
    obj = bytearray(committed_object(name, debug=data.draw(st.booleans())).read_bytes())
    for _ in range(data.draw(st.integers(1, 8))):
        at = data.draw(st.integers(0, len(obj) - 1))
        obj[at] = data.draw(st.integers(0, 255))
    load_or_refuse(bytes(obj))
