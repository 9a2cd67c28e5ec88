"""Which loops the optimized tier unrolls, and by how much.

Every block charges its fuel on entry, and every backward jump is a poll site: in
a tight loop those checks cost as much as the eBPF instructions. An unrolled loop
pays them once per group of iterations instead. Before entering a group of `copies`
iterations the latch checks `fuel - copies * max_cost >= poll_at`: no iteration
costs more than `max_cost`, and `poll_at` is never negative, so inside the group no
block can run out of fuel and no poll site has to read the interrupt flag. The
copies then charge each block's exact cost without checking it, so fuel and every
trap come out exactly as in the interpreter. When the check fails, the loop goes
round once through the original, fully checked blocks.

A loop qualifies when it is innermost and simple: a head H, and a body made of the
blocks that reach one of its backward jumps to H without passing through H, all
at pcs from H on. (A backward jump to H from a block entered around H, such as
the outer latch of clang's rotated loops, still enters the copies; it is not part
of the body.) The body may contain no local call (a poll site of its own), no
helper call (a helper may charge fuel), and no backward jump except those to H.
Every other edge in the body goes to a higher pc, so the body without its back
edges is acyclic and `max_cost` is its longest path. Exits from a copy go to the
original blocks, which check their fuel as usual.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bpfexec.vm import isa
from bpfexec.vm.interpreter import FALL, JUMP, Block
from bpfexec.vm.isa import Instruction

MAX_COPIES = 8  # iterations per group, at most
# Instructions of one group, at most: longer bodies get fewer copies, and a body
# too long for two gains little (its checks are a small share of its time).
GROUP_INSTRUCTIONS = 64


@dataclass(frozen=True)
class Loop:
    head: int
    body: frozenset[int]  # pcs of the blocks copied, the head included
    max_cost: int  # fuel of the costliest path from the head to a back edge
    copies: int  # iterations per group
    single_latch: bool  # one block of the body jumps back to the head


def unrollable_loops(
    pcs: Sequence[int],
    blocks: Sequence[Block | None],
    code: Sequence[Instruction],
    jumps: dict[int, list[int]],
) -> dict[int, Loop]:
    """The loops among the blocks `pcs` (one function) worth unrolling, by head."""
    inside = set(pcs)
    predecessors: dict[int, list[int]] = {pc: [] for pc in pcs}
    latches: dict[int, list[int]] = {}
    for pc in pcs:
        for successor in jumps[pc]:
            predecessors[successor].append(pc)
        block = blocks[pc]
        assert block is not None
        if block.kind == JUMP and block.backward:
            head = block.end_pc + 1 + isa.jump_offset(code[block.end_pc])
            latches.setdefault(head, []).append(pc)
    loops = {}
    for head, ends in latches.items():
        # A jump back to the head from a block reached around it (clang's rotated
        # loops enter through the outer latch) is not part of this loop.
        body: set[int] = set()
        for end in ends:
            body |= _body(head, end, predecessors) or set()
        if not body or not body <= inside:
            continue
        loop = _loop(head, body, blocks, code, jumps)
        if loop is not None:
            loops[head] = loop
    return loops


def _body(head: int, latch: int, predecessors: dict[int, list[int]]) -> set[int] | None:
    """The blocks that reach `latch` without passing through `head`, and the head."""
    body = {head, latch}
    work = [latch] if latch != head else []
    while work:
        for pc in predecessors[work.pop()]:
            if pc < head:
                return None  # entered around the head: not a loop this handles
            if pc not in body:
                body.add(pc)
                work.append(pc)
    return body


def _loop(
    head: int,
    body: set[int],
    blocks: Sequence[Block | None],
    code: Sequence[Instruction],
    jumps: dict[int, list[int]],
) -> Loop | None:
    instructions = 0
    latches = 0
    longest: dict[int, int] = {}  # pc -> fuel of the costliest path from the head to it
    max_cost = 0
    for pc in sorted(body):  # every edge but a back edge goes to a higher pc
        block = blocks[pc]
        assert block is not None
        if block.kind not in (FALL, JUMP):
            return None
        end = block.next_pc if block.kind == FALL else block.end_pc + 1
        if any(insn.opcode in (isa.OP_CALL, isa.OP_CALLX) for insn in code[pc:end]):
            return None
        instructions += end - pc
        latches += head in jumps[pc]
        if block.kind == JUMP and block.backward and head not in jumps[pc]:
            return None  # a backward jump elsewhere: an inner loop, or out of this one
        reach = longest.get(pc, 0 if pc == head else None)
        if reach is None:
            continue  # not reachable from the head inside the body: never copied into
        reach += block.cost
        for successor in jumps[pc]:
            if successor == head:
                max_cost = max(max_cost, reach)
            elif successor in body:
                longest[successor] = max(longest.get(successor, 0), reach)
    copies = min(MAX_COPIES, GROUP_INSTRUCTIONS // max(instructions, 1))
    if copies < 2 or max_cost == 0:
        return None
    return Loop(head, frozenset(body), max_cost, copies, latches == 1)
