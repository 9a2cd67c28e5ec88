"""A batch on native code: one loop in machine code runs a function over many inputs.

`bpfexec.vm.batch.run_batch` hands each chunk of inputs to a `NativeBatch`
when the JIT runs the program natively. Python encodes the chunk once (r1..r5
of every input, its argument buffers laid end to end in one arena); the loop,
`bpfexec_batch_loop` below (compiled once per process), then does for each
input what `bpfexec.vm.machine.prepare` and `run_native` would do between two
runs, without returning to Python:

- r0..r9 from the input (buffers as their regions' addresses, the rest 0), r10
  the top of the stack; the fuel, the helper call count and the status reset;
- the input's buffers mapped where the interpreter would map them (regions
  `BUFFER0 + n` point into the arena, so the program writes the results in
  place), the other buffer regions unmapped;
- the stack and the writable globals back to what a fresh run has: the part of
  the stack the run may have written zeroed, the globals copied from their
  image (`reset_extent` says what a run may have written, docs/jit.md);
- the native entry called, and r0, the fuel used and the status written to a
  packed result (0 for `Status.ENDED`, a packet load outside the packet, which
  is no trap but the end of the run with r0 = 0).

The loop returns to Python after a trap (which Python turns into the same Trap
the interpreter raises, then resumes at the next input), when the interrupt
flag is set between inputs, and at the end of the chunk. Every input of a
batch shares the maps, as `run_batch` documents.

Helpers run as in `run_native`: native ones from the loop, Python ones through
the dispatcher, which finds the running input's own Machine (`_BatchRun`, built
the first time an input calls into Python: its buffers, its log), so a helper
sees what the interpreter would show it. Not run here, but input by input:
programs with a ring buffer (events are per run) or a tail call (a restart the
loop cannot do), and runs `runs_natively` refuses.
"""

from __future__ import annotations

import ctypes
import time
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from bpfexec.vm import isa
from bpfexec.vm.batch import BUFFER_WORDS, PACKED_INPUT_WORDS, PACKED_RESULT_WORDS, PackedResults
from bpfexec.vm.builtin_helpers import bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_trace_printk
from bpfexec.vm.callbacks import bpf_tail_call
from bpfexec.vm.errors import RequestError, Trap, TrapKind
from bpfexec.vm.helpers import Helper, HelperContext
from bpfexec.vm.interpreter import locate_trap
from bpfexec.vm.isa import FRAME_POINTER, NUM_REGISTERS
from bpfexec.vm.jit.context import FIELD_INDEX, Context, Status
from bpfexec.vm.jit.provenance import harmless_stores
from bpfexec.vm.jit.runtime import (
    _RUNS,
    CompiledProgram,
    NativeCode,
    NativeFunction,
    _report_native_calls,
    _Run,
    _trap,
    native_context,
    runs_natively,
)
from bpfexec.vm.linux_helpers import (
    bpf_get_smp_processor_id,
    bpf_map_delete_elem,
    bpf_map_lookup_elem,
    bpf_map_update_elem,
)
from bpfexec.vm.machine import Argument, Machine, Result, encode_arguments
from bpfexec.vm.maps import BPF_MAP_TYPE_RINGBUF
from bpfexec.vm.memory import MAX_BUFFERS, Region
from bpfexec.vm.native import CALLS
from bpfexec.vm.packet_helpers import (
    bpf_csum_diff,
    bpf_l3_csum_replace,
    bpf_l4_csum_replace,
    bpf_skb_change_tail,
    bpf_skb_pull_data,
    bpf_skb_store_bytes,
    bpf_skb_vlan_pop,
    bpf_skb_vlan_push,
    bpf_xdp_adjust_head,
    bpf_xdp_adjust_meta,
    bpf_xdp_adjust_tail,
)
from bpfexec.vm.program import Program

LOOP_SYMBOL = "bpfexec_batch_loop"
INPUT_WORDS = PACKED_INPUT_WORDS  # r1..r5 of an input
RESULT_WORDS = PACKED_RESULT_WORDS  # r0, fuel used, and the Status of a trap (else 0)

# Helpers that never write the program's stack or globals (they may write maps,
# which a batch shares anyway): a run that calls only these, and stores only at
# constant offsets from r10, dirties no more than its frames.
_NO_WRITES = frozenset(
    {
        bpf_ktime_get_ns,
        bpf_get_prandom_u32,
        bpf_trace_printk,
        bpf_map_lookup_elem,
        bpf_map_update_elem,
        bpf_map_delete_elem,
        bpf_get_smp_processor_id,
    }
)


