"""Which registers each function takes and hands back.

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

The JIT passes each function only its parameters; `bpfexec run` warns when a
function reads an argument register that no `--arg` sets (`arguments_read`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from bpfexec.vm import isa
from bpfexec.vm.interpreter import CALL, EXIT, FALL, JUMP, Block
from bpfexec.vm.isa import FRAME_POINTER, NUM_REGISTERS, Instruction
from bpfexec.vm.program import Program

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
    if isa.is_packet_load(insn):
        return isa.packet_load_operands(insn)
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


def successors(block: Block, code: Sequence[Instruction]) -> list[int]:
    """The pcs control may reach from `block` without a call (a call's return included)."""
    if block.kind in (FALL, CALL):
        return [block.next_pc]
    if block.kind == EXIT:
        return []
    insn = code[block.end_pc]
    taken = block.end_pc + 1 + isa.jump_offset(insn)
    return [taken] if insn.op == isa.JA else [taken, block.end_pc + 1]


def reachable(entry: int, blocks: Sequence[Block | None], code: Sequence[Instruction]) -> list[int]:
    """The pcs of the blocks control reaches from `entry` without a call, ascending.

    ValueError if control reaches a pc where no block starts.
    """
    seen = {entry}
    work = [entry]
    while work:
        block = blocks[work.pop()]
        assert block is not None
        for pc in successors(block, code):
            if not 0 <= pc < len(blocks) or blocks[pc] is None:
                raise ValueError(f"pc {block.end_pc}: control reaches pc {pc}, not a block")
            if pc not in seen:
                seen.add(pc)
                work.append(pc)
    return sorted(seen)


def arguments_read(program: Program, blocks: Sequence[Block | None], entry: int) -> set[int]:
    """The argument registers (r1..r5) the function at `entry` may read before
    writing them, on some path, through its local calls included; not counting
    what a helper call passes on."""
    code = program.instructions
    bodies: dict[int, list[int]] = {}
    todo = [entry]
    while todo:
        pc = todo.pop()
        if pc not in bodies:
            bodies[pc] = reachable(pc, blocks, code)
            todo += [b.target for b in map(blocks.__getitem__, bodies[pc]) if b and b.kind == CALL]
    jumps = {pc: successors(blocks[pc], code) for pcs in bodies.values() for pc in pcs}  # type: ignore[arg-type]
    found = signatures(bodies, blocks, code, jumps, _uses_not_passing_to_helpers)
    return set(found[entry].params) & HELPER_ARGUMENTS


def _uses_not_passing_to_helpers(insn: Instruction) -> tuple[set[int], set[int]]:
    """`uses_and_defs`, but a helper call reads none of r1..r5: a helper that takes
    fewer arguments is handed whatever they hold, and that is no argument of the run."""
    uses, defs = uses_and_defs(insn)
    if insn.opcode == isa.OP_CALL:
        return set(), defs
    if insn.opcode == isa.OP_CALLX:
        return _valid([isa.callx_register(insn)]), defs
    return uses, defs


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
    uses_and_defs: Callable[[Instruction], tuple[set[int], set[int]]] = uses_and_defs,
) -> dict[int, Signature]:
    """The signature of every function in `bodies` (entry pc -> the pcs of its blocks).

    `successors` maps a block's pc to the pcs control reaches without a call;
    `uses_and_defs` says what a straight-line instruction reads and writes.
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
