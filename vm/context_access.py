"""Context accesses of packet programs: checked and rewritten at load time.

The kernel's verifier knows, at every instruction, which registers hold the
context pointer; it refuses an access to a field the program type may not
read or write, and it rewrites the 32-bit loads of `data`, `data_end` and
`data_meta` into loads of the real pointers. `with_context` does the same for
one program type, so that both engines run the rewritten code:

- A forward data-flow analysis over every function of that type (each entered
  with the context in r1) and every function they call tracks, per register
  and per 8-byte stack slot, whether it holds the context: `Ctx.YES` on every
  path, `Ctx.NO` on none, `Ctx.MIXED` otherwise (on some paths only, or moved
  by arithmetic). Calls pass r1..r5 to the callee (its entry joins every call
  site's), keep r6..r9, and leave r0..r5 holding no context.
- A load or store through a `YES` register must hit a field of the type's
  layout (`bpfexec.vm.program_types`) that the type may read or write, and a
  pointer field must be loaded whole as a u32; that load becomes a u64 load of
  the hidden pointer. An access through a `MIXED` register, an atomic on the
  context, `callx`, and `LD_ABS`/`LD_IND` without the context in r6 are
  refused, as the kernel refuses them.

Each refusal is a `VerifyError` naming the pc, the instruction and the source
line. The analysis is the kernel's in what it decides for the programs clang
emits; it does not track the context through memory other than the frame.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from enum import IntEnum

from bpfexec.vm import isa
from bpfexec.vm.disassembler import disassemble_instruction
from bpfexec.vm.errors import VerifyError
from bpfexec.vm.isa import Instruction
from bpfexec.vm.program import Function, Program
from bpfexec.vm.program_types import Field, ProgramType, layout, program_type


class Ctx(IntEnum):
    NO = 0
    YES = 1
    MIXED = 2


def _join(a: Ctx, b: Ctx) -> Ctx:
    return a if a == b else Ctx.MIXED


@dataclasses.dataclass(frozen=True)
class _State:
    registers: tuple[Ctx, ...]  # r0..r10
    slots: frozenset[tuple[int, Ctx]]  # (offset from r10, what the 8 bytes there hold)

    def join(self, other: _State) -> _State:
        registers = tuple(_join(a, b) for a, b in zip(self.registers, other.registers, strict=True))
        mine, theirs = dict(self.slots), dict(other.slots)
        slots = {
            offset: _join(mine.get(offset, Ctx.NO), theirs.get(offset, Ctx.NO))
            for offset in mine.keys() | theirs.keys()
        }
        return _State(registers, _slots(slots))

    def set(self, register: int, value: Ctx) -> _State:
        registers = list(self.registers)
        registers[register] = value
        return dataclasses.replace(self, registers=tuple(registers))


def _slots(slots: dict[int, Ctx]) -> frozenset[tuple[int, Ctx]]:
    return frozenset((offset, value) for offset, value in slots.items() if value is not Ctx.NO)


_NO_REGISTERS = (Ctx.NO,) * isa.NUM_REGISTERS


def context_type(program: Program, function: str | None) -> ProgramType:
    """The program type of `function` (its section's: `bpfexec.vm.program_types`)."""
    return program_type(program.function(function).section)


@dataclasses.dataclass(frozen=True)
class _Rewrite:
    program: Program  # every function of the type rewritten where it could be
    refusals: dict[int, str]  # pc -> why the access there is refused


def with_context(program: Program, function: str | None) -> Program:
    """`program` with the context accesses of the functions of `function`'s type
    checked and rewritten; the same program for `syscall`. Raises VerifyError for
    the first refused access `function` can reach (another function's refusals are
    that function's: the kernel verifies each program alone). The analysis is
    cached on the program (`Program.compiled`): it runs once per module and type."""
    entry = program.function(function)
    kind = program_type(entry.section)
    if kind is ProgramType.SYSCALL:
        return program
    key = f"context:{kind.value}"
    rewrite = program.compiled.get(key)
    if rewrite is None:
        rewrite = program.compiled[key] = _rewrite(program, kind)
    refused = sorted(pc for pc in _reachable(program, entry.pc) if pc in rewrite.refusals)
    if refused:
        pc = refused[0]
        raise VerifyError(
            rewrite.refusals[pc],
            pc,
            disassemble_instruction(program.instructions, pc),
            program.location(pc),
        )
    rewritten: Program = rewrite.program
    return rewritten


def _rewrite(program: Program, kind: ProgramType) -> _Rewrite:
    entries = [fn for fn in program.functions if fn.exported and program_type(fn.section) is kind]
    states = _analyse(program, entries)
    fields, _ = layout(kind)
    code = list(program.instructions)
    refusals: dict[int, str] = {}
    for pc, state in states.items():
        try:
            replacement = _check(code[pc], state, fields, kind)
        except _Refused as refused:
            refusals[pc] = str(refused)
            continue
        if replacement is not None:
            code[pc] = replacement
    # A packet program's numbered helpers are the kernel's, whatever else its object holds.
    rewritten = dataclasses.replace(
        program, instructions=tuple(code), compiled={}, kernel_helpers=True,
        tail_refusals=_tail_refusals(program, kind, refusals),
    )  # fmt: skip
    return _Rewrite(rewritten, refusals)


def _tail_refusals(program: Program, kind: ProgramType, refusals: dict[int, str]) -> dict[int, str]:
    """Why a tail call may not enter each function that a `kind` program's array could
    not hold: one of another type (the kernel's arrays hold one type), or one whose
    code the kernel's verifier refuses (it would not have loaded)."""
    reasons: dict[int, str] = {}
    for fn in program.functions:
        other = program_type(fn.section)
        if other is not kind:
            reasons[fn.pc] = (
                f"{fn.name} is of type {other.value}, and the prog_array of a program of "
                f"type {kind.value} holds only programs of that type"
            )
            continue
        refused = sorted(pc for pc in _reachable(program, fn.pc) if pc in refusals)
        if refused:
            pc = refused[0]
            where = program.location(pc)
            reasons[fn.pc] = (
                f"{fn.name} would not load: pc {pc}"
                + (f" ({where})" if where else "")
                + f": {refusals[pc]}"
            )
    return reasons


def _reachable(program: Program, entry: int) -> set[int]:
    """The pcs a run entering at `entry` may execute (local calls followed)."""
    blank = _State(_NO_REGISTERS, frozenset())
    seen: set[int] = set()
    work = [entry]
    code = program.instructions
    while work:
        pc = work.pop()
        if pc in seen or not 0 <= pc < len(code):
            continue
        seen.add(pc)
        work.extend(target for target, _ in _successors(program, pc, code[pc], blank))
    return seen


class _Refused(Exception):
    pass


# -- the analysis ---------------------------------------------------------------------


def _analyse(program: Program, entries: list[Function]) -> dict[int, _State]:
    """The state before every reachable instruction, from `entries` (r1 the context)."""
    code = program.instructions
    states: dict[int, _State] = {}
    work: list[int] = []

    def reach(pc: int, state: _State) -> None:
        old = states.get(pc)
        new = state if old is None else old.join(state)
        if new != old:
            states[pc] = new
            work.append(pc)

    entry = _State(_NO_REGISTERS, frozenset()).set(1, Ctx.YES)
    for fn in entries:
        reach(fn.pc, entry)
    while work:
        pc = work.pop()
        if not 0 <= pc < len(code):
            continue
        for target, state in _successors(program, pc, code[pc], states[pc]):
            reach(target, state)
    return states


def _successors(
    program: Program, pc: int, insn: Instruction, state: _State
) -> Iterator[tuple[int, _State]]:
    cls = insn.cls
    if insn.opcode == isa.OP_EXIT:
        return
    if insn.opcode == isa.OP_CALL and insn.src == isa.CALL_LOCAL:
        callee = _State(state.registers[:6] + _NO_REGISTERS[6:], frozenset())
        yield pc + 1 + insn.imm, callee.set(0, Ctx.NO)
        yield pc + 1, _after_call(state)
        return
    if insn.cls == isa.JMP and insn.op == isa.CALL:  # a helper (or callx: refused later)
        yield pc + 1, _after_call(state)
        return
    if isa.is_jump(insn):
        yield pc + 1 + isa.jump_offset(insn), state
        if insn.op != isa.JA:
            yield pc + 1, state
        return
    if insn.opcode == isa.LDDW:
        yield pc + 2, state.set(insn.dst, Ctx.NO)
        return
    if cls == isa.LD:  # LD_ABS / LD_IND: r0 is data
        yield pc + 1, state.set(0, Ctx.NO)
        return
    if cls in (isa.ALU, isa.ALU64):
        copy = insn.opcode & isa.SRC_MASK == isa.X and insn.offset == 0  # not movsx
        if cls == isa.ALU64 and insn.op == isa.MOV and copy:
            value = state.registers[insn.src]
        elif cls == isa.ALU64 and insn.op == isa.MOV:
            value = Ctx.NO
        elif state.registers[insn.dst] is not Ctx.NO and cls == isa.ALU64:
            value = Ctx.MIXED  # a moved context pointer: no access through it
        else:
            value = Ctx.NO
        yield pc + 1, state.set(insn.dst, value)
        return
    if cls == isa.LDX:
        value = Ctx.NO
        if insn.src == isa.FRAME_POINTER and insn.size == isa.DW:
            value = dict(state.slots).get(insn.offset, Ctx.NO)
        yield pc + 1, state.set(insn.dst, value)
        return
    if cls in (isa.ST, isa.STX):
        after = state
        if insn.dst == isa.FRAME_POINTER:
            size = isa.SIZE_BYTES[insn.size]
            slots = {
                offset: value
                for offset, value in state.slots
                if offset + 8 <= insn.offset or insn.offset + size <= offset
            }
            if cls == isa.STX and insn.mode == isa.MEM and insn.size == isa.DW:
                slots[insn.offset] = state.registers[insn.src]
            after = dataclasses.replace(state, slots=_slots(slots))
        if insn.mode == isa.ATOMIC and insn.imm & isa.FETCH:
            register = 0 if insn.imm == isa.ATOMIC_CMPXCHG else insn.src
            after = after.set(register, Ctx.NO)
        yield pc + 1, after
        return
    yield pc + 1, state


def _after_call(state: _State) -> _State:
    return dataclasses.replace(state, registers=_NO_REGISTERS[:6] + state.registers[6:])


# -- the checks -----------------------------------------------------------------------


def _check(
    insn: Instruction, state: _State, fields: tuple[Field, ...], kind: ProgramType
) -> Instruction | None:
    """Refuse a context access `kind` may not make; the rewritten instruction, if any."""
    cls = insn.cls
    name = kind.value
    if insn.opcode == isa.OP_CALLX:
        raise _Refused(f"callx is not supported in {name} programs")
    if cls == isa.LD and insn.mode in (isa.ABS, isa.IND):
        if state.registers[6] is not Ctx.YES:
            raise _Refused("LD_ABS and LD_IND need the context in r6")
        return None
    if cls == isa.LDX:
        base, access = insn.src, "read"
    elif cls in (isa.ST, isa.STX):
        base, access = insn.dst, "write"
    else:
        return None
    held = state.registers[base]
    if held is Ctx.NO:
        return None
    if held is Ctx.MIXED:
        raise _Refused(
            f"r{base} is the context on some paths only, or a context pointer moved by "
            "arithmetic: the kernel's verifier refuses an access through it"
        )
    size = isa.SIZE_BYTES[insn.size]
    offset = insn.offset
    if insn.mode == isa.ATOMIC:
        raise _Refused(f"atomic access to the {name} context (offset {offset})")
    found = next((f for f in fields if f.offset <= offset < f.offset + f.size), None)
    if found is None or offset + size > found.offset + found.size:
        raise _Refused(f"invalid {access} of {size} bytes at offset {offset} of the {name} context")
    if access == "write":
        if kind not in found.writable:
            raise _Refused(f"{name} programs may not write the context field {found.name}")
        return None
    if found.readable is not None and kind not in found.readable:
        raise _Refused(f"{name} programs may not read the context field {found.name}")
    if found.pointer is None:
        return None
    if size != 4 or offset != found.offset or insn.mode != isa.MEM:
        raise _Refused(f"the context field {found.name} must be read whole, as a u32")
    return Instruction(isa.LDX | isa.MEM | isa.DW, insn.dst, insn.src, found.pointer, 0)