# Helpers of packet programs that write only the packet's frame and its context, the
# context's pointers always to genuine frame addresses (`bpfexec.vm.packet_helpers`):
# harmless to the stack and the globals where the entry's r1 is the context.
_PACKET_WRITERS = frozenset(
    {
        bpf_xdp_adjust_head,
        bpf_xdp_adjust_meta,
        bpf_xdp_adjust_tail,
        bpf_skb_store_bytes,
        bpf_l3_csum_replace,
        bpf_l4_csum_replace,
        bpf_skb_vlan_push,
        bpf_skb_vlan_pop,
        bpf_skb_change_tail,
        bpf_skb_pull_data,
        bpf_csum_diff,
    }
)


class BatchLoop(ctypes.Structure):
    """What the loop reads: shared by `NativeBatch` and the IR below (every field 8 bytes)."""

    _fields_ = [
        ("entry", ctypes.c_void_p),  # the module's `bpf_entry`
        ("ctx", ctypes.c_void_p),  # the Context it runs on
        ("pc", ctypes.c_int64),  # the function entered
        ("first", ctypes.c_int64),  # inputs first..count-1 run
        ("count", ctypes.c_int64),
        ("inputs", ctypes.c_void_p),  # INPUT_WORDS u64 per input
        ("buffers", ctypes.c_void_p),  # BUFFER_WORDS u64 per input, or NULL: no buffers
        ("results", ctypes.c_void_p),  # RESULT_WORDS u64 per input
        ("budget", ctypes.c_int64),  # each input's fuel
        ("max_calls", ctypes.c_int64),  # each input's helper calls
        ("frame_pointer", ctypes.c_uint64),  # r10 on entry
        ("stack_reset", ctypes.c_void_p),  # zeroed before each input...
        ("stack_reset_bytes", ctypes.c_int64),  # ...this many bytes (0: none)
        ("data", ctypes.c_void_p),  # the writable globals, copied before each input...
        ("data_image", ctypes.c_void_p),  # ...from their initial image...
        ("data_bytes", ctypes.c_int64),  # ...this many bytes (0: none)
        ("current", ctypes.c_int64),  # the input running (for the dispatcher)
    ]


_TRAP_KINDS = {
    Status.OUT_OF_FUEL: TrapKind.OUT_OF_FUEL,
    Status.MEMORY_FAULT: TrapKind.MEMORY_FAULT,
    Status.CALL_DEPTH_EXCEEDED: TrapKind.CALL_DEPTH_EXCEEDED,
}

_LOOP_INDEX = {field[0]: i for i, field in enumerate(BatchLoop._fields_)}


