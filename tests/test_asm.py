"""The assembler and the disassembler: round trips, llvm-objdump's text, errors.

- Every valid instruction form (generated from the `bpfexec.vm.isa` tables) prints as
  text that assembles back to the same instruction.
- The text equals what `llvm-objdump -d` prints, checked against real objects
  when clang and llvm-objdump are installed: C fixtures compiled for several CPU
  versions, and an object holding every instruction form as raw bytes.
- A pasted llvm-objdump listing assembles to the object's code.
- Bad input gives `LoadError("name:line: message")`, never another exception.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile
from hypothesis import given, settings
from hypothesis import strategies as st

from bpfexec.vm import isa
from bpfexec.vm.assembler import DEFAULT_FUNCTION, assemble
from bpfexec.vm.disassembler import disassemble, disassemble_instruction, format_instruction
from bpfexec.vm.errors import LoadError
from bpfexec.vm.isa import Instruction
from bpfexec.vm.loader import load
from bpfexec.vm.program import Function, HelperRef, Program

CLANG = shutil.which("clang")
OBJDUMP = shutil.which("llvm-objdump")
needs_llvm = pytest.mark.skipif(
    CLANG is None or OBJDUMP is None, reason="clang and llvm-objdump are not installed"
)


# -- every valid form ------------------------------------------------------------------------

IMMEDIATES = (0, 1, -1, 0x7FFFFFFF, -0x80000000)
OFFSETS = (0, 1, -1, 0x7FFF, -0x8000)


def valid_forms() -> Iterator[tuple[str, tuple[Instruction, ...]]]:
    """One or more instances of every valid instruction form, in canonical encoding."""
    for cls in (isa.ALU, isa.ALU64):
        for op in isa.ALU_NAMES:
            for imm in IMMEDIATES:
                yield f"alu{cls:x}-{op:x}-k{imm}", (Instruction(cls | op | isa.K, 3, 0, 0, imm),)
            yield f"alu{cls:x}-{op:x}-x", (Instruction(cls | op | isa.X, 3, 9, 0, 0),)
        for op in isa.SIGNED_ALU_NAMES:
            yield f"alu{cls:x}-{op:x}-signed-k", (Instruction(cls | op | isa.K, 1, 0, 1, -7),)
            yield f"alu{cls:x}-{op:x}-signed-x", (Instruction(cls | op | isa.X, 1, 2, 1, 0),)
        yield f"alu{cls:x}-neg", (Instruction(cls | isa.NEG, 7),)
        for bits in (8, 16, 32) if cls == isa.ALU64 else (8, 16):
            yield f"alu{cls:x}-movsx{bits}", (Instruction(cls | isa.MOV | isa.X, 0, 1, bits),)
        for width in (16, 32, 64):
            sources = (isa.TO_LE, isa.TO_BE) if cls == isa.ALU else (isa.TO_LE,)
            for source in sources:
                opcode = cls | isa.END | source
                yield f"end-{opcode:x}-{width}", (Instruction(opcode, 4, 0, 0, width),)
    for cls in (isa.JMP, isa.JMP32):
        for op in isa.JMP_NAMES:
            for offset in OFFSETS:
                yield f"jmp{cls:x}-{op:x}-k{offset}", (Instruction(cls | op, 1, 0, offset, -3),)
            yield f"jmp{cls:x}-{op:x}-x", (Instruction(cls | op | isa.X, 1, 10, -2, 0),)
    for offset in OFFSETS:
        yield f"ja{offset}", (Instruction(isa.OP_JA, offset=offset),)
    for imm in IMMEDIATES:
        yield f"gotol{imm}", (Instruction(isa.OP_JA32, imm=imm),)
        yield f"call{imm}", (Instruction(isa.OP_CALL, imm=imm),)
        yield f"call-local{imm}", (Instruction(isa.OP_CALL, src=isa.CALL_LOCAL, imm=imm),)
    for reg in range(isa.NUM_REGISTERS):
        yield f"callx-r{reg}", (Instruction(isa.OP_CALLX, dst=reg),)
    yield "exit", (Instruction(isa.OP_EXIT),)
    for size in isa.SIZE_NAMES:
        for offset in OFFSETS:
            yield f"ldx{size:x}{offset}", (Instruction(isa.LDX | isa.MEM | size, 2, 10, offset),)
            yield f"st{size:x}{offset}", (Instruction(isa.ST | isa.MEM | size, 10, 0, offset, -5),)
            yield f"stx{size:x}{offset}", (Instruction(isa.STX | isa.MEM | size, 1, 9, offset),)
    for size in isa.SIGNED_SIZE_NAMES:
        yield f"ldsx{size:x}", (Instruction(isa.LDX | isa.MEMSX | size, 2, 3, -4),)
    for size in (isa.W, isa.DW):
        for op in sorted(isa.ATOMIC_OPS):
            yield f"atomic{size:x}-{op:x}", (Instruction(isa.STX | isa.ATOMIC | size, 1, 2, 8, op),)
    for value in (0, 1, -1, 1 << 32, 0x8000_0000, 0x1234_5678_9ABC_DEF0, 1 << 63):
        yield f"lddw{value:#x}", isa.lddw_pair(5, value)
    for size in (isa.B, isa.H, isa.W):
        yield f"abs{size:x}", (Instruction(isa.LD | isa.ABS | size, imm=12),)
        yield f"ind{size:x}", (Instruction(isa.LD | isa.IND | size, src=3, imm=0),)


FORMS = dict(valid_forms())


def texts(instructions: tuple[Instruction, ...]) -> list[str]:
    return [disassemble_instruction(instructions, pc) for pc in range(len(instructions))]


@pytest.mark.parametrize("form", FORMS.values(), ids=FORMS.keys())
def test_every_form_round_trips(form: tuple[Instruction, ...]) -> None:
    text = "\n".join(texts(form))
    assert not text.startswith("<invalid"), text
    assert assemble(text).instructions == form, text


def test_round_trip_of_a_whole_listing() -> None:
    instructions = tuple(insn for form in FORMS.values() for insn in form)
    listing = "\n".join(line for line in texts(instructions) if line)
    assert assemble(listing).instructions == instructions


@pytest.mark.parametrize(
    ("insn", "text"),
    [
        (Instruction(0xBF, 0, 2), "r0 = r2"),
        (Instruction(0x25, 1, 0, 1, 3), "if r1 > 3 goto +1"),
        (Instruction(0x61, 0, 1, 4), "r0 = *(u32 *)(r1 + 4)"),
        (Instruction(0x7B, 10, 1, -8), "*(u64 *)(r10 - 8) = r1"),
        (Instruction(0x62, 1, 0, 0, 7), "*(u32 *)(r1 + 0) = 7"),
        (Instruction(0xBC, 0, 1), "w0 = w1"),
        (Instruction(0x04, 0, 0, 0, 1), "w0 += 1"),
        (Instruction(0x3F, 0, 1, 1), "r0 s/= r1"),
        (Instruction(0x9C, 0, 1, 1), "w0 s%= w1"),
        (Instruction(0xBF, 0, 1, 8), "r0 = (s8)r1"),
        (Instruction(0xBC, 0, 1, 16), "w0 = (s16)w1"),
        (Instruction(0x91, 0, 1, 0), "r0 = *(s8 *)(r1 + 0)"),
        (Instruction(0xDC, 0, 0, 0, 16), "r0 = be16 r0"),
        (Instruction(0xD4, 0, 0, 0, 64), "r0 = le64 r0"),
        (Instruction(0xD7, 0, 0, 0, 64), "r0 = bswap64 r0"),
        (Instruction(0x87, 0), "r0 = -r0"),
        (Instruction(0x84, 3), "w3 = -w3"),
        (Instruction(0xDB, 1, 2, 0, 0x00), "lock *(u64 *)(r1 + 0) += r2"),
        (Instruction(0xC3, 1, 2, 0, 0xA0), "lock *(u32 *)(r1 + 0) ^= w2"),
        (Instruction(0xDB, 1, 2, 0, 0x01), "r2 = atomic_fetch_add((u64 *)(r1 + 0), r2)"),
        (Instruction(0xC3, 1, 2, 0, 0x51), "w2 = atomic_fetch_and((u32 *)(r1 + 0), w2)"),
        (Instruction(0xDB, 1, 0, 0, 0xE1), "r0 = xchg_64(r1 + 0, r0)"),
        (Instruction(0xC3, 1, 3, 4, 0xE1), "w3 = xchg32_32(r1 + 4, w3)"),
        (Instruction(0xDB, 1, 2, 0, 0xF1), "r0 = cmpxchg_64(r1 + 0, r0, r2)"),
        (Instruction(0xC3, 1, 2, 0, 0xF1), "w0 = cmpxchg32_32(r1 + 0, w0, w2)"),
        (Instruction(0x05, 0, 0, 3), "goto +3"),
        (Instruction(0x06, 0, 0, 0, 3), "gotol +3"),
        (Instruction(0xCE, 1, 2, -2), "if w1 s< w2 goto -2"),
        (Instruction(0x45, 1, 0, 1, 16), "if r1 & 16 goto +1"),
        (Instruction(0x85, 0, 0, 0, 42), "call 42"),
        (Instruction(0x85, 0, 0, 0, -1), "call -1"),
        (Instruction(0x85, 0, 1, 0, -3), "call local -3"),
        (Instruction(0x85, 0, 2, 0, 42), "call runtime 42"),
        (Instruction(0x8D, 8), "callx r8"),
        (Instruction(0x8D, 0, 0, 0, 8), "callx r8"),  # clang 14 puts the register in imm
        (Instruction(0x95), "exit"),
        (Instruction(0x20, 0, 0, 0, 4), "r0 = *(u32 *)skb[4]"),
        (Instruction(0x48, 0, 2), "r0 = *(u16 *)skb[r2]"),
    ],
)
def test_syntax(insn: Instruction, text: str) -> None:
    assert format_instruction(insn) == text


def test_lddw_prints_its_value_in_decimal_like_llvm() -> None:
    pair = isa.lddw_pair(1, 1 << 32)
    assert texts(pair) == ["r1 = 4294967296 ll", ""]
    assert texts(isa.lddw_pair(1, -1)) == ["r1 = -1 ll", ""]


@pytest.mark.parametrize(
    "insn",
    [
        Instruction(0xFF),
        Instruction(0x8F),  # NEG from a register
        Instruction(0xDF, imm=16),  # bswap with the source bit
        Instruction(0xD4, imm=8),  # byte swap width 8
        Instruction(0x3F, offset=2),  # div with offset 2
        Instruction(0xBF, offset=7),  # movsx from 7 bits
        Instruction(0xBC, offset=32),  # 32-bit movsx from 32 bits
        Instruction(0x99),  # ldsx of 64 bits
        Instruction(0xDB, imm=0x02),  # unknown atomic operation
        Instruction(0xD3),  # atomic of 8 bits
        Instruction(0x85, src=3),  # call with an unknown src
        Instruction(0x86),  # call in JMP32
        Instruction(0x96),  # exit in JMP32
        Instruction(0x38),  # legacy load of 64 bits
        Instruction(0x18),  # lddw without its second slot
    ],
)
def test_invalid_instructions_print_without_raising(insn: Instruction) -> None:
    assert disassemble_instruction((insn,), 0).startswith("<invalid opcode 0x")


@settings(max_examples=3000, deadline=None)
@given(
    st.builds(
        Instruction,
        st.integers(0, 255),
        st.integers(0, 15),
        st.integers(0, 15),
        st.integers(-(1 << 15), (1 << 15) - 1),
        st.integers(-(1 << 31), (1 << 31) - 1),
    )
)
def test_any_printed_instruction_reads_back(insn: Instruction) -> None:
    """Whatever the fields, the text assembles to an instruction with the same text
    (fields the instruction ignores may differ: text cannot carry them)."""
    text = format_instruction(insn)
    if text.startswith("<invalid"):
        return
    try:
        again = assemble(text).instructions
    except LoadError as exc:  # registers 11-15 print, but are not registers
        assert re.search(r"unknown register [rw]1[1-5]", str(exc)), exc
        return
    assert format_instruction(again[0]) == text


# -- listings --------------------------------------------------------------------------------


def sample_program() -> Program:
    assembled = assemble(
        """
        foo:
            r6 = r1
            r1 = 0x100000000 ll
            call max
            call mul
            r0 += r6
            exit
        max:
            r0 = r1
            if r1 > r2 goto +1
            r0 = r2
            exit
        """
    )
    return Program(assembled.instructions, assembled.functions, helper_calls=assembled.helper_calls)


def test_listing_layout() -> None:
    listing = disassemble(sample_program())
    assert listing.splitlines()[:5] == [
        "\t.globl\tfoo",
        "0000000000000000 <foo>:",
        "       0:\tbf 16 00 00 00 00 00 00\tr6 = r1",
        "       1:\t18 01 00 00 00 00 00 00 00 00 00 00 01 00 00 00\tr1 = 4294967296 ll",
        "       3:\t85 10 00 00 03 00 00 00\tcall max",
    ]
    assert "       4:\t85 00 00 00 ff ff ff ff\tcall mul" in listing
    assert "\n\t.globl\tmax\n0000000000000038 <max>:" in listing


@pytest.mark.parametrize("raw", [True, False])
def test_listing_assembles_back(raw: bool) -> None:
    program = sample_program()
    again = assemble(disassemble(program, raw=raw))
    assert again.instructions == program.instructions
    assert again.functions == program.functions
    assert again.helper_calls == program.helper_calls


# -- the assembler's own features ------------------------------------------------------------


def test_comments_and_blank_lines() -> None:
    text = """
    ; a comment
    r0 = 1   # another
    r0 += 2  // and another

    exit ; done
    """
    assert assemble(text).instructions == (
        Instruction(0xB7, 0, 0, 0, 1),
        Instruction(0x07, 0, 0, 0, 2),
        Instruction(0x95),
    )


def test_jumps_to_labels() -> None:
    text = """
        r0 = 0
    loop:
        r0 += 1
        if r0 < 10 goto loop
        goto done
        r0 = 99
    done:
        gotol end
    end:
        exit
    """
    insns = assemble(text).instructions
    assert insns[2] == Instruction(0xA5, 0, 0, -2, 10)
    assert insns[3] == Instruction(0x05, 0, 0, 1)
    assert insns[5] == Instruction(0x06, 0, 0, 0, 0)


def test_calls_local_helper_by_name_and_by_number() -> None:
    text = """
        call max
        call mul
        call 42
        exit
    max:
        exit
    """
    result = assemble(text)
    assert result.instructions[:3] == (
        Instruction(0x85, 0, isa.CALL_LOCAL, 0, 3),
        Instruction(0x85, 0, isa.CALL_HELPER, 0, -1),
        Instruction(0x85, 0, isa.CALL_HELPER, 0, 42),
    )
    assert result.helper_calls == {1: HelperRef(name="mul"), 2: HelperRef(number=42)}
    assert result.functions == (Function(DEFAULT_FUNCTION, 0, 4), Function("max", 4, 1))


def test_function_rules() -> None:
    text = """
    add:                      ; pc 0: a function
        if r1 == 0 goto zero
        r0 = r1
        r0 += r2
        exit
    zero:                     ; after an exit, but jumped to: a plain label
        r0 = 0
        exit
    sub:                      ; after an exit and never jumped to: a function
        r0 = r1
        r0 -= r2
        goto .Lout
    .Lout:                    ; compiler-local: never a function
        exit
    """
    functions = assemble(text).functions
    assert [(fn.name, fn.pc, fn.size) for fn in functions] == [("add", 0, 6), ("sub", 6, 4)]
    assert all(fn.exported for fn in functions)


def test_globl_decides_what_is_exported() -> None:
    text = """
        .globl main
    helper:
        r0 = 1
        exit
    main:
        call helper
        exit
    """
    functions = assemble(text).functions
    assert [(fn.name, fn.exported) for fn in functions] == [("helper", False), ("main", True)]


def test_local_declares_a_function_that_is_not_exported() -> None:
    text = """
        .local main, helper
    main:
        call helper
        exit
    helper:
        if r1 == 0 goto +0
        r0 = 1
        exit
    """
    functions = assemble(text).functions
    assert [(fn.name, fn.exported) for fn in functions] == [("main", False), ("helper", False)]


# -- disasm, then load: the same program -----------------------------------------------------

C_SOURCES = Path(__file__).parent / "fixtures" / "c"
BENCH_PROGRAMS = Path(__file__).parent.parent / "bench" / "programs"
ROUND_TRIPS = [
    *(("fixture", source.stem) for source in sorted(C_SOURCES.glob("*.c"))),
    # Not the map programs: a listing has no map definitions to load back.
    *(("bench", source.stem) for source in sorted(BENCH_PROGRAMS.glob("*.c"))
      if not source.stem.startswith("maps_")),
]  # fmt: skip


def listed_program(compile_c, tmp_path: Path, kind: str, name: str) -> Program:
    if kind == "fixture":
        return load(compile_c(name).read_bytes(), f"{name}.o")
    if CLANG is None:
        pytest.skip("clang is not installed")
    obj = clang(BENCH_PROGRAMS / f"{name}.c", tmp_path / f"{name}.o", "-mcpu=v3")
    return load(obj.read_bytes(), f"{name}.o")


@pytest.mark.parametrize(("kind", "name"), ROUND_TRIPS, ids=[name for _, name in ROUND_TRIPS])
def test_a_listing_loads_back_as_the_same_program(
    compile_c, tmp_path: Path, kind: str, name: str
) -> None:
    """What `bpfexec disasm` prints, `bpfexec run` loads as the program it came from:
    every function (name, pc, size, exported or local), local calls to it, helpers
    by name and by number. Data is the exception, and the listing says so."""
    program = listed_program(compile_c, tmp_path, kind, name)
    listing = disassemble(program)
    again = load(listing.encode(), f"{name}.s")
    assert again.instructions == program.instructions
    assert again.functions == program.functions
    assert dict(again.helper_calls) == dict(program.helper_calls)
    has_data = bool(program.rodata or program.data)
    assert ("Assembly text cannot carry data" in listing) == has_data


def test_the_round_trip_cases_cover_what_a_listing_must_keep(compile_c, tmp_path: Path) -> None:
    programs = [listed_program(compile_c, tmp_path, "fixture", name) for name in
                ("local_calls", "multi_section", "helper_prototypes", "globals")]  # fmt: skip
    local_calls, multi_section, prototypes, globals_ = programs
    assert len(local_calls.functions) > 1
    assert any(insn.src == isa.CALL_LOCAL for insn in local_calls.instructions)
    assert {fn.exported for fn in multi_section.functions} == {True, False}
    assert any(ref.name for ref in prototypes.helper_calls.values())
    assert globals_.rodata and globals_.data


def test_a_program_without_entry_points_keeps_them_local() -> None:
    assembled = assemble(".local f, g\nf:\ncall g\nexit\ng:\nr0 = 1\nexit\n")
    program = Program(assembled.instructions, assembled.functions)
    local = (Function("f", 0, 2, exported=False), Function("g", 2, 2, exported=False))
    assert program.functions == local
    assert assemble(disassemble(program)).functions == local


def test_clang_s_directives_are_understood() -> None:
    text = """
        .text
        .file   "x.c"
        .globl  foo                             # -- Begin function foo
        .p2align        3
        .type   foo,@function
    foo:                                    # @foo
    # %bb.0:
        r0 = r1
        exit
    .Lfunc_end0:
        .size   foo, .Lfunc_end0-foo
        .addrsig
    """
    result = assemble(text, "x.s")
    assert result.functions == (Function("foo", 0, 2),)


def test_llvm_objdump_listing_is_accepted_as_is() -> None:
    text = """
    prog.o:\tfile format elf64-bpf

    Disassembly of section .text:

    0000000000000000 <foo>:
           0:\tbf 20 00 00 00 00 00 00\tr0 = r2
           1:\t25 01 01 00 03 00 00 00\tif r1 > 3 goto +1 <LBB0_2>
           2:\t18 00 00 00 05 00 00 00 00 00 00 00 00 00 00 00\tr0 = 5 ll

    0000000000000020 <LBB0_2>:
           4:\t95 00 00 00 00 00 00 00\texit
    """
    result = assemble(text)
    assert result.instructions == (
        Instruction(0xBF, 0, 2),
        Instruction(0x25, 1, 0, 1, 3),
        *isa.lddw_pair(0, 5),
        Instruction(0x95),
    )
    assert result.functions[0].name == "foo"


# -- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("r0 = 1\nr0 = 2\nr11 = 1\n", "prog.s:3: unknown register r11"),
        ("r0 = r12", "prog.s:1: unknown register r12"),
        ("r0 = 1\nexit\n\n\ngoto foo\n", "prog.s:5: unknown label 'foo'"),
        ("if r1 > 2 goto nowhere", "prog.s:1: unknown label 'nowhere'"),
        ("r0 = 0x1ffffffff", "prog.s:1: immediate 0x1ffffffff does not fit in 32 bits"),
        ("r0 += -0x80000001", "prog.s:1: immediate -0x80000001 does not fit in 32 bits"),
        ("r0 = 0x10000000000000000 ll", "prog.s:1: immediate 0x10000000000000000 does not fit"),
        ("r0 = *(u32 *)(r1 + 40000)", "prog.s:1: offset 40000 does not fit in 16 bits"),
        ("goto +32768", "prog.s:1: offset 32768 does not fit in 16 bits"),
        ("r0 += w1", "prog.s:1: r0 and w1: mixed 32-bit and 64-bit registers"),
        ("r0 = *(u32 *)(w1 + 0)", "prog.s:1: an address needs a 64-bit register, not w1"),
        ("w0 = (s32)w1", "prog.s:1: a 32-bit move sign-extends from s8 or s16"),
        ("r0 = *(s64 *)(r1 + 0)", "prog.s:1: no sign-extending load of s64"),
        ("lock *(u8 *)(r1 + 0) += r2", "prog.s:1: atomic operations are 32 or 64 bits wide"),
        ("r1 = -r2", "prog.s:1: negation works in place"),
        ("r1 = be16 r2", "prog.s:1: byte swaps work in place"),
        ("mov r0, 1", "prog.s:1: cannot parse 'mov r0, 1'"),
        ("x:\nx:\nexit", "prog.s:2: label 'x' already defined on line 1"),
        (".byte 1, 2", "prog.s:1: unsupported directive .byte"),
        (".section .rodata", "prog.s:1: section .rodata is not code"),
        ("; only a comment", "prog.s: no instructions"),
        ("", "prog.s: no instructions"),
    ],
)
def test_errors(text: str, message: str) -> None:
    with pytest.raises(LoadError) as caught:
        assemble(text, "prog.s")
    assert str(caught.value).startswith(message)


def test_far_jump_to_a_label_needs_gotol() -> None:
    text = "goto far\n" + "r0 = 0\n" * 40000 + "far:\nexit\n"
    with pytest.raises(LoadError, match=r"prog.s:1: label 'far' is 40000 instructions away"):
        assemble(text, "prog.s")
    assert assemble(text.replace("goto far", "gotol far")).instructions[0].imm == 40000


GRAMMAR_WORDS = [
    "r0", "r1", "w2", "r10", "r11", "w99", "=", "+=", "s/=", "s>>=", "-", "ll", "0x10", "-5",
    "*(u32 *)", "*(s8 *)", "(r1 + 4)", "(r10 - 8)", "if", "goto", "gotol", "+3", "call",
    "local", "callx", "exit", "lock", "atomic_fetch_add(", "xchg_64(", "cmpxchg32_32(", ",",
    ")", "(", "be16", "bswap64", "(s8)", "label:", ".globl", "foo", ";", "#", "\n", "\t",
    "0:", "bf 20 00 00 00 00 00 00", "0000000000000000 <f>:", "skb[", "]", "99999999999999999999",
]  # fmt: skip


@settings(max_examples=500, deadline=None)
@given(st.text())
def test_random_text_only_raises_load_error(text: str) -> None:
    with contextlib.suppress(LoadError):
        assemble(text)


@settings(max_examples=1500, deadline=None)
@given(st.lists(st.sampled_from(GRAMMAR_WORDS), max_size=20).map(" ".join))
def test_random_token_soup_only_raises_load_error(text: str) -> None:
    with contextlib.suppress(LoadError):
        assemble(text)


# -- llvm-objdump ----------------------------------------------------------------------------

# Written for this test: alu32, jmp32, local calls, helpers by prototype and by number,
# and (with -DATOMICS, cpu v3 and later) every atomic operation.
C_SOURCE = r"""
#include <stdint.h>
uint64_t mul(uint64_t a, uint64_t b);
static uint64_t (*by_number)(uint64_t) = (void *)42;

