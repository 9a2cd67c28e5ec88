"""The verifier's rules, one crafted program per rule, loaded as raw bytecode.

Each rejected case names the pc it must be reported at and a fragment of the
message; each accepted case is a form clang or the RFC allows and must pass.
"""

from __future__ import annotations

import re

import pytest

from bpfexec.vm import isa
from bpfexec.vm.errors import VerifyError
from bpfexec.vm.isa import Instruction as I  # short: the tables read like assembly
from bpfexec.vm.loader import load
from bpfexec.vm.program import Function, HelperRef, Program
from bpfexec.vm.verifier import verify

EXIT = I(isa.OP_EXIT)
JA = isa.OP_JA


def alu64(op: int, dst: int = 0, imm: int = 0, *, src: int | None = None, offset: int = 0) -> I:
    if src is None:
        return I(isa.ALU64 | op | isa.K, dst, 0, offset, imm)
    return I(isa.ALU64 | op | isa.X, dst, src, offset, 0)


def alu32(op: int, dst: int = 0, imm: int = 0, *, src: int | None = None, offset: int = 0) -> I:
    if src is None:
        return I(isa.ALU | op | isa.K, dst, 0, offset, imm)
    return I(isa.ALU | op | isa.X, dst, src, offset, 0)


def lddw(dst: int, value: int, src: int = 0) -> list[I]:
    return list(isa.lddw_pair(dst, value, src))


def program_bytes(*parts: I | list[I]) -> bytes:
    flat: list[I] = []
    for part in parts:
        flat.extend(part if isinstance(part, list) else [part])
    return isa.encode(flat)


# -- accepted ---------------------------------------------------------------------------

ARITHMETIC = [isa.ADD, isa.SUB, isa.MUL, isa.DIV, isa.OR, isa.AND, isa.LSH, isa.RSH]
ARITHMETIC += [isa.MOD, isa.XOR, isa.MOV, isa.ARSH]
CONDITIONS = sorted(isa.JMP_NAMES)
SIZES = [isa.B, isa.H, isa.W, isa.DW]

VALID_INSTRUCTIONS: list[I | list[I]] = [
    *(alu64(op, 1, 3) for op in ARITHMETIC),
    *(alu64(op, 1, src=2) for op in ARITHMETIC),
    *(alu32(op, 1, 3) for op in ARITHMETIC),
    *(alu32(op, 1, src=2) for op in ARITHMETIC),
    alu64(isa.NEG, 1),
    alu32(isa.NEG, 1),
    *(f(op, 1, src=2, offset=1) for f in (alu64, alu32) for op in (isa.DIV, isa.MOD)),
    *(f(op, 1, -7, offset=1) for f in (alu64, alu32) for op in (isa.DIV, isa.MOD)),
    *(alu64(isa.MOV, 1, src=2, offset=bits) for bits in (8, 16, 32)),
    *(alu32(isa.MOV, 1, src=2, offset=bits) for bits in (8, 16)),
    *(
        I(isa.ALU | isa.END | order, 1, imm=w)
        for order in (isa.TO_LE, isa.TO_BE)
        for w in (16, 32, 64)
    ),
    *(I(isa.ALU64 | isa.END | isa.TO_LE, 1, imm=w) for w in (16, 32, 64)),
    *(I(cls | op | isa.K, 1, 0, 0, 5) for cls in (isa.JMP, isa.JMP32) for op in CONDITIONS),
    *(I(cls | op | isa.X, 1, 2, 0, 0) for cls in (isa.JMP, isa.JMP32) for op in CONDITIONS),
    I(isa.OP_JA, offset=0),
    I(isa.OP_JA32, imm=0),
    *(I(isa.LDX | isa.MEM | size, 1, 10, -8) for size in SIZES),
    *(I(isa.LDX | isa.MEMSX | size, 1, 10, -8) for size in (isa.B, isa.H, isa.W)),
    *(I(isa.ST | isa.MEM | size, 10, 0, -8, 7) for size in SIZES),
    *(I(isa.STX | isa.MEM | size, 10, 1, -8) for size in SIZES),
    *(
        I(isa.STX | isa.ATOMIC | size, 10, 1, -8, op)
        for size in (isa.W, isa.DW)
        for op in sorted(isa.ATOMIC_OPS)
    ),
    lddw(1, 0x1122334455667788),
    I(isa.OP_CALL, imm=1),
    I(isa.OP_CALL, imm=-1),
    I(isa.OP_CALLX, dst=3),
    I(isa.OP_CALLX, imm=3),  # the older encoding: register in imm
    alu64(isa.MOV, 0, src=10),  # reading r10 is fine
]


