"""The eBPF instruction set (RFC 9669): opcode constants, instruction encoding.

This module is the one source of truth for opcodes, their fields and their
mnemonics. The verifier, the interpreter, the JIT, the assembler and the
disassembler all import their names from here; none of them defines an opcode.
It knows nothing of memory, programs or execution.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

INSTRUCTION_SIZE = 8
NUM_REGISTERS = 11  # r0..r10
FRAME_POINTER = 10  # r10, read-only
MASK64 = (1 << 64) - 1
MASK32 = (1 << 32) - 1

# Instruction classes: the low three bits of the opcode.
CLASS_MASK = 0x07
LD = 0x00
LDX = 0x01
ST = 0x02
STX = 0x03
ALU = 0x04
JMP = 0x05
JMP32 = 0x06
ALU64 = 0x07

# Source operand (ALU and JMP classes): immediate or register.
SRC_MASK = 0x08
K = 0x00
X = 0x08

# Operation (ALU and JMP classes): the high four bits.
OP_MASK = 0xF0
ADD = 0x00
SUB = 0x10
MUL = 0x20
DIV = 0x30
OR = 0x40
AND = 0x50
LSH = 0x60
RSH = 0x70
NEG = 0x80
MOD = 0x90
XOR = 0xA0
MOV = 0xB0
ARSH = 0xC0
END = 0xD0

JA = 0x00
JEQ = 0x10
JGT = 0x20
JGE = 0x30
JSET = 0x40
JNE = 0x50
JSGT = 0x60
JSGE = 0x70
CALL = 0x80
EXIT = 0x90
JLT = 0xA0
JLE = 0xB0
JSLT = 0xC0
JSLE = 0xD0

# Byte-swap direction (ALU class, END operation), carried in the source bit.
TO_LE = 0x00
TO_BE = 0x08

# Access size and mode (load and store classes).
SIZE_MASK = 0x18
W = 0x00
H = 0x08
B = 0x10
DW = 0x18
SIZE_BYTES = {B: 1, H: 2, W: 4, DW: 8}

MODE_MASK = 0xE0
IMM = 0x00
# Legacy packet access (`LD_ABS`, `LD_IND`; clang's `llvm.bpf.load.byte/half/word`):
# r0 = the 1, 2 or 4 bytes at packet offset imm (ABS) or (s32)(src + imm) (IND), read
# big-endian, the packet being the one of the context in r6. See `packet_load_operands`.
ABS = 0x20
IND = 0x40
MEM = 0x60
MEMSX = 0x80
ATOMIC = 0xC0

# Atomic operations, carried in the immediate of an ATOMIC store.
FETCH = 0x01
ATOMIC_ADD = ADD
ATOMIC_OR = OR
ATOMIC_AND = AND
ATOMIC_XOR = XOR
ATOMIC_XCHG = 0xE0 | FETCH
ATOMIC_CMPXCHG = 0xF0 | FETCH
ATOMIC_OPS = frozenset(
    {ATOMIC_ADD, ATOMIC_OR, ATOMIC_AND, ATOMIC_XOR}
    | {op | FETCH for op in (ATOMIC_ADD, ATOMIC_OR, ATOMIC_AND, ATOMIC_XOR)}
    | {ATOMIC_XCHG, ATOMIC_CMPXCHG}
)

# Source register values of `call` (JMP | CALL | K).
CALL_HELPER = 0  # imm is a helper number
CALL_LOCAL = 1  # imm is a pc offset to a function of the program
# imm is a BTF id, the kernel's name for a "kfunc" or runtime function; a userspace VM
# has no BTF, so the host resolves the id like a helper number.
CALL_BTF = 2

# Source register values of `lddw` (LD | IMM | DW).
LDDW_IMM = 0  # imm64 is a plain 64-bit constant
LDDW = LD | IMM | DW  # 0x18

# Frequently used whole opcodes.
OP_CALL = JMP | CALL | K  # 0x85
OP_CALLX = JMP | CALL | X  # 0x8d
OP_EXIT = JMP | EXIT  # 0x95
OP_JA = JMP | JA  # 0x05
OP_JA32 = JMP32 | JA  # 0x06, "gotol": 32-bit offset in imm

ALU_NAMES = {
    ADD: "+=", SUB: "-=", MUL: "*=", DIV: "/=", OR: "|=", AND: "&=", LSH: "<<=",
    RSH: ">>=", MOD: "%=", XOR: "^=", MOV: "=", ARSH: "s>>=",
}  # fmt: skip
SIGNED_ALU_NAMES = {DIV: "s/=", MOD: "s%="}
JMP_NAMES = {
    JEQ: "==", JGT: ">", JGE: ">=", JSET: "&", JNE: "!=", JSGT: "s>", JSGE: "s>=",
    JLT: "<", JLE: "<=", JSLT: "s<", JSLE: "s<=",
}  # fmt: skip
SIZE_NAMES = {B: "u8", H: "u16", W: "u32", DW: "u64"}
SIGNED_SIZE_NAMES = {B: "s8", H: "s16", W: "s32"}
ATOMIC_NAMES = {ATOMIC_ADD: "add", ATOMIC_OR: "or", ATOMIC_AND: "and", ATOMIC_XOR: "xor"}

_FORMAT = struct.Struct("<BBhi")


@dataclass(frozen=True, slots=True)
class Instruction:
    """One 8-byte instruction slot (an `lddw` occupies two)."""

    opcode: int
    dst: int = 0
    src: int = 0
    offset: int = 0  # signed 16-bit
    imm: int = 0  # signed 32-bit

    @property
    def cls(self) -> int:
        return self.opcode & CLASS_MASK

    @property
    def op(self) -> int:
        return self.opcode & OP_MASK

    @property
    def mode(self) -> int:
        return self.opcode & MODE_MASK

    @property
    def size(self) -> int:
        return self.opcode & SIZE_MASK

    def encode(self) -> bytes:
        return _FORMAT.pack(self.opcode, (self.src << 4) | self.dst, self.offset, self.imm)


def decode(code: bytes) -> tuple[Instruction, ...]:
    """Split bytecode (a multiple of 8 bytes, little-endian) into slots."""
    if len(code) % INSTRUCTION_SIZE:
        raise ValueError(f"bytecode length {len(code)} is not a multiple of {INSTRUCTION_SIZE}")
    return tuple(
        Instruction(opcode, regs & 0x0F, regs >> 4, offset, imm)
        for opcode, regs, offset, imm in _FORMAT.iter_unpack(code)
    )


def encode(instructions: tuple[Instruction, ...] | list[Instruction]) -> bytes:
    return b"".join(insn.encode() for insn in instructions)


def lddw_value(first: Instruction, second: Instruction) -> int:
    """The unsigned 64-bit constant of an `lddw` pair."""
    return (first.imm & MASK32) | ((second.imm & MASK32) << 32)


def lddw_pair(dst: int, value: int, src: int = LDDW_IMM) -> tuple[Instruction, Instruction]:
    value &= MASK64
    return (
        Instruction(LDDW, dst, src, 0, to_signed(value & MASK32, 32)),
        Instruction(0, 0, 0, 0, to_signed(value >> 32, 32)),
    )


def to_signed(value: int, bits: int) -> int:
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) else value


def is_jump(insn: Instruction) -> bool:
    """A conditional or unconditional jump (not call, not exit)."""
    return insn.cls in (JMP, JMP32) and insn.op not in (CALL, EXIT)


def jump_offset(insn: Instruction) -> int:
    """The pc delta of a jump: `gotol` carries it in imm, every other jump in offset."""
    return insn.imm if insn.opcode == OP_JA32 else insn.offset


def is_helper_call(insn: Instruction) -> bool:
    """`call imm` of a host function: a helper number (src 0) or a runtime function id (src 2)."""
    return insn.opcode == OP_CALL and insn.src in (CALL_HELPER, CALL_BTF)


# The register a legacy packet load (LD | ABS/IND) reads the context from, implicitly.
CONTEXT_REGISTER = 6


def is_packet_load(insn: Instruction) -> bool:
    """A legacy packet load: `LD_ABS` or `LD_IND` (class LD, mode ABS or IND)."""
    return insn.cls == LD and insn.mode in (ABS, IND)


def packet_load_operands(insn: Instruction) -> tuple[set[int], set[int]]:
    """The registers a packet load reads (r6, and its index register for IND) and
    writes (r0): its operands are implicit, apart from IND's src. (The kernel's
    verifier also makes r1..r5 unreadable after one; their values do not change.)"""
    reads = {CONTEXT_REGISTER}
    if insn.mode == IND and insn.src < NUM_REGISTERS:
        reads.add(insn.src)
    return reads, {0}


def callx_register(insn: Instruction) -> int:
    """The register a `callx` calls through.

    The RFC-style encoding (and bpf_conformance) puts it in dst; clang 14 puts it in
    imm with dst 0. Reading dst when it is set, else imm when it names a register,
    accepts both.
    """
    if insn.dst == 0 and 0 <= insn.imm < NUM_REGISTERS:
        return insn.imm
    return insn.dst
