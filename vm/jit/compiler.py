"""Translation of a decoded eBPF program into an LLVM IR module (textual IR).

The interpreter's basic blocks (`bpfexec.vm.interpreter.decode_blocks`) are the unit of
translation, so both engines agree by construction on where blocks start, what
each costs and how it ends. Every pc that is entered by a call (the program's
functions and every local call target) becomes one internal LLVM function
holding the blocks reachable from it by jumps and fall-through:

    %res.<pc> preserve_nonecc bpf_fn_<pc>(ptr ctx, i64 fuel, i64 <params>...)
    %res.<pc> = {<results>..., fuel}

(preserve_none: a callee saves no register, so a leaf call saves none at all; a
caller saves what it keeps across the call, and only on the paths that call.)

A local call is a native call: the callee gets the caller's registers it may
read (`bpfexec.vm.liveness`), `r10 - frame_size` and the fuel left, and hands back
those of r0..r5 its callers may read, and the fuel; r6..r10 of the caller are
its own values, so they survive the call exactly as the interpreter's frame
stack restores them. A registers the analysis proves unread starts as 0.
Registers live in allocas (SROA makes them SSA values); within a block they
are cached, so the IR stays small. One function enters them all,
`i64 bpf_entry(ptr ctx, i64 pc)`: for the exported function at `pc` it reads
the initial registers and fuel from the context, writes r0 and the fuel back
and returns a `Status` (one function, not one per export: code generation
costs about a quarter of a millisecond per LLVM function).

Memory accesses translate the virtual address through the context's region
table with a bounds check. In a module built with `frame_bytes > 0`, accesses
inside the current frame, `[r10 - frame_bytes, r10)` at an offset known at
compile time, are not checked: the runtime
uses such a module only when every frame of every call depth lies inside the
stack region (`ModuleIR.frame_low`), and a fully checked module otherwise.

Backward jumps and local calls poll the interrupt flag where the interpreter
does, at the cost of one compare until a read is due (`poll`, `back_edge`).
Traps call `bpf_trap` (kind, pc, details and fuel into the context) and
return a fuel of -1; it fails the fuel check of the block a call returns to, whose
slow path then unwinds (a call needs no check of its own). A legacy packet load
outside the packet ends the program the same way, recording `Status.ENDED`
(`packet_load`). A helper call
counts itself against the run's limit, then calls a native helper through the
function pointer in the run's table of call sites, or the runtime's Python
entry `CALL_SYMBOL` with r1..r5 and the fuel (`helper_call`); a `callx`, or a
call at the limit, spills the registers and goes through the generic
dispatcher. A `bpf_map_lookup_elem` call on an array map may run inline, as
arithmetic, and one on a hash map as a probe of the map's index, where the run
marks its site (`inline_lookup`, `bpfexec.vm.jit.maps`).
No host address is ever stored in an eBPF register: host pointers exist only
inside the access that uses them.

The IR is emitted as text rather than built with llvmlite.ir objects: the
object model costs more Python time per instruction than LLVM spends
compiling it, and compile time is a budget of its own (see docs/jit.md).

This module only produces IR. It never runs code, imports nothing of llvmlite,
and refuses (`Unsupported`) anything whose interpreter semantics it does not
reproduce exactly, so the runtime can hand such programs to the interpreter.

Why one file: the analyses that stand on their own are modules of their own
(`liveness`, `unroll`, `induction`, `limits`). What is left is one object,
`_FunctionCompiler`, whose per-function state (cached registers, roots,
translations, frame slots, the loop copy being emitted and the accesses its
group checked) every part of the emission reads and writes: an access consults
the copy's checked accesses and the frame slots, a jump the loops, and
`check_entries` the labels and hand-overs every part records. Split across
files, its methods would still share that state through one class, and a
reader following one access would move between files. The file is ordered by
concern instead: the module (`build_module`, the prelude, the entry), then per
function the emission helpers, traps and polls, loops and groups, the function
and its checks, blocks, calls and jumps, ALU, and memory.
"""

from __future__ import annotations

import builtins
import ctypes
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from bpfexec.vm import isa
from bpfexec.vm.interpreter import CALL, EXIT, FALL, JUMP, Block
from bpfexec.vm.isa import MASK32, NUM_REGISTERS, Instruction
from bpfexec.vm.jit.context import FIELD_INDEX, Access, Context, Status
from bpfexec.vm.jit.induction import Linear, Stride, strided_accesses
from bpfexec.vm.jit.maps import (
    INLINE_MARK,
    InlineArray,
    InlineHash,
    inline_arrays,
    inline_hashes,
    lookup_sites,
)
from bpfexec.vm.jit.unroll import Loop, unrollable_loops
from bpfexec.vm.liveness import Signature, reachable, signatures, successors, uses_and_defs
from bpfexec.vm.maps_hash import EMPTY, FMIX_1, FMIX_2, FNV_OFFSET, FNV_PRIME, TAG, TOMBSTONE
from bpfexec.vm.memory import OFFSET_MASK, REGION_COUNT, REGION_SHIFT
from bpfexec.vm.program import Program
from bpfexec.vm.program_types import PACKET_DATA, PACKET_END

DISPATCH_SYMBOL = "bpfexec_jit_dispatch"  # i64 (ptr ctx, i64 pc): 0, or a trap is recorded
# i64 (ptr ctx, i64 pc, i64 fuel, i64 r1, ..., i64 r5): r0; a trap sets the context's status
CALL_SYMBOL = "bpfexec_jit_call"
FUEL = NUM_REGISTERS  # the fuel counter is cached and spilled like a register
# Fuel spent between two reads of the interrupt flag, at most: a bound on how late
# native code notices an interrupt (about 0.1 ms of work at a billion instructions/s).
POLL_INTERVAL = 1 << 17
# Blocks compiled in total may exceed the program's own by this factor (code reachable
# from several call targets is compiled once per target); beyond it, do not compile.
MAX_DUPLICATION = 4
# Offsets from r10 tracked for the frame fast path; farther ones take the checked path.
MAX_FRAME_OFFSET = 1 << 20
# A strided access is checked once per group only when its step is under this in
# magnitude: a region offset is under 2^32 and a group has at most 8 rounds, so
# `offset + k * step` then never wraps around 2^64 (see `precheck`). No step of a
# loop that stays in one region for two rounds is this large.
STEP_BOUND = 1 << REGION_SHIFT

_FRAME = "frame"  # the root of r10 when frame accesses are unchecked
_LENGTH = {
    Access.READ: "region_read_len",
    Access.WRITE: "region_write_len",
    Access.ATOMIC: "region_write_len",
}
COLD = "!0"  # branch weights: the first successor is almost never taken
INVARIANT = "!1"  # the region table and limits do not change while native code runs
LOOPING = "!2"  # branch weights: a backward jump is usually taken (a loop goes round)


# What a register holds: root + constant (+ index); see _FunctionCompiler.roots.
Root = tuple[str, int, str | None]
# What a frame slot holds: the i64 value last stored there, the store's size in
# bytes, and the stored register's root (see _FunctionCompiler.slots).
Slot = tuple[str, int, Root | None]
# What a block knows on leaving: cached registers, roots, translations, frame slots.
_State = tuple[dict[int, str], dict[int, Root], dict[str, dict[str, str]], dict[int, Slot]]


class Unsupported(Exception):
    """The program uses something the compiler does not reproduce exactly."""


# The function that enters every exported function of a module, by pc.
ENTRY_SYMBOL = "bpf_entry"


@dataclass(frozen=True)
class ModuleIR:
    text: str
    entries: frozenset[int]  # pcs of the exported functions (see ENTRY_SYMBOL)
    functions: int  # LLVM functions generated for eBPF code
    blocks: int  # eBPF blocks translated (with duplicates)
    helper_pcs: frozenset[int]  # call sites that go through the dispatcher
    # Unchecked accesses reach down to r10 - frame_low: every frame needs that much
    # stack below its r10 for the module to be safe to run (0: nothing unchecked).
    frame_low: int
    # `bpf_map_lookup_elem` call sites that look these arrays up inline when the run's
    # table marks them (`bpfexec.vm.jit.maps`); empty: none.
    inline_lookups: frozenset[int] = frozenset()
    inline_arrays: tuple[InlineArray, ...] = ()
    inline_hashes: tuple[InlineHash, ...] = ()


def _ir_type(ctype: type[Any]) -> str:
    if issubclass(ctype, ctypes.Array):
        # typeshed declares Array._type_ a property of instances; it is a class attribute.
        return f"[{ctype._length_} x {_ir_type(ctype._type_)}]"  # type: ignore[arg-type]
    if ctype is ctypes.c_void_p:
        return "ptr"
    if ctypes.sizeof(ctype) == 8:
        return "i64"
    raise TypeError(f"no LLVM type for context field type {ctype.__name__}")


CONTEXT_TYPE = "{ " + ", ".join(_ir_type(field[1]) for field in Context._fields_) + " }"
UNWOUND = -1  # the fuel a function hands back when it unwinds after a trap


def _result_type(signature: Signature) -> str:
    """`{ results..., fuel }`: what `bpf_fn_<pc>` returns."""
    return "{ " + ", ".join(["i64"] * (len(signature.results) + 1)) + " }"


def _signed(value: int, bits: int = 64) -> int:
    """Constants are printed signed: every value fits the type's range that way."""
    return isa.to_signed(value, bits)


def _field(ctx: str, name: str, index: str | None = None) -> str:
    """A getelementptr expression operand list for a context field."""
    tail = f", i64 {index}" if index is not None else ""
    return f"getelementptr inbounds %ctx, ptr {ctx}, i32 0, i32 {FIELD_INDEX[name]}{tail}"


def _reachable(
    entry: int, blocks: Sequence[Block | None], code: Sequence[Instruction]
) -> list[int]:
    try:
        return reachable(entry, blocks, code)
    except ValueError as exc:
        raise Unsupported(str(exc)) from None


def call_sites(program: Program) -> dict[int, int]:
    """The `call` sites of `program` (pc -> slot, in pc order): each has a slot in a
    run's `native_helpers` and `native_costs` tables."""
    return {pc: slot for slot, pc in enumerate(sorted(program.helper_calls))}


def _writes_frame_pointer(code: Sequence[Instruction]) -> bool:
    """Whether any instruction may change r10 (the verifier forbids it; be sure anyway)."""
    fp = isa.FRAME_POINTER
    for insn in code:
        if insn.cls in (isa.ALU, isa.ALU64, isa.LDX) or insn.opcode == isa.LDDW:
            if insn.dst == fp:
                return True
        elif insn.cls == isa.STX and insn.mode == isa.ATOMIC and insn.src == fp:
            return True
    return False