@pytest.mark.parametrize("insn", VALID_INSTRUCTIONS, ids=lambda i: str(i))
def test_valid_instruction(insn: I | list[I]) -> None:
    # Jumps with offset 0 land on the exit that follows.
    load(program_bytes(insn, EXIT), "valid")


VALID_PROGRAMS = {
    "local call forward": [I(isa.OP_CALL, src=1, imm=1), EXIT, EXIT],
    "local call backward": [I(JA, offset=1), EXIT, I(isa.OP_CALL, src=1, imm=-2), EXIT],
    "function ends with a backward ja": [alu64(isa.ADD, 1, 1), I(JA, offset=-2)],
    "gotol backward": [alu64(isa.ADD, 1, 1), I(isa.OP_JA32, imm=-2)],
    "jump over lddw": [I(JA, offset=2), *lddw(0, 1), EXIT],
    "jump to lddw": [I(JA, offset=1), EXIT, *lddw(0, 1), EXIT],
    "store through r10": [I(isa.ST | isa.MEM | isa.DW, 10, 0, -8, 1), EXIT],
}


@pytest.mark.parametrize("code", VALID_PROGRAMS.values(), ids=VALID_PROGRAMS.keys())
def test_valid_program(code: list[I]) -> None:
    load(program_bytes(*code), "valid")


# -- rejected ---------------------------------------------------------------------------