def _loop_ir() -> str:
    from bpfexec.vm.jit.compiler import CONTEXT_TYPE

    loop_type = "{ " + ", ".join(
        "ptr" if field[1] is ctypes.c_void_p else "i64" for field in BatchLoop._fields_
    ) + " }"  # fmt: skip

    def field(name: str) -> str:
        return f"getelementptr inbounds %loop, ptr %s, i32 0, i32 {_LOOP_INDEX[name]}"

    def ctx(name: str, index: str | int | None = None) -> str:
        tail = f", i64 {index}" if index is not None else ""
        return f"getelementptr inbounds %ctx, ptr %c, i32 0, i32 {FIELD_INDEX[name]}{tail}"

    loads = "\n".join(
        f"  %{name}.p = {field(name)}\n  %{name} = load {ty}, ptr %{name}.p"
        for name, ty in [
            ("entry", "ptr"), ("ctx", "ptr"), ("pc", "i64"), ("first", "i64"), ("count", "i64"),
            ("inputs", "ptr"), ("buffers", "ptr"), ("results", "ptr"), ("budget", "i64"),
            ("max_calls", "i64"), ("frame_pointer", "i64"), ("stack_reset", "ptr"),
            ("stack_reset_bytes", "i64"), ("data", "ptr"), ("data_image", "ptr"),
            ("data_bytes", "i64"),
        ]
    )  # fmt: skip
    registers = []
    for n in range(NUM_REGISTERS):
        registers.append(f"  %rp{n} = {ctx('regs', n)}")
        if 1 <= n <= INPUT_WORDS:
            registers.append(f"  %ip{n} = getelementptr i64, ptr %in, i64 {n - 1}")
            registers.append(f"  %iv{n} = load i64, ptr %ip{n}")
            registers.append(f"  store i64 %iv{n}, ptr %rp{n}")
        elif n == FRAME_POINTER:
            registers.append(f"  store i64 %frame_pointer, ptr %rp{n}")
        else:
            registers.append(f"  store i64 0, ptr %rp{n}")
    buffers = []
    for k in range(MAX_BUFFERS):
        region = int(Region.BUFFER0) + k
        buffers += [
            f"  %ba{k}.p = getelementptr i64, ptr %bin, i64 {2 * k}",
            f"  %ba{k} = load ptr, ptr %ba{k}.p",
            f"  %bl{k}.p = getelementptr i64, ptr %bin, i64 {2 * k + 1}",
            f"  %bl{k} = load i64, ptr %bl{k}.p",
            f"  %rb{k} = {ctx('region_base', region)}",
            f"  store ptr %ba{k}, ptr %rb{k}",
            f"  %rr{k} = {ctx('region_read_len', region)}",
            f"  store i64 %bl{k}, ptr %rr{k}",
            f"  %rw{k} = {ctx('region_write_len', region)}",
            f"  store i64 %bl{k}, ptr %rw{k}",
        ]
    nl = "\n"
    return f"""
%ctx = type {CONTEXT_TYPE}
%loop = type {loop_type}

declare void @llvm.memset.p0.i64(ptr, i8, i64, i1)
declare void @llvm.memcpy.p0.p0.i64(ptr, ptr, i64, i1)

define i64 @{LOOP_SYMBOL}(ptr noalias %s) nounwind {{
start:
{loads}
  %c = bitcast ptr %ctx to ptr
  %flag.p = {ctx("interrupt")}
  %flag.a = load ptr, ptr %flag.p
  %current = {field("current")}
  %fuel.p = {ctx("fuel")}
  %poll.p = {ctx("poll_at")}
  %status.p = {ctx("status")}
  %calls.p = {ctx("helper_calls_left")}
  %poll_at = add i64 %budget, 1
  %has_buffers = icmp ne ptr %buffers, null
  br label %head
head:
  %i = phi i64 [ %first, %start ], [ %next, %again ]
  %more = icmp slt i64 %i, %count
  br i1 %more, label %check, label %out
check:
  store i64 %i, ptr %current
  %flag = load atomic i64, ptr %flag.a monotonic, align 8
  %stop = icmp ne i64 %flag, 0
  br i1 %stop, label %out, label %setup
setup:
  %in.o = mul i64 %i, {INPUT_WORDS}
  %in = getelementptr i64, ptr %inputs, i64 %in.o
{nl.join(registers)}
  store i64 %budget, ptr %fuel.p
  store i64 %poll_at, ptr %poll.p
  store i64 0, ptr %status.p
  store i64 %max_calls, ptr %calls.p
  call void @llvm.memset.p0.i64(ptr %stack_reset, i8 0, i64 %stack_reset_bytes, i1 false)
  call void @llvm.memcpy.p0.p0.i64(ptr %data, ptr %data_image, i64 %data_bytes, i1 false)
  br i1 %has_buffers, label %map, label %run
map:
  %bin.o = mul i64 %i, {BUFFER_WORDS}
  %bin = getelementptr i64, ptr %buffers, i64 %bin.o
{nl.join(buffers)}
  br label %run
run:
  %status = call i64 %entry(ptr %c, i64 %pc)
  %ok = icmp eq i64 %status, {int(Status.OK)}
  %r0 = load i64, ptr %rp0
  %value = select i1 %ok, i64 %r0, i64 0
  %left = load i64, ptr %fuel.p
  %used = sub i64 %budget, %left
  %out.o = mul i64 %i, {RESULT_WORDS}
  %out0 = getelementptr i64, ptr %results, i64 %out.o
  store i64 %value, ptr %out0
  %out1 = getelementptr i64, ptr %out0, i64 1
  store i64 %used, ptr %out1
  %out2 = getelementptr i64, ptr %out0, i64 2
  %ended = icmp eq i64 %status, {int(Status.ENDED)}
  %fine = or i1 %ok, %ended
  %trap = select i1 %fine, i64 0, i64 %status
  store i64 %trap, ptr %out2
  %next = add i64 %i, 1
  br i1 %fine, label %again, label %trapped
again:
  br label %head
trapped:
  ret i64 %next
out:
  ret i64 %i
}}
"""


