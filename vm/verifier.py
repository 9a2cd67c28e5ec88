"""Static checks of a `Program` before it may run.

The verifier guarantees what the engines rely on without checking at run
time: every opcode is one of RFC 9669 (conformance groups base32, base64,
atomic32, atomic64, divmul32, divmul64, and the legacy packet loads LD_ABS and
LD_IND of 1, 2 or 4 bytes), fields that must be zero are zero, registers exist
and the read-only frame pointer r10 is never written, every jump and local call
lands on an instruction inside the code (never the second slot of an `lddw`),
and neither the code nor any function can run off its end.

What it must not do: reason about values (bounds, termination, types: fuel
and the bounds-checked memory make a program safe whatever it computes),
change the program, or report more than the first problem.
"""

from __future__ import annotations

from bpfexec.vm import isa
from bpfexec.vm.errors import VerifyError
from bpfexec.vm.isa import Instruction
from bpfexec.vm.program import Program

_ALU_OPS = frozenset(isa.ALU_NAMES) | {isa.NEG, isa.END}
_JUMP_CONDITIONS = frozenset(isa.JMP_NAMES)
_SWAP_WIDTHS = (16, 32, 64)
_LDDW_PSEUDO = {
    1: "map by fd",
    2: "map value by fd",
    3: "variable by BTF id",
    4: "function address",
    5: "map by index",
    6: "map value by index",
}


class _Problem(Exception):
    """A broken rule at the instruction being checked; `verify` adds where."""


def verify(program: Program) -> None:
    """Raise `VerifyError` naming the first broken rule, its pc, instruction and source line."""
    code = program.instructions
    if not code:
        raise VerifyError("the program has no instructions", 0)
    second_slots = _second_slots(code)
    for pc, insn in enumerate(code):
        if pc in second_slots:
            continue
        try:
            _check(code, pc, insn, second_slots)
        except _Problem as problem:
            raise _error(program, pc, str(problem)) from None
    _check_functions(program, second_slots)
    for pc in program.helper_calls:
        if not (0 <= pc < len(code) and pc not in second_slots and _is_helper_call(code[pc])):
            raise _error(program, pc, "a helper is recorded here, but this is no helper call")


def _second_slots(code: tuple[Instruction, ...]) -> set[int]:
    """Pcs of the second halves of `lddw` pairs, decided left to right like the CPU reads."""
    slots = set()
    pc = 0
    while pc < len(code):
        if code[pc].opcode == isa.LDDW:
            slots.add(pc + 1)
            pc += 2
        else:
            pc += 1
    return slots


def _is_helper_call(insn: Instruction) -> bool:
    return isa.is_helper_call(insn)


def _error(program: Program, pc: int, message: str) -> VerifyError:
    return VerifyError(message, pc, _instruction_text(program, pc), program.location(pc))


def _instruction_text(program: Program, pc: int) -> str:
    code = program.instructions
    if not 0 <= pc < len(code):
        return ""
    try:
        from bpfexec.vm.disassembler import disassemble_instruction

        return disassemble_instruction(code, pc)
    # Without a disassembler, or when it chokes on exactly the malformed slot
    # being reported, the raw bytes still say what is there.
    except Exception:
        return code[pc].encode().hex(" ")


# -- one instruction ----------------------------------------------------------------


def _check(code: tuple[Instruction, ...], pc: int, insn: Instruction, second: set[int]) -> None:
    if insn.dst >= isa.NUM_REGISTERS:
        raise _Problem(f"invalid destination register r{insn.dst} (registers are r0..r10)")
    cls = insn.cls
    if cls in (isa.ALU, isa.ALU64):
        _check_alu(insn)
    elif cls in (isa.JMP, isa.JMP32):
        _check_jump(code, pc, insn, second)
    elif cls == isa.LD:
        _check_ld(code, pc, insn)
    elif cls == isa.LDX:
        _check_ldx(insn)
    else:
        _check_store(insn)


def _unknown(insn: Instruction) -> _Problem:
    return _Problem(f"unknown opcode {insn.opcode:#04x}")


def _require_zero(insn: Instruction, *fields: str) -> None:
    for name in fields:
        value = getattr(insn, name)
        if value:
            raise _Problem(f"reserved field {name} must be 0, is {value}")


def _source_register(insn: Instruction) -> None:
    if insn.src >= isa.NUM_REGISTERS:
        raise _Problem(f"invalid source register r{insn.src} (registers are r0..r10)")