REJECTED = {
    # opcodes
    "unknown ALU op": ([I(isa.ALU64 | 0xE0, 1), EXIT], 0, "unknown opcode 0xe7"),
    "neg with register source": (
        [I(isa.ALU64 | isa.NEG | isa.X, 1, 2), EXIT],
        0,
        "unknown opcode 0x8f",
    ),
    "bswap to big-endian in ALU64": ([I(0xDF, 1, imm=16), EXIT], 0, "unknown opcode 0xdf"),
    "call in JMP32": ([I(isa.JMP32 | isa.CALL, imm=1), EXIT], 0, "unknown opcode 0x86"),
    "exit in JMP32": ([I(isa.JMP32 | isa.EXIT)], 0, "unknown opcode 0x96"),
    "ja with register": ([I(isa.JMP | isa.JA | isa.X), EXIT], 0, "unknown opcode 0x0d"),
    "unknown jump op": ([I(isa.JMP | 0xE0, 1, imm=1), EXIT], 0, "unknown opcode 0xe5"),
    "LD with word size": ([I(isa.LD), EXIT], 0, "unknown opcode 0x00"),
    "LDX in IMM mode": ([I(isa.LDX | isa.IMM | isa.W, 1, 2), EXIT], 0, "unknown opcode 0x01"),
    "LDX in ATOMIC mode": ([I(isa.LDX | isa.ATOMIC | isa.W, 1, 2), EXIT], 0, "unknown opcode 0xc1"),
    "ST in ATOMIC mode": (
        [I(isa.ST | isa.ATOMIC | isa.DW, 1, 0, 0, 0), EXIT],
        0,
        "unknown opcode 0xda",
    ),
    "STX in MEMSX mode": ([I(isa.STX | isa.MEMSX | isa.W, 1, 2), EXIT], 0, "unknown opcode 0x83"),
    "sign-extending 8-byte load": (
        [I(isa.LDX | isa.MEMSX | isa.DW, 1, 2), EXIT],
        0,
        "sign-extending load of 8 bytes",
    ),
    # reserved fields
    "ALU immediate with src": (
        [I(isa.ALU64 | isa.ADD, 1, 2, 0, 1), EXIT],
        0,
        "reserved field src must be 0, is 2",
    ),
    "ALU register with imm": (
        [I(isa.ALU64 | isa.ADD | isa.X, 1, 2, 0, 1), EXIT],
        0,
        "reserved field imm must be 0",
    ),
    "exit with imm": ([I(isa.OP_EXIT, imm=1)], 0, "reserved field imm must be 0"),
    "helper call with dst": ([I(isa.OP_CALL, 1, 0, 0, 1), EXIT], 0, "reserved field dst must be 0"),
    "ja with imm": ([I(JA, imm=1), EXIT], 0, "reserved field imm must be 0"),
    "gotol with offset": ([I(isa.OP_JA32, offset=1), EXIT], 0, "reserved field offset must be 0"),
    "lddw second slot": (
        [I(isa.LDDW, 1), I(isa.OP_EXIT), EXIT],
        0,
        "second slot of lddw must be all zero",
    ),
    "store with src": ([I(isa.ST | isa.MEM | isa.W, 10, 1, -4, 0), EXIT], 0, "reserved field src"),
    "load with imm": ([I(isa.LDX | isa.MEM | isa.W, 1, 10, -4, 1), EXIT], 0, "reserved field imm"),
    "neg with imm": ([alu64(isa.NEG, 1, 1), EXIT], 0, "reserved field imm"),
    "callx with src": ([I(isa.OP_CALLX, 1, 1), EXIT], 0, "reserved field src"),
    "callx imm is no register": ([I(isa.OP_CALLX, 0, 0, 0, 11), EXIT], 0, "callx register"),
    # offsets and immediates with meaning
    "div offset 2": ([alu64(isa.DIV, 1, 3, offset=2), EXIT], 0, "offset 2 is not valid here"),
    "movsx from 32 in ALU": (
        [alu32(isa.MOV, 1, src=2, offset=32), EXIT],
        0,
        "offset 32 is not valid",
    ),
    "movsx from 7": ([alu64(isa.MOV, 1, src=2, offset=7), EXIT], 0, "offset 7 is not valid"),
    "mov immediate with offset": (
        [alu64(isa.MOV, 1, 3, offset=8), EXIT],
        0,
        "offset 8 is not valid",
    ),
    "add with offset": ([alu64(isa.ADD, 1, 3, offset=1), EXIT], 0, "offset 1 is not valid"),
    "byte swap width 8": (
        [I(isa.ALU | isa.END, 1, imm=8), EXIT],
        0,
        "byte swap width must be 16, 32 or 64",
    ),
    "atomic byte": (
        [I(isa.STX | isa.ATOMIC | isa.B, 10, 1, -8, isa.ATOMIC_ADD), EXIT],
        0,
        "only for 4 and 8 bytes",
    ),
    "atomic half": (
        [I(isa.STX | isa.ATOMIC | isa.H, 10, 1, -8, isa.ATOMIC_ADD), EXIT],
        0,
        "only for 4 and 8 bytes",
    ),
    "unknown atomic op": (
        [I(isa.STX | isa.ATOMIC | isa.DW, 10, 1, -8, 0x10), EXIT],
        0,
        "unknown atomic operation 0x10",
    ),
    # registers
    "dst r11": ([alu64(isa.MOV, 11, 1), EXIT], 0, "invalid destination register r11"),
    "src r12": ([alu64(isa.MOV, 1, src=12), EXIT], 0, "invalid source register r12"),
    "load from r15": (
        [I(isa.LDX | isa.MEM | isa.DW, 1, 15), EXIT],
        0,
        "invalid source register r15",
    ),
    "mov to r10": ([alu64(isa.MOV, 10, 1), EXIT], 0, "write to the read-only frame pointer r10"),
    "add to r10": (
        [alu32(isa.ADD, 10, src=1), EXIT],
        0,
        "write to the read-only frame pointer r10",
    ),
    "bswap r10": ([I(isa.ALU64 | isa.END, 10, imm=16), EXIT], 0, "frame pointer r10"),
    "load into r10": ([I(isa.LDX | isa.MEM | isa.DW, 10, 1), EXIT], 0, "frame pointer r10"),
    "lddw into r10": ([*lddw(10, 5), EXIT], 0, "frame pointer r10"),
    "fetching atomic into r10": (
        [I(isa.STX | isa.ATOMIC | isa.DW, 1, 10, 0, isa.ATOMIC_XCHG), EXIT],
        0,
        "frame pointer r10",
    ),
    # the legacy packet loads, malformed
    "ld_abs of 8 bytes": (
        [I(isa.LD | isa.ABS | isa.DW, 0, 0, 0, 12), EXIT],
        0,
        "legacy packet load (ld_abs/ld_ind) of 8 bytes does not exist",
    ),
    "ld_abs with a source register": (
        [I(isa.LD | isa.ABS | isa.W, 0, 1, 0, 12), EXIT],
        0,
        "reserved field src must be 0, is 1",
    ),
    "call src 3": ([I(isa.OP_CALL, 0, 3, 0, 7), EXIT], 0, "call with src 3 is not valid"),
    **{
        f"lddw src {src}": ([*lddw(1, 0, src), EXIT], 0, f"lddw with src {src} (")
        for src in range(1, 7)
    },
    "lddw src 7": ([*lddw(1, 0, 7), EXIT], 0, "reserved field src must be 0, is 7"),
    # targets
    "jump past the end": (
        [I(JA, offset=1), EXIT],
        0,
        "jump target pc 2 is outside the code (pc 0..1)",
    ),
    "jump before the start": ([EXIT, I(JA, offset=-3)], 1, "jump target pc -1 is outside the code"),
    "conditional jump out": ([I(isa.JMP | isa.JEQ, 1, 0, 5, 0), EXIT], 0, "jump target pc 6"),
    "gotol out": ([I(isa.OP_JA32, imm=100), EXIT], 0, "jump target pc 101 is outside"),
    "jump into lddw": (
        [I(JA, offset=1), *lddw(0, 1), EXIT],
        0,
        "jump target pc 2 is the second slot of an lddw",
    ),
    "call out": ([I(isa.OP_CALL, src=1, imm=5), EXIT], 0, "call target pc 6 is outside the code"),
    "call into lddw": (
        [I(isa.OP_CALL, src=1, imm=2), EXIT, *lddw(0, 1), EXIT],
        0,
        "call target pc 3 is the second slot",
    ),
    # ends
    "truncated lddw": ([EXIT, I(isa.LDDW, 1)], 1, "lddw is truncated"),
    "falls off the end": ([alu64(isa.MOV, 0, 1)], 0, "falls off the end of the code"),
    "ends with a conditional jump": (
        [EXIT, I(isa.JMP | isa.JEQ, 1, 0, -2, 0)],
        1,
        "falls off the end of the code",
    ),
    "ends with a call": ([I(isa.OP_CALL, imm=1)], 0, "falls off the end of the code"),
    "ends with lddw": ([EXIT, *lddw(0, 1)], 1, "falls off the end of the code"),
    "function falls into the next": (
        [I(isa.OP_CALL, src=1, imm=1), alu64(isa.MOV, 0, 1), EXIT],
        1,
        "falls off the end of function main",
    ),
}


