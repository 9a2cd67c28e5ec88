"""Which stores of a function cannot write the stack, the globals or a context's hidden slots.

`bpfexec.vm.jit.batch_loop.reset_extent` zeroes, between two inputs of a batch,
only the part of the stack a run may have written. A store at a constant offset
from r10 says where it writes; a store through any other register could write
anywhere, since any integer may be an address (a program can compute a stack
address). `harmless_stores` proves, for some of those, that the address is in
a region that is none of these: it follows, along every path through one
function, what each register holds, as one of

- `MAP`: the result of `bpf_map_lookup_elem` (a value's address in region
  MAP0 + n, or 0, or an inner map's handle in region 0);
- `CONTEXT`: the packet context (argument buffer 0), only as the entry
  function's r1 in a packet test run, whose r1 is the context's address;
- `PACKET`: a load of the context's hidden `data`, `data_end` or `data_meta`
  slot (region BUFFER0 + PACKET, the frame);

each plus a constant offset below 2**31 in size, which stays within the region
or its neighbours (a region is 2**32 bytes; the neighbours of MAP0 + n, of
region 0 and of the frame's region are never the stack's or the globals'),
and lands, in a neighbour, at an offset no buffer reaches. Anything else
(other arithmetic, another load, a register two paths disagree on, what a call
leaves in r0..r5) is unknown. A store through a MAP or PACKET register is
harmless; through the CONTEXT, unless it touches the hidden slots (which the
PACKET reasoning needs to hold genuine frame addresses: only the test run and
the packet helpers write them). docs/jit.md argues this; tests attack it.
"""

from __future__ import annotations

from collections.abc import Sequence

from bpfexec.vm import isa
from bpfexec.vm.isa import FRAME_POINTER, NUM_REGISTERS, Instruction
from bpfexec.vm.program_types import HIDDEN, PACKET_DATA, PACKET_END, PACKET_META

MAP, CONTEXT, PACKET = "map", "context", "packet"
_SLOTS = (PACKET_DATA, PACKET_END, PACKET_META)
_BOUND = 1 << 31  # the size of a constant offset that keeps a pointer's provenance

Value = tuple[str, int] | None  # (provenance, constant offset), or unknown
State = tuple[Value, ...]


def harmless_stores(
    code: Sequence[Instruction],
    start: int,
    size: int,
    lookups: frozenset[int],
    context: bool,
) -> frozenset[int]:
    """The pcs of stores (ST, STX, atomics) in the function at `start` (`size`
    instructions) whose address is MAP, PACKET, or CONTEXT away from its hidden
    slots, on every path. `lookups` are the pcs of its `bpf_map_lookup_elem`
    calls; `context` says that r1 holds the packet context on entry."""
    entry: list[Value] = [None] * NUM_REGISTERS
    if context:
        entry[1] = (CONTEXT, 0)
    states: dict[int, State] = {start: tuple(entry)}
    work = [start]
    end = start + size
    while work:
        pc = work.pop()
        state = states[pc]
        insn = code[pc]
        after = _transfer(insn, pc, state, lookups)
        for target in _successors(code, pc, insn):
            if not start <= target < end:
                continue
            known = states.get(target)
            joined = after if known is None else _join(known, after)
            if joined != known:
                states[target] = joined
                work.append(target)
    harmless = set()
    for pc, state in states.items():
        insn = code[pc]
        store = insn.cls in (isa.ST, isa.STX) and insn.dst != FRAME_POINTER
        if store and _harmless(state[insn.dst], insn.offset, isa.SIZE_BYTES[insn.size]):
            harmless.add(pc)
    return frozenset(harmless)


def _harmless(value: Value, offset: int, size: int) -> bool:
    if value is None:
        return False
    kind, base = value
    if kind == CONTEXT:
        return base + offset + size <= HIDDEN and abs(base + offset) < _BOUND
    return abs(base + offset) < _BOUND


def _join(a: State, b: State) -> State:
    return tuple(x if x == y else None for x, y in zip(a, b, strict=True))


def _offset(value: Value, delta: int) -> Value:
    if value is None or abs(value[1] + delta) >= _BOUND:
        return None
    return (value[0], value[1] + delta)


def _transfer(insn: Instruction, pc: int, state: State, lookups: frozenset[int]) -> State:
    registers = list(state)
    cls, dst, src = insn.cls, insn.dst, insn.src
    by_register = insn.opcode & isa.SRC_MASK == isa.X
    if insn.opcode == isa.OP_CALL or insn.opcode == isa.OP_CALLX or isa.is_packet_load(insn):
        for n in range(6):  # r0 the result, r1..r5 what the callee left
            registers[n] = None
        if pc in lookups:
            registers[0] = (MAP, 0)
    elif cls == isa.ALU64 and insn.op == isa.MOV and insn.offset == 0:
        registers[dst] = registers[src] if by_register else None
    elif cls == isa.ALU64 and insn.op in (isa.ADD, isa.SUB) and not by_register:
        registers[dst] = _offset(registers[dst], insn.imm if insn.op == isa.ADD else -insn.imm)
    elif cls == isa.LDX:
        loaded = registers[src]
        slot = None if loaded is None else loaded[1] + insn.offset
        genuine = (
            loaded is not None
            and loaded[0] == CONTEXT
            and slot in _SLOTS
            and insn.size == isa.DW
            and insn.mode == isa.MEM
        )
        registers[dst] = (PACKET, 0) if genuine else None
    elif cls == isa.STX and insn.mode == isa.ATOMIC:
        if insn.imm == isa.ATOMIC_CMPXCHG:
            registers[0] = None
        elif insn.imm & isa.FETCH:
            registers[src] = None
    elif cls in (isa.ALU, isa.ALU64) or insn.opcode == isa.LDDW:
        registers[dst] = None
    return tuple(registers)


def _successors(code: Sequence[Instruction], pc: int, insn: Instruction) -> list[int]:
    if insn.opcode == isa.LDDW:
        return [pc + 2]
    if insn.cls not in (isa.JMP, isa.JMP32) or insn.opcode in (isa.OP_CALL, isa.OP_CALLX):
        return [pc + 1]
    if insn.opcode == isa.OP_EXIT:
        return []
    taken = pc + 1 + isa.jump_offset(insn)
    return [taken] if insn.op == isa.JA else [taken, pc + 1]
