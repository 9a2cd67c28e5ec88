"""Assembly text to instructions: the inverse of `bpfexec.vm.disassembler`.

`assemble()` reads the llvm-objdump syntax the disassembler prints, one
instruction per line, plus what a person writing a test or a listing needs:

- comments from `;`, `#` or `//` to the end of the line;
- labels (`name:`), as jump targets (`goto done`, `if r1 > 3 goto big`) and as
  call targets (`call max` is a local call when `max` is a label);
- `call name` where `name` is not a label: a helper called by name (encoded as
  `call -1` plus an entry in `helper_calls`, like a relocation in an object file);
- a pasted `llvm-objdump -d` listing: the pc and byte columns, the `<sym+0x..>`
  annotations of jumps and the `file format` / `Disassembly of` lines are
  skipped; a `0000000000000000 <name>:` header is a label;
- the directives `.globl name` / `.global name`, `.local name` and
  `.type name,@function`; harmless layout directives of `clang -S` output are
  ignored.

Which labels start a function: the label at pc 0 (or an implicit `main` when
the text starts without one); a label named in `.globl`, `.local` or
`.type @function`; a label that is the target of a `call`; and a label that
follows an `exit` or an unconditional `goto` and is not the target of any jump
(so `sub:` after the `exit` of `add:` is a function, while `done:` after a
`goto` that other jumps reach is not). Labels beginning with `.L` (compiler-local) never start one.
Exported functions: those named in `.globl` when the text has any `.globl`,
otherwise every function not named in `.local` (the disassembler writes one or
the other before each function, so a listing keeps which functions are entry points).

Every problem raises `LoadError("name:line: message")`; no input text makes
this module raise anything else. It does not check that the program is valid
(jump targets, reserved fields...): that is the verifier's job.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from bpfexec.vm import isa
from bpfexec.vm.errors import LoadError
from bpfexec.vm.isa import Instruction
from bpfexec.vm.program import Function, HelperRef

DEFAULT_FUNCTION = "main"  # the name of the first function when the text has no label there


@dataclass(frozen=True)
class Assembled:
    """What a text assembles to: the parts of a `Program` that text can express."""

    instructions: tuple[Instruction, ...]
    functions: tuple[Function, ...]
    helper_calls: dict[int, HelperRef] = field(default_factory=dict)


def assemble(text: str, name: str = "<asm>") -> Assembled:
    """Assemble `text`; errors name `name` and the line."""
    return _Assembler(name).run(text)


class _AsmError(Exception):
    """A problem on the current line; the driver adds `name:line:`."""


# --- lexical pieces -------------------------------------------------------------------------

_NUM = r"[+-]?\s*(?:0[xX][0-9a-fA-F]+|[0-9]+)"
_REG = r"[rw][0-9]+"
_IDENT = r"[A-Za-z_.$][A-Za-z0-9_.$]*"
_TARGET = rf"(?:[+-]\s*[0-9]+|{_IDENT})"
_ADDR = rf"({_REG})\s*(?:([+-])\s*([0-9]+|0[xX][0-9a-fA-F]+))?"  # base register, sign, offset
_MEM = rf"\*\s*\(\s*([us](?:8|16|32|64))\s*\*\s*\)\s*\(\s*{_ADDR}\s*\)"

_SIZES = {name: size for size, name in isa.SIZE_NAMES.items()}
_SIGNED_SIZES = {name: size for size, name in isa.SIGNED_SIZE_NAMES.items()}
_JUMP_OPS = {name: op for op, name in isa.JMP_NAMES.items()}
_ALU_OPS = {name: op for op, name in isa.ALU_NAMES.items()}
_SIGNED_ALU_OPS = {name: op for op, name in isa.SIGNED_ALU_NAMES.items()}
_ATOMIC_OPS = {name: op for op, name in isa.ATOMIC_NAMES.items()}


def _alternatives(names: Iterable[str]) -> str:
    # Longest first, so that `s>=` is tried before `s>` and `>`.
    return "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))


_JUMP_OP_RE = _alternatives(_JUMP_OPS)
_ALU_OP_RE = _alternatives([*_ALU_OPS, *_SIGNED_ALU_OPS])
_ATOMIC_OP_RE = _alternatives(isa.ALU_NAMES[op] for op in isa.ATOMIC_NAMES)

_LISTING_LINE = re.compile(r"\s*[0-9]+:\s+(?:[0-9a-f]{2}\s)*[0-9a-f]{2}(?:\t|\s{2,}|$)(.*)")
_LISTING_PC = re.compile(r"\s*[0-9]+:(?:\t|\s{2,})(.*)")  # --no-show-raw-insn
_LISTING_HEADER = re.compile(r"[0-9a-f]{8,16}\s+<([^<>\s]+)>:\s*")
_LISTING_NOISE = re.compile(r".*:\s+file format .*|Disassembly of section .*")
_JUMP_ANNOTATION = re.compile(r"(goto[l]?\s+[+-]?\s*[0-9]+)\s+<[^<>]*>$")
_LABEL = re.compile(rf"({_IDENT})\s*:(.*)")
_DIRECTIVE = re.compile(r"(\.[A-Za-z_][A-Za-z0-9_]*)\b(.*)")

# Directives `clang -S` emits around code that do not change it.
_IGNORED_DIRECTIVES = frozenset(
    {".text", ".file", ".p2align", ".align", ".size", ".addrsig", ".addrsig_sym", ".ident",
     ".loc", ".weak", ".hidden", ".visibility"}
)  # fmt: skip


def is_symbol(name: str) -> bool:
    """Whether `name` can be a label, a `.globl` symbol and a `call` target."""
    return re.fullmatch(_IDENT, name) is not None


def _strip_comment(line: str) -> str:
    cut = len(line)
    for marker in (";", "#", "//"):
        at = line.find(marker)
        if at >= 0:
            cut = min(cut, at)
    return line[:cut]


# --- one line -------------------------------------------------------------------------------


@dataclass
class _Slot:
    """An instruction being assembled, with what must be resolved once every label is known."""

    insn: Instruction
    line: int
    jump_label: str | None = None  # `goto label`: patch offset (or imm for gotol)
    call_label: str | None = None  # `call name`: local call or helper by name


_Parser = Callable[["re.Match[str]"], "list[_Slot] | _Slot"]


class _Assembler:
    def __init__(self, name: str) -> None:
        self.name = name
        self.slots: list[_Slot] = []
        self.labels: dict[str, int] = {}  # label -> pc
        self.label_lines: dict[str, int] = {}
        self.after_terminator: set[str] = set()  # labels that follow exit / goto
        self.declared: set[str] = set()  # .type name,@function, .globl name or .local name
        self.globl: set[str] = set()
        self.local: set[str] = set()
        self.line = 0
        self._forms: list[tuple[re.Pattern[str], _Parser]] = [
            (re.compile(pattern + r"\s*"), parser) for pattern, parser in self._grammar()
        ]

    # The grammar: one regular expression per instruction form, tried in order.
    def _grammar(self) -> list[tuple[str, _Parser]]:
        return [
            (r"exit", lambda m: self._slot(isa.OP_EXIT)),
            (rf"(goto|gotol)\s+({_TARGET})", self._goto),
            (rf"if\s+({_REG})\s*({_JUMP_OP_RE})\s*({_REG}|{_NUM})\s+goto\s+({_TARGET})", self._if),
            (rf"call\s+local\s+({_NUM})", self._call_local),
            (rf"call\s+runtime\s+({_NUM})", self._call_runtime),
            (rf"call\s+({_NUM})", self._call_number),
            (rf"call\s+({_IDENT})", self._call_name),
            (rf"callx\s+({_REG})", self._callx),
            (rf"lock\s+{_MEM}\s*({_ATOMIC_OP_RE})\s*({_REG})", self._lock),
            (
                rf"({_REG})\s*=\s*atomic_fetch_(\w+)\s*\(\s*\(\s*(u32|u64)\s*\*\s*\)\s*"
                rf"\(\s*{_ADDR}\s*\)\s*,\s*({_REG})\s*\)",
                self._fetch,
            ),
            (
                rf"({_REG})\s*=\s*(xchg_64|xchg32_32)\s*\(\s*{_ADDR}\s*,\s*({_REG})\s*\)",
                self._xchg,
            ),
            (
                rf"({_REG})\s*=\s*(cmpxchg_64|cmpxchg32_32)\s*\(\s*{_ADDR}\s*,"
                rf"(?:\s*({_REG})\s*,)?\s*({_REG})\s*\)",
                self._cmpxchg,
            ),
            (rf"{_MEM}\s*=\s*({_REG})", self._store_reg),
            (rf"{_MEM}\s*=\s*({_NUM})", self._store_imm),
            (rf"({_REG})\s*=\s*{_MEM}", self._load),
            (rf"({_REG})\s*=\s*\*\s*\(\s*(u8|u16|u32)\s*\*\s*\)\s*skb\[\s*({_REG}|{_NUM})"
             rf"(?:\s*([+-])\s*([0-9]+|0[xX][0-9a-fA-F]+))?\s*\]", self._legacy),
            (rf"({_REG})\s*=\s*({_NUM})\s+ll", self._lddw),
            (rf"({_REG})\s*=\s*-\s*({_REG})", self._neg),
            (rf"({_REG})\s*=\s*(be|le|bswap)(16|32|64)\s+({_REG})", self._byte_swap),
            (rf"({_REG})\s*=\s*\(\s*(s8|s16|s32)\s*\)\s*({_REG})", self._movsx),
            (rf"({_REG})\s*({_ALU_OP_RE})\s*({_REG}|{_NUM})", self._alu),
        ]  # fmt: skip

    # -- driver ------------------------------------------------------------------------------

    def run(self, text: str) -> Assembled:
        for self.line, raw in enumerate(text.splitlines(), start=1):
            try:
                self._line(raw)
            except _AsmError as exc:
                raise LoadError(f"{self.name}:{self.line}: {exc}") from None
        if not self.slots:
            raise LoadError(f"{self.name}: no instructions")
        return self._link()

    def _line(self, raw: str) -> None:
        line = _strip_comment(raw).strip()
        if not line or _LISTING_NOISE.fullmatch(line):
            return
        header = _LISTING_HEADER.fullmatch(line)
        if header:
            self._label(header[1])
            return
        listed = _LISTING_LINE.fullmatch(line) or _LISTING_PC.fullmatch(line)
        if listed:
            line = listed[1].strip()
            if not line:
                return  # the second slot of an lddw in our own listing
        while True:
            label = _LABEL.fullmatch(line)
            if not label:
                break
            self._label(label[1])
            line = label[2].strip()
        if not line:
            return
        directive = _DIRECTIVE.fullmatch(line)
        if directive:
            self._directive(directive[1], directive[2].strip())
            return
        line = _JUMP_ANNOTATION.sub(r"\1", line)
        self._instruction(line)

    def _label(self, label: str) -> None:
        if label in self.labels:
            raise _AsmError(f"label '{label}' already defined on line {self.label_lines[label]}")
        self.labels[label] = len(self.slots)
        self.label_lines[label] = self.line
        if self.slots and _ends_flow(self.slots[-1].insn):
            self.after_terminator.add(label)

    def _directive(self, name: str, rest: str) -> None:
        if name in (".globl", ".global", ".local"):
            visibility = self.local if name == ".local" else self.globl
            for symbol in (s.strip() for s in rest.split(",")):
                if not is_symbol(symbol):
                    raise _AsmError(f"bad symbol name {symbol!r} in {name}")
                visibility.add(symbol)
                self.declared.add(symbol)
        elif name == ".type":
            parts = [p.strip() for p in rest.split(",")]
            if len(parts) == 2 and parts[1] in ("@function", "%function", "STT_FUNC"):
                self.declared.add(parts[0])
        elif name == ".section":
            section, _, flags = rest.partition(",")
            section = section.strip().strip('"')
            if not (section.startswith(".text") or "x" in flags.split(",")[0]):
                raise _AsmError(
                    f"section {section} is not code: data sections are not supported in "
                    "assembly text; compile to an object file instead"
                )
        elif name not in _IGNORED_DIRECTIVES and not name.startswith(".cfi_"):
            raise _AsmError(f"unsupported directive {name}")

    def _instruction(self, text: str) -> None:
        for pattern, parser in self._forms:
            match = pattern.fullmatch(text)
            if match:
                made = parser(match)
                self.slots.extend(made if isinstance(made, list) else [made])
                return
        raise _AsmError(f"cannot parse {text!r}{_hint(text)}")

    # -- operands ----------------------------------------------------------------------------

    def _slot(
        self, opcode: int, dst: int = 0, src: int = 0, offset: int = 0, imm: int = 0
    ) -> _Slot:
        return _Slot(Instruction(opcode, dst, src, offset, imm), self.line)

    @staticmethod
    def _register(text: str) -> tuple[int, bool]:
        """Register number and whether it is 64-bit (`r`) rather than 32-bit (`w`)."""
        digits = text[1:]
        if len(digits) > 2 or int(digits) >= isa.NUM_REGISTERS or digits != str(int(digits)):
            raise _AsmError(f"unknown register {text}")
        return int(digits), text[0] == "r"

    def _base(self, text: str) -> int:
        number, wide = self._register(text)
        if not wide:
            raise _AsmError(f"an address needs a 64-bit register, not {text}")
        return number

    @staticmethod
    def _number(text: str) -> int:
        cleaned = "".join(text.split())  # every space `\s` matches, not just " "
        negative = cleaned.startswith("-")
        digits = cleaned.lstrip("+-")
        if len(digits) > 40:
            raise _AsmError(f"number {text} is too large")
        value = int(digits, 16) if digits[:2].lower() == "0x" else int(digits, 10)
        return -value if negative else value

    def _imm32(self, text: str) -> int:
        value = self._number(text)
        if not -(1 << 31) <= value <= isa.MASK32:
            raise _AsmError(f"immediate {_show(value)} does not fit in 32 bits")
        return isa.to_signed(value, 32)

    def _offset16(self, sign: str | None, text: str | None) -> int:
        value = 0 if text is None else self._number(text)
        value = -value if sign == "-" else value
        if not -(1 << 15) <= value < 1 << 15:
            raise _AsmError(f"offset {value} does not fit in 16 bits")
        return value

    def _pair(self, dst_text: str, src_text: str) -> tuple[int, int, bool]:
        dst, wide = self._register(dst_text)
        src, src_wide = self._register(src_text)
        if wide != src_wide:
            raise _AsmError(f"{dst_text} and {src_text}: mixed 32-bit and 64-bit registers")
        return dst, src, wide

    def _operand(self, dst_text: str, operand: str) -> tuple[int, int, int, bool, bool]:
        """dst, src, imm, 64-bit?, by register? for `dst op operand` forms."""
        if re.fullmatch(_REG, operand):
            dst, src, wide = self._pair(dst_text, operand)
            return dst, src, 0, wide, True
        dst, wide = self._register(dst_text)
        return dst, 0, self._imm32(operand), wide, False

    # -- instruction forms -------------------------------------------------------------------

    def _goto(self, m: re.Match[str]) -> _Slot:
        long = m[1] == "gotol"
        slot = self._slot(isa.OP_JA32 if long else isa.OP_JA)
        target = m[2]
        if target[0] in "+-":
            if long:
                slot.insn = Instruction(isa.OP_JA32, imm=self._imm32(target))
            else:
                slot.insn = Instruction(isa.OP_JA, offset=self._offset16(None, target))
        else:
            slot.jump_label = target
        return slot

    def _if(self, m: re.Match[str]) -> _Slot:
        dst, src, imm, wide, by_register = self._operand(m[1], m[3])
        opcode = (isa.JMP if wide else isa.JMP32) | _JUMP_OPS[m[2]]
        opcode |= isa.X if by_register else isa.K
        slot = self._slot(opcode, dst, src, 0, imm)
        target = m[4]
        if target[0] in "+-":
            slot.insn = Instruction(opcode, dst, src, self._offset16(None, target), imm)
        else:
            slot.jump_label = target
        return slot

    def _call_local(self, m: re.Match[str]) -> _Slot:
        return self._slot(isa.OP_CALL, src=isa.CALL_LOCAL, imm=self._imm32(m[1]))

    def _call_number(self, m: re.Match[str]) -> _Slot:
        return self._slot(isa.OP_CALL, src=isa.CALL_HELPER, imm=self._imm32(m[1]))

    def _call_runtime(self, m: re.Match[str]) -> _Slot:
        return self._slot(isa.OP_CALL, src=isa.CALL_BTF, imm=self._imm32(m[1]))

    def _call_name(self, m: re.Match[str]) -> _Slot:
        slot = self._slot(isa.OP_CALL, src=isa.CALL_HELPER, imm=-1)
        slot.call_label = m[1]
        return slot

    def _callx(self, m: re.Match[str]) -> _Slot:
        number, wide = self._register(m[1])
        if not wide:
            raise _AsmError(f"callx needs a 64-bit register, not {m[1]}")
        # The register goes in dst (RFC / bpf_conformance encoding); see isa.callx_register.
        return self._slot(isa.OP_CALLX, dst=number)

    def _atomic(self, size: str, base: str, sign: str | None, offset: str | None,
                value: str, op: int) -> _Slot:  # fmt: skip
        if size not in ("u32", "u64"):
            raise _AsmError(f"atomic operations are 32 or 64 bits wide, not {size}")
        src, _ = self._register(value)
        opcode = isa.STX | isa.ATOMIC | _SIZES[size]
        return self._slot(opcode, self._base(base), src, self._offset16(sign, offset), op)

    def _lock(self, m: re.Match[str]) -> _Slot:
        return self._atomic(m[1], m[2], m[3], m[4], m[6], _ALU_OPS[m[5]])

    def _fetch(self, m: re.Match[str]) -> _Slot:
        op = _ATOMIC_OPS.get(m[2])
        if op is None:
            raise _AsmError(f"unknown atomic operation atomic_fetch_{m[2]}")
        if m[1] != m[7]:
            raise _AsmError(f"atomic_fetch_{m[2]} must write back to its operand {m[7]}")
        return self._atomic(m[3], m[4], m[5], m[6], m[7], op | isa.FETCH)

    def _xchg(self, m: re.Match[str]) -> _Slot:
        if m[1] != m[6]:
            raise _AsmError(f"{m[2]} must write back to its operand {m[6]}")
        size = "u64" if m[2] == "xchg_64" else "u32"
        return self._atomic(size, m[3], m[4], m[5], m[6], isa.ATOMIC_XCHG)

    def _cmpxchg(self, m: re.Match[str]) -> _Slot:
        size = "u64" if m[2] == "cmpxchg_64" else "u32"
        for register in (m[1], m[6]):
            if register is not None and self._register(register)[0] != 0:
                raise _AsmError(f"{m[2]} compares with and writes to r0, not {register}")
        return self._atomic(size, m[3], m[4], m[5], m[7], isa.ATOMIC_CMPXCHG)

    def _store_reg(self, m: re.Match[str]) -> _Slot:
        size = _SIZES.get(m[1])
        if size is None:
            raise _AsmError(f"a store writes u8, u16, u32 or u64, not {m[1]}")
        src, _ = self._register(m[5])
        offset = self._offset16(m[3], m[4])
        return self._slot(isa.STX | isa.MEM | size, self._base(m[2]), src, offset)

    def _store_imm(self, m: re.Match[str]) -> _Slot:
        size = _SIZES.get(m[1])
        if size is None:
            raise _AsmError(f"a store writes u8, u16, u32 or u64, not {m[1]}")
        offset = self._offset16(m[3], m[4])
        return self._slot(isa.ST | isa.MEM | size, self._base(m[2]), 0, offset, self._imm32(m[5]))

    def _load(self, m: re.Match[str]) -> _Slot:
        dst, _ = self._register(m[1])  # llvm writes w1 for a 32-bit load with alu32
        if m[2] in _SIZES:
            opcode = isa.LDX | isa.MEM | _SIZES[m[2]]
        elif m[2] in _SIGNED_SIZES:
            opcode = isa.LDX | isa.MEMSX | _SIGNED_SIZES[m[2]]
        else:
            raise _AsmError(f"no sign-extending load of {m[2]}")
        return self._slot(opcode, dst, self._base(m[3]), self._offset16(m[4], m[5]))

    def _legacy(self, m: re.Match[str]) -> _Slot:
        """`r0 = *(u16 *)skb[12]` (LD_ABS), `r0 = *(u8 *)skb[r7]` (LD_IND, as llvm
        prints it) and `r0 = *(u8 *)skb[r7 + 14]` (LD_IND with an imm, which llvm
        never emits)."""
        if self._register(m[1]) != (0, True):
            raise _AsmError("legacy packet loads always write r0")
        size = _SIZES[m[2]]
        if re.fullmatch(_REG, m[3]):
            index, wide = self._register(m[3])
            if not wide:
                raise _AsmError(f"a packet load's index is a 64-bit register, not {m[3]}")
            imm = 0 if m[5] is None else self._imm32(f"{m[4]}{m[5]}")
            return self._slot(isa.LD | isa.IND | size, src=index, imm=imm)
        if m[4] is not None:
            raise _AsmError(f"skb[{m[3]} {m[4]} {m[5]}]: write the offset as one number")
        return self._slot(isa.LD | isa.ABS | size, imm=self._imm32(m[3]))

    def _lddw(self, m: re.Match[str]) -> list[_Slot]:
        dst, wide = self._register(m[1])
        if not wide:
            raise _AsmError(f"lddw loads a 64-bit register, not {m[1]}")
        value = self._number(m[2])
        if not -(1 << 63) <= value <= isa.MASK64:
            raise _AsmError(f"immediate {_show(value)} does not fit in 64 bits")
        first, second = isa.lddw_pair(dst, value)
        return [_Slot(first, self.line), _Slot(second, self.line)]

    def _neg(self, m: re.Match[str]) -> _Slot:
        dst, src, wide = self._pair(m[1], m[2])
        if dst != src:
            raise _AsmError(f"negation works in place: write {m[1]} = -{m[1]}")
        return self._slot((isa.ALU64 if wide else isa.ALU) | isa.NEG, dst)

    def _byte_swap(self, m: re.Match[str]) -> _Slot:
        dst, src, _ = self._pair(m[1], m[4])
        if dst != src:
            raise _AsmError(f"byte swaps work in place: write {m[1]} = {m[2]}{m[3]} {m[1]}")
        if m[2] == "bswap":
            opcode = isa.ALU64 | isa.END | isa.TO_LE
        else:
            opcode = isa.ALU | isa.END | (isa.TO_BE if m[2] == "be" else isa.TO_LE)
        return self._slot(opcode, dst, imm=int(m[3]))

    def _movsx(self, m: re.Match[str]) -> _Slot:
        dst, src, wide = self._pair(m[1], m[3])
        bits = int(m[2][1:])
        if not wide and bits == 32:
            raise _AsmError("a 32-bit move sign-extends from s8 or s16, not s32")
        return self._slot((isa.ALU64 if wide else isa.ALU) | isa.MOV | isa.X, dst, src, bits)

    def _alu(self, m: re.Match[str]) -> _Slot:
        dst, src, imm, wide, by_register = self._operand(m[1], m[3])
        signed = m[2] in _SIGNED_ALU_OPS
        op = _SIGNED_ALU_OPS[m[2]] if signed else _ALU_OPS[m[2]]
        opcode = (isa.ALU64 if wide else isa.ALU) | op | (isa.X if by_register else isa.K)
        return self._slot(opcode, dst, src, 1 if signed else 0, imm)

    # -- second pass: labels, functions ------------------------------------------------------

    def _link(self) -> Assembled:
        called = {s.call_label for s in self.slots if s.call_label in self.labels}
        jumped = {s.jump_label for s in self.slots if s.jump_label is not None}
        starts: dict[int, str] = {}
        for label, pc in self.labels.items():
            if pc >= len(self.slots) or label.startswith(".L"):
                continue
            is_function = (
                pc == 0
                or label in self.declared
                or label in called
                or (label in self.after_terminator and label not in jumped)
            )
            if is_function:
                starts.setdefault(pc, label)  # two labels on one pc: the first names it
        if 0 not in starts:
            starts[0] = self._unused_name(DEFAULT_FUNCTION)
        helper_calls: dict[int, HelperRef] = {}
        instructions: list[Instruction] = []
        for pc, slot in enumerate(self.slots):
            instructions.append(self._resolve(pc, slot, helper_calls))
        bounds = [*sorted(starts), len(instructions)]
        functions = tuple(
            Function(
                starts[pc],
                pc,
                end - pc,
                exported=(starts[pc] in self.globl if self.globl else starts[pc] not in self.local),
            )
            for pc, end in itertools.pairwise(bounds)
        )
        return Assembled(tuple(instructions), functions, helper_calls)

    def _unused_name(self, base: str) -> str:
        """`base`, or `base_1`, `base_2`...: a name no label and no helper of the text has
        (a listing names functions and helpers alike, so a clash would not read back)."""
        taken = set(self.labels) | {slot.call_label for slot in self.slots if slot.call_label}
        name = base
        for n in itertools.count(1):
            if name not in taken:
                break
            name = f"{base}_{n}"
        return name

    def _resolve(self, pc: int, slot: _Slot, helper_calls: dict[int, HelperRef]) -> Instruction:
        insn = slot.insn
        if slot.call_label is not None:
            target = self.labels.get(slot.call_label)
            if target is None:
                helper_calls[pc] = HelperRef(name=slot.call_label)
                return insn
            return Instruction(isa.OP_CALL, src=isa.CALL_LOCAL, imm=target - pc - 1)
        if isa.is_helper_call(insn):
            # Unsigned, as the loader records raw bytecode: `call -1` is helper #0xffffffff.
            helper_calls[pc] = HelperRef(number=insn.imm & isa.MASK32)
            return insn
        if slot.jump_label is None:
            return insn
        target = self.labels.get(slot.jump_label)
        if target is None:
            raise LoadError(f"{self.name}:{slot.line}: unknown label '{slot.jump_label}'")
        delta = target - pc - 1
        if insn.opcode == isa.OP_JA32:
            return Instruction(insn.opcode, imm=delta)
        if not -(1 << 15) <= delta < 1 << 15:
            raise LoadError(
                f"{self.name}:{slot.line}: label '{slot.jump_label}' is {delta} instructions "
                "away, beyond a 16-bit jump offset (use gotol)"
            )
        return Instruction(insn.opcode, insn.dst, insn.src, delta, insn.imm)


def _ends_flow(insn: Instruction) -> bool:
    """Execution never falls through to the next instruction."""
    return insn.opcode in (isa.OP_EXIT, isa.OP_JA, isa.OP_JA32)


def _show(value: int) -> str:
    return f"-0x{-value:x}" if value < 0 else f"0x{value:x}"


def _hint(text: str) -> str:
    """Name the likely mistake for the common ones; the rest get the bare message."""
    for word in re.findall(r"\b[rw][0-9]+\b", text):
        if len(word) > 3 or int(word[1:]) >= isa.NUM_REGISTERS:
            return f": unknown register {word}"
    return ""