def _no_frame_pointer_write(insn: Instruction, register: int) -> None:
    if register == isa.FRAME_POINTER:
        raise _Problem("write to the read-only frame pointer r10")


def _check_alu(insn: Instruction) -> None:
    wide = insn.cls == isa.ALU64
    op = insn.op
    if op not in _ALU_OPS:
        raise _unknown(insn)
    if op == isa.END:
        # The source bit picks the byte order; ALU64 has only the unconditional bswap.
        if wide and insn.opcode & isa.SRC_MASK != isa.TO_LE:
            raise _unknown(insn)
        _require_zero(insn, "src", "offset")
        if insn.imm not in _SWAP_WIDTHS:
            raise _Problem(f"byte swap width must be 16, 32 or 64, is {insn.imm}")
    elif op == isa.NEG:
        if insn.opcode & isa.SRC_MASK:
            raise _unknown(insn)
        _require_zero(insn, "src", "offset", "imm")
    else:
        if insn.opcode & isa.SRC_MASK == isa.X:
            _source_register(insn)
            _require_zero(insn, "imm")
        else:
            _require_zero(insn, "src")
        _check_alu_offset(insn, wide)
    _no_frame_pointer_write(insn, insn.dst)


def _check_alu_offset(insn: Instruction, wide: bool) -> None:
    op, offset = insn.op, insn.offset
    if op in (isa.DIV, isa.MOD):
        allowed: tuple[int, ...] = (0, 1)  # 1: signed division
    elif op == isa.MOV and insn.opcode & isa.SRC_MASK == isa.X:
        allowed = (0, 8, 16, 32) if wide else (0, 8, 16)  # sign-extending moves
    else:
        allowed = (0,)
    if offset not in allowed:
        raise _Problem(f"offset {offset} is not valid here (allowed: {allowed})")


def _check_target(code: tuple[Instruction, ...], target: int, second: set[int], what: str) -> None:
    if not 0 <= target < len(code):
        raise _Problem(f"{what} target pc {target} is outside the code (pc 0..{len(code) - 1})")
    if target in second:
        raise _Problem(f"{what} target pc {target} is the second slot of an lddw")


def _check_jump(
    code: tuple[Instruction, ...], pc: int, insn: Instruction, second: set[int]
) -> None:
    op, wide = insn.op, insn.cls == isa.JMP
    if op == isa.CALL:
        _check_call(code, pc, insn, second)
    elif op == isa.EXIT:
        if not wide or insn.opcode & isa.SRC_MASK:
            raise _unknown(insn)
        _require_zero(insn, "dst", "src", "offset", "imm")
    elif op == isa.JA:
        if insn.opcode & isa.SRC_MASK:
            raise _unknown(insn)
        if wide:
            _require_zero(insn, "dst", "src", "imm")
        else:  # gotol: the 32-bit offset is in imm
            _require_zero(insn, "dst", "src", "offset")
        _check_target(code, pc + 1 + isa.jump_offset(insn), second, "jump")
    elif op in _JUMP_CONDITIONS:
        if insn.opcode & isa.SRC_MASK == isa.X:
            _source_register(insn)
            _require_zero(insn, "imm")
        else:
            _require_zero(insn, "src")
        _check_target(code, pc + 1 + insn.offset, second, "jump")
    else:
        raise _unknown(insn)


def _check_call(
    code: tuple[Instruction, ...], pc: int, insn: Instruction, second: set[int]
) -> None:
    if insn.opcode == isa.OP_CALLX:
        _require_zero(insn, "src", "offset")
        # LLVM puts the register in dst; older encodings put it in imm.
        if not (insn.imm == 0 or (insn.dst == 0 and 0 < insn.imm < isa.NUM_REGISTERS)):
            raise _Problem(f"callx register must be in dst (imm {insn.imm} is not a register)")
        return
    if insn.opcode != isa.OP_CALL:
        raise _unknown(insn)
    _require_zero(insn, "dst", "offset")
    if insn.src == isa.CALL_LOCAL:
        _check_target(code, pc + 1 + insn.imm, second, "call")
    elif insn.src not in (isa.CALL_HELPER, isa.CALL_BTF):
        raise _Problem(
            f"call with src {insn.src} is not valid (0: helper, 1: local function, 2: runtime "
            "function)"
        )