# The compiled loop, `i64 (BatchLoop *)`.
_loop = NativeFunction(LOOP_SYMBOL, _loop_ir, ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_void_p))


def _unwrapped(helper: Helper) -> object:
    return getattr(helper.fn, "__wrapped__", helper.fn)


def reset_extent(program: Program, entry: int, helpers: dict[int, Helper], stack: int,
                 frame: int, context: bool = False) -> tuple[int, bool]:  # fmt: skip
    """What one run of the function at `entry` may have written of the stack (bytes
    below its top, of `stack`) and whether it may have written the writable globals.

    A run writes memory only with its own stores and its helpers. When every store
    (atomics included) is at a constant offset from r10 or one `harmless_stores`
    proves writes no stack, globals or context pointer (`context`: the entry's r1
    is a packet context), and every helper called is one that writes no program
    memory but a packet's (`_NO_WRITES`, and with `context` `_PACKET_WRITERS`), a
    function reached at call depth d writes nowhere below `top - d * frame + (its
    lowest r10 store offset)`, and never the globals. Otherwise (a store through any
    other register, a helper that writes, a local call that is no function's
    entry, recursion): the whole stack and the globals. docs/jit.md gives the
    argument; tests attack it."""
    code = program.instructions
    everything = (stack, True)
    allowed = _NO_WRITES | _PACKET_WRITERS if context else _NO_WRITES
    if any(_unwrapped(helpers[pc]) not in allowed for pc in helpers):
        return everything
    starts = {fn.pc: fn for fn in program.functions}
    callees: dict[int, set[int]] = {}
    for fn in program.functions:
        callees[fn.pc] = set()
        for pc in range(fn.pc, fn.pc + fn.size):
            insn = code[pc]
            if insn.opcode == isa.OP_CALLX:
                return everything  # a helper chosen at run time
            if insn.opcode == isa.OP_CALL and insn.src == 1:
                target = pc + insn.imm + 1
                if target not in starts:
                    return everything
                callees[fn.pc].add(target)
    depth: dict[int, int] = {}  # function pc -> the deepest call depth it is reached at

    def visit(pc: int, d: int, path: frozenset[int]) -> bool:
        if pc in path:
            return False  # recursion
        if depth.get(pc, -1) >= d:
            return True
        depth[pc] = d
        return all(visit(callee, d + 1, path | {pc}) for callee in callees[pc])

    if not visit(entry, 0, frozenset()):
        return everything
    # The entry's r1 is the context only if no call reaches the entry again.
    context = context and not any(entry in callees[pc] for pc in depth)
    lookups = frozenset(pc for pc in helpers if _unwrapped(helpers[pc]) is bpf_map_lookup_elem)
    written = 0
    for start, d in depth.items():  # the functions a run may reach
        fn = starts[start]
        low: int | None = None
        harmless: frozenset[int] | None = None  # computed at the function's first need
        for pc in range(fn.pc, fn.pc + fn.size):
            insn = code[pc]
            if insn.cls not in (isa.ST, isa.STX):
                continue
            if insn.dst == FRAME_POINTER:
                low = insn.offset if low is None else min(low, insn.offset)
                continue
            if harmless is None:
                harmless = harmless_stores(code, fn.pc, fn.size, lookups, context and d == 0)
            if pc not in harmless:
                return everything
        if low is not None:
            written = max(written, d * frame - low)
    return min(stack, max(0, written)), False


@dataclass
class _Chunk:
    """One chunk of inputs, encoded for the loop."""

    count: int
    inputs: array[int]  # INPUT_WORDS a input
    buffers: array[int] | None  # BUFFER_WORDS an input (None: no input has a buffer)
    results: array[int]  # RESULT_WORDS an input
    arena: bytearray
    spans: Sequence[list[tuple[int, int]]]  # each input's buffers: (offset in arena, length)


class _TableSpans(Sequence[list[tuple[int, int]]]):
    """The spans of inputs laid out by their caller: read from the buffer table."""

    def __init__(self, table: array[int], base: int) -> None:
        self.table, self.base = table, base

    def __len__(self) -> int:
        return len(self.table) // BUFFER_WORDS

    def __getitem__(self, index: int) -> list[tuple[int, int]]:  # type: ignore[override]
        row = self.table[index * BUFFER_WORDS : (index + 1) * BUFFER_WORDS]
        return [(row[k] - self.base, row[k + 1]) for k in range(0, BUFFER_WORDS, 2) if row[k + 1]]


