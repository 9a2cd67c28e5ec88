"""Instruction text: the one way bpfexec prints an instruction.

The syntax is the one `llvm-objdump -d` prints for BPF (`r0 = *(u32 *)(r1 + 4)`,
`if w1 s< w2 goto -2`, `r1 = 4294967296 ll`), so a listing reads like the
compiler's, and `bpfexec.vm.assembler` reads every line printed here back into the same
instruction. Traps, verifier errors, traces and the CLI's listing all use it.

The details, and our choices where llvm-objdump's text is ambiguous or missing:

- a local call (src 1) prints `call local -3`: llvm prints `call -3` for both a
  local call and a helper call, which could not be assembled back;
- `callx` accepts both encodings (see `bpfexec.vm.isa.callx_register`) and prints `callx r8`;
- the cpu v4 forms, which llvm 14 cannot decode, use the syntax of the llvm
  releases that added them (`r0 s/= r1`, `r0 = (s8)r1`, `r0 = *(s8 *)(r1 + 0)`,
  `r0 = bswap64 r0`, `gotol +3`, `*(u32 *)(r1 + 0) = 7`); JSET, which llvm never
  emits, follows the other jumps (`if r1 & 16 goto +1`);
- `cmpxchg` names r0 twice, as llvm does: `r0 = cmpxchg_64(r1 + 0, r0, r2)`;
- 32-bit atomics name their value register `w2`, as llvm-objdump does with alu32;
- the legacy packet loads print as llvm does, `r0 = *(u16 *)skb[12]` (LD_ABS) and
  `r0 = *(u8 *)skb[r7]` (LD_IND); llvm never emits LD_IND with an imm and has no
  text for one, which prints `r0 = *(u8 *)skb[r7 + 14]` (or `- 14`);
- an instruction that is not valid prints `<invalid opcode 0x.. ...>` rather than
  raising, because the verifier needs to show what it rejects.

This module only formats; it never validates a program (that is the verifier's
job) and never raises for any instruction.
"""

from __future__ import annotations

from collections.abc import Sequence

from bpfexec.vm import isa
from bpfexec.vm.assembler import is_symbol
from bpfexec.vm.isa import Instruction
from bpfexec.vm.program import Program

# llvm-objdump pads the pc column to this width in its listings.
_PC_WIDTH = 8


def disassemble_instruction(instructions: Sequence[Instruction], pc: int) -> str:
    """The text of the instruction at `pc`.

    The second slot of an `lddw` has no text of its own: it returns "".
    """
    insn = instructions[pc]
    if insn.opcode == 0 and pc > 0 and instructions[pc - 1].opcode == isa.LDDW:
        return ""
    if insn.opcode == isa.LDDW:
        if pc + 1 >= len(instructions):
            return _invalid(insn, "(lddw without its second slot)")
        return _lddw(insn, instructions[pc + 1])
    return format_instruction(insn)


def format_instruction(insn: Instruction) -> str:
    """The text of one single-slot instruction (an `lddw` needs both slots: see
    `disassemble_instruction`)."""
    cls = insn.cls
    if cls in (isa.ALU, isa.ALU64):
        return _alu(insn)
    if cls in (isa.JMP, isa.JMP32):
        return _jump(insn)
    if cls == isa.LDX:
        return _load(insn)
    if cls == isa.ST:
        return _store_imm(insn)
    if cls == isa.STX:
        return _store_reg(insn)
    return _legacy_or_invalid(insn)


def disassemble(program: Program, *, raw: bool = True) -> str:
    """A listing of the whole program in llvm-objdump's layout.

    Each function starts with a `0000000000000000 <name>:` header, preceded by
    `.globl name` (an entry point) or `.local name`, which llvm-objdump does not
    print but the assembler needs to tell functions and entry points apart; each
    line has the pc, the bytes (when `raw`) and the text. Calls show their target
    by name (`call max` for a local function, `call mul` for a helper known by
    name). The listing assembles back into the same instructions, functions and
    helper call sites (`bpfexec.vm.assembler`). Assembly text has no data
    sections: a program with data gets a comment saying that it loads without it.
    """
    instructions = program.instructions
    starts = {fn.pc: fn for fn in program.functions}
    lines: list[str] = [f"; {line}" for line in _data_note(program)]
    pc = 0
    while pc < len(instructions):
        fn = starts.get(pc)
        if fn is not None:
            if lines:
                lines.append("")
            if is_symbol(fn.name):
                lines.append(f"\t{'.globl' if fn.exported else '.local'}\t{fn.name}")
            lines.append(f"{pc * isa.INSTRUCTION_SIZE:016x} <{fn.name}>:")
        text = _listing_text(program, pc)
        width = 2 if instructions[pc].opcode == isa.LDDW and pc + 1 < len(instructions) else 1
        columns = [f"{pc:>{_PC_WIDTH}}:"]
        if raw:
            code = b"".join(insn.encode() for insn in instructions[pc : pc + width])
            columns.append(" ".join(f"{byte:02x}" for byte in code))
        columns.append(text)
        lines.append("\t".join(columns))
        pc += width
    return "\n".join(lines) + "\n" if lines else ""