def _check_ld(code: tuple[Instruction, ...], pc: int, insn: Instruction) -> None:
    if insn.mode in (isa.ABS, isa.IND):
        _check_packet_load(insn)
        return
    if insn.opcode != isa.LDDW:
        raise _unknown(insn)
    if pc + 1 >= len(code):
        raise _Problem("lddw is truncated: its second slot is missing at the end of the code")
    if insn.src in _LDDW_PSEUDO:
        raise _Problem(
            f"lddw with src {insn.src} ({_LDDW_PSEUDO[insn.src]}) is a kernel map/BTF "
            "pseudo-load and is not supported"
        )
    _require_zero(insn, "src", "offset")
    following = code[pc + 1]
    if following.opcode or following.dst or following.src or following.offset:
        raise _Problem("the second slot of lddw must be all zero except its imm")
    _no_frame_pointer_write(insn, insn.dst)


def _check_packet_load(insn: Instruction) -> None:
    """LD_ABS / LD_IND, as the kernel's `check_ld_abs` takes them: r0 is their implicit
    destination (dst 0), offset is reserved, ABS has no source register, and they read
    1, 2 or 4 bytes. They may appear in any function: one that ends the program ends
    it from any call depth, in both engines. (That r6 holds the context is checked by
    the program type's context analysis; without it, r6 is just an address.)"""
    if insn.size == isa.DW:
        raise _Problem("legacy packet load (ld_abs/ld_ind) of 8 bytes does not exist")
    _require_zero(insn, "dst", "offset")
    if insn.mode == isa.ABS:
        _require_zero(insn, "src")
    else:
        _source_register(insn)


def _check_ldx(insn: Instruction) -> None:
    if insn.mode == isa.MEMSX:
        if insn.size == isa.DW:
            raise _Problem("sign-extending load of 8 bytes does not exist (use u64 load)")
    elif insn.mode != isa.MEM:
        raise _unknown(insn)
    _source_register(insn)
    _require_zero(insn, "imm")
    _no_frame_pointer_write(insn, insn.dst)


def _check_store(insn: Instruction) -> None:
    mode = insn.mode
    if insn.cls == isa.ST:
        if mode != isa.MEM:
            raise _unknown(insn)
        _require_zero(insn, "src")
        return
    _source_register(insn)
    if mode == isa.MEM:
        _require_zero(insn, "imm")
    elif mode == isa.ATOMIC:
        if insn.size not in (isa.W, isa.DW):
            raise _Problem("atomic operations exist only for 4 and 8 bytes")
        if insn.imm not in isa.ATOMIC_OPS:
            raise _Problem(f"unknown atomic operation {insn.imm:#x}")
        if insn.imm & isa.FETCH and insn.imm != isa.ATOMIC_CMPXCHG:
            # Fetching atomics return the old value in the source register.
            _no_frame_pointer_write(insn, insn.src)
    else:
        raise _unknown(insn)


# -- control flow at the ends -------------------------------------------------------


def _ends_flow(insn: Instruction) -> bool:
    """An instruction after which execution never falls through to the next slot."""
    return insn.opcode in (isa.OP_EXIT, isa.OP_JA, isa.OP_JA32)


def _check_functions(program: Program, second: set[int]) -> None:
    code = program.instructions
    last = len(code) - 1
    if last in second or not _ends_flow(code[last]):
        raise _error(
            program,
            last - 1 if last in second else last,
            "falls off the end of the code (the last instruction must be exit or an "
            "unconditional jump)",
        )
    covered = 0
    for fn in sorted(program.functions, key=lambda f: f.pc):
        end = fn.pc + fn.size - 1
        if fn.size <= 0 or fn.pc < 0 or end > last:
            where = max(min(fn.pc, last), 0)
            message = f"function {fn.name} (pc {fn.pc}, {fn.size} slots) is not inside the code"
            raise _error(program, where, message)
        if fn.pc < covered:
            raise _error(program, fn.pc, f"function {fn.name} overlaps the previous function")
        if fn.pc in second:
            raise _error(program, fn.pc, f"function {fn.name} starts in the middle of an lddw")
        if end in second or not _ends_flow(code[end]):
            message = (
                f"falls off the end of function {fn.name} (its last instruction must be "
                "exit or an unconditional jump)"
            )
            raise _error(program, end - 1 if end in second else end, message)
        covered = end + 1
