"""Accesses of an unrolled loop whose address moves by the same step every round.

Along a loop's body, many registers hold a linear form in the values the
registers had at the head: `r8 + 3`, `r1 + r2`, `4*r6 - 8`, all modulo 2^64 as
eBPF's 64-bit arithmetic is. When the latch hands the next round, for every
register of such a form, either the value it had (an invariant) or that value
plus a form in invariants (an induction variable), the address of an access in
round `k` of a group is `start + k * step`: `start` in the registers' values at
the group's first head, `step` in invariants. An address that moves linearly
stays inside a region between two points inside it, so the compiler checks the
first and the last round of a group once, before entering it, and the copies
access memory with no check at all (`_FunctionCompiler.precheck`).

Only accesses in blocks every round passes through (they dominate the latch)
are returned, so that an access a round may skip does not keep the loop out of
its groups for nothing. The check needs nothing from the path into the group:
a group is also entered from outside the loop's body (an outer latch), where no
round ran with the current registers, so the compiler bounds the step itself
(see `precheck`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bpfexec.vm import isa
from bpfexec.vm.interpreter import FALL, Block
from bpfexec.vm.isa import FRAME_POINTER, MASK64, NUM_REGISTERS, Instruction
from bpfexec.vm.jit.unroll import Loop
from bpfexec.vm.liveness import uses_and_defs


@dataclass(frozen=True)
class Linear:
    """constant + sum of coefficient * r<n>, modulo 2^64 (no zero coefficient)."""

    constant: int
    terms: tuple[tuple[int, int], ...] = ()  # (register, coefficient), by register

    @staticmethod
    def register(n: int) -> Linear:
        return Linear(0, ((n, 1),))

    def plus(self, other: Linear, sign: int = 1) -> Linear:
        terms = dict(self.terms)
        for n, coefficient in other.terms:
            terms[n] = (terms.get(n, 0) + sign * coefficient) & MASK64
        kept = tuple((n, c) for n, c in sorted(terms.items()) if c)
        return Linear((self.constant + sign * other.constant) & MASK64, kept)

    def times(self, factor: int) -> Linear:
        terms = tuple((n, c * factor & MASK64) for n, c in self.terms if c * factor & MASK64)
        return Linear(self.constant * factor & MASK64, terms)

    @property
    def registers(self) -> frozenset[int]:
        return frozenset(n for n, _ in self.terms)


State = list[Linear | None]  # per register: its form, or None (not linear)


@dataclass(frozen=True)
class Stride:
    start: Linear  # the address in the group's first round, in the head's registers
    step: Linear  # how far it moves each round, in registers the loop leaves alone


def strided_accesses(
    loop: Loop,
    blocks: Sequence[Block | None],
    code: Sequence[Instruction],
    jumps: dict[int, list[int]],
) -> dict[int, Stride]:
    """The accesses of `loop` that move by a fixed step per round, by pc."""
    if not loop.single_latch:
        return {}
    body = sorted(loop.body)
    predecessors: dict[int, list[int]] = {pc: [] for pc in body}
    latch = loop.head
    for pc in body:
        for successor in jumps[pc]:
            if successor == loop.head:
                latch = pc
            elif successor in loop.body:
                predecessors[successor].append(pc)
    out: dict[int, State] = {}
    dominators: dict[int, frozenset[int]] = {}
    addresses: dict[int, tuple[int, Linear]] = {}  # pc -> (block, address form)
    for pc in body:  # every edge of the body but the back edge goes forward
        entered = [p for p in predecessors[pc] if p in out]
        if pc == loop.head:
            state: State = [Linear.register(n) for n in range(NUM_REGISTERS)]
            dominators[pc] = frozenset([pc])
        elif entered:
            state = [_meet([out[p][n] for p in entered]) for n in range(NUM_REGISTERS)]
            dominators[pc] = frozenset.intersection(*(dominators[p] for p in entered)) | {pc}
        else:
            continue  # not reached from the head inside the body
        block = blocks[pc]
        assert block is not None
        end = block.next_pc if block.kind == FALL else block.end_pc
        at = pc
        while at < end:
            insn = code[at]
            address = _address(insn, state)
            if address is not None:
                addresses[at] = (pc, address)
            _transfer(insn, code, at, state)
            at += 2 if insn.opcode == isa.LDDW else 1
        out[pc] = state
    if latch not in out:
        return {}
    steps: dict[int, Linear] = {}
    after = out[latch]
    unchanged = {n for n in range(NUM_REGISTERS) if after[n] == Linear.register(n)}
    for n in range(NUM_REGISTERS):
        form = after[n]
        if form is not None:
            step = form.plus(Linear.register(n), -1)
            if step.registers <= unchanged:
                steps[n] = step
    strides = {}
    for pc, (block_pc, address) in addresses.items():
        if block_pc not in dominators[latch] or not address.registers <= steps.keys():
            continue
        if address.registers == {FRAME_POINTER}:
            continue  # the frame at a fixed offset: unchecked already (or checked always)
        step = Linear(0)
        for n, coefficient in address.terms:
            step = step.plus(steps[n].times(coefficient))
        strides[pc] = Stride(address, step)
    return strides


def _meet(forms: list[Linear | None]) -> Linear | None:
    first = forms[0]
    return first if all(form == first for form in forms) else None


def _address(insn: Instruction, state: State) -> Linear | None:
    """The form of the address `insn` accesses, if it accesses memory and has one."""
    if insn.cls == isa.LDX:
        register = insn.src
    elif insn.cls in (isa.ST, isa.STX):
        register = insn.dst
    else:
        return None
    base = state[register] if register < NUM_REGISTERS else None
    return None if base is None else base.plus(Linear(insn.offset & MASK64))


def _transfer(insn: Instruction, code: Sequence[Instruction], pc: int, state: State) -> None:
    """Update `state` past `insn` (a straight-line instruction)."""
    result = _linear(insn, code, pc, state)
    written = isa.packet_load_operands(insn)[1] if isa.is_packet_load(insn) else None
    for n in uses_and_defs(insn)[1] if written is None else written:
        state[n] = None
    if result is not None:
        state[insn.dst] = result


def _linear(insn: Instruction, code: Sequence[Instruction], pc: int, state: State) -> Linear | None:
    """The form `insn` writes to its dst, when it is a linear function of the state."""
    if insn.opcode == isa.LDDW:
        return Linear(isa.lddw_value(insn, code[pc + 1]) & MASK64)
    if insn.cls != isa.ALU64 or insn.dst >= NUM_REGISTERS or insn.src >= NUM_REGISTERS:
        return None
    by_register = insn.opcode & isa.SRC_MASK == isa.X
    immediate = Linear(isa.to_signed(insn.imm, 32) & MASK64)
    operand = state[insn.src] if by_register else immediate
    dst, op = state[insn.dst], insn.op
    if op == isa.MOV:
        return None if by_register and insn.offset else operand  # movsx is not linear
    if op == isa.NEG:
        return None if dst is None else dst.times(-1)
    if dst is None or operand is None:
        return None
    if op == isa.ADD:
        return dst.plus(operand)
    if op == isa.SUB:
        return dst.plus(operand, -1)
    if op == isa.MUL and not operand.terms:
        return dst.times(operand.constant)
    if op == isa.MUL and not dst.terms:
        return operand.times(dst.constant)
    if op == isa.LSH and not operand.terms:
        return dst.times(1 << (operand.constant & 63))
    return None