class _BatchRun(_Run):
    """The dispatcher's view of a batch: the Machine of the input running now, built
    the first time that input calls into Python, from the template's."""

    def __init__(self, template: Machine, ctx: Context, code: NativeCode, loop: BatchLoop) -> None:
        super().__init__(template, ctx, code.helper_ops)
        self.template = template
        self.loop = loop
        self.chunk: _Chunk | None = None
        self.view: memoryview | None = None
        self.machines: dict[int, Machine] = {}  # this chunk's inputs that have one

    def current(self) -> Machine:
        index = self.loop.current
        machine = self.machines.get(index)
        if machine is None:
            machine = self.machines[index] = self._input_machine(index)
        return machine

    def _input_machine(self, index: int) -> Machine:
        template, chunk = self.template, self.chunk
        assert chunk is not None and self.view is not None
        view = self.view
        buffers = [view[offset : offset + length] for offset, length in chunk.spans[index]]
        memory = template.memory.with_buffers(buffers)
        log: list[str] = []
        limits = template.limits
        context = HelperContext(memory, log, limits.max_log_lines, limits.max_log_bytes)
        context.maps = template.context.maps
        registers = [0] * NUM_REGISTERS
        registers[FRAME_POINTER] = template.registers[FRAME_POINTER]
        return Machine(
            program=template.program, entry=template.entry, memory=memory, registers=registers,
            fuel=template.budget, budget=template.budget, helpers=template.helpers,
            resolver=template.resolver, context=context, limits=limits,
            interrupt=template.interrupt, log=log, buffer_count=len(buffers),
        )  # fmt: skip


def native_batch(
    compiled: CompiledProgram, template: Machine, context: bool = False
) -> NativeBatch | None:
    """A NativeBatch running inputs as `template` (a prepared Machine with no
    arguments, on the batch's maps) would run, or None if native code cannot.
    `context`: every input's r1 is a packet context (`reset_extent`)."""
    program = template.program
    if not runs_natively(compiled, template):
        return None
    if any(spec.type == BPF_MAP_TYPE_RINGBUF for spec in program.maps):
        return None
    if any(_unwrapped(helper) is bpf_tail_call for helper in template.helpers.values()):
        return None
    code = compiled.code_for(template)
    assert code is not None
    return NativeBatch(template, code, context)