__attribute__((noinline)) static int32_t clamp(int32_t x, int32_t lo, int32_t hi) {
    return x < lo ? lo : x > hi ? hi : x;
}

uint64_t entry(uint64_t *p, uint32_t n, int64_t s) {
    uint32_t acc = 0;
    for (uint32_t i = 0; i < n; i++) acc += (acc << 3) ^ (uint32_t)p[i % 4] ^ (i >> 2);
    uint64_t old = p[1];
    __sync_fetch_and_add(p, 3);
#ifdef ATOMICS
    old += __sync_fetch_and_or(p + 1, 5);
    __sync_fetch_and_xor((uint32_t *)(p + 2), n);
    old += __sync_val_compare_and_swap(p + 3, old, s);
    old += __atomic_exchange_n(p, s, __ATOMIC_SEQ_CST);
#endif
    int8_t b = (int8_t)s;
    int16_t h = (int16_t)(s >> 8);
    return mul(acc, old) + clamp(b, -5, 5) + h + (s >> 3) + (uint64_t)s / 7 + (uint64_t)s % 9
         + by_number(n) + (s == 0x123456789abcLL);
}
"""


def objdump_lines(obj: Path, *options: str) -> dict[int, str]:
    """pc -> instruction text of the .text section, as llvm-objdump prints it."""
    out = subprocess.run(
        [OBJDUMP or "llvm-objdump", "-d", *options, "--section=.text", str(obj)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    lines = {}
    for line in out.splitlines():
        match = re.fullmatch(r"\s*([0-9]+):\t[0-9a-f ]+\t(.*)", line)
        if match:
            # Jumps carry a `<symbol+0x..>` annotation of their target: not instruction text.
            lines[int(match[1])] = re.sub(r"\s+<[^<>]*>$", "", match[2])
    return lines


def text_section(obj: Path) -> tuple[Instruction, ...]:
    with obj.open("rb") as stream:
        section = ELFFile(stream).get_section_by_name(".text")
        assert section is not None
        return isa.decode(section.data())


def assert_matches_objdump(obj: Path) -> int:
    """Compare every instruction llvm-objdump can decode; return how many were compared.

    llvm-objdump (without alu32) prints 32-bit atomics with an `r` register or not
    at all; with alu32 it prints them as we do (`w2`), so those lines come from the
    alu32 run. A local call is `call -1` there and `call local -1` here (see
    bpfexec.vm.disassembler). Lines it cannot decode (`<unknown>`: cpu v4 forms in llvm 14)
    are left to the syntax tests above.
    """
    insns = text_section(obj)
    plain, alu32 = objdump_lines(obj), objdump_lines(obj, "--mattr=+alu32")
    compared = 0
    for pc, theirs in plain.items():
        insn = insns[pc]
        if insn.opcode == isa.STX | isa.ATOMIC | isa.W:
            theirs = alu32[pc]
        if theirs == "<unknown>" or (not LLVM_KNOWS_V4 and decoded_differently_by_llvm14(insn)):
            continue
        ours = disassemble_instruction(insns, pc)
        if insn.opcode == isa.OP_CALL and insn.src == isa.CALL_LOCAL:
            ours = re.sub(r"call local \+?", "call ", ours)
        assert ours == theirs, f"pc {pc}: {insn}"
        compared += 1
    return compared


def decoded_differently_by_llvm14(insn: Instruction) -> bool:
    """Forms llvm 14 decodes, but as something else: it predates cpu v4 and ignores
    the offset of sdiv/smod/movsx; it reads the register of `callx` from imm."""
    if insn.cls in (isa.ALU, isa.ALU64) and insn.op in (isa.DIV, isa.MOD, isa.MOV):
        return insn.offset != 0
    return insn.opcode == isa.OP_CALLX and insn.dst != 0


def clang(source: Path, out: Path, *flags: str) -> Path:
    cmd = [CLANG or "clang", "-O2", "-target", "bpf", "-ffreestanding", *flags, "-c"]
    subprocess.run([*cmd, str(source), "-o", str(out)], check=True, capture_output=True)
    return out


def cpu_versions() -> list[str]:
    """The -mcpu values this clang accepts (v4 needs LLVM 18)."""
    if CLANG is None:
        return []
    probe = subprocess.run(
        [CLANG, "-target", "bpf", "-mcpu=v4", "-x", "c", "-c", "-", "-o", "/dev/null"],
        input="int x;",
        capture_output=True,
        text=True,
    )
    return ["v1", "v2", "v3"] + (["v4"] if probe.returncode == 0 else [])


LLVM_KNOWS_V4 = "v4" in cpu_versions()


@needs_llvm
@pytest.mark.parametrize("cpu", cpu_versions())
def test_clang_objects_match_llvm_objdump(tmp_path: Path, cpu: str) -> None:
    source = tmp_path / "prog.c"
    source.write_text(C_SOURCE)
    flags = [f"-mcpu={cpu}"] + ([] if cpu in ("v1", "v2") else ["-DATOMICS"])
    obj = clang(source, tmp_path / "prog.o", *flags)
    assert assert_matches_objdump(obj) > 40


@needs_llvm
@pytest.mark.parametrize("name", ["local_calls", "loops", "helper_pointers", "strings"])
def test_fixture_objects_match_llvm_objdump(compile_c, name: str) -> None:
    assert assert_matches_objdump(compile_c(name)) > 0


@needs_llvm
def test_every_form_matches_llvm_objdump(tmp_path: Path) -> None:
    """An object whose code is every valid form, as raw bytes."""
    code = b"".join(insn.encode() for form in FORMS.values() for insn in form)
    source = tmp_path / "forms.s"
    source.write_text(".text\n" + "".join(f".byte {', '.join(map(str, code[i : i + 8]))}\n"
                                          for i in range(0, len(code), 8)))  # fmt: skip
    obj = tmp_path / "forms.o"
    subprocess.run(
        [CLANG or "clang", "-target", "bpf", "-c", str(source), "-o", str(obj)],
        check=True,
        capture_output=True,
    )
    assert assert_matches_objdump(obj) > 300


@needs_llvm
def test_pasted_objdump_listing_assembles_to_the_object(tmp_path: Path) -> None:
    source = tmp_path / "prog.c"
    source.write_text(C_SOURCE)
    obj = clang(source, tmp_path / "prog.o", "-mcpu=v3", "-DATOMICS")
    listing = subprocess.run(
        [OBJDUMP or "llvm-objdump", "-d", "--mattr=+alu32", "--section=.text", str(obj)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    expected = text_section(obj)
    got = assemble(listing, "prog.o.txt").instructions
    assert len(got) == len(expected)
    for pc, (ours, theirs) in enumerate(zip(got, expected, strict=True)):
        if theirs.opcode == isa.OP_CALL and theirs.src == isa.CALL_LOCAL:
            # llvm prints a local call like a helper call: `call -1` (see bpfexec.vm.disassembler).
            assert ours == Instruction(isa.OP_CALL, imm=theirs.imm), pc
        else:
            assert ours == theirs, pc