@pytest.mark.parametrize(("code", "pc", "message"), REJECTED.values(), ids=REJECTED.keys())
def test_rejected(code: list[I], pc: int, message: str) -> None:
    with pytest.raises(VerifyError) as caught:
        load(program_bytes(*code), "bad")
    error = caught.value
    text = str(error)
    assert "\n" not in text
    assert message in text
    assert error.pc == pc
    assert text.startswith(f"pc {pc} (")
    assert error.instruction


# -- programs built by hand (as the assembler or ELF loader could) ------------------------


def test_empty_program() -> None:
    with pytest.raises(VerifyError, match="no instructions"):
        verify(Program((), ()))


def program(functions: tuple[Function, ...], **fields: object) -> Program:
    code = (alu64(isa.MOV, 0, 1), EXIT, I(isa.OP_CALL, imm=5), EXIT)
    return Program(code, functions, **fields)  # type: ignore[arg-type]


MALFORMED = {
    "function past the end": (
        (Function("f", 0, 2), Function("g", 2, 5)),
        "function g (pc 2, 5 slots) is not inside",
    ),
    "overlapping functions": ((Function("f", 0, 2), Function("g", 1, 3)), "overlaps"),
    "function without exit": ((Function("f", 0, 1), Function("g", 1, 3)), "end of function f"),
}


@pytest.mark.parametrize(("functions", "message"), MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_functions(functions: tuple[Function, ...], message: str) -> None:
    with pytest.raises(VerifyError, match=re.escape(message)):
        verify(program(functions))


def test_helper_recorded_at_a_non_call() -> None:
    functions = (Function("f", 0, 2), Function("g", 2, 2))
    verify(program(functions, helper_calls={2: HelperRef(name="print")}))
    with pytest.raises(VerifyError, match=r"pc 1 .*no helper call"):
        verify(program(functions, helper_calls={1: HelperRef(name="print")}))


def test_location_is_reported() -> None:
    broken = Program(
        (alu64(isa.MOV, 10, 1), EXIT),
        (Function("f", 0, 2),),
        lines={0: "prog.c:3"},
    )
    with pytest.raises(VerifyError) as caught:
        verify(broken)
    assert caught.value.location == "prog.c:3"
    assert "at prog.c:3: write to the read-only frame pointer r10" in str(caught.value)