class NativeBatch:
    """Runs chunks of inputs on native code; `close()` it when the batch ends."""

    def __init__(self, template: Machine, code: NativeCode, context: bool = False) -> None:
        self.template = template
        self.code = code
        limits = template.limits
        ctx, flag, keep, tables = native_context(template, code)
        self.ctx, self.flag, self._keep, self._tables = ctx, flag, keep, tables
        memory = template.memory
        stack = memory.regions[Region.STACK]
        data = memory.regions[Region.DATA]
        assert isinstance(stack, bytearray) and isinstance(data, bytearray)
        self._stack = (ctypes.c_char * len(stack)).from_buffer(stack)
        reset, globals_written = reset_extent(
            template.program, template.entry, template.helpers, len(stack),
            limits.stack_frame_size, context,
        )  # fmt: skip
        loop = self.loop = BatchLoop()
        loop.entry = ctypes.cast(code.entry, ctypes.c_void_p).value  # type: ignore[arg-type]
        loop.ctx = ctypes.addressof(ctx)
        loop.pc = template.entry
        loop.budget = template.budget
        loop.max_calls = limits.max_helper_calls
        loop.frame_pointer = template.registers[FRAME_POINTER]
        loop.stack_reset = ctypes.addressof(self._stack) + len(stack) - reset
        loop.stack_reset_bytes = reset
        self._image = bytes(template.program.data)
        if globals_written and data:
            self._data = (ctypes.c_char * len(data)).from_buffer(data)
            loop.data = ctypes.addressof(self._data)
            loop.data_image = ctypes.cast(ctypes.c_char_p(self._image), ctypes.c_void_p).value
            loop.data_bytes = len(data)
        self.run = _BatchRun(template, ctx, code, loop)
        self._address = ctypes.addressof(ctx)
        _RUNS[self._address] = self.run
        CALLS[self._address] = self.run
        self._listening = True
        template.interrupt.listeners.append(self._stop)
        if template.interrupt.reason is not None:
            flag.value = 1
        self._function = _loop.compiled()  # before any run is timed

    def _stop(self, reason: TrapKind) -> None:
        self.flag.value = 1

    def close(self) -> None:
        if self._listening:
            self._listening = False
            self.template.interrupt.listeners.remove(self._stop)
            del _RUNS[self._address], CALLS[self._address]

    def encode(self, inputs: Sequence[Sequence[Argument]]) -> tuple[_Chunk, RequestError | None]:
        """The chunk of `inputs` up to the first that cannot run (`chunk.count` is its
        index), and that one's error, as `encode_arguments` raises it."""
        limits = self.template.limits
        words = array("Q")
        spans: list[list[tuple[int, int]]] = []
        arena = bytearray()
        error: RequestError | None = None
        for args in inputs:
            try:
                registers, buffers = encode_arguments(args, limits)
            except RequestError as exc:
                error = exc
                break
            words.extend(registers)
            span = []
            for buf in buffers:
                span.append((len(arena), len(buf)))
                arena += buf
            spans.append(span)
        count = len(spans)
        table = array("Q", bytes(8 * BUFFER_WORDS * count)) if any(spans) else None
        results = array("Q", bytes(8 * RESULT_WORDS * count))
        return _Chunk(count, words, table, results, arena, spans), error

    def results(self, chunk: _Chunk) -> Iterator[Result]:
        """Run every input of `chunk` (stopping early when interrupted) and yield their
        Results in order."""
        loop, run = self.loop, self.run
        arena = chunk.arena
        view = (ctypes.c_char * max(1, len(arena))).from_buffer(arena) if arena else None
        base = ctypes.addressof(view) if view is not None else 0
        if chunk.buffers is not None:
            table = chunk.buffers
            for index, span in enumerate(chunk.spans):
                for k, (offset, length) in enumerate(span):
                    if length:
                        table[index * BUFFER_WORDS + 2 * k] = base + offset
                        table[index * BUFFER_WORDS + 2 * k + 1] = length
        self._unmap_buffers()
        loop.inputs = chunk.inputs.buffer_info()[0]
        loop.buffers = chunk.buffers.buffer_info()[0] if chunk.buffers is not None else None
        loop.results = chunk.results.buffer_info()[0]
        loop.count = chunk.count
        run.chunk, run.view, run.machines, run.error = chunk, memoryview(arena), {}, None
        out = chunk.results
        start = 0
        try:
            while start < chunk.count:
                loop.first = start
                began = time.perf_counter_ns()
                done = self._function(ctypes.addressof(loop))
                mean = (time.perf_counter_ns() - began) // max(1, done - start)
                for index in range(start, done):
                    yield self._result(index, out, chunk, arena, mean)
                if done == chunk.count:
                    return
                if done == start or not out[RESULT_WORDS * (done - 1) + 2]:
                    return  # interrupted before input `done`: no later input runs
                start = done  # input done - 1 trapped: on with the next
        finally:
            self._unmap_buffers()
            run.chunk, run.view, run.machines = None, None, {}
            del view
            self._report_calls()

    def packed_results(self, inputs: array[int]) -> PackedResults:
        """`packed`, with each trap and log line kept."""
        count = len(inputs) // INPUT_WORDS
        out = array("Q", bytes(8 * RESULT_WORDS * count))
        traps: dict[int, Trap] = {}
        logs: dict[int, tuple[str, ...]] = {}
        done = self.packed(inputs, out, traps, logs)
        del out[RESULT_WORDS * done :]
        return PackedResults(out, traps, logs)

    def packed(
        self,
        inputs: array[int],
        out: array[int],
        traps: dict[int, Trap] | None = None,
        logs: dict[int, tuple[str, ...]] | None = None,
    ) -> int:
        """Run the inputs of `inputs` (INPUT_WORDS an input, no buffers), writing
        RESULT_WORDS an input to `out`: r0, fuel used, and 0 or the trap's
        `TrapKind.code`. Returns how many inputs ran (fewer when interrupted).
        With `traps` and `logs`, each input's Trap and log lines go there."""
        count = len(inputs) // INPUT_WORDS
        spans: list[list[tuple[int, int]]] = [[]] * count
        return self._words(_Chunk(count, inputs, None, out, bytearray(), spans), traps, logs)

    def in_arena(
        self,
        inputs: array[int],
        table: array[int],
        arena: bytearray,
        out: array[int],
        traps: dict[int, Trap] | None = None,
        logs: dict[int, tuple[str, ...]] | None = None,
    ) -> int:
        """`packed`, for inputs whose argument buffers are laid out in `arena` already:
        `table` has BUFFER_WORDS words an input (each buffer's host address in the
        arena and its length; 0 and 0 after the last). The program writes them in
        place."""
        count = len(inputs) // INPUT_WORDS
        view = (ctypes.c_char * max(1, len(arena))).from_buffer(arena)
        try:
            spans = _TableSpans(table, ctypes.addressof(view))
            return self._words(_Chunk(count, inputs, table, out, arena, spans), traps, logs)
        finally:
            del view

    def _words(
        self,
        chunk: _Chunk,
        traps: dict[int, Trap] | None,
        logs: dict[int, tuple[str, ...]] | None,
    ) -> int:
        count, inputs, out = chunk.count, chunk.inputs, chunk.results
        loop, run = self.loop, self.run
        self._unmap_buffers()
        loop.inputs = inputs.buffer_info()[0]
        loop.buffers = chunk.buffers.buffer_info()[0] if chunk.buffers is not None else None
        loop.results, loop.count = out.buffer_info()[0], count
        run.chunk = chunk
        run.view, run.machines, run.error = memoryview(chunk.arena), {}, None
        start = 0
        try:
            while start < count:
                loop.first = start
                done: int = self._function(ctypes.addressof(loop))
                if logs is not None:
                    logs.update((i, tuple(m.log)) for i, m in run.machines.items() if m.log)
                at = RESULT_WORDS * done - 1
                if done == start or not out[at]:
                    return done  # all of them, or interrupted before input `done`
                status = Status(out[at])  # input done - 1 trapped
                if traps is not None:
                    trap = self._trap(done - 1, out[at - 1], status)
                    traps[done - 1] = trap
                    out[at] = trap.kind.code
                else:
                    out[at] = self._trap_kind(status).code
                run.machines, run.error = {}, None
                start = done
            return count
        finally:
            self._unmap_buffers()
            run.chunk, run.view, run.machines = None, None, {}
            self._report_calls()

    def _trap(self, index: int, used: int, status: Status) -> Trap:
        """The Trap the interpreter raises for input `index`, which native code stopped
        with `status` after using `used` fuel."""
        self.loop.current = index
        machine = self.run.current()
        machine.fuel = self.template.budget - used
        trap = locate_trap(_trap(status, self.ctx, self.run), self.template.program)
        self.run.error = None
        return trap

    def _unmap_buffers(self) -> None:
        """Unmap the argument buffer regions: a chunk without buffers leaves them as
        they are, and the last chunk's arena may be gone."""
        ctx = self.ctx
        for region in range(Region.BUFFER0, Region.BUFFER0 + MAX_BUFFERS):
            ctx.region_base[region] = None
            ctx.region_read_len[region] = 0
            ctx.region_write_len[region] = 0

    def _trap_kind(self, status: Status) -> TrapKind:
        if status == Status.INTERRUPTED:
            return self.template.interrupt.reason or TrapKind.CANCELLED
        if status == Status.PYTHON:
            error = self.run.error
            if not isinstance(error, Trap):
                raise error or RuntimeError("native code returned a trap without an error")
            return error.kind
        return _TRAP_KINDS[status]

    def _report_calls(self) -> None:
        _report_native_calls(self.template, self._tables[-1])  # type: ignore[arg-type]
        calls = self._tables[-1]
        if calls is not None:
            ctypes.memset(calls, 0, ctypes.sizeof(calls))  # type: ignore[arg-type]

    def _result(
        self, index: int, out: array[int], chunk: _Chunk, arena: bytearray, duration: int
    ) -> Result:
        """Input `index`'s Result; its duration is the mean of the loop's run it was in."""
        at = RESULT_WORDS * index
        value, used, status = out[at], out[at + 1], out[at + 2]
        trap = self._trap(index, used, Status(status)) if status else None
        machine_now = self.run.machines.get(index)
        return Result(
            return_value=value,
            fuel_used=used,
            trap=trap,
            log=tuple(machine_now.log) if machine_now is not None else (),
            buffers=tuple(
                bytes(arena[offset : offset + length]) for offset, length in chunk.spans[index]
            ),
            duration_ns=duration,
        )