def build_module(
    program: Program,
    blocks: Sequence[Block | None],
    exported: Sequence[int],
    frame_bytes: int,
    *,
    optimized: bool = True,
) -> ModuleIR:
    """The IR of `program`, whose `ENTRY_SYMBOL` enters each pc in `exported`.

    Accesses within `frame_bytes` below r10 are unchecked (0: check every access).
    `optimized` unrolls simple inner loops (`bpfexec.vm.jit.unroll`), faster code and more
    of it, and makes the cold calls (traps, polls, out-of-line translations) with a
    convention that saves every register, so hot paths keep theirs across them. The
    quick tier makes them with the C convention, which LLVM's fast instruction
    selector handles itself: other conventions cost it a slower selector per block.
    """
    cold = _COLD_CC if optimized else ""
    code = program.instructions
    entries = sorted(set(exported))
    for pc in entries:
        if not 0 <= pc < len(blocks) or blocks[pc] is None:
            raise Unsupported(f"function at pc {pc} does not start a block")
    bodies: dict[int, list[int]] = {}
    todo = list(entries)
    total = 0
    limit = MAX_DUPLICATION * sum(b is not None for b in blocks) + 16
    while todo:
        entry = todo.pop()
        if entry in bodies:
            continue
        bodies[entry] = _reachable(entry, blocks, code)
        total += len(bodies[entry])
        if total > limit:
            raise Unsupported("too much code reachable from several call targets")
        for pc in bodies[entry]:
            block = blocks[pc]
            assert block is not None
            if block.kind == CALL:
                if not 0 <= block.target < len(blocks) or blocks[block.target] is None:
                    raise Unsupported(f"pc {block.end_pc}: call to pc {block.target}, not a block")
                todo.append(block.target)

    if _writes_frame_pointer(code):  # r10 tells the call depth and the frame
        raise Unsupported("an instruction writes r10")
    jumps = {pc: successors(blocks[pc], code) for pcs in bodies.values() for pc in pcs}  # type: ignore[arg-type]
    signature = signatures(bodies, blocks, code, jumps, uses_and_defs)
    helper_pcs: set[int] = set()
    arrays, hashes = inline_arrays(program), inline_hashes(program)
    lookups = lookup_sites(program)
    parts = [_prelude(cold)]
    parts += [f"%res.{entry} = type {_result_type(signature[entry])}" for entry in sorted(bodies)]
    frame_low = 0
    for entry in sorted(bodies):
        fn = _FunctionCompiler(program, blocks, frame_bytes, helper_pcs, signature, optimized)
        fn.arrays, fn.hashes, fn.lookups = arrays, hashes, lookups
        loops = unrollable_loops(bodies[entry], blocks, code, jumps) if optimized else {}
        strides = {
            head: strided_accesses(loop, blocks, code, jumps) for head, loop in loops.items()
        }
        parts.append(fn.compile(entry, bodies[entry], loops, strides))
        frame_low = max(frame_low, fn.frame_low)
        total += fn.copied
    parts.append(_entry(entries, signature, blocks, cold))
    return ModuleIR(
        "\n".join(parts), frozenset(entries), len(bodies), total, frozenset(helper_pcs),
        frame_low, lookups & helper_pcs, arrays, hashes,
    )  # fmt: skip


def _predecessors(lines: Sequence[str]) -> dict[str, set[str]]:
    """label -> the labels whose branches enter it, in a function's emitted body."""
    entered: dict[str, set[str]] = {}
    label = ""
    for line in lines:
        if not line.startswith(" "):
            label = line[:-1]
        elif line.startswith("  br "):
            for target in line.split("label %")[1:]:
                entered.setdefault(target.split(",", 1)[0].strip(), set()).add(label)
    return entered


# The calling convention of calls off the hot path, in the optimized tier.
_COLD_CC = "preserve_allcc"


def _prelude(cold: str) -> str:
    """Types, declarations and the out-of-line functions, called with convention `cold`."""
    return f"""
%ctx = type {CONTEXT_TYPE}

declare i64 @{DISPATCH_SYMBOL}(ptr, i64) nounwind
declare i64 @{CALL_SYMBOL}(ptr, i64, i64, i64, i64, i64, i64, i64) nounwind
declare i16 @llvm.bswap.i16(i16)
declare i32 @llvm.bswap.i32(i32)
declare i64 @llvm.bswap.i64(i64)

define internal {cold} void @bpf_trap(ptr noalias %ctx, i64 %status, i64 %pc,
    i64 %a, i64 %b, i64 %c, i64 %fuel) cold noinline nounwind {{
  %p0 = {_field("%ctx", "status")}
  store i64 %status, ptr %p0
  %p1 = {_field("%ctx", "trap_pc")}
  store i64 %pc, ptr %p1
  %p2 = {_field("%ctx", "trap_a")}
  store i64 %a, ptr %p2
  %p3 = {_field("%ctx", "trap_b")}
  store i64 %b, ptr %p3
  %p4 = {_field("%ctx", "trap_c")}
  store i64 %c, ptr %p4
  %p5 = {_field("%ctx", "fuel")}
  store i64 %fuel, ptr %p5
  ret void
}}

define internal {cold} i1 @bpf_poll(ptr noalias %ctx, i64 %pc, i64 %fuel)
    cold noinline nounwind {{
  %ip = {_field("%ctx", "interrupt")}
  %interrupt = load ptr, ptr %ip
  %flag = load atomic i64, ptr %interrupt monotonic, align 8
  %set = icmp ne i64 %flag, 0
  br i1 %set, label %stop, label %go
stop:
  call {cold} void @bpf_trap(ptr %ctx, i64 {int(Status.INTERRUPTED)}, i64 %pc,
      i64 0, i64 0, i64 0, i64 %fuel)
  ret i1 true
go:
  %far = icmp sgt i64 %fuel, {POLL_INTERVAL}
  %next = sub i64 %fuel, {POLL_INTERVAL}
  %poll_at = select i1 %far, i64 %next, i64 0
  %pp = {_field("%ctx", "poll_at")}
  store i64 %poll_at, ptr %pp
  ret i1 false
}}

define internal {cold} ptr @bpf_translate(ptr noalias %ctx, i64 %addr, i64 %size,
    i64 %access, i64 %pc, i64 %fuel) cold noinline nounwind {{
  %region = lshr i64 %addr, {REGION_SHIFT}
  %known = icmp ult i64 %region, {REGION_COUNT}
  %index = select i1 %known, i64 %region, i64 0
  %rp = {_field("%ctx", "region_read_len", "%index")}
  %wp = {_field("%ctx", "region_write_len", "%index")}
  %rlen = load i64, ptr %rp
  %wlen = load i64, ptr %wp
  %is_write = icmp ne i64 %access, {int(Access.READ)}
  %len = select i1 %is_write, i64 %wlen, i64 %rlen
  %offset = and i64 %addr, {OFFSET_MASK}
  %end = add i64 %offset, %size
  %outside = icmp ugt i64 %end, %len
  br i1 %outside, label %fault, label %ok
fault:
  call {cold} void @bpf_trap(ptr %ctx, i64 {int(Status.MEMORY_FAULT)}, i64 %pc, i64 %addr,
      i64 %size, i64 %access, i64 %fuel)
  ret ptr null
ok:
  %bp = {_field("%ctx", "region_base", "%index")}
  %base = load ptr, ptr %bp
  %host = getelementptr i8, ptr %base, i64 %offset
  ret ptr %host
}}

!0 = !{{!"branch_weights", i32 1, i32 1048576}}
!1 = !{{}}
!2 = !{{!"branch_weights", i32 31, i32 1}}
"""


def _entry(
    entries: list[int], signature: dict[int, Signature], blocks: Sequence[Block | None], cold: str
) -> str:
    """`i64 bpf_entry(ctx, pc)`: for the function at `pc`, registers and fuel from the
    context in, r0 and fuel out, and a `Status`.

    Like a caller, it checks the fuel of the function's entry block."""
    cases = " ".join(f"i64 {pc}, label %enter.{pc}" for pc in entries)
    lines = [
        # No jump table: its relocations assume data near the code, which MCJIT's
        # sections are not (an assertion in RuntimeDyld, seen with the medium model).
        f"define i64 @{ENTRY_SYMBOL}(ptr noalias %ctx, i64 %pc) nounwind "
        '"no-jump-tables"="true" {',
        "entry:",
        f"  %fp = {_field('%ctx', 'fuel')}",
        "  %fuel = load i64, ptr %fp",
        f"  switch i64 %pc, label %unknown [ {cases} ]",
        "unknown:",  # the runtime enters exported pcs only
        f"  ret i64 {int(Status.PYTHON)}",
        "trapped:",
        f"  %sp = {_field('%ctx', 'status')}",
        "  %status = load i64, ptr %sp",
        "  ret i64 %status",
    ]
    for pc in entries:
        block = blocks[pc]
        assert block is not None
        ty, params = f"%res.{pc}", signature[pc].params
        lines.append(f"enter.{pc}:")
        for n in params:
            lines.append(f"  %rp{n}.{pc} = {_field('%ctx', 'regs', str(n))}")
            lines.append(f"  %r{n}.{pc} = load i64, ptr %rp{n}.{pc}")
        args = ", ".join(f"i64 %r{n}.{pc}" for n in params)
        lines += [
            f"  %short.{pc} = icmp slt i64 %fuel, {block.cost}",
            f"  br i1 %short.{pc}, label %starved.{pc}, label %call.{pc}",
            f"starved.{pc}:",
            f"  call {cold} void @bpf_trap(ptr %ctx, i64 {int(Status.OUT_OF_FUEL)}, i64 {pc}, "
            f"i64 {block.cost}, i64 0, i64 0, i64 %fuel)",
            f"  ret i64 {int(Status.OUT_OF_FUEL)}",
            f"call.{pc}:",
            f"  %res.{pc} = call preserve_nonecc {ty} @bpf_fn_{pc}(ptr %ctx, i64 %fuel, {args})",
            f"  %left.{pc} = extractvalue {ty} %res.{pc}, {len(signature[pc].results)}",
            f"  %ok.{pc} = icmp ne i64 %left.{pc}, {UNWOUND}",
            f"  br i1 %ok.{pc}, label %done.{pc}, label %trapped",
            f"done.{pc}:",
            f"  %out.{pc} = extractvalue {ty} %res.{pc}, 0",
            f"  %r0p.{pc} = {_field('%ctx', 'regs', '0')}",
            f"  store i64 %out.{pc}, ptr %r0p.{pc}",
            f"  store i64 %left.{pc}, ptr %fp",
            "  ret i64 0",
        ]
    return "\n".join([*lines, "}"])


_BINARY = {
    isa.ADD: "add", isa.SUB: "sub", isa.MUL: "mul", isa.OR: "or", isa.AND: "and", isa.XOR: "xor",
    isa.LSH: "shl", isa.RSH: "lshr", isa.ARSH: "ashr",
}  # fmt: skip
_SHIFTS = (isa.LSH, isa.RSH, isa.ARSH)
_CONDITIONS = {
    isa.JEQ: "eq", isa.JNE: "ne", isa.JGT: "ugt", isa.JGE: "uge", isa.JLT: "ult", isa.JLE: "ule",
    isa.JSGT: "sgt", isa.JSGE: "sge", isa.JSLT: "slt", isa.JSLE: "sle",
}  # fmt: skip
_ATOMIC_BINARY = {
    isa.ATOMIC_ADD: "add",
    isa.ATOMIC_OR: "or",
    isa.ATOMIC_AND: "and",
    isa.ATOMIC_XOR: "xor",
}


def _accessed(insn: Instruction) -> tuple[int, Access]:
    """The size and kind of the access a load, store or atomic instruction makes."""
    if insn.cls == isa.LDX:
        access = Access.READ
    elif insn.cls == isa.STX and insn.mode == isa.ATOMIC:
        access = Access.ATOMIC
    else:
        access = Access.WRITE
    return isa.SIZE_BYTES[insn.size], access