def _data_note(program: Program) -> list[str]:
    """What the listing leaves out: the data images, which assembly text cannot express."""
    parts = []
    if program.rodata:
        parts.append(f"{len(program.rodata)} bytes of read-only data (.rodata*)")
    if program.data:
        parts.append(f"{len(program.data)} bytes of writable globals (.data*, .bss*)")
    if not parts:
        return []
    return [
        f"This program has {' and '.join(parts)}.",
        "Assembly text cannot carry data: this listing loads without it, and its",
        "loads from those addresses fault. Run the object file itself instead.",
    ]


def _listing_text(program: Program, pc: int) -> str:
    insn = program.instructions[pc]
    if insn.opcode == isa.OP_CALL and insn.src == isa.CALL_LOCAL:
        target = program.function_at(pc + insn.imm + 1)
        if target is not None and target.pc == pc + insn.imm + 1:
            return f"call {target.name}"
    if insn.opcode == isa.OP_CALL and insn.src == isa.CALL_HELPER:
        ref = program.helper_calls.get(pc)
        if ref is not None and ref.name is not None:
            return f"call {ref.name}"
    return disassemble_instruction(program.instructions, pc)


def _reg(number: int, wide: bool = True) -> str:
    return f"{'r' if wide else 'w'}{number}"


def _offset(value: int) -> str:
    """A jump offset as llvm prints it: always signed (`+0`, `-2`)."""
    return f"{value:+d}"


def _address(base: int, offset: int) -> str:
    sign = "-" if offset < 0 else "+"
    return f"r{base} {sign} {abs(offset)}"


def _invalid(insn: Instruction, detail: str = "") -> str:
    return f"<invalid opcode 0x{insn.opcode:02x}{' ' + detail if detail else ''}>"


def _lddw(first: Instruction, second: Instruction) -> str:
    if first.src != isa.LDDW_IMM:
        return _invalid(first, f"(lddw with src {first.src})")
    value = isa.to_signed(isa.lddw_value(first, second), 64)
    return f"{_reg(first.dst)} = {value} ll"


def _alu(insn: Instruction) -> str:
    wide = insn.cls == isa.ALU64
    dst = _reg(insn.dst, wide)
    op = insn.op
    by_register = insn.opcode & isa.SRC_MASK == isa.X
    if op == isa.NEG:
        return _invalid(insn) if by_register else f"{dst} = -{dst}"
    if op == isa.END:
        return _byte_swap(insn)
    if op == isa.MOV and by_register and insn.offset:
        sizes = (8, 16, 32) if wide else (8, 16)
        if insn.offset not in sizes:
            return _invalid(insn, f"(movsx offset {insn.offset})")
        return f"{dst} = (s{insn.offset}){_reg(insn.src, wide)}"
    if op in (isa.DIV, isa.MOD) and insn.offset:
        if insn.offset != 1:
            return _invalid(insn, f"(offset {insn.offset})")
        name = isa.SIGNED_ALU_NAMES[op]
    elif op in isa.ALU_NAMES:
        name = isa.ALU_NAMES[op]
    else:
        return _invalid(insn)
    operand = _reg(insn.src, wide) if by_register else str(insn.imm)
    return f"{dst} {name} {operand}"


