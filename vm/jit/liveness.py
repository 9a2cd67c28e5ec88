"""Which registers each compiled function takes and hands back.

A local call passes the whole register file in the interpreter: the callee
sees the caller's r0..r9, and the caller gets the callee's r0..r5 back. Native
code need only pass what is read: `signatures()` computes, for every function
of a module, the registers it may read before writing them (its parameters,
with r10 always among them) and the registers among r0..r5 that a caller may
read after it returns before writing them (its results, r0 always among them).
The analysis is the classic backward liveness over the interpreter's blocks,
iterated across calls until nothing changes; it is conservative, so a register
it leaves out is provably never read, and the compiler gives it the value 0.

Helpers read r1..r5 (and `callx` its register) and write r0.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from bpfexec.vm import isa
from bpfexec.vm.interpreter import CALL, EXIT, FALL, JUMP, Block
from bpfexec.vm.isa import FRAME_POINTER, NUM_REGISTERS, Instruction

RESULTS = frozenset(range(6))  # what a call may hand back: r0..r5
HELPER_ARGUMENTS = frozenset(range(1, 6))


@dataclass(frozen=True)
class Signature:
    params: tuple[int, ...]  # registers passed in, ascending; r10 always
    results: tuple[int, ...]  # registers handed back, ascending; r0 always


def _valid(registers: Iterable[int]) -> set[int]:
    return {n for n in registers if n < NUM_REGISTERS}


def uses_and_defs(insn: Instruction) -> tuple[set[int], set[int]]:
    """Registers a straight-line instruction reads and writes."""
    cls, dst, src = insn.cls, insn.dst, insn.src
    if insn.opcode == isa.LDDW:
        return set(), _valid([dst])
    if cls in (isa.ALU, isa.ALU64):
        by_register = insn.opcode & isa.SRC_MASK == isa.X
        if insn.op == isa.MOV:
            return _valid([src] if by_register else []), _valid([dst])
        if insn.op in (isa.NEG, isa.END):
            return _valid([dst]), _valid([dst])
        return _valid([dst, src] if by_register else [dst]), _valid([dst])
    if cls == isa.LDX:
        return _valid([src]), _valid([dst])
    if cls == isa.ST:
        return _valid([dst]), set()
    if cls == isa.STX and insn.mode == isa.ATOMIC:
        if insn.imm == isa.ATOMIC_CMPXCHG:
            return _valid([dst, src, 0]), {0}
        return _valid([dst, src]), _valid([src] if insn.imm & isa.FETCH else [])
    if cls == isa.STX:
        return _valid([dst, src]), set()
    if insn.opcode == isa.OP_CALLX:
        return set(HELPER_ARGUMENTS) | _valid([isa.callx_register(insn)]), {0}
    if insn.opcode == isa.OP_CALL:
        return set(HELPER_ARGUMENTS), {0}
    return set(), set()


def _jump_uses(insn: Instruction) -> set[int]:
    if insn.op == isa.JA:
        return set()
    by_register = insn.opcode & isa.SRC_MASK == isa.X
    return _valid([insn.dst, insn.src] if by_register else [insn.dst])


def _straight_line(block: Block, code: Sequence[Instruction]) -> list[Instruction]:
    """The block's instructions before its terminator (all of them for FALL)."""
    end = block.next_pc if block.kind == FALL else block.end_pc
    out = []
    pc = block.pc
    while pc < end:
        out.append(code[pc])
        pc += 2 if code[pc].opcode == isa.LDDW else 1
    return out


def signatures(
    bodies: Mapping[int, Sequence[int]],
    blocks: Sequence[Block | None],
    code: Sequence[Instruction],
    successors: Mapping[int, Sequence[int]],
) -> dict[int, Signature]:
    """The signature of every function in `bodies` (entry pc -> the pcs of its blocks).

    `successors` maps a block's pc to the pcs control reaches without a call.
    """
    # Per block: what its straight-line part reads before writing, and writes.
    summary: dict[int, tuple[set[int], set[int]]] = {}
    for pcs in bodies.values():
        for pc in pcs:
            if pc in summary:
                continue
            block = blocks[pc]
            assert block is not None
            gen: set[int] = set()
            kill: set[int] = set()
            for insn in reversed(_straight_line(block, code)):
                uses, defs = uses_and_defs(insn)
                gen = (gen - defs) | uses
                kill |= defs
            summary[pc] = (gen, kill)

    params: dict[int, set[int]] = {entry: set() for entry in bodies}
    results: dict[int, set[int]] = {entry: {0} for entry in bodies}
    changed = True
    while changed:
        changed = False
        for entry, pcs in bodies.items():
            live_in = _function_liveness(
                entry, pcs, blocks, code, successors, summary, params, results
            )
            entry_live = live_in[entry] - {FRAME_POINTER}
            if not entry_live <= params[entry]:
                params[entry] |= entry_live
                changed = True
            for pc in pcs:
                block = blocks[pc]
                assert block is not None
                if block.kind != CALL:
                    continue
                wanted = live_in[block.next_pc] & RESULTS
                if not wanted <= results[block.target]:
                    results[block.target] |= wanted
                    changed = True
    return {
        entry: Signature(
            tuple(sorted(params[entry] | {FRAME_POINTER})), tuple(sorted(results[entry]))
        )
        for entry in bodies
    }


def _function_liveness(
    entry: int,
    pcs: Sequence[int],
    blocks: Sequence[Block | None],
    code: Sequence[Instruction],
    successors: Mapping[int, Sequence[int]],
    summary: Mapping[int, tuple[set[int], set[int]]],
    params: Mapping[int, set[int]],
    results: Mapping[int, set[int]],
) -> dict[int, set[int]]:
    """Registers live at the start of each block of one function."""
    live_in: dict[int, set[int]] = {pc: set() for pc in pcs}
    changed = True
    while changed:
        changed = False
        for pc in reversed(pcs):
            block = blocks[pc]
            assert block is not None
            if block.kind == EXIT:
                live = set(results[entry])
            elif block.kind == CALL:
                after = live_in[block.next_pc]
                live = (after - RESULTS) | params[block.target] | {FRAME_POINTER}
            else:
                live = set().union(*(live_in[s] for s in successors[pc]))
                if block.kind == JUMP:
                    live |= _jump_uses(code[block.end_pc])
            gen, kill = summary[pc]
            live = (live - kill) | gen
            if live != live_in[pc]:
                live_in[pc] = live
                changed = True
    return live_in