class _FunctionCompiler:
    """Emits one `bpf_fn_<pc>`."""

    def __init__(
        self,
        program: Program,
        blocks: Sequence[Block | None],
        frame_bytes: int,
        helper_pcs: set[int],
        signature: dict[int, Signature],
        optimized: bool,
    ) -> None:
        self.code = program.instructions
        self.optimized = optimized
        self.cold_cc = _COLD_CC if optimized else ""  # of traps, polls and translations
        self.signature = signature
        self.entry = 0  # the function being compiled
        # Parameters no instruction of the function writes: they are their argument
        # everywhere, and their translations are computed once, in the prologue.
        self.unchanged: frozenset[int] = frozenset()
        self.prologue: list[str] = []
        self.hoisted: dict[str, dict[str, str]] = {}
        self.blocks = blocks
        self.frame_bytes = frame_bytes
        self.helper_pcs = helper_pcs
        # Helper call sites by pc -> their slot in the run's native helper table.
        self.call_sites = call_sites(program)
        # Array and hash maps looked up inline at the `bpf_map_lookup_elem` sites
        # `lookups` (`inline_lookup`), and each inline lookup's first label -> the label
        # of the check of the run's mark it must be entered from (`check_entries`).
        self.arrays: tuple[InlineArray, ...] = ()
        self.hashes: tuple[InlineHash, ...] = ()
        self.lookups: frozenset[int] = frozenset()
        self.marked: dict[str, str] = {}
        self.lines: list[str] = []
        self.cold: list[str] = []  # trap exits, emitted after the body
        self.counter = 0
        self.label = ""
        self.cache: dict[int, str] = {}  # register -> its current value in this block
        self.dirty: set[int] = set()  # registers whose value is not in their alloca yet
        # register -> (root, constant, index): the register holds root + constant
        # (+ index), root and index SSA values of this block (root may be %a10, the
        # frame pointer of the call). Any such split gives an exact bounds check.
        self.roots: dict[int, Root] = {}
        # root -> its region index, offset and host address, and region lengths
        self.translations: dict[str, dict[str, str]] = {}
        # r10 offset -> what this block (or the one before it, see `leave`) stored at
        # that unchecked frame address, while nothing else may have written it: a load
        # from there takes the value, and the root, without reading memory. clang's
        # eBPF back end spills what x86 would keep in registers, pointers included.
        self.slots: dict[int, Slot] = {}
        self.frame_low = 0  # bytes below r10 reached by unchecked accesses
        self.predecessors: dict[int, int] = {}  # pc -> edges into it within the function
        self.loop_heads: set[int] = set()  # targets of backward jumps
        # label -> (cache, roots, translations) left by its only predecessor (`leave`)
        self.inherited: dict[str, _State] = {}
        self.loops: dict[int, Loop] = {}  # unrolled loops by head
        self.returns: set[int] = set()  # pcs a local call returns to
        # Accesses each unrolled loop checks once per group (`precheck`), by head and pc
        self.strides: dict[int, dict[int, Stride]] = {}
        # While copying a loop: pc -> host address in the group's first round, and the
        # step per round (an SSA value or a constant), of each access its group checked
        self.covered: dict[int, tuple[str, str | int]] = {}
        self.copy: tuple[Loop, int] | None = None  # the copy of a loop being emitted
        self.copied = 0  # blocks emitted as copies
        self.guessing = False  # whether translations guess the region (`guessed_region`)
        self.exits: list[tuple[str, list[str]]] = []  # (label, results and fuel) of each exit
        # What `check_entries` verifies. The unit being emitted (the label of an eBPF
        # block, or of a group's precheck), and the unit that emitted each label:
        self.unit = ""
        self.owner: dict[str, str] = {}
        self.handed: dict[str, str] = {}  # label -> the unit that handed it its state
        self.group_checks: set[str] = set()  # labels reached past a group's fuel check

    # -- emission helpers ------------------------------------------------------------

    def tmp(self) -> str:
        self.counter += 1
        return f"%t{self.counter}"

    def new_label(self) -> str:
        self.counter += 1
        return f"s{self.counter}"

    def emit(self, line: str) -> None:
        self.lines.append("  " + line)

    def value(self, expression: str) -> str:
        name = self.tmp()
        self.emit(f"{name} = {expression}")
        return name

    def start(self, label: str) -> None:
        self.lines.append(f"{label}:")
        self.label = label
        self.owner[label] = self.unit

    def get(self, n: int) -> str:
        if n in self.unchanged:
            return f"%a{n}"
        if n not in self.cache:
            self.cache[n] = self.value(f"load i64, ptr %r{n}")
        return self.cache[n]

    def set(self, n: int, value: str, root: Root | None = None) -> None:
        if n in self.unchanged:  # `written` missed a write: hoisted translations are stale
            raise RuntimeError(f"r{n} is written in function {self.entry}, thought unchanged")
        self.cache[n] = value
        self.dirty.add(n)
        if root is not None and abs(root[1]) < MAX_FRAME_OFFSET:
            self.roots[n] = root
        else:
            self.roots.pop(n, None)

    def root_of(self, n: int) -> Root:
        return self.roots.get(n) or (self.get(n), 0, None)

    def flush(self) -> None:
        for n in sorted(self.dirty):
            self.emit(f"store i64 {self.cache[n]}, ptr %r{n}")
        self.dirty.clear()

    def field(self, name: str, index: str | None = None) -> str:
        return self.value(_field("%ctx", name, index))

    def invariant(self, name: str, index: str | None = None, ty: str = "i64") -> str:
        pointer = self.field(name, index)
        return self.value(f"load {ty}, ptr {pointer}, !invariant.load {INVARIANT}")

    def trap_if(
        self,
        failed: str,
        status: Status,
        pc: int | str,
        a: int | str = 0,
        b: int = 0,
        c: int = 0,
        *,
        unwound: bool = False,
    ) -> None:
        """Leave through a trap exit when `failed`, recording status, pc and details;
        with `unwound`, just leave when the fuel is `UNWOUND` (a trap is recorded)."""
        fuel = self.get(FUEL)  # before the branch: the trap exit records it
        trap, cont = self.new_label(), self.new_label()
        self.emit(f"br i1 {failed}, label %{trap}, label %{cont}, !prof {COLD}")
        self.cold.append(f"{trap}:")
        if unwound:
            gone, trap = self.tmp(), self.new_label()
            self.cold += [
                f"  {gone} = icmp eq i64 {fuel}, {UNWOUND}",
                f"  br i1 {gone}, label %unwind, label %{trap}",
                f"{trap}:",
            ]
        self.cold += [
            f"  call {self.cold_cc} void @bpf_trap(ptr %ctx, i64 {int(status)}, i64 {pc}, "
            f"i64 {a}, i64 {b}, i64 {c}, i64 {fuel})",
            "  br label %unwind",
        ]
        self.start(cont)

    # Interrupts: the interpreter reads its flag at every backward jump and call. Native
    # code does so at the same places, but only once the fuel has fallen below the
    # context's `poll_at`, which `bpf_poll` then sets POLL_INTERVAL lower: in between, a
    # poll site costs one comparison. Every block costs fuel, so a running program reads
    # the flag at least once per POLL_INTERVAL of fuel spent in loops and calls. The
    # runtime sets `poll_at` above the fuel at the start of a run and after each helper
    # call, so the next poll site always reads the flag then, as the interpreter's does.

    def poll_at(self) -> str:
        return self.value(f"load i64, ptr {self.field('poll_at')}")

    def poll(self, pc: int) -> None:
        """A poll site: read the interrupt flag (trapping at `pc`) if fuel < poll_at."""
        fuel = self.get(FUEL)
        low = self.value(f"icmp slt i64 {fuel}, {self.poll_at()}")
        slow, cont = self.new_label(), self.new_label()
        self.emit(f"br i1 {low}, label %{slow}, label %{cont}, !prof {COLD}")
        self.start(slow)
        self.read_flag(pc, fuel)
        self.emit(f"br label %{cont}")
        self.start(cont)

    def read_flag(self, pc: int, fuel: str) -> None:
        """Call `bpf_poll`, and unwind if it recorded an interrupt."""
        stopped = self.value(f"call {self.cold_cc} i1 @bpf_poll(ptr %ctx, i64 {pc}, i64 {fuel})")
        cont = self.new_label()
        self.emit(f"br i1 {stopped}, label %unwind, label %{cont}, !prof {COLD}")
        self.start(cont)

    def back_edge(self, target: int, cond: str | None, fallthrough: int) -> None:
        """A backward jump: the poll site and the target's fuel check in one comparison.

        `fuel - cost < poll_at` holds whenever the target block does not fit (poll_at
        is never negative) and whenever the fall-through's poll site must read the
        flag (it does when fuel < poll_at), so one comparison before the branch covers both
        edges; the slow path sorts out which, in the interpreter's order. The
        target's body is entered past its own fuel check.
        """
        block = self.blocks[target]
        assert block is not None
        fuel = self.get(FUEL)
        poll_at = self.poll_at()
        loop = self.loops.get(target)
        if loop is not None:  # a group of copies if it fits, or else one more round
            group_left = self.value(f"sub i64 {fuel}, {loop.copies * loop.max_cost}")
            few = self.value(f"icmp slt i64 {group_left}, {poll_at}")
            group, single = self.new_label(), self.new_label()
            self.emit(f"br i1 {few}, label %{single}, label %{group}, !prof {COLD}")
            self.start(group)
            self.group_checks.add(group)
            self.iterate(loop, 1, cond, fallthrough)
            self.start(single)
        left = self.value(f"sub i64 {fuel}, {block.cost}")
        low = self.value(f"icmp slt i64 {left}, {poll_at}")
        slow, fast = self.new_label(), self.new_label()
        self.emit(f"br i1 {low}, label %{slow}, label %{fast}, !prof {COLD}")
        self.start(fast)
        # The jump goes straight back: the loop's latch is the block that exits it.
        self.emit(f"store i64 {left}, ptr %r{FUEL}")
        if cond is None:
            self.emit(f"br label %pc{target}.body")
        else:
            forward = self.new_label()
            self.emit(f"br i1 {cond}, label %pc{target}.body, label %{forward}, !prof {LOOPING}")
            self.start(forward)
            self.emit(f"store i64 {fuel}, ptr %r{FUEL}")
            self.emit(f"br label %{self.here(fallthrough)}")
        self.start(slow)
        if cond is not None:
            slow_back, slow_forward = self.new_label(), self.new_label()
            self.emit(f"br i1 {cond}, label %{slow_back}, label %{slow_forward}")
            self.start(slow_forward)
            self.poll(fallthrough)
            self.emit(f"br label %{self.here(fallthrough)}")
            self.start(slow_back)
        self.poll_and_enter(target, fuel, block)
        self.emit(f"store i64 {left}, ptr %r{FUEL}")
        self.emit(f"br label %pc{target}.body")

    def poll_and_enter(self, pc: int, fuel: str, block: Block) -> None:
        """The slow path of a poll site folded into `block`'s fuel check: read the
        flag (trapping at `pc`), then trap if `block` does not fit, as the interpreter
        does one after the other."""
        self.read_flag(pc, fuel)
        short = self.value(f"icmp slt i64 {fuel}, {block.cost}")
        self.trap_if(short, Status.OUT_OF_FUEL, block.pc, block.cost)

    def iterate(self, loop: Loop, copy: int, cond: str | None, fallthrough: int) -> None:
        """Jump back to the head of copy `copy` of `loop` (or fall through): within a
        group, so no fuel check and no poll is due (see `bpfexec.vm.jit.unroll`)."""
        head = f"u{copy}.pc{loop.head}"
        if copy == 1 and self.strides.get(loop.head):
            head = f"u0.pc{loop.head}"  # the group's checks of its accesses first
        if cond is None:
            self.emit(f"br label %{head}")
        else:
            self.emit(
                f"br i1 {cond}, label %{head}, label %{self.here(fallthrough)}, !prof {LOOPING}"
            )

    def precheck(self, loop: Loop, strides: dict[int, Stride]) -> None:
        """`u0.pc<head>`: check, once before a group, every round's access of each
        strided access (`bpfexec.vm.jit.induction`), so the copies make them unchecked.

        The check holds on its own, whatever edge enters the group: a backward jump
        from the loop's latch, or from a block outside the body (the outer latch of a
        rotated loop), after which no round ran with these registers. It proves, for
        the group's `rounds + 1` rounds, that `offset + k * step` lies in the region
        for every k:
        - the step is under `STEP_BOUND` in magnitude (known at compile time for a
          constant step, else compared here), so with the first offset below 2^32
          no `offset + k * step` wraps around 2^64;
        - the first and the last round's offsets are in bounds, and a value moving
          linearly without wrapping stays between them.
        When a check fails (a huge step, or the loop walks off its buffer within this
        group), the loop goes round once through the original blocks, which check
        each access and trap where the interpreter does. The group's fuel check
        passed, so the original head's fuel check passes too and no poll was due.
        """
        head = loop.head
        self.unit = f"u0.pc{head}"
        self.start(self.unit)
        self.forget()
        rounds = loop.copies - 1
        passed = "true"
        for pc, stride in sorted(strides.items()):
            size, access = _accessed(self.code[pc])
            constant = _signed(stride.step.constant)
            step: str | int = constant
            if stride.step.terms:
                step = self.linear(stride.step)
                bounded = self.value(f"add i64 {step}, {STEP_BOUND - 1}")
                small = self.value(f"icmp ult i64 {bounded}, {2 * STEP_BOUND - 1}")
                passed = self.value(f"and i1 {passed}, {small}")
            elif not -STEP_BOUND < constant < STEP_BOUND:
                continue  # never in bounds twice: the copies check it themselves
            region = self.translation(self.linear(stride.start), access, size)
            starts = region[f"{_LENGTH[access]}.{size}"]
            first = self.value(f"icmp ult i64 {region['offset']}, {starts}")
            end = self.value(f"add i64 {region['offset']}, {self.times(step, rounds)}")
            last = self.value(f"icmp ult i64 {end}, {starts}")
            both = self.value(f"and i1 {first}, {last}")
            passed = self.value(f"and i1 {passed}, {both}")
            self.covered[pc] = (region["host"], step)
        self.hand(f"u1.pc{head}")
        self.emit(f"br i1 {passed}, label %u1.pc{head}, label %pc{head}")

    def linear(self, form: Linear) -> str:
        """The value of `form` in the registers' current values."""
        total = None if form.terms else str(_signed(form.constant))
        for n, coefficient in form.terms:
            term = self.times(self.get(n), _signed(coefficient))
            total = term if total is None else self.value(f"add i64 {total}, {term}")
        if form.terms and form.constant:
            total = self.value(f"add i64 {total}, {_signed(form.constant)}")
        assert total is not None
        return total

    def times(self, value: str | int, factor: int) -> str:
        """`value * factor`: folded when `value` is a constant, or `factor` 0 or 1."""
        if isinstance(value, int):
            return str(value * factor)
        if factor in (0, 1):
            return value if factor else "0"
        return self.value(f"mul i64 {value}, {factor}")

    def here(self, pc: int) -> str:
        """The label of the block at `pc` in the code being emitted (a copy, or not)."""
        if self.copy is not None and pc in self.copy[0].body:
            return f"u{self.copy[1]}.pc{pc}"
        return f"pc{pc}"

    def compile(
        self,
        entry: int,
        pcs: list[int],
        loops: dict[int, Loop],
        strides: dict[int, dict[int, Stride]],
    ) -> str:
        self.entry = entry
        self.loops = loops
        self.strides = strides
        self.predecessors = {entry: 1}  # the function's entry counts as one
        for pc in pcs:
            block = self.blocks[pc]
            assert block is not None
            for successor in successors(block, self.code):
                self.predecessors[successor] = self.predecessors.get(successor, 0) + 1
            if block.kind == JUMP and block.backward:
                self.loop_heads.add(block.end_pc + 1 + isa.jump_offset(self.code[block.end_pc]))
            if block.kind == CALL:
                self.returns.add(block.next_pc)
        for loop in loops.values():  # exits of the copies enter their targets too
            for pc in loop.body:
                block = self.blocks[pc]
                assert block is not None
                for successor in successors(block, self.code):
                    if successor not in loop.body:
                        self.predecessors[successor] += loop.copies
        self.unchanged = frozenset(self.signature[entry].params) - self.written(pcs)
        for pc in pcs:
            block = self.blocks[pc]
            assert block is not None
            self.block(block)
        for loop in loops.values():
            if strides.get(loop.head):
                self.precheck(loop, strides[loop.head])
            for copy in range(1, loop.copies + 1):
                self.copy = (loop, copy)
                for pc in sorted(loop.body):
                    block = self.blocks[pc]
                    assert block is not None
                    self.block(block)
                    self.copied += 1
            self.copy = None
            self.covered = {}
        self.check_entries(loops, strides)
        signature = self.signature[entry]
        params = ", ".join(f"i64 %a{n}" for n in signature.params)
        result = f"%res.{entry}"
        head = [  # no jump tables (see `_entry`): simplifycfg turns compare chains into
            # switches, such as an inline lookup's handle compared with four maps' or more
            f"define internal preserve_nonecc {result} @bpf_fn_{entry}(ptr noalias %ctx, "
            f'i64 %a{FUEL}, {params}) nounwind "no-jump-tables"="true" {{',
            "entry:",
        ]
        for n in range(NUM_REGISTERS + 1):
            head.append(f"  %r{n} = alloca i64")
            value = f"%a{n}" if n in signature.params or n == FUEL else "0"
            head.append(f"  store i64 {value}, ptr %r{n}")
        if self.guessing:  # a region number is below 2^32: the first guess misses
            head += [
                "  %guess.index = alloca i64",
                "  store i64 -1, ptr %guess.index",
                "  %guess.base = alloca ptr",
                "  store ptr null, ptr %guess.base",
            ]
        head += self.frame_prologue() + self.prologue
        head.append(f"  br label %pc{entry}.entered")
        return "\n".join(head + self.lines + self.cold + self.epilogue())

    def check_entries(self, loops: dict[int, Loop], strides: dict[int, dict[int, Stride]]) -> None:
        """Verify, on the emitted code, the conditions on the CFG that the elided checks
        rest on (docs/jit.md, "Where a check is elided"); a violation is a compiler bug,
        and the program runs on the interpreter instead (see `bpfexec.vm.jit`):
        - a label handed a block's state (cached registers, roots, translations, frame
          slots) is entered only from code of that block, so every path into it passes
          through the point the state describes, with no store or call in between;
        - a group (its precheck, or its first copy) is entered only past a group fuel
          check, and copy k + 1 only from copy k: at most `copies` rounds run without
          a fuel check, and copy k runs round k of the group its precheck checked.
        """
        entered_from = _predecessors(self.lines)

        def owned_by(unit: str) -> Callable[[str], bool]:
            return lambda p: self.owner.get(p) == unit

        def in_copy(prefix: str) -> Callable[[str], bool]:
            return lambda p: self.owner.get(p, "").startswith(prefix)

        rules: list[tuple[str, Callable[[str], bool], str]] = [
            (label, owned_by(unit), f"from {unit} only") for label, unit in self.handed.items()
        ]
        rules += [  # an inline lookup runs only where the run marked its call site
            (label, check.__eq__, f"from the check of the mark in {check} only")
            for label, check in self.marked.items()
        ]
        for loop in loops.values():
            first = f"u0.pc{loop.head}" if strides.get(loop.head) else f"u1.pc{loop.head}"
            rules.append((first, self.group_checks.__contains__, "past a fuel check only"))
            for copy in range(1, loop.copies):
                prefix = f"u{copy}."
                rules.append(
                    (f"u{copy + 1}.pc{loop.head}", in_copy(prefix), f"from copy {copy} only")
                )
        for label, allowed, what in rules:
            wrong = sorted(p for p in entered_from.get(label, ()) if not allowed(p))
            if wrong:
                raise RuntimeError(
                    f"function {self.entry}: {label} must be entered {what}, not from {wrong}"
                )

    def epilogue(self) -> list[str]:
        """The one `ret` of the function, which every exit and the unwind path reach:
        LLVM's fast instruction selector lowers no aggregate return, and each block it
        does not lower costs the slow selector's time."""
        results = len(self.signature[self.entry].results)
        exits = [*self.exits, ("unwind", ["undef"] * results + [str(UNWOUND)])]
        ty = f"%res.{self.entry}"
        lines, value = ["unwind:", "  br label %return", "return:"], "undef"
        for index in range(results + 1):
            incoming = ", ".join(f"[ {values[index]}, %{label} ]" for label, values in exits)
            lines.append(f"  %ret.{index} = phi i64 {incoming}")
        for index in range(results + 1):
            lines.append(f"  %ret.{index}.in = insertvalue {ty} {value}, i64 %ret.{index}, {index}")
            value = f"%ret.{index}.in"
        return [*lines, f"  ret {ty} {value}", "}"]

    def written(self, pcs: list[int]) -> builtins.set[int]:  # not the method `set`
        """Registers some instruction of these blocks may write (never r10: see
        `_writes_frame_pointer`)."""
        written: set[int] = set()
        for pc in pcs:
            block = self.blocks[pc]
            assert block is not None
            end = block.end_pc + 1 if block.kind != FALL else block.next_pc
            for insn in self.code[block.pc : end]:
                written |= uses_and_defs(insn)[1]
            if block.kind == CALL:
                written |= set(range(6))
        return written

    def frame_prologue(self) -> list[str]:
        """The host address of r10, for unchecked accesses (the runtime vouches for it)."""
        if not self.frame_low:
            return []
        fp = f"%a{isa.FRAME_POINTER}"
        return [
            f"  %fp.region = lshr i64 {fp}, {REGION_SHIFT}",
            f"  %fp.known = icmp ult i64 %fp.region, {REGION_COUNT}",
            "  %fp.index = select i1 %fp.known, i64 %fp.region, i64 0",
            f"  %fp.bp = {_field('%ctx', 'region_base', '%fp.index')}",
            f"  %fp.base = load ptr, ptr %fp.bp, !invariant.load {INVARIANT}",
            f"  %fp.offset = and i64 {fp}, {OFFSET_MASK}",
            "  %fp.host = getelementptr i8, ptr %fp.base, i64 %fp.offset",
        ]

    def block(self, block: Block) -> None:
        label = self.here(block.pc)
        self.unit = label
        self.start(label)
        state = self.inherited.pop(label, None)
        if state is not None:
            self.cache, self.roots, self.translations, self.slots = state
            self.dirty.clear()  # the block before in pc order may have ended in exit
        else:
            self.forget()
        fuel = self.get(FUEL)
        if self.copy is None:  # a copy's group checked the fuel for all its blocks
            # A call hands back a fuel of UNWOUND (-1) after a trap: that fails this
            # check too, so a call returns here without a check of its own.
            short = self.value(f"icmp slt i64 {fuel}, {block.cost}")
            returned = block.pc in self.returns
            self.trap_if(short, Status.OUT_OF_FUEL, block.pc, block.cost, unwound=returned)
            if block.pc == self.entry:  # callers check the fuel of the entry block
                self.emit(f"br label %pc{block.pc}.entered")
                self.start(f"pc{block.pc}.entered")
                self.forget()
                fuel = self.get(FUEL)
        self.set(FUEL, self.value(f"sub i64 {fuel}, {block.cost}"))
        if block.pc in self.loop_heads and self.copy is None:  # back edges enter here
            self.flush()
            self.emit(f"br label %pc{block.pc}.body")
            self.start(f"pc{block.pc}.body")
            self.forget()
            self.get(FUEL)  # cached here: trap exits on conditional paths record it
        pc = block.pc
        end = block.end_pc if block.kind != FALL else block.next_pc
        while pc < end:
            insn = self.code[pc]
            self.instruction(insn, pc)
            pc += 2 if insn.opcode == isa.LDDW else 1
        if block.kind == FALL:
            self.flush()
            self.leave(block)
            self.emit(f"br label %{self.here(block.next_pc)}")
        elif block.kind == EXIT:
            results = [*self.signature[self.entry].results, FUEL]
            self.exits.append((self.label, [self.get(n) for n in results]))
            self.emit("br label %return")
        elif block.kind == CALL:
            self.local_call(block)
        else:
            assert block.kind == JUMP
            self.jump(block)

    def forget(self) -> None:
        """Start from the allocas: at a block several edges enter."""
        self.cache = {}
        self.dirty.clear()
        self.translations = {}
        self.slots = {}
        self.roots = {isa.FRAME_POINTER: (_FRAME, 0, None)} if self.frame_bytes else {}

    def leave(self, block: Block) -> None:
        """Hand what this block knows to each later block it is the only way into.

        Its values dominate such a block, so that block keeps the cached registers,
        roots and translations (a pointer computed before a branch is still known
        after it). Called with nothing dirty, before the block's branches.
        """
        for pc in successors(block, self.code):
            if pc > block.pc and self.predecessors.get(pc) == 1:
                self.hand(self.here(pc))

    def hand(self, label: str) -> None:
        """Hand what this block knows to the block at `label`, entered only from here
        (`check_entries` verifies that in the emitted code)."""
        self.inherited[label] = self.state()
        self.handed[label] = self.unit

    def state(self) -> _State:
        """A copy of what this block knows, for a block it is the only way into."""
        translations = {root: dict(region) for root, region in self.translations.items()}
        return dict(self.cache), dict(self.roots), translations, dict(self.slots)

    def local_call(self, block: Block) -> None:
        # The call depth is implied by r10, which no instruction writes: a frame at the
        # deepest depth allowed has r10 == deepest_frame, and frames do not wrap around.
        deepest = self.invariant("deepest_frame")
        too_deep = self.value(f"icmp ule i64 %a{isa.FRAME_POINTER}, {deepest}")
        self.trap_if(too_deep, Status.CALL_DEPTH_EXCEEDED, block.end_pc)
        # The poll site and the fuel check of the callee's entry block in one comparison,
        # as on a backward jump; the slow path sorts them out in the interpreter's order.
        entered = self.blocks[block.target]
        assert entered is not None
        fuel = self.get(FUEL)
        left = self.value(f"sub i64 {fuel}, {entered.cost}")
        low = self.value(f"icmp slt i64 {left}, {self.poll_at()}")
        slow, cont = self.new_label(), self.new_label()
        self.emit(f"br i1 {low}, label %{slow}, label %{cont}, !prof {COLD}")
        self.start(slow)
        self.poll_and_enter(block.end_pc, fuel, entered)
        self.emit(f"br label %{cont}")
        self.start(cont)
        frame_size = self.invariant("frame_size")
        callee = self.signature[block.target]
        args = []
        for n in callee.params:
            value = self.get(n)
            if n == isa.FRAME_POINTER:
                value = self.value(f"sub i64 {value}, {frame_size}")
            args.append(f"i64 {value}")
        ty = f"%res.{block.target}"
        self.slots = {}  # the callee may write this frame through a pointer
        result = self.value(
            f"call preserve_nonecc {ty} @bpf_fn_{block.target}(ptr %ctx, i64 {self.get(FUEL)}, "
            f"{', '.join(args)})"
        )
        # UNWOUND when the callee trapped: the next block's fuel check unwinds then.
        fuel = self.value(f"extractvalue {ty} {result}, {len(callee.results)}")
        for n in range(6):  # r0..r5: the callee's, or never read again
            self.set(n, "0")
        for index, n in enumerate(callee.results):
            self.set(n, self.value(f"extractvalue {ty} {result}, {index}"))
        self.set(FUEL, fuel)
        self.flush()
        self.leave(block)
        self.emit(f"br label %{self.here(block.next_pc)}")

    def jump(self, block: Block) -> None:
        insn = self.code[block.end_pc]
        taken = block.end_pc + 1 + isa.jump_offset(insn)
        fallthrough = block.end_pc + 1
        cond = None if insn.op == isa.JA else self.condition(insn)
        self.flush()
        self.leave(block)
        if not block.backward:
            if cond is None:
                self.emit(f"br label %{self.here(taken)}")
            else:
                self.emit(
                    f"br i1 {cond}, label %{self.here(taken)}, label %{self.here(fallthrough)}"
                )
            return
        if self.copy is not None and self.copy[1] < self.copy[0].copies:
            loop, copy = self.copy
            if loop.single_latch:  # the next copy's head has this block as its only way in
                self.hand(f"u{copy + 1}.pc{loop.head}")
            self.iterate(loop, copy + 1, cond, fallthrough)
            return
        # The interpreter polls after choosing the next pc, either way, and traps there.
        self.back_edge(taken, cond, fallthrough)

    def condition(self, insn: Instruction) -> str:
        wide = insn.cls == isa.JMP
        ty = "i64" if wide else "i32"
        lhs = self.operand(insn.dst, wide)
        if insn.opcode & isa.SRC_MASK == isa.X:
            rhs = self.operand(insn.src, wide)
        else:
            rhs = str(_signed(insn.imm, 64 if wide else 32))
        if insn.op == isa.JSET:
            both = self.value(f"and {ty} {lhs}, {rhs}")
            return self.value(f"icmp ne {ty} {both}, 0")
        return self.value(f"icmp {_CONDITIONS[insn.op]} {ty} {lhs}, {rhs}")

    def operand(self, n: int, wide: bool) -> str:
        value = self.get(n)
        return value if wide else self.value(f"trunc i64 {value} to i32")

    # -- straight-line instructions ---------------------------------------------------

    def instruction(self, insn: Instruction, pc: int) -> None:
        if insn.opcode == isa.LDDW:
            if insn.dst >= NUM_REGISTERS:
                raise Unsupported(f"pc {pc}: register r{insn.dst}")
            value = _signed(isa.lddw_value(insn, self.code[pc + 1]))
            self.set(insn.dst, str(value))
            return
        if insn.dst >= NUM_REGISTERS or insn.src >= NUM_REGISTERS:
            raise Unsupported(f"pc {pc}: register r{max(insn.dst, insn.src)}")
        cls = insn.cls
        if cls in (isa.ALU, isa.ALU64):
            self.alu(insn, pc)
        elif cls == isa.LDX:
            self.load(insn, pc)
        elif cls == isa.ST or (cls == isa.STX and insn.mode != isa.ATOMIC):
            self.store(insn, pc)
        elif cls == isa.STX:
            self.atomic(insn, pc)
        elif insn.opcode in (isa.OP_CALL, isa.OP_CALLX):
            self.helper_call(pc)
        elif isa.is_packet_load(insn):
            self.packet_load(insn, pc)
        else:
            raise Unsupported(f"pc {pc}: opcode {insn.opcode:#04x}")

    def helper_call(self, pc: int) -> None:
        """A helper call: a native helper called directly, any other through Python.

        Every `call` counts against `helper_calls_left` here; at the limit, the
        generic dispatcher raises the interpreter's trap. Then the call site's slot
        of the run's `native_helpers` table says how: a function pointer (a native
        helper, `bpfexec.vm.native`) is called with r1..r5 and the context as its
        `bpfexec_call *`, after its cost is charged; 0 (or too little
        fuel for the cost) calls `CALL_SYMBOL` with pc, fuel and r1..r5, which
        runs the helper as the interpreter does. Either way a trap the helper
        recorded is in the context's status, and the call unwinds. A `callx` goes
        through the generic dispatcher. A `bpf_map_lookup_elem` site of a program with
        array or hash maps may look them up inline (`inline_lookup`), when the run
        marks it so.
        """
        self.helper_pcs.add(pc)
        stored = self.slots  # what the frame held before the call, for an inline lookup
        self.slots = {}  # the helper may write the frame through a pointer
        site = self.call_sites.get(pc)
        if site is None:
            self.dispatch_call(pc)
            return
        fuel = self.get(FUEL)
        args = ", ".join(f"i64 {self.get(n)}" for n in range(1, 6))
        left_field = self.field("helper_calls_left")
        left = self.value(f"load i64, ptr {left_field}")
        counted, limit, native, python, merge = (self.new_label() for _ in range(5))
        at_limit = self.value(f"icmp sle i64 {left}, 0")
        self.emit(f"br i1 {at_limit}, label %{limit}, label %{counted}, !prof {COLD}")

        self.start(limit)  # the dispatcher traps: past the limit, as the interpreter does
        self.dispatch_call(pc)
        self.emit(f"br label %{merge}")
        limit_end, limit_r0, limit_fuel = self.label, self.get(0), self.get(FUEL)

        self.start(counted)
        self.emit(f"store i64 {self.value(f'sub i64 {left}, 1')}, ptr {left_field}")
        table = self.value(f"load ptr, ptr {self.field('native_helpers')}")
        slot = self.value(f"getelementptr ptr, ptr {table}, i64 {site}")
        function = self.value(f"load ptr, ptr {slot}")
        status_field = self.field("status")
        inlined: list[tuple[str, str, str]] = []
        if (self.arrays or self.hashes) and pc in self.lookups:
            mark = self.value(f"ptrtoint ptr {function} to i64")
            marked = self.value(f"icmp eq i64 {mark}, {INLINE_MARK}")
            inline, generic = self.new_label(), self.new_label()
            self.emit(f"br i1 {marked}, label %{inline}, label %{generic}")
            self.marked[inline] = self.label
            self.start(inline)
            inlined = self.inline_lookup(pc, site, fuel, stored, python, merge)
            self.start(generic)
        costs = self.value(f"load ptr, ptr {self.field('native_costs')}")
        cost_slot = self.value(f"getelementptr i64, ptr {costs}, i64 {site}")
        is_native = self.value(f"icmp ne ptr {function}, null")
        cost = self.value(f"load i64, ptr {cost_slot}")
        affordable = self.value(f"icmp sge i64 {fuel}, {cost}")
        direct = self.value(f"and i1 {is_native}, {affordable}")
        self.emit(f"br i1 {direct}, label %{native}, label %{python}")

        self.start(native)
        # The pc and fuel in the context: for a trap the helper records, and for the
        # built-in twins (`bpfexec.vm.jit.builtins`), which charge fuel there.
        self.emit(f"store i64 {pc}, ptr {self.field('trap_pc')}")
        fuel_field = self.field("fuel")
        self.emit(f"store i64 {self.value(f'sub i64 {fuel}, {cost}')}, ptr {fuel_field}")
        counts = self.value(f"load ptr, ptr {self.field('native_calls')}")
        count_slot = self.value(f"getelementptr i64, ptr {counts}, i64 {site}")
        count = self.value(f"load i64, ptr {count_slot}")
        self.emit(f"store i64 {self.value(f'add i64 {count}, 1')}, ptr {count_slot}")
        native_r0 = self.value(f"call i64 {function}({args}, ptr %ctx)")
        self.unwind_on_status(status_field)
        native_fuel = self.value(f"load i64, ptr {fuel_field}")
        native_end = self.label
        self.emit(f"br label %{merge}")

        self.start(python)
        self.emit(f"store i64 {fuel}, ptr {self.field('fuel')}")
        python_r0 = self.value(f"call i64 @{CALL_SYMBOL}(ptr %ctx, i64 {pc}, i64 {fuel}, {args})")
        self.unwind_on_status(status_field)
        python_fuel = self.value(f"load i64, ptr {self.field('fuel')}")
        # A Python helper may take long (a remote one is a round trip): the next
        # poll site reads the interrupt flag, as the interpreter's does.
        poll_at = self.value(f"add i64 {python_fuel}, 1")
        self.emit(f"store i64 {poll_at}, ptr {self.field('poll_at')}")
        python_end = self.label
        self.emit(f"br label %{merge}")

        self.start(merge)
        arms = ((native_r0, native_fuel, native_end), (python_r0, python_fuel, python_end),
                (limit_r0, limit_fuel, limit_end), *inlined)  # fmt: skip
        r0 = ", ".join(f"[ {value}, %{label} ]" for value, _, label in arms)
        fuels = ", ".join(f"[ {value}, %{label} ]" for _, value, label in arms)
        self.set(0, self.value(f"phi i64 {r0}"))
        self.set(FUEL, self.value(f"phi i64 {fuels}"))

    def inline_lookup(
        self, pc: int, site: int, fuel: str, stored: dict[int, Slot], fallback: str, merge: str
    ) -> list[tuple[str, str, str]]:
        """`bpf_map_lookup_elem(r1, r2)` without calling it, for r1 the handle of one of
        the maps of `self.arrays` or `self.hashes`; any other r1 goes to `fallback` (the
        Python call, already counted). Each map's arm counts the call as a native call
        site does (`native_calls`), then reads the key at r2 through the usual checked
        access (the interpreter's fault, at this pc, when it is out of bounds; a frame
        slot still holding what was `stored` there before the call is forwarded). An
        array's r0 is `index < max_entries ? base + index * slot : 0`; a hash map's
        arm probes its index (`probe`) and, when the index was changing, takes the
        count back and goes to `fallback`, where the helper counts itself. The arms'
        (r0, fuel, label), for the phi at `merge`; `fuel` is what is left at the call
        (a lookup costs nothing more).

        The arms branch, so what they learn of registers and translations is dropped
        after each: none of it dominates the code after the call. docs/jit.md,
        "Inline array lookups" and "Inline hash lookups", argues why this is the
        helper, exactly.
        """
        self.cache[FUEL] = fuel  # not the limit arm's: a fault in the key records it
        before, dirty = self.state(), set(self.dirty)
        handle = self.get(1)
        maps: Sequence[InlineArray | InlineHash] = [*self.arrays, *self.hashes]
        known = handle.lstrip("-").isdigit()  # a constant (from lddw): decided here
        if known:
            maps = [m for m in maps if _signed(m.handle) == int(handle)]
        arms = []
        uncount = self.new_label()  # a hash arm's way to the helper
        for inline in maps:
            if not known:
                hit, miss = self.new_label(), self.new_label()
                same = self.value(f"icmp eq i64 {handle}, {_signed(inline.handle)}")
                self.emit(f"br i1 {same}, label %{hit}, label %{miss}")
                self.start(hit)
            self.count_native(site, 1)
            if isinstance(inline, InlineArray):
                index = self.read_key(pc, stored, 4)[0]
                inside = self.value(f"icmp ult i64 {index}, {inline.max_entries}")
                offset = self.value(f"mul i64 {index}, {inline.slot}")
                address = self.value(f"add i64 {offset}, {_signed(inline.base)}")
                r0 = self.value(f"select i1 {inside}, i64 {address}, i64 0")
            else:
                r0 = self.probe(inline, self.read_key(pc, stored, inline.key_size), uncount)
            arms.append((r0, fuel, self.label))
            self.emit(f"br label %{merge}")
            self.cache, self.roots, self.translations, self.slots = before
            before, self.dirty = self.state(), set(dirty)
            if not known:
                self.start(miss)
        if not known or not maps:
            self.emit(f"br label %{fallback}")
        if any(isinstance(inline, InlineHash) for inline in maps):
            self.start(uncount)
            self.count_native(site, -1)
            self.emit(f"br label %{fallback}")
        return arms

    def count_native(self, site: int, delta: int) -> None:
        """Add `delta` to the run's count of native calls at call site `site`."""
        counts = self.value(f"load ptr, ptr {self.field('native_calls')}")
        count_slot = self.value(f"getelementptr i64, ptr {counts}, i64 {site}")
        count = self.value(f"load i64, ptr {count_slot}")
        self.emit(f"store i64 {self.value(f'add i64 {count}, {delta}')}, ptr {count_slot}")

    def probe(self, inline: InlineHash, words: list[str], fallback: str) -> str:
        """r0 of a lookup of the key `words` (its u64 words, zero-padded) in the index
        of hash map `inline` (`bpfexec.vm.maps_hash.NativeIndex`): the address of the
        key's value, or 0; or a branch to `fallback` when the index was changing (an
        odd version, or another one after the probe), when the probe did not end
        within the table's size, or when the slot found is not below max_entries.
        The version is read with acquire ordering before the probe, and again after
        an acquire fence; the table with unordered atomic loads (plain moves): a seqlock's
        reader. docs/jit.md, "Inline hash lookups".
        """
        h = str(_signed(FNV_OFFSET))
        for word in words:
            h = self.value(f"mul i64 {self.value(f'xor i64 {h}, {word}')}, {_signed(FNV_PRIME)}")
        for factor in (FMIX_1, FMIX_2, None):
            h = self.value(f"xor i64 {h}, {self.value(f'lshr i64 {h}, 33')}")
            if factor is not None:
                h = self.value(f"mul i64 {h}, {_signed(factor)}")
        tag = self.value(f"and i64 {h}, {TAG}")
        headers = self.value(f"load ptr, ptr {self.field('map_indexes')}")
        entry = self.value(f"getelementptr ptr, ptr {headers}, i64 {inline.position}")
        header = self.value(f"load ptr, ptr {entry}")
        version = self.value(f"load atomic i64, ptr {header} acquire, align 8")
        odd = self.value(f"trunc i64 {version} to i1")
        read, probe, check, compare, advance, done, found = (self.new_label() for _ in range(7))
        self.emit(f"br i1 {odd}, label %{fallback}, label %{read}, !prof {COLD}")

        self.start(read)
        table_field = self.value(f"getelementptr i8, ptr {header}, i64 8")
        table = self.value(f"load atomic ptr, ptr {table_field} unordered, align 8")
        mask = self.value(f"load atomic i64, ptr {table} unordered, align 8")
        first = self.value(f"and i64 {h}, {mask}")
        self.emit(f"br label %{probe}")

        self.start(probe)
        bucket, tries, next_bucket, next_tries = self.tmp(), self.tmp(), self.tmp(), self.tmp()
        self.emit(f"{bucket} = phi i64 [ {first}, %{read} ], [ {next_bucket}, %{advance} ]")
        self.emit(f"{tries} = phi i64 [ 0, %{read} ], [ {next_tries}, %{advance} ]")
        size = 1 + len(words)  # words per bucket
        at = self.value(f"add i64 {self.value(f'mul i64 {bucket}, {size}')}, 1")
        head_pointer = self.value(f"getelementptr i64, ptr {table}, i64 {at}")
        head = self.value(f"load atomic i64, ptr {head_pointer} unordered, align 8")
        slot1 = self.value(f"and i64 {head}, {TOMBSTONE}")  # the slot + 1
        empty = self.value(f"icmp eq i64 {slot1}, {EMPTY}")
        self.emit(f"br i1 {empty}, label %{done}, label %{check}")

        self.start(check)
        same_tag = self.value(f"icmp eq i64 {self.value(f'lshr i64 {head}, 32')}, {tag}")
        live = self.value(f"icmp ne i64 {slot1}, {TOMBSTONE}")
        candidate = self.value(f"and i1 {same_tag}, {live}")
        self.emit(f"br i1 {candidate}, label %{compare}, label %{advance}")

        self.start(compare)
        equal = "true"
        for n, word in enumerate(words, 1):
            stored_pointer = self.value(f"getelementptr i64, ptr {head_pointer}, i64 {n}")
            stored = self.value(f"load atomic i64, ptr {stored_pointer} unordered, align 8")
            same = self.value(f"icmp eq i64 {stored}, {word}")
            equal = self.value(f"and i1 {equal}, {same}")
        self.emit(f"br i1 {equal}, label %{done}, label %{advance}")

        self.start(advance)
        self.emit(f"{next_tries} = add i64 {tries}, 1")
        self.emit(f"{next_bucket} = and i64 {self.value(f'add i64 {bucket}, 1')}, {mask}")
        exhausted = self.value(f"icmp ugt i64 {next_tries}, {mask}")
        self.emit(f"br i1 {exhausted}, label %{fallback}, label %{probe}, !prof {COLD}")

        self.start(done)
        result = self.value(f"phi i64 [ 0, %{probe} ], [ {slot1}, %{compare} ]")
        self.emit("fence acquire")
        again = self.value(f"load atomic i64, ptr {header} monotonic, align 8")
        changed = self.value(f"icmp ne i64 {again}, {version}")
        outside = self.value(f"icmp ugt i64 {result}, {inline.max_entries}")
        retry = self.value(f"or i1 {changed}, {outside}")
        self.emit(f"br i1 {retry}, label %{fallback}, label %{found}, !prof {COLD}")

        self.start(found)
        offset = self.value(f"mul i64 {self.value(f'add i64 {result}, -1')}, {inline.slot}")
        address = self.value(f"add i64 {offset}, {_signed(inline.base)}")
        hit = self.value(f"icmp ne i64 {result}, 0")
        return self.value(f"select i1 {hit}, i64 {address}, i64 0")

    def read_key(self, pc: int, stored: dict[int, Slot], size: int) -> list[str]:
        """The `size` bytes at r2 as u64 words (little-endian, the last zero-extended),
        as `load` reads them: one checked access of `size` bytes, and a frame slot
        forwarded when it holds them all."""
        slot = self.frame_slot(2, 0, size, pc)
        value, width, _ = stored.get(slot, ("", 0, None)) if slot is not None else ("", 0, None)
        if size <= 8 and width >= size:  # the low bytes of what was stored (little-endian)
            return [self.widen(self.narrow(value, f"i{size * 8}"), f"i{size * 8}")]

        def load(host: str, qualifier: str, start: int = 0) -> str:
            ty = f"i{min(8, size - start) * 8}"
            at = self.value(f"getelementptr i8, ptr {host}, i64 {start}") if start else host
            return self.widen(self.value(f"load {qualifier}{ty}, ptr {at}, align 1"), ty)

        if size <= 8:
            key = self.access(2, 0, size, Access.READ, pc, load, "i64")
            assert key is not None
            return [key]
        host = self.host_pointer(2, 0, size, Access.READ, pc)
        return [load(host, "", start) for start in range(0, size, 8)]

    def unwind_on_status(self, status_field: str) -> None:
        """Unwind if the call just made recorded a trap (its fuel is in the context)."""
        status = self.value(f"load i64, ptr {status_field}")
        failed = self.value(f"icmp ne i64 {status}, 0")
        cont = self.new_label()
        self.emit(f"br i1 {failed}, label %unwind, label %{cont}, !prof {COLD}")
        self.start(cont)

    def dispatch_call(self, pc: int) -> None:
        """Spill registers and fuel, let the generic dispatcher run the call, take r0 back."""
        uses, _ = uses_and_defs(self.code[pc])
        for n in sorted(uses):
            self.emit(f"store i64 {self.get(n)}, ptr {self.field('regs', str(n))}")
        fuel_field = self.field("fuel")
        self.emit(f"store i64 {self.get(FUEL)}, ptr {fuel_field}")
        status = self.value(f"call i64 @{DISPATCH_SYMBOL}(ptr %ctx, i64 {pc})")
        failed = self.value(f"icmp ne i64 {status}, 0")
        cont = self.new_label()
        self.emit(f"br i1 {failed}, label %unwind, label %{cont}, !prof {COLD}")
        self.start(cont)
        self.set(0, self.value(f"load i64, ptr {self.field('regs', '0')}"))
        self.set(FUEL, self.value(f"load i64, ptr {fuel_field}"))

    def alu(self, insn: Instruction, pc: int) -> None:
        d, op = insn.dst, insn.op
        wide = insn.cls == isa.ALU64
        ty = "i64" if wide else "i32"
        if op == isa.NEG:
            self.set_result(d, self.value(f"sub {ty} 0, {self.operand(d, wide)}"), wide)
            return
        if op == isa.END:
            self.set(d, self.byte_swap(insn, pc))
            return
        from_register = insn.opcode & isa.SRC_MASK == isa.X
        if op == isa.MOV and insn.offset and from_register:
            value = self.sign_extend(self.get(insn.src), insn.offset, pc)
            self.set(d, value if wide else self.value(f"and i64 {value}, {MASK32}"))
            return
        rhs = (
            self.operand(insn.src, wide)
            if from_register
            else str(_signed(insn.imm, 64 if wide else 32))
        )
        if op == isa.MOV:
            if wide:
                self.set(d, rhs, self.root_of(insn.src) if from_register else None)
            else:
                self.set(d, self.value(f"zext i32 {rhs} to i64"))
            return
        # Pointer arithmetic by a constant, or the addition of one index register,
        # keeps the root: accesses share its translation (hoisted out of loops).
        root: Root | None = None
        if wide and not from_register and op in (isa.ADD, isa.SUB):
            base, constant, index = self.root_of(d)
            root = (base, constant + (insn.imm if op == isa.ADD else -insn.imm), index)
        elif wide and op == isa.ADD and insn.src != d:
            base, constant, index = self.root_of(d)
            # A pointer stepped by a register, round after round: the steps add up.
            step = rhs if index is None else self.value(f"add i64 {index}, {rhs}")
            root = (base, constant, step)
        lhs = self.operand(d, wide)
        result = self.binary(op, lhs, rhs, ty, signed=insn.offset == 1)
        if wide:
            self.set(d, result, root)
        else:
            self.set_result(d, result, wide)

    def set_result(self, d: int, value: str, wide: bool) -> None:
        self.set(d, value if wide else self.value(f"zext i32 {value} to i64"))

    def binary(self, op: int, lhs: str, rhs: str, ty: str, signed: bool) -> str:
        width = 64 if ty == "i64" else 32
        if op in _SHIFTS:
            # LLVM shifts by >= the width are poison: mask the count as RFC 9669 does.
            count = self.value(f"and {ty} {rhs}, {width - 1}")
            return self.value(f"{_BINARY[op]} {ty} {lhs}, {count}")
        if op in _BINARY:
            return self.value(f"{_BINARY[op]} {ty} {lhs}, {rhs}")
        if op not in (isa.DIV, isa.MOD):
            raise AssertionError(f"ALU operation {op:#x} passed the interpreter's decoder")
        # Division by zero and INT_MIN / -1 are undefined in LLVM: divide by 1
        # instead and select the RFC's result.
        zero = self.value(f"icmp eq {ty} {rhs}, 0")
        if signed:
            minus_one = self.value(f"icmp eq {ty} {rhs}, -1")
            either = self.value(f"or i1 {zero}, {minus_one}")
            safe = self.value(f"select i1 {either}, {ty} 1, {ty} {rhs}")
            if op == isa.DIV:
                quotient = self.value(f"sdiv {ty} {lhs}, {safe}")
                negated = self.value(f"sub {ty} 0, {lhs}")
                quotient = self.value(f"select i1 {minus_one}, {ty} {negated}, {ty} {quotient}")
                return self.value(f"select i1 {zero}, {ty} 0, {ty} {quotient}")
            remainder = self.value(f"srem {ty} {lhs}, {safe}")  # x % -1 == x % 1 == 0
            return self.value(f"select i1 {zero}, {ty} {lhs}, {ty} {remainder}")
        safe = self.value(f"select i1 {zero}, {ty} 1, {ty} {rhs}")
        if op == isa.DIV:
            quotient = self.value(f"udiv {ty} {lhs}, {safe}")
            return self.value(f"select i1 {zero}, {ty} 0, {ty} {quotient}")
        remainder = self.value(f"urem {ty} {lhs}, {safe}")
        return self.value(f"select i1 {zero}, {ty} {lhs}, {ty} {remainder}")

    def sign_extend(self, value: str, bits: int, pc: int) -> str:
        if bits >= 64:
            return value  # the interpreter's sign_extend leaves all 64 bits alone
        if bits < 1:
            raise Unsupported(f"pc {pc}: sign extension from {bits} bits")
        shifted = self.value(f"shl i64 {value}, {64 - bits}")
        return self.value(f"ashr i64 {shifted}, {64 - bits}")

    def byte_swap(self, insn: Instruction, pc: int) -> str:
        value = self.get(insn.dst)
        bits = insn.imm
        if insn.cls == isa.ALU64 or insn.opcode & isa.SRC_MASK == isa.TO_BE:
            if bits == 64:
                return self.value(f"call i64 @llvm.bswap.i64(i64 {value})")
            if bits in (16, 32):
                narrow = self.value(f"trunc i64 {value} to i{bits}")
                swapped = self.value(f"call i{bits} @llvm.bswap.i{bits}(i{bits} {narrow})")
                return self.value(f"zext i{bits} {swapped} to i64")
            raise Unsupported(f"pc {pc}: byte swap of {bits} bits")
        if bits >= 64:
            return value  # to little-endian on a little-endian VM: only truncation
        return self.value(f"and i64 {value}, {_signed((1 << bits) - 1)}")

    # -- memory ---------------------------------------------------------------------------

    def host_pointer(self, base: int, offset: int, size: int, access: Access, pc: int) -> str:
        """The host address of r[base] + offset, or a trap when it is out of bounds."""
        pointer = self.access(base, offset, size, access, pc, lambda host, _: host, "ptr")
        assert pointer is not None
        return pointer

    def access(
        self,
        base: int,
        offset: int,
        size: int,
        access: Access,
        pc: int,
        emit: Callable[[str, str], str | None],
        ty: str | None,
    ) -> str | None:
        """`emit(host, qualifier)` at the host address of r[base] + offset, or a trap
        when it is out of bounds; the value of type `ty` it returns (None: nothing).

        In the optimized tier the access is emitted on the fast and the slow path each,
        so that the fast one can fold its address arithmetic into the instruction. The
        slow one is volatile (harmless there) so that instcombine does not merge the two
        back into one access through a phi of the addresses. The quick tier makes that
        one access itself: less IR, and its code generator folds nothing anyway.
        """
        if self.copy is not None and pc in self.covered:  # checked before the group
            host, step = self.covered[pc]
            distance = self.times(step, self.copy[1] - 1)
            return emit(self.value(f"getelementptr i8, ptr {host}, i64 {distance}"), "")
        slot = self.frame_slot(base, offset, size, pc)
        if slot is not None:
            self.frame_low = max(self.frame_low, -slot)
            return emit(self.value(f"getelementptr i8, ptr %fp.host, i64 {slot}"), "")
        root, constant, index = self.root_of(base)
        return self.access_at(root, offset + constant, index, size, access, pc, emit, ty)

    def access_at(
        self,
        root: str,
        offset: int,
        index: str | None,
        size: int,
        access: Access,
        pc: int,
        emit: Callable[[str, str], str | None],
        ty: str | None,
    ) -> str | None:
        """`access` at root + offset (+ index): root an SSA value (or `_FRAME`), index
        an SSA value or None, the checks as for any access."""
        # Fast check against the root's region (or the frame, for r10 plus an index);
        # when it fails (a fault, or an address past the root's region into another),
        # the out-of-line translation decides. One unsigned compare covers both ends:
        # a negative start is a huge one.
        if root == _FRAME and index is not None and self.frame_bytes >= size:
            self.frame_low = max(self.frame_low, self.frame_bytes)
            start = self.value(f"add i64 {index}, {offset + self.frame_bytes}")
            outside = self.value(f"icmp ugt i64 {start}, {self.frame_bytes - size}")
            host = "%fp.host"
        else:
            region = self.translation(root, access, size)
            start = self.value(f"add i64 {region['offset']}, {offset}")
            if index is not None:
                start = self.value(f"add i64 {start}, {index}")
            limit = region[f"{_LENGTH[access]}.{size}"]
            outside = self.value(f"icmp uge i64 {start}, {limit}")
            host = region["host"]
        fuel = self.get(FUEL)  # before the branch: the slow path records it on a fault
        slow, done = self.new_label(), self.new_label()
        if not self.optimized:  # the least IR: one access, at a phi of the two addresses
            fast = self.fast_address(host, offset, index)
            entered = self.label
            self.emit(f"br i1 {outside}, label %{slow}, label %{done}, !prof {COLD}")
            self.start(slow)
            checked = self.checked(root, offset, index, size, access, pc, fuel)
            checked_from = self.label
            self.emit(f"br label %{done}")
            self.start(done)
            host = self.value(f"phi ptr [ {fast}, %{entered} ], [ {checked}, %{checked_from} ]")
            return emit(host, "")
        inside = self.new_label()
        self.emit(f"br i1 {outside}, label %{slow}, label %{inside}, !prof {COLD}")
        self.start(inside)
        fast_value = emit(self.fast_address(host, offset, index), "")
        self.emit(f"br label %{done}")
        self.start(slow)
        checked = self.checked(root, offset, index, size, access, pc, fuel)
        slow_value = emit(checked, "volatile ")
        if slow_value is not None:
            # Opaque to instcombine, which would otherwise turn phi(zext, zext) into
            # zext(phi) and so extend every fast load twice.
            slow_value = self.value(f'call {ty} asm "", "=r,0"({ty} {slow_value})')
        slow_end = self.label
        self.emit(f"br label %{done}")
        self.start(done)
        if ty is None:
            return None
        return self.value(f"phi {ty} [ {fast_value}, %{inside} ], [ {slow_value}, %{slow_end} ]")

    def fast_address(self, host: str, offset: int, index: str | None) -> str:
        fast = self.value(f"getelementptr i8, ptr {host}, i64 {offset}")
        if index is not None:
            fast = self.value(f"getelementptr i8, ptr {fast}, i64 {index}")
        return fast

    def checked(
        self,
        root: str,
        offset: int,
        index: str | None,
        size: int,
        access: Access,
        pc: int,
        fuel: str,
    ) -> str:
        """The slow path: `bpf_translate`, which records a fault, then unwind on one."""
        address = self.value(f"add i64 {self.real(root)}, {offset}")
        if index is not None:
            address = self.value(f"add i64 {address}, {index}")
        checked = self.value(
            f"call {self.cold_cc} ptr @bpf_translate(ptr %ctx, i64 {address}, i64 {size}, "
            f"i64 {int(access)}, i64 {pc}, i64 {fuel})"
        )
        missing = self.value(f"icmp eq ptr {checked}, null")
        cont = self.new_label()
        self.emit(f"br i1 {missing}, label %unwind, label %{cont}, !prof {COLD}")
        self.start(cont)
        return checked

    def real(self, root: str) -> str:
        return f"%a{isa.FRAME_POINTER}" if root == _FRAME else root

    def translation(self, root: str, access: Access, size: int) -> dict[str, str]:
        """Region index, offset, host address and length for `root`: once per block, or
        once per function in the prologue for an unchanged parameter."""
        if root.startswith("%a") and int(root[2:]) in self.unchanged:
            body, self.lines = self.lines, self.prologue
            try:
                return self._translation(root, access, size, self.hoisted)
            finally:
                self.lines = body
        return self._translation(root, access, size, self.translations)

    def _translation(
        self, root: str, access: Access, size: int, cache: dict[str, dict[str, str]]
    ) -> dict[str, str]:
        region = cache.get(root)
        if region is None:
            value = self.real(root)
            number = self.value(f"lshr i64 {value}, {REGION_SHIFT}")
            if self.optimized and cache is self.translations:
                index, base = self.guessed_region(number)
            else:
                index, base = self.region(number)
            offset = self.value(f"and i64 {value}, {OFFSET_MASK}")
            host = self.value(f"getelementptr i8, ptr {base}, i64 {offset}")
            region = {"index": index, "offset": offset, "host": host}
            cache[root] = region
        table = _LENGTH[access]
        if table not in region:
            region[table] = self.invariant(table, region["index"])
        starts = f"{table}.{size}"  # how many offsets an access of `size` may start at
        if starts not in region:
            length = region[table]
            fits = self.value(f"icmp uge i64 {length}, {size}")
            last = self.value(f"sub i64 {length}, {size - 1}")
            region[starts] = self.value(f"select i1 {fits}, i64 {last}, i64 0")
        return region

    def region(self, number: str) -> tuple[str, str]:
        """The region table's index for a region number, and the region's host base."""
        mapped = self.value(f"icmp ult i64 {number}, {REGION_COUNT}")
        # Region 0 is never mapped (length 0): every number past the table maps there.
        index = self.value(f"select i1 {mapped}, i64 {number}, i64 0")
        return index, self.invariant("region_base", index, "ptr")

    def guessed_region(self, number: str) -> tuple[str, str]:
        """`region(number)`, guessing that it is the region translated last in this
        function: when it is, the host base comes from a register rather than from the
        table, which takes a load off the path from a pointer loaded from memory to the
        next load through it (a linked list, a tree). The guess is exact: it is a
        region number below REGION_COUNT, and the table does not change during a run.
        """
        self.guessing = True
        guess = self.value("load i64, ptr %guess.index")
        same = self.value(f"icmp eq i64 {number}, {guess}")
        hit, miss, join = self.new_label(), self.new_label(), self.new_label()
        self.emit(f"br i1 {same}, label %{hit}, label %{miss}")
        self.start(hit)
        guessed_base = self.value("load ptr, ptr %guess.base")
        self.emit(f"br label %{join}")
        self.start(miss)
        index, base = self.region(number)
        self.emit(f"store i64 {index}, ptr %guess.index")
        self.emit(f"store ptr {base}, ptr %guess.base")
        missed = self.label
        self.emit(f"br label %{join}")
        self.start(join)
        return (
            self.value(f"phi i64 [ {guess}, %{hit} ], [ {index}, %{missed} ]"),
            self.value(f"phi ptr [ {guessed_base}, %{hit} ], [ {base}, %{missed} ]"),
        )

    def load(self, insn: Instruction, pc: int) -> None:
        size = isa.SIZE_BYTES[insn.size]
        ty = f"i{size * 8}"
        extend = "sext" if insn.mode == isa.MEMSX else "zext"

        def load(host: str, qualifier: str) -> str:
            value = self.value(f"load {qualifier}{ty}, ptr {host}, align 1")
            return self.value(f"{extend} {ty} {value} to i64") if size < 8 else value

        slot = self.frame_slot(insn.src, insn.offset, size, pc)
        unknown: Slot = ("", 0, None)
        stored, stored_size, root = self.slots.get(slot, unknown) if slot is not None else unknown
        if size == stored_size == 8:
            self.set(insn.dst, stored, root)
            return
        if size <= stored_size:  # the low bytes of what was stored (little-endian)
            part = self.narrow(stored, ty)
            self.set(insn.dst, self.value(f"{extend} {ty} {part} to i64"))
            return
        value = self.access(insn.src, insn.offset, size, Access.READ, pc, load, "i64")
        assert value is not None
        self.set(insn.dst, value)

    def packet_load(self, insn: Instruction, pc: int) -> None:
        """`LD_ABS` / `LD_IND`, as the interpreter's `_packet_load_op`: r0 = the `size`
        bytes at packet offset `off`, big-endian, zero-extended.

        The packet's start and end are read from r6 + PACKET_DATA and r6 + PACKET_END,
        and its bytes from start + off, by three ordinary checked accesses (a fault is
        the interpreter's, at this pc). `off` is imm (ABS) or the 32-bit sum of the
        index register and imm, sign-extended (IND). Outside the packet (`off < 0`,
        `end < start` or `off + size > end - start`: `start + off + size > end` without
        wrapping, as `off + size < 2^32`) the program ends: `Status.ENDED`, recorded
        with the fuel left as a trap is, and unwound through every call as a trap is,
        so r0 = 0 and the fuel is that of the blocks run (a packet load ends its block).
        Nothing is elided: docs/jit.md, "Legacy packet loads".
        """
        if insn.size == isa.DW or insn.dst or insn.offset:
            raise Unsupported(f"pc {pc}: packet load {insn.opcode:#04x} with reserved fields")
        if insn.mode == isa.ABS and insn.src:
            raise Unsupported(f"pc {pc}: LD_ABS with a source register")
        size = isa.SIZE_BYTES[insn.size]
        bits = size * 8

        def word(host: str, qualifier: str) -> str:
            return self.value(f"load {qualifier}i64, ptr {host}, align 1")

        context = isa.CONTEXT_REGISTER
        start = self.access(context, PACKET_DATA, 8, Access.READ, pc, word, "i64")
        end = self.access(context, PACKET_END, 8, Access.READ, pc, word, "i64")
        assert start is not None and end is not None
        index: str | None = None
        constant = 0
        if insn.mode == isa.ABS:
            constant = insn.imm
            negative = "true" if constant < 0 else "false"
            needed = str(constant + size)
        else:
            low = self.value(f"trunc i64 {self.get(insn.src)} to i32")
            sum32 = self.value(f"add i32 {low}, {insn.imm}")
            negative = self.value(f"icmp slt i32 {sum32}, 0")
            index = self.value(f"sext i32 {sum32} to i64")
            needed = self.value(f"add i64 {index}, {size}")
        backwards = self.value(f"icmp ult i64 {end}, {start}")
        room = self.value(f"sub i64 {end}, {start}")
        short = self.value(f"icmp ugt i64 {needed}, {room}")
        outside = self.value(f"or i1 {negative}, {backwards}")
        outside = self.value(f"or i1 {outside}, {short}")
        self.trap_if(outside, Status.ENDED, pc)

        def packet(host: str, qualifier: str) -> str:
            value = self.value(f"load {qualifier}i{bits}, ptr {host}, align 1")
            if size > 1:
                value = self.value(f"call i{bits} @llvm.bswap.i{bits}(i{bits} {value})")
            return self.value(f"zext i{bits} {value} to i64")

        value = self.access_at(start, constant, index, size, Access.READ, pc, packet, "i64")
        assert value is not None
        self.set(0, value)

    def store(self, insn: Instruction, pc: int) -> None:
        size = isa.SIZE_BYTES[insn.size]
        ty = f"i{size * 8}"
        if insn.cls == isa.STX:
            wide, root = self.get(insn.src), self.roots.get(insn.src)
            value = self.narrow(wide, ty)
        else:
            wide, root = str(insn.imm), None  # a 64-bit store sign-extends imm
            value = str(_signed(insn.imm, size * 8))

        def store(host: str, qualifier: str) -> None:
            self.emit(f"store {qualifier}{ty} {value}, ptr {host}, align 1")

        slot = self.frame_slot(insn.dst, insn.offset, size, pc)
        self.access(insn.dst, insn.offset, size, Access.WRITE, pc, store, None)
        self.overwrite(slot, size)
        if slot is not None:
            self.slots[slot] = (wide, size, root if size == 8 else None)

    def frame_slot(self, base: int, offset: int, size: int, pc: int) -> int | None:
        """The r10 offset that r[base] + offset is, when `access` makes it unchecked."""
        if self.copy is not None and pc in self.covered:
            return None
        root, constant, index = self.root_of(base)
        offset += constant
        if root == _FRAME and index is None and -self.frame_bytes <= offset <= -size:
            return offset
        return None

    def overwrite(self, slot: int | None, size: int) -> None:
        """Forget the frame slots a store of `size` bytes at `slot` overlaps (None:
        a store anywhere, the frame included)."""
        if slot is None:
            self.slots = {}
            return
        for other, (_, other_size, _) in list(self.slots.items()):
            if other < slot + size and slot < other + other_size:
                del self.slots[other]

    def narrow(self, value: str, ty: str) -> str:
        return value if ty == "i64" else self.value(f"trunc i64 {value} to {ty}")

    def widen(self, value: str, ty: str) -> str:
        return value if ty == "i64" else self.value(f"zext {ty} {value} to i64")

    def atomic(self, insn: Instruction, pc: int) -> None:
        # Every execution owns its memory, so read-modify-write needs no host atomics;
        # plain accesses also work at any alignment.
        size = isa.SIZE_BYTES[insn.size]
        ty = f"i{size * 8}"
        code = insn.imm
        op = code & ~isa.FETCH
        known = (isa.ATOMIC_CMPXCHG, isa.ATOMIC_XCHG & ~isa.FETCH, *_ATOMIC_BINARY)
        if code != isa.ATOMIC_CMPXCHG and op not in known:
            raise Unsupported(f"pc {pc}: atomic operation {code:#x}")
        self.overwrite(self.frame_slot(insn.dst, insn.offset, size, pc), size)
        host = self.host_pointer(insn.dst, insn.offset, size, Access.ATOMIC, pc)
        old = self.value(f"load {ty}, ptr {host}, align 1")
        operand = self.narrow(self.get(insn.src), ty)
        if code == isa.ATOMIC_CMPXCHG:
            expected = self.narrow(self.get(0), ty)
            equal = self.value(f"icmp eq {ty} {old}, {expected}")
            new = self.value(f"select i1 {equal}, {ty} {operand}, {ty} {old}")
            self.emit(f"store {ty} {new}, ptr {host}, align 1")
            self.set(0, self.widen(old, ty))
            return
        if op == isa.ATOMIC_XCHG & ~isa.FETCH:
            new = operand
        else:
            new = self.value(f"{_ATOMIC_BINARY[op]} {ty} {old}, {operand}")
        self.emit(f"store {ty} {new}, ptr {host}, align 1")
        if code & isa.FETCH:
            self.set(insn.src, self.widen(old, ty))