def _byte_swap(insn: Instruction) -> str:
    if insn.imm not in (16, 32, 64):
        return _invalid(insn, f"(byte swap width {insn.imm})")
    if insn.cls == isa.ALU64:
        if insn.opcode & isa.SRC_MASK != isa.TO_LE:
            return _invalid(insn)
        name = "bswap"
    else:
        name = "be" if insn.opcode & isa.SRC_MASK == isa.TO_BE else "le"
    return f"r{insn.dst} = {name}{insn.imm} r{insn.dst}"


def _jump(insn: Instruction) -> str:
    wide = insn.cls == isa.JMP
    op = insn.op
    by_register = insn.opcode & isa.SRC_MASK == isa.X
    if op == isa.JA:
        if by_register:
            return _invalid(insn)
        return f"goto {_offset(insn.offset)}" if wide else f"gotol {_offset(insn.imm)}"
    if op in (isa.CALL, isa.EXIT) and not wide:
        return _invalid(insn)
    if op == isa.EXIT:
        return _invalid(insn) if by_register else "exit"
    if op == isa.CALL:
        if by_register:
            return f"callx r{isa.callx_register(insn)}"
        if insn.src == isa.CALL_HELPER:
            return f"call {insn.imm}"
        if insn.src == isa.CALL_LOCAL:
            return f"call local {_offset(insn.imm)}"
        if insn.src == isa.CALL_BTF:
            return f"call runtime {insn.imm}"
        return _invalid(insn, f"(call with src {insn.src})")
    name = isa.JMP_NAMES.get(op)
    if name is None:
        return _invalid(insn)
    operand = _reg(insn.src, wide) if by_register else str(insn.imm)
    return f"if {_reg(insn.dst, wide)} {name} {operand} goto {_offset(insn.offset)}"


def _load(insn: Instruction) -> str:
    if insn.mode == isa.MEM:
        kind = isa.SIZE_NAMES[insn.size]
    elif insn.mode == isa.MEMSX and insn.size in isa.SIGNED_SIZE_NAMES:
        kind = isa.SIGNED_SIZE_NAMES[insn.size]
    else:
        return _invalid(insn)
    return f"r{insn.dst} = *({kind} *)({_address(insn.src, insn.offset)})"


def _store_imm(insn: Instruction) -> str:
    if insn.mode != isa.MEM:
        return _invalid(insn)
    kind = isa.SIZE_NAMES[insn.size]
    return f"*({kind} *)({_address(insn.dst, insn.offset)}) = {insn.imm}"


def _store_reg(insn: Instruction) -> str:
    kind = isa.SIZE_NAMES[insn.size]
    address = _address(insn.dst, insn.offset)
    if insn.mode == isa.MEM:
        return f"*({kind} *)({address}) = r{insn.src}"
    if insn.mode != isa.ATOMIC or insn.size not in (isa.W, isa.DW):
        return _invalid(insn)
    wide = insn.size == isa.DW
    src = _reg(insn.src, wide)
    op = insn.imm
    if op == isa.ATOMIC_XCHG:
        return f"{src} = {'xchg_64' if wide else 'xchg32_32'}({address}, {src})"
    if op == isa.ATOMIC_CMPXCHG:
        r0 = _reg(0, wide)
        return f"{r0} = {'cmpxchg_64' if wide else 'cmpxchg32_32'}({address}, {r0}, {src})"
    operation = isa.ATOMIC_NAMES.get(op & ~isa.FETCH)
    if operation is None or op not in isa.ATOMIC_OPS:
        return _invalid(insn, f"(atomic operation 0x{op & isa.MASK32:x})")
    if op & isa.FETCH:
        return f"{src} = atomic_fetch_{operation}(({kind} *)({address}), {src})"
    return f"lock *({kind} *)({address}) {isa.ALU_NAMES[op]} {src}"


def _legacy_or_invalid(insn: Instruction) -> str:
    """Class LD: `lddw` is handled by the caller; the rest is legacy packet access
    (LD_ABS, LD_IND), printed as llvm does, with IND's imm when it has one."""
    if insn.mode in (isa.ABS, isa.IND) and insn.size != isa.DW:
        kind = isa.SIZE_NAMES[insn.size]
        if insn.mode == isa.ABS:
            where = str(insn.imm)
        elif insn.imm:
            where = f"r{insn.src} {'-' if insn.imm < 0 else '+'} {abs(insn.imm)}"
        else:
            where = f"r{insn.src}"
        return f"r0 = *({kind} *)skb[{where}]"
    return _invalid(insn)
