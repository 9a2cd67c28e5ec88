"""The interpreter: the reference engine, in plain Python.

Each instruction is decoded once into a small closure specialised for its
operands; straight-line closures are grouped into basic blocks. Running is then
a loop over blocks: charge the block's fuel, run its closures, let its last
instruction pick the next block. The decoded blocks are kept in
`Program.compiled`, so a cached module is decoded only once.

Semantics follow RFC 9669 and are the reference for every other engine: the
JIT is held to this module's results by the differential tests. This module
does no set-up (that is `bpfexec.vm.machine`) and no verification (the verifier has
already checked every instruction it sees).

The legacy packet loads (`LD_ABS`, `LD_IND`) follow the kernel: one whose bytes
are not all inside the packet ends the program at once, from any call depth, with
r0 = 0 and no trap (`ProgramEnded`). Each ends its basic block, so the fuel charged
is exactly that of the instructions run up to it.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

from bpfexec.vm import isa
from bpfexec.vm.errors import Trap, TrapKind
from bpfexec.vm.isa import (
    ALU,
    ALU64,
    JMP,
    JMP32,
    LD,
    LDX,
    MASK32,
    MASK64,
    ST,
    STX,
    Instruction,
)
from bpfexec.vm.machine import Machine
from bpfexec.vm.memory import OFFSET_MASK, REGION_SHIFT
from bpfexec.vm.program import Program
from bpfexec.vm.program_types import PACKET_DATA, PACKET_END

Op = Callable[[list[int], Machine], None]
Branch = Callable[[list[int]], int]

SIGN64 = 1 << 63
SIGN32 = 1 << 31

# Block terminators.
FALL = 0  # the next block follows (its first instruction is a jump target)
JUMP = 1  # `branch(registers)` returns the next pc
CALL = 2  # local call to `target`
EXIT = 3

_UNPACK = {
    1: struct.Struct("<B").unpack_from,
    2: struct.Struct("<H").unpack_from,
    4: struct.Struct("<I").unpack_from,
    8: struct.Struct("<Q").unpack_from,
}
_PACK = {
    1: struct.Struct("<B").pack_into,
    2: struct.Struct("<H").pack_into,
    4: struct.Struct("<I").pack_into,
    8: struct.Struct("<Q").pack_into,
}


@dataclass(frozen=True, slots=True)
class Block:
    pc: int  # first instruction
    cost: int  # fuel: instructions in the block, an lddw counting once
    ops: tuple[Op, ...]  # the straight-line instructions
    kind: int  # how the block ends: FALL, JUMP, CALL or EXIT
    end_pc: int  # pc of the last instruction (the terminator, if any)
    next_pc: int  # where FALL goes, and where a CALL returns to
    branch: Branch | None = None  # JUMP: computes the next pc
    target: int = 0  # CALL: the callee's pc
    backward: bool = False  # may jump to an earlier pc (loops): check for interrupts


# -- value helpers -----------------------------------------------------------


def signed64(value: int) -> int:
    return value - (1 << 64) if value & SIGN64 else value


def signed32(value: int) -> int:
    value &= MASK32
    return value - (1 << 32) if value & SIGN32 else value


def sign_extend(value: int, bits: int) -> int:
    """Sign-extend the low `bits` of value to an unsigned 64-bit value."""
    value &= (1 << bits) - 1
    if value >> (bits - 1):
        value -= 1 << bits
    return value & MASK64


def _trunc_div(a: int, b: int) -> int:
    """Signed division rounding toward zero, as C and RFC 9669 do."""
    q = abs(a) // abs(b)
    return -q if (a < 0) != (b < 0) else q


def _trunc_mod(a: int, b: int) -> int:
    return a - b * _trunc_div(a, b)


def _swap(value: int, bits: int) -> int:
    return int.from_bytes((value & ((1 << bits) - 1)).to_bytes(bits // 8, "little"), "big")


# -- ALU -----------------------------------------------------------------------

# Each entry computes the 64-bit result from unsigned 64-bit operands.
_ALU64: dict[int, Callable[[int, int], int]] = {
    isa.ADD: lambda a, b: (a + b) & MASK64,
    isa.SUB: lambda a, b: (a - b) & MASK64,
    isa.MUL: lambda a, b: (a * b) & MASK64,
    isa.DIV: lambda a, b: a // b if b else 0,
    isa.OR: lambda a, b: a | b,
    isa.AND: lambda a, b: a & b,
    isa.LSH: lambda a, b: (a << (b & 63)) & MASK64,
    isa.RSH: lambda a, b: a >> (b & 63),
    isa.MOD: lambda a, b: a % b if b else a,
    isa.XOR: lambda a, b: a ^ b,
    isa.MOV: lambda a, b: b,
    isa.ARSH: lambda a, b: (signed64(a) >> (b & 63)) & MASK64,
}
_SIGNED64: dict[int, Callable[[int, int], int]] = {
    isa.DIV: lambda a, b: _trunc_div(signed64(a), signed64(b)) & MASK64 if b else 0,
    isa.MOD: lambda a, b: _trunc_mod(signed64(a), signed64(b)) & MASK64 if b else a,
}
# 32-bit variants take the low 32 bits of each operand; results are zero-extended.
_ALU32: dict[int, Callable[[int, int], int]] = {
    isa.ADD: lambda a, b: (a + b) & MASK32,
    isa.SUB: lambda a, b: (a - b) & MASK32,
    isa.MUL: lambda a, b: (a * b) & MASK32,
    isa.DIV: lambda a, b: (a & MASK32) // (b & MASK32) if b & MASK32 else 0,
    isa.OR: lambda a, b: (a | b) & MASK32,
    isa.AND: lambda a, b: a & b & MASK32,
    isa.LSH: lambda a, b: (a << (b & 31)) & MASK32,
    isa.RSH: lambda a, b: (a & MASK32) >> (b & 31),
    isa.MOD: lambda a, b: (a & MASK32) % (b & MASK32) if b & MASK32 else a & MASK32,
    isa.XOR: lambda a, b: (a ^ b) & MASK32,
    isa.MOV: lambda a, b: b & MASK32,
    isa.ARSH: lambda a, b: (signed32(a) >> (b & 31)) & MASK32,
}
_SIGNED32: dict[int, Callable[[int, int], int]] = {
    isa.DIV: lambda a, b: _trunc_div(signed32(a), signed32(b)) & MASK32 if b & MASK32 else 0,
    isa.MOD: lambda a, b: (
        _trunc_mod(signed32(a), signed32(b)) & MASK32 if b & MASK32 else a & MASK32
    ),
}


def _alu_op(insn: Instruction) -> Op:
    d, s, op = insn.dst, insn.src, insn.op
    wide = insn.cls == ALU64
    if op == isa.NEG:
        mask = MASK64 if wide else MASK32

        def neg(r: list[int], m: Machine) -> None:
            r[d] = -r[d] & mask

        return neg
    if op == isa.END:
        return _end_op(insn)
    if op == isa.MOV and insn.offset and insn.opcode & isa.SRC_MASK == isa.X:
        bits = insn.offset  # movsx: sign-extend the low `bits` of src
        if wide:

            def movsx64(r: list[int], m: Machine) -> None:
                r[d] = sign_extend(r[s], bits)

            return movsx64

        def movsx32(r: list[int], m: Machine) -> None:
            r[d] = sign_extend(r[s], bits) & MASK32

        return movsx32

    if insn.offset == 1 and op in (isa.DIV, isa.MOD):
        fn = (_SIGNED64 if wide else _SIGNED32)[op]
    else:
        fn = (_ALU64 if wide else _ALU32)[op]
    if insn.opcode & isa.SRC_MASK == isa.X:
        return _alu_reg(d, s, op, wide, fn)
    imm = insn.imm & MASK64 if wide else insn.imm & MASK32  # imm sign-extends to 64 bits
    return _alu_imm(d, imm, op, wide, fn)


def _alu_reg(d: int, s: int, op: int, wide: bool, fn: Callable[[int, int], int]) -> Op:
    # The most frequent operations get a closure of their own: one call fewer.
    if wide and op == isa.ADD:

        def add(r: list[int], m: Machine) -> None:
            r[d] = (r[d] + r[s]) & MASK64

        return add
    if wide and op == isa.MOV:

        def mov(r: list[int], m: Machine) -> None:
            r[d] = r[s]

        return mov

    def alu(r: list[int], m: Machine) -> None:
        r[d] = fn(r[d], r[s])

    return alu


def _alu_imm(d: int, imm: int, op: int, wide: bool, fn: Callable[[int, int], int]) -> Op:
    if op == isa.MOV:

        def mov(r: list[int], m: Machine) -> None:
            r[d] = imm

        return mov
    if wide and op == isa.ADD:

        def add(r: list[int], m: Machine) -> None:
            r[d] = (r[d] + imm) & MASK64

        return add
    if wide and op == isa.AND:

        def and_(r: list[int], m: Machine) -> None:
            r[d] &= imm

        return and_
    if wide and op == isa.LSH:
        shift = imm & 63

        def lsh(r: list[int], m: Machine) -> None:
            r[d] = (r[d] << shift) & MASK64

        return lsh
    if wide and op == isa.RSH:
        shift = imm & 63

        def rsh(r: list[int], m: Machine) -> None:
            r[d] >>= shift

        return rsh

    def alu(r: list[int], m: Machine) -> None:
        r[d] = fn(r[d], imm)

    return alu


def _end_op(insn: Instruction) -> Op:
    d, bits = insn.dst, insn.imm
    if insn.cls == ALU64 or insn.opcode & isa.SRC_MASK == isa.TO_BE:
        # bswap (ALU64), or to-big-endian on our little-endian VM: swap the low bits.
        def swap(r: list[int], m: Machine) -> None:
            r[d] = _swap(r[d], bits)

        return swap
    mask = (1 << bits) - 1  # to-little-endian is a no-op apart from truncation

    def truncate(r: list[int], m: Machine) -> None:
        r[d] &= mask

    return truncate


# -- memory ----------------------------------------------------------------------


def _load_op(insn: Instruction, pc: int) -> Op:
    d, s, off = insn.dst, insn.src, insn.offset
    size = isa.SIZE_BYTES[insn.size]
    unpack = _UNPACK[size]
    extend = insn.mode == isa.MEMSX
    bits = size * 8

    def load(r: list[int], m: Machine) -> None:
        addr = (r[s] + off) & MASK64
        regions = m.memory.regions
        region = addr >> REGION_SHIFT
        offset = addr & OFFSET_MASK
        if region < len(regions):
            store = regions[region]
            if store is not None and offset + size <= len(store):
                value = unpack(store, offset)[0]
                r[d] = sign_extend(value, bits) if extend else value
                return
        raise _at(m.memory.fault(addr, size, "read"), pc)

    return load


def _store_op(insn: Instruction, pc: int) -> Op:
    d, s, off = insn.dst, insn.src, insn.offset
    size = isa.SIZE_BYTES[insn.size]
    pack = _PACK[size]
    mask = (1 << (size * 8)) - 1
    from_register = insn.cls == STX
    imm = insn.imm & mask

    def store(r: list[int], m: Machine) -> None:
        addr = (r[d] + off) & MASK64
        memory = m.memory
        region = addr >> REGION_SHIFT
        offset = addr & OFFSET_MASK
        if region < len(memory.regions) and memory.writable[region]:
            buf = memory.regions[region]
            if offset + size <= len(buf):  # type: ignore[arg-type]
                pack(buf, offset, r[s] & mask if from_register else imm)  # type: ignore[arg-type]
                return
        raise _at(memory.fault(addr, size, "write"), pc)

    return store


_ATOMIC_FNS: dict[int, Callable[[int, int], int]] = {
    isa.ATOMIC_ADD: lambda old, v: old + v,
    isa.ATOMIC_OR: lambda old, v: old | v,
    isa.ATOMIC_AND: lambda old, v: old & v,
    isa.ATOMIC_XOR: lambda old, v: old ^ v,
    isa.ATOMIC_XCHG & ~isa.FETCH: lambda old, v: v,
}


# Atomic instructions of interpreted runs read, modify and write under this lock:
# map values are memory that executions on other threads share. (Native code
# uses the processor's atomic instructions; the two are not atomic with each other.)
ATOMIC_LOCK = threading.Lock()


def _atomic_op(insn: Instruction, pc: int) -> Op:
    d, s, off, code = insn.dst, insn.src, insn.offset, insn.imm
    size = isa.SIZE_BYTES[insn.size]
    mask = (1 << (size * 8)) - 1
    unpack, pack = _UNPACK[size], _PACK[size]

    def locate(r: list[int], m: Machine) -> tuple[bytearray, int]:
        addr = (r[d] + off) & MASK64
        memory = m.memory
        region = addr >> REGION_SHIFT
        offset = addr & OFFSET_MASK
        if region < len(memory.regions) and memory.writable[region]:
            buf = memory.regions[region]
            if offset + size <= len(buf):  # type: ignore[arg-type]
                return buf, offset  # type: ignore[return-value]
        raise _at(memory.fault(addr, size, "atomic access"), pc)

    if code == isa.ATOMIC_CMPXCHG:

        def cmpxchg(r: list[int], m: Machine) -> None:
            buf, offset = locate(r, m)
            with ATOMIC_LOCK:
                old = unpack(buf, offset)[0]
                if old == r[0] & mask:
                    pack(buf, offset, r[s] & mask)
            r[0] = old

        return cmpxchg

    fn = _ATOMIC_FNS[code & ~isa.FETCH]
    fetch = bool(code & isa.FETCH)

    def atomic(r: list[int], m: Machine) -> None:
        buf, offset = locate(r, m)
        with ATOMIC_LOCK:
            old = unpack(buf, offset)[0]
            pack(buf, offset, fn(old, r[s] & mask) & mask)
        if fetch:
            r[s] = old

    return atomic


class ProgramEnded(Exception):
    """A legacy packet load outside the packet: the program ends with r0 = 0.

    Not a trap: the kernel ends a socket filter this way (`bpf_gen_ld_abs`: the
    load helper's error becomes `r0 = 0; exit` of the whole program)."""


# Big-endian (network order) reads of a packet load, by size.
_UNPACK_BE = {
    1: struct.Struct(">B").unpack_from,
    2: struct.Struct(">H").unpack_from,
    4: struct.Struct(">I").unpack_from,
}


def _read(m: Machine, addr: int, size: int, unpack: Callable[..., tuple[int]], pc: int) -> int:
    """The checked read a load makes: the value at `addr`, or the load's MEMORY_FAULT."""
    regions = m.memory.regions
    region = addr >> REGION_SHIFT
    offset = addr & OFFSET_MASK
    if region < len(regions):
        store = regions[region]
        if store is not None and offset + size <= len(store):
            return unpack(store, offset)[0]
    raise _at(m.memory.fault(addr, size, "read"), pc)


def _packet_load_op(insn: Instruction, pc: int) -> Op:
    """`LD_ABS` / `LD_IND`: r0 = the `size` bytes at packet offset `off`, big-endian.

    The packet is [start, end), the u64s at r6 + PACKET_DATA and r6 + PACKET_END
    (`bpfexec.vm.program_types`), each read as a u64 load reads (faulting alike).
    `off` is imm for ABS and `(s32)(src + imm)` for IND, as the kernel computes it
    (an int argument of `bpf_skb_load_helper_*`). A negative `off` (the kernel's
    SKF_AD_* / SKF_LL_OFF ancillary offsets included: they are not supported) or
    `start + off + size > end` (unbounded integers) ends the program. r1..r5 keep
    their values.
    """
    size = isa.SIZE_BYTES[insn.size]
    unpack = _UNPACK_BE[size]
    word = _UNPACK[8]
    index, imm = insn.src, insn.imm
    indexed = insn.mode == isa.IND
    ctx = isa.CONTEXT_REGISTER

    def packet_load(r: list[int], m: Machine) -> None:
        start = _read(m, (r[ctx] + PACKET_DATA) & MASK64, 8, word, pc)
        end = _read(m, (r[ctx] + PACKET_END) & MASK64, 8, word, pc)
        off = signed32(r[index] + imm) if indexed else imm
        if off < 0 or start + off + size > end:
            raise ProgramEnded
        r[0] = _read(m, start + off, size, unpack, pc)

    return packet_load


def _lddw_op(insn: Instruction, value: int) -> Op:
    d = insn.dst

    def lddw(r: list[int], m: Machine) -> None:
        r[d] = value

    return lddw


# -- calls -----------------------------------------------------------------------


def _helper_op(pc: int) -> Op:
    def call_helper(r: list[int], m: Machine) -> None:
        try:
            m.call_helper(m.helpers[pc], pc)
        except Trap as trap:
            raise _at(trap, pc) from None

    return call_helper


def _callx_op(insn: Instruction, pc: int) -> Op:
    reg = isa.callx_register(insn)

    def callx(r: list[int], m: Machine) -> None:
        from bpfexec.vm.program import HelperRef

        number = r[reg]
        helper = m.resolver.resolve(HelperRef(number=number)) if m.resolver else None
        if helper is None or number > MASK32:
            raise _at(Trap(TrapKind.UNKNOWN_HELPER, f"callx r{reg}: no helper #{number}"), pc)
        try:
            m.call_helper(helper, pc)
        except Trap as trap:
            raise _at(trap, pc) from None

    return callx


# -- jumps -------------------------------------------------------------------------

_CONDITIONS: dict[int, Callable[[int, int], bool]] = {
    isa.JEQ: lambda a, b: a == b,
    isa.JNE: lambda a, b: a != b,
    isa.JGT: lambda a, b: a > b,
    isa.JGE: lambda a, b: a >= b,
    isa.JLT: lambda a, b: a < b,
    isa.JLE: lambda a, b: a <= b,
    isa.JSET: lambda a, b: bool(a & b),
}
_SIGNED_CONDITIONS: dict[int, Callable[[int, int], bool]] = {
    isa.JSGT: lambda a, b: a > b,
    isa.JSGE: lambda a, b: a >= b,
    isa.JSLT: lambda a, b: a < b,
    isa.JSLE: lambda a, b: a <= b,
}


def _branch(insn: Instruction, pc: int) -> Branch:
    taken = pc + 1 + isa.jump_offset(insn)
    if insn.op == isa.JA:
        return lambda r: taken
    fallthrough = pc + 1
    d, s = insn.dst, insn.src
    wide = insn.cls == JMP
    from_register = insn.opcode & isa.SRC_MASK == isa.X
    if insn.op in _SIGNED_CONDITIONS:
        cond = _SIGNED_CONDITIONS[insn.op]
        to_signed = signed64 if wide else signed32
        if from_register:
            return lambda r: taken if cond(to_signed(r[d]), to_signed(r[s])) else fallthrough
        imm = insn.imm if wide else signed32(insn.imm)
        return lambda r: taken if cond(to_signed(r[d]), imm) else fallthrough
    cond = _CONDITIONS[insn.op]
    if wide:
        if from_register:
            return lambda r: taken if cond(r[d], r[s]) else fallthrough
        imm = insn.imm & MASK64
        if insn.op == isa.JEQ:
            return lambda r: taken if r[d] == imm else fallthrough
        if insn.op == isa.JNE:
            return lambda r: taken if r[d] != imm else fallthrough
        return lambda r: taken if cond(r[d], imm) else fallthrough
    if from_register:
        return lambda r: taken if cond(r[d] & MASK32, r[s] & MASK32) else fallthrough
    imm32 = insn.imm & MASK32
    return lambda r: taken if cond(r[d] & MASK32, imm32) else fallthrough


# -- decoding into blocks ------------------------------------------------------------


def decode_op(program: Program, pc: int) -> Op:
    """The closure for the straight-line instruction at pc."""
    insn = program.instructions[pc]
    cls = insn.cls
    if cls in (ALU, ALU64):
        return _alu_op(insn)
    if cls == LDX:
        return _load_op(insn, pc)
    if cls == ST:
        return _store_op(insn, pc)
    if cls == STX:
        return _atomic_op(insn, pc) if insn.mode == isa.ATOMIC else _store_op(insn, pc)
    if cls == LD and insn.opcode == isa.LDDW:
        return _lddw_op(insn, isa.lddw_value(insn, program.instructions[pc + 1]))
    if isa.is_packet_load(insn):
        return _packet_load_op(insn, pc)
    if isa.is_helper_call(insn):
        return _helper_op(pc)
    if insn.opcode == isa.OP_CALLX:
        return _callx_op(insn, pc)
    raise AssertionError(f"pc {pc}: opcode {insn.opcode:#04x} is not straight-line")


def ends_block(insn: Instruction) -> bool:
    """Jumps, local calls and exits end a basic block; helper calls do not."""
    if insn.cls not in (JMP, JMP32):
        return False
    if insn.op == isa.CALL:
        return insn.opcode == isa.OP_CALL and insn.src == isa.CALL_LOCAL
    return True


def block_leaders(program: Program) -> list[int]:
    """Sorted pcs that start a basic block: function entries, jump targets, and
    every instruction after one that ends a block or after a packet load (which may
    end the program: its block must cost no fuel past it)."""
    code = program.instructions
    leaders = {fn.pc for fn in program.functions}
    leaders.add(0)
    pc = 0
    while pc < len(code):
        insn = code[pc]
        step = 2 if insn.opcode == isa.LDDW else 1
        if isa.is_packet_load(insn):
            leaders.add(pc + 1)
        if ends_block(insn):
            leaders.add(pc + step)
            if isa.is_jump(insn):
                leaders.add(pc + 1 + isa.jump_offset(insn))
            elif insn.op == isa.CALL:
                leaders.add(pc + 1 + insn.imm)
        pc += step
    return sorted(p for p in leaders if 0 <= p < len(code))


def decode_blocks(program: Program) -> list[Block | None]:
    """Basic blocks indexed by their first pc (None elsewhere)."""
    code = program.instructions
    leaders = block_leaders(program)
    blocks: list[Block | None] = [None] * len(code)
    for i, start in enumerate(leaders):
        limit = leaders[i + 1] if i + 1 < len(leaders) else len(code)
        ops: list[Op] = []
        pc, cost = start, 0
        while pc < limit:
            insn = code[pc]
            cost += 1
            if ends_block(insn):
                blocks[start] = _terminated(start, cost, ops, insn, pc)
                break
            ops.append(decode_op(program, pc))
            pc += 2 if insn.opcode == isa.LDDW else 1
        else:
            blocks[start] = Block(start, cost, tuple(ops), FALL, pc - 1, pc)
    return blocks


def _terminated(start: int, cost: int, ops: list[Op], insn: Instruction, pc: int) -> Block:
    if insn.opcode == isa.OP_EXIT:
        return Block(start, cost, tuple(ops), EXIT, pc, pc + 1)
    if insn.op == isa.CALL:
        return Block(start, cost, tuple(ops), CALL, pc, pc + 1, target=pc + 1 + insn.imm)
    backward = isa.jump_offset(insn) < 0
    return Block(start, cost, tuple(ops), JUMP, pc, pc + 1, _branch(insn, pc), backward=backward)


def _at(trap: Trap, pc: int) -> Trap:
    if trap.pc < 0:
        trap.pc = pc
    return trap


# -- running -----------------------------------------------------------------------------


def program_blocks(program: Program) -> list[Block | None]:
    """`decode_blocks(program)`, decoded once and kept with the program (`compiled`)."""
    blocks = program.compiled.get("interpreter")
    if blocks is None:
        blocks = program.compiled.setdefault("interpreter", decode_blocks(program))
    return blocks  # type: ignore[no-any-return]


class Interpreter:
    name = "interpreter"

    def run(self, machine: Machine) -> int:
        program = machine.program
        blocks = program_blocks(program)
        if machine.trace is not None:
            blocks = _traced(program, blocks, machine)
        try:
            return _execute(machine, blocks)
        except ProgramEnded:  # the fuel of its block, which it ends, is charged
            machine.registers[0] = 0
            return 0
        except Trap as trap:
            raise locate_trap(trap, program) from None


def _execute(m: Machine, blocks: list[Block | None]) -> int:
    r = m.registers
    frames: list[tuple[int, int, int, int, int, int]] = []
    max_frames = m.limits.max_call_depth - 1  # the entry function holds the first frame
    frame_size = m.limits.stack_frame_size
    interrupt = m.interrupt
    pc = m.entry
    while True:
        block = blocks[pc]
        assert block is not None, f"no block at pc {pc}"
        if block.cost > m.fuel:
            raise Trap(
                TrapKind.OUT_OF_FUEL,
                f"fuel exhausted: {m.budget - m.fuel} of {m.budget} used, "
                f"the next block needs {block.cost}",
                pc=pc,
            )
        m.fuel -= block.cost
        for op in block.ops:
            op(r, m)
        kind = block.kind
        if kind == JUMP:
            pc = block.branch(r)  # type: ignore[misc]
            if block.backward and interrupt.reason is not None:
                raise interrupted(interrupt.reason, pc)
        elif kind == FALL:
            pc = block.next_pc
        elif kind == CALL:
            if len(frames) >= max_frames:
                raise Trap(
                    TrapKind.CALL_DEPTH_EXCEEDED,
                    f"call depth limit of {m.limits.max_call_depth} frames exceeded",
                    pc=block.end_pc,
                )
            if interrupt.reason is not None:
                raise interrupted(interrupt.reason, block.end_pc)
            frames.append((block.next_pc, r[6], r[7], r[8], r[9], r[10]))
            r[10] -= frame_size
            pc = block.target
        else:  # EXIT
            if not frames:
                return r[0]
            pc, r[6], r[7], r[8], r[9], r[10] = frames.pop()


def interrupted(reason: TrapKind, pc: int) -> Trap:
    what = "the deadline passed" if reason == TrapKind.DEADLINE_EXCEEDED else "cancelled"
    return Trap(reason, f"execution stopped: {what}", pc=pc)


def locate_trap(trap: Trap, program: Program) -> Trap:
    """Fill in the instruction, function and source line of the trap's pc."""
    from bpfexec.vm.disassembler import disassemble_instruction

    pc = trap.pc
    if 0 <= pc < len(program.instructions):
        fn = program.function_at(pc)
        trap.at(
            pc,
            disassemble_instruction(program.instructions, pc),
            fn.name if fn else "",
            program.location(pc),
        )
    return trap


def _traced(program: Program, blocks: list[Block | None], machine: Machine) -> list[Block | None]:
    """The same blocks, each instruction reporting itself to machine.trace first."""
    from bpfexec.vm.disassembler import disassemble_instruction

    trace = machine.trace
    assert trace is not None
    code = program.instructions

    def line(pc: int, r: list[int]) -> str:
        insn = code[pc]
        if isa.is_packet_load(insn):
            regs = sorted(isa.packet_load_operands(insn)[0])
        else:
            regs = sorted({insn.dst, insn.src} if insn.cls != LD else {insn.dst})
        values = " ".join(f"r{n}={r[n]:#x}" for n in regs)
        return f"{pc:6d}: {disassemble_instruction(code, pc):<40} ; {values}"

    def wrap(op: Op, pc: int) -> Op:
        def traced(r: list[int], m: Machine) -> None:
            trace(line(pc, r))
            op(r, m)

        return traced

    out: list[Block | None] = []
    for block in blocks:
        if block is None:
            out.append(None)
            continue
        pcs = []
        pc = block.pc
        for _ in block.ops:
            pcs.append(pc)
            pc += 2 if code[pc].opcode == isa.LDDW else 1
        ops = [wrap(op, p) for op, p in zip(block.ops, pcs, strict=True)]
        if block.kind != FALL:
            ops.append(wrap(lambda r, m: None, block.end_pc))
        out.append(
            Block(
                block.pc,
                block.cost,
                tuple(ops),
                block.kind,
                block.end_pc,
                block.next_pc,
                block.branch,
                block.target,
                block.backward,
            )
        )
    return out
