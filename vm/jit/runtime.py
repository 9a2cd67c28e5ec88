"""Native code for a Program, and running it: LLVM code generation, the context, helpers.

`compile_program()` turns a Program into a `CompiledProgram` once (the result
is cached in `Program.compiled["jit"]`), `run_native()` runs one prepared
Machine on it:

- the region table of the context is filled from `Machine.memory`, pointing
  at the very bytearrays the interpreter would use, so helpers and the final
  Result see what native code wrote; read-only data is never given a writable
  length;
- the native entry is called through a ctypes CFUNCTYPE pointer, which releases
  the GIL: executions on different threads run in parallel;
- helper calls come back into Python through one process-wide dispatcher
  callback, which runs the interpreter's own operation for that call site, so
  helper semantics (fuel cost, limits, errors) cannot drift between engines;
- an interrupt listener sets a flag word that native code reads on backward
  jumps and calls, once per `POLL_INTERVAL` of fuel (`bpfexec.vm.jit.compiler`);
- a trap recorded by native code becomes the same `Trap` the interpreter
  raises, message and pc included; `Status.ENDED` (a packet load outside the
  packet) is no trap but the end of the run with r0 = 0, as in the interpreter.

Programs the compiler does not reproduce exactly (`Unsupported`) are marked in
their CompiledProgram and run by the interpreter instead. This module does no
IR construction (`bpfexec.vm.jit.compiler`) and no Machine set-up (`bpfexec.vm.machine`).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import llvmlite.binding as llvm

from bpfexec.vm.errors import Trap, TrapKind
from bpfexec.vm.helpers import HelperContext, HelperFn
from bpfexec.vm.interpreter import (
    Block,
    Op,
    _at,
    decode_op,
    interrupted,
    locate_trap,
    program_blocks,
)
from bpfexec.vm.isa import FRAME_POINTER
from bpfexec.vm.jit.builtins import TWINS, twin_addresses
from bpfexec.vm.jit.compiler import (
    CALL_SYMBOL,
    DISPATCH_SYMBOL,
    ENTRY_SYMBOL,
    Unsupported,
    build_module,
    call_sites,
)
from bpfexec.vm.jit.context import Access, Context, Status
from bpfexec.vm.jit.limits import TierLimits, over_limit, tier_limits
from bpfexec.vm.jit.maps import (
    INLINE_MARK,
    InlineArray,
    InlineHash,
    index_headers,
    maps_match,
    site_inlines,
)
from bpfexec.vm.limits import Limits
from bpfexec.vm.machine import Machine
from bpfexec.vm.memory import OFFSET_MASK, REGION_COUNT, REGION_SHIFT
from bpfexec.vm.native import API_ADDRESS, CALLS, NativeHelper
from bpfexec.vm.program import Program

# Deeper call limits than this run on the interpreter: every eBPF frame is a native
# frame too, and the thread's C stack must hold them all.
MAX_NATIVE_CALL_DEPTH = 4096
# Accesses this far below r10 are left unchecked when the run's frames allow it.
FRAME_BYTES = Limits().stack_frame_size

log = logging.getLogger(__name__)

# Keys of the tiers' CompiledPrograms in `Program.compiled`.
OPTIMIZED = "jit"
QUICK = "jit.quick"

_ENTRY_TYPE = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64)
_DISPATCH_TYPE = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64)
_CALL_TYPE = ctypes.CFUNCTYPE(
    ctypes.c_uint64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, *([ctypes.c_uint64] * 5)
)

# llvmlite shares LLVM's global state between threads; one LLVM operation at a time
# keeps it consistent: code generation in this process, and loading object code a
# compile worker made (`bpfexec.vm.jit.worker`), which takes about a millisecond. IR
# generation (Python) and waiting for a worker happen outside it; runs never take it.
_LLVM_LOCK = threading.RLock()
_llvm_ready = False

# `emit(ir_text, quick) -> object code`: where LLVM turns the IR into machine code
# (`emit_object` in this process, or a compile worker process).
Emit = Callable[[str, bool], bytes]


class CompileAbandoned(Exception):
    """The compile was given up (a timeout, or the server shutting down): the program
    stays on the tier it has, and nothing is wrong with it or with the compiler."""


@dataclass
class NativeCode:
    """One compiled LLVM module of a program, and what running it needs."""

    entry: Callable[[int, int], int]  # (context address, pc of an exported function)
    exported: frozenset[int]  # pcs `entry` enters
    helper_ops: dict[int, Op]  # call site -> the interpreter's operation for it
    frame_low: int  # bytes below r10 that unchecked frame accesses reach (0: none)
    compile_seconds: float
    functions: int  # LLVM functions generated
    blocks: int  # eBPF blocks translated
    engine: object = field(repr=False)  # owns the machine code: keep it alive
    object_bytes: int = 0  # size of the object code loaded
    # `bpf_map_lookup_elem` sites that look up these arrays inline when a run marks
    # them (`_native_helper_tables`, `bpfexec.vm.jit.maps`)
    inline_lookups: frozenset[int] = frozenset()
    inline_arrays: tuple[InlineArray, ...] = ()
    inline_hashes: tuple[InlineHash, ...] = ()


@dataclass
class CompiledProgram:
    """The native code of one Program, or the reason it runs on the interpreter.

    `fast` leaves accesses inside the current stack frame unchecked and is used
    whenever every frame of the run lies inside the stack region (always, with
    the memory `bpfexec.vm.machine.prepare` builds); `checked` checks every access and
    is compiled the first time a run needs it.
    """

    program: Program = field(repr=False)
    fallback: str = ""  # non-empty: why this program is not compiled
    fast: NativeCode | None = None
    checked: NativeCode | None = None
    quick: bool = False  # the first tier: compiled fast, runs a few times slower
    failed: bool = False  # the fallback is a fault of the compiler, not the program
    checked_fallback: str = ""  # non-empty: why the checked variant is not compiled
    # Why a tier was not compiled although nothing is wrong: "limit" (over the tier's
    # size limits, `bpfexec.vm.jit.limits`) or "abandoned" (a timeout, a shutdown).
    refused: str = ""

    @property
    def native(self) -> bool:
        return not self.fallback

    @property
    def reason(self) -> str:
        """Why the tier fell back: compiler_error, limit, abandoned or unsupported."""
        if self.failed:
            return "compiler_error"
        return self.refused or "unsupported"

    @property
    def compile_seconds(self) -> float:
        """Time spent compiling (both variants, when the checked one was needed)."""
        return sum(code.compile_seconds for code in (self.fast, self.checked) if code)

    def code_for(self, machine: Machine) -> NativeCode | None:
        """The variant that runs `machine` with every access that may fault checked
        (None if compiling it failed: the interpreter runs `machine`)."""
        assert self.fast is not None
        if _frames_fit(self.fast, machine):
            return self.fast
        if self.checked is None and not self.checked_fallback:
            with _LLVM_LOCK:
                if self.checked is None and not self.checked_fallback:
                    try:
                        self.checked = _native_code(self.program, 0, self.quick)
                    except Exception as exc:  # no CompileAbandoned: compiled here
                        self.checked_fallback = _compiler_fault(self.program, exc)
        return self.checked


@dataclass
class _Run:
    """What the dispatchers and a native helper's callbacks find from a context's
    address (a `bpfexec.vm.native.CallSink`)."""

    machine: Machine
    ctx: Context
    helper_ops: dict[int, Op]
    error: BaseException | None = None

    def current(self) -> Machine:
        """The machine of the execution running now (a batch has one per input)."""
        return self.machine

    def helper_context(self) -> HelperContext:
        machine = self.current()
        context = machine.context
        context.helper = machine.helpers.get(self.ctx.trap_pc)  # set before the call
        return context

    def trap(self, trap: Trap) -> None:
        """A native helper's trap: recorded for the unwinding after it returns."""
        if self.error is None:
            self.error = _at(trap, self.ctx.trap_pc)
            self.ctx.status = Status.PYTHON


# Running executions by the address of their context, for the dispatchers. The same
# address is the `bpfexec_call *` of native helpers: `bpfexec.vm.native.CALLS`.
_RUNS: dict[int, _Run] = {}


def _dispatch(ctx_address: int, pc: int) -> int:
    """Run the helper call at `pc` for native code (called with the GIL re-acquired)
    as the interpreter's operation does, registers and helper call count synced: a
    `callx`, or a `call` at the helper call limit."""
    run = _RUNS[ctx_address]
    try:
        machine, ctx = run.current(), run.ctx
        registers = machine.registers
        registers[:] = ctx.regs
        machine.fuel = ctx.fuel
        max_calls = machine.limits.max_helper_calls
        machine.helper_calls = max_calls - ctx.helper_calls_left
        try:
            run.helper_ops[pc](registers, machine)
        finally:
            ctx.fuel = machine.fuel  # a helper's cost is charged even when it then fails
            ctx.helper_calls_left = max_calls - machine.helper_calls
            # A helper may take long (a remote one is a round trip): the next poll
            # site reads the interrupt flag, as the interpreter's does.
            ctx.poll_at = machine.fuel + 1
        ctx.regs[0] = registers[0]
        return Status.OK
    except BaseException as exc:  # an exception must not cross the native frames
        run.error = exc
        run.ctx.status = Status.PYTHON  # callers unwind on the context's status
        return Status.PYTHON


def _call(ctx_address: int, pc: int, fuel: int, r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
    """The helper call at `pc`, already counted, for native code: r0. Only what the
    call needs crosses: the fuel left and r1..r5 in, r0 out, the fuel back only if
    the helper charged some. A trap is recorded and the context's status set."""
    run = _RUNS[ctx_address]
    machine = run.current()
    machine.fuel = fuel
    try:
        value = machine.helper_value(machine.helpers[pc], r1, r2, r3, r4, r5)
    except Trap as trap:
        run.error = _at(trap, pc)
        run.ctx.status = Status.PYTHON
        value = 0
    except BaseException as exc:  # an exception must not cross the native frames
        run.error = exc
        run.ctx.status = Status.PYTHON
        value = 0
    if machine.fuel != fuel:
        run.ctx.fuel = machine.fuel
    return value


# The C function pointers native code calls (module globals: they must stay alive).
_DISPATCH = _DISPATCH_TYPE(_dispatch)
_CALL = _CALL_TYPE(_call)


def _prepare_llvm() -> None:
    global _llvm_ready
    if not _llvm_ready:
        llvm.initialize_native_target()
        llvm.initialize_native_asmprinter()
        # Tail merging folds our thousands of near-identical trap exits together, slowly
        # and for no gain: they are cold. (A process-wide LLVM option.)
        llvm.set_option("bpfexec", "-enable-tail-merge=false")
        llvm.add_symbol(DISPATCH_SYMBOL, ctypes.cast(_DISPATCH, ctypes.c_void_p).value)
        llvm.add_symbol(CALL_SYMBOL, ctypes.cast(_CALL, ctypes.c_void_p).value)
        _llvm_ready = True


def _interpreter_blocks(program: Program) -> list[Block | None]:
    return program_blocks(program)


def compile_program(
    program: Program,
    *,
    quick: bool = False,
    emit: Emit | None = None,
    limits: TierLimits | None = None,
) -> CompiledProgram:
    """The native code of `program`, compiled on first use and cached with it.

    `quick` asks for the first tier: LLVM's fast instruction selection and
    register allocation after SROA alone, several times quicker to compile and
    several times slower to run than the default, optimized tier. A program over
    the tier's size limits (`limits`, default `bpfexec.vm.jit.limits.tier_limits(quick)`)
    is not compiled: its CompiledProgram says why (`refused == "limit"`). `emit`
    generates the machine code (default: in this process; the server passes a
    compile worker's, `bpfexec.vm.jit.worker`).
    A compile that raises `CompileAbandoned` is not cached: it may be asked again.
    """
    key = QUICK if quick else OPTIMIZED
    compiled: CompiledProgram | None = program.compiled.get(key)
    if compiled is None:
        with program.compiled.setdefault(key + ".lock", threading.Lock()):
            compiled = program.compiled.get(key)
            if compiled is None:
                compiled = _compile(program, quick, emit, limits)
                if compiled.refused != "abandoned":
                    program.compiled[key] = compiled
    return compiled


def compile_best(program: Program) -> CompiledProgram:
    """The optimized tier if the program is within its limits, else the quick one
    (which says why it is not native, if it is not)."""
    optimized = compile_program(program)
    if optimized.native or optimized.refused != "limit":
        return optimized
    return compile_program(program, quick=True)


def best_compiled(program: Program) -> CompiledProgram | None:
    """The best tier of native code compiled so far for `program`, if any (else the
    first tier that fell back, which says why)."""
    tiers: list[CompiledProgram | None] = [program.compiled.get(key) for key in (OPTIMIZED, QUICK)]
    for compiled in tiers:
        if compiled is not None and compiled.native:
            return compiled
    return next((c for c in tiers if c is not None), None)


def _compile(
    program: Program, quick: bool, emit: Emit | None = None, limits: TierLimits | None = None
) -> CompiledProgram:
    if sys.byteorder != "little":
        return CompiledProgram(program, "eBPF memory is little-endian; this host is not")
    try:
        blocks = _interpreter_blocks(program)
    except Exception as exc:  # the interpreter reports it when the program runs
        return CompiledProgram(program, f"the interpreter cannot decode it: {exc}")
    too_big = over_limit(program, blocks, limits or tier_limits(quick))
    if too_big is not None:
        tier = "quick" if quick else "optimized"
        return CompiledProgram(
            program, f"too big for the {tier} tier: {too_big}", quick=quick, refused="limit"
        )
    try:
        fast = _native_code(program, FRAME_BYTES, quick, emit)
    except Unsupported as exc:
        return CompiledProgram(program, str(exc))
    except CompileAbandoned as exc:
        log.warning("JIT compile of %s abandoned: %s", program.name, exc)
        reason = f"compile abandoned: {exc}"
        return CompiledProgram(program, reason, quick=quick, refused="abandoned")
    except Exception as exc:  # a bug of ours or LLVM's must not fail the program's runs
        return CompiledProgram(program, _compiler_fault(program, exc), quick=quick, failed=True)
    return CompiledProgram(program, fast=fast, quick=quick)


def _compiler_fault(program: Program, exc: Exception) -> str:
    """Log an unexpected compiler or LLVM error; the fallback reason that says so."""
    log.error("JIT compile of %s failed; the interpreter runs it", program.name, exc_info=exc)
    first = str(exc).strip().splitlines()
    return f"internal compiler error: {type(exc).__name__}: {first[0] if first else ''}"


# On x86-64, code calls code with rel32 calls (a module's code is one section), data
# is anywhere, and the dispatcher, far away, is reached through the stub the JIT
# linker makes for a PLT call; the JIT default (large) calls through a register
# everywhere. Other targets have no medium model: they keep the default.
_CODE_MODEL = "medium" if llvm.get_default_triple().startswith("x86_64") else "jitdefault"


def _native_code(
    program: Program, frame_bytes: int, quick: bool, emit: Emit | None = None
) -> NativeCode:
    start = time.perf_counter()
    blocks = _interpreter_blocks(program)
    module = build_module(
        program, blocks, [fn.pc for fn in program.functions], frame_bytes, optimized=not quick
    )
    helper_ops = {pc: decode_op(program, pc) for pc in module.helper_pcs}
    code = (emit or emit_object)(module.text, quick)
    engine, entry = _load_object(code, quick)
    return NativeCode(
        entry=entry,
        exported=module.entries,
        helper_ops=helper_ops,
        frame_low=module.frame_low,
        compile_seconds=time.perf_counter() - start,
        functions=module.functions,
        blocks=module.blocks,
        engine=engine,
        object_bytes=len(code),
        inline_lookups=module.inline_lookups,
        inline_arrays=module.inline_arrays,
        inline_hashes=module.inline_hashes,
    )


def _target_machine(quick: bool) -> llvm.TargetMachine:
    """The host's target machine, the same in this process and in compile workers."""
    target = llvm.Target.from_default_triple()
    return target.create_target_machine(
        cpu=llvm.get_host_cpu_name(),
        features=llvm.get_host_cpu_features().flatten(),
        opt=0 if quick else 2,
        jit=True,
        codemodel=_CODE_MODEL,
    )


def emit_object(text: str, quick: bool) -> bytes:
    """LLVM IR text to an object file for this host (parse, verify, passes, codegen).

    Everything a module calls outside itself is named, never an address: the
    dispatcher is `DISPATCH_SYMBOL`, which `_load_object` resolves at load time
    (`llvm.add_symbol`), so the object may come from another process.
    """
    with _LLVM_LOCK:
        _prepare_llvm()
        native = llvm.parse_assembly(text)
        native.verify()
        machine = _target_machine(quick)
        _optimize(native, machine, quick)
        return bytes(machine.emit_object(native))


def _load_object(code: bytes, quick: bool) -> tuple[object, Callable[[int, int], int]]:
    """Load object code into an engine of its own; the engine (keep it alive) and the
    entry. Relocation and symbol resolution are linear and take about a millisecond."""
    engine, addresses = load_functions(code, [ENTRY_SYMBOL], quick)
    return engine, _ENTRY_TYPE(addresses[ENTRY_SYMBOL])


def load_functions(
    code: bytes, symbols: list[str], quick: bool = False
) -> tuple[object, dict[str, int]]:
    """Load object code into an engine of its own: the engine (keep it alive) and the
    address of each function in `symbols` (RuntimeError if one is missing)."""
    with _LLVM_LOCK:
        _prepare_llvm()
        engine = llvm.create_mcjit_compiler(llvm.parse_assembly(""), _target_machine(quick))
        engine.add_object_file(llvm.ObjectFileRef.from_data(code))
        engine.finalize_object()
        addresses = {symbol: engine.get_function_address(symbol) for symbol in symbols}
    missing = [symbol for symbol, address in addresses.items() if not address]
    if missing:
        raise RuntimeError(f"the object code has no {', '.join(missing)}")
    return engine, addresses


class NativeFunction:
    """One function of LLVM IR, `symbol` in the text `ir()` returns, compiled on its first
    call (once per process, its engine kept for the process) and called as `prototype`
    says (a ctypes CFUNCTYPE): the native loops of batches, test runs and captures."""

    def __init__(self, symbol: str, ir: Callable[[], str], prototype: Any) -> None:
        self.symbol, self.ir, self.prototype = symbol, ir, prototype
        self._lock = threading.Lock()
        self._function: Callable[..., Any] | None = None
        self._engine: object = None  # owns the machine code

    def compiled(self) -> Callable[..., Any]:
        """The function, compiled now if it was not yet (a run timing its calls
        compiles first)."""
        function = self._function
        if function is None:
            with self._lock:
                if self._function is None:
                    code = emit_object(self.ir(), quick=False)
                    self._engine, addresses = load_functions(code, [self.symbol])
                    self._function = self.prototype(addresses[self.symbol])
                function = self._function
        return function

    def __call__(self, *args: Any) -> Any:
        return self.compiled()(*args)


def _optimize(module: llvm.ModuleRef, machine: llvm.TargetMachine, quick: bool) -> None:
    """Registers to SSA, then (optimized tier) the cheap clean-ups; codegen does the rest.

    The full -O2 pipeline (loop unrolling, vectorization, GVN, LICM) costs two to
    three times more compile time for little gain on this IR: registers are the
    only locals, memory accesses are opaque, and fuel checks pin every block.
    """
    builder = llvm.create_pass_builder(machine, llvm.create_pipeline_tuning_options(1))
    passes = llvm.create_new_module_pass_manager()
    passes.add_sroa_pass()
    if not quick:
        passes.add_instruction_combine_pass()
        passes.add_simplify_cfg_pass()
    passes.run(module, builder)


def _frames_fit(code: NativeCode, machine: Machine) -> bool:
    """Whether the frame of every call depth leaves `code.frame_low` bytes of stack below
    r10 (and r10 inside it), so that its unchecked frame accesses cannot leave the region."""
    if not code.frame_low:
        return True
    memory = machine.memory
    fp = machine.registers[FRAME_POINTER]
    region = fp >> REGION_SHIFT
    if region >= len(memory.regions) or not memory.writable[region]:
        return False
    size = len(memory.regions[region] or b"")
    deepest = _deepest_frame(machine)
    return all(
        code.frame_low <= (top & OFFSET_MASK) <= size and top >> REGION_SHIFT == region
        for top in (fp, deepest)
    )


def _deepest_frame(machine: Machine) -> int:
    """r10 of a frame at the deepest call depth allowed (the entry holds the first frame)."""
    limits = machine.limits
    return machine.registers[FRAME_POINTER] - (limits.max_call_depth - 1) * limits.stack_frame_size


def runs_natively(compiled: CompiledProgram, machine: Machine) -> bool:
    """Whether `machine` can run on `compiled`'s native code with identical results
    (compiling the checked variant first when the run needs it)."""
    memory = machine.memory
    return (
        compiled.native
        and compiled.fast is not None
        and machine.entry in compiled.fast.exported
        and machine.trace is None  # native code cannot report instruction by instruction
        and machine.limits.max_call_depth <= MAX_NATIVE_CALL_DEPTH
        and _deepest_frame(machine) >= 0  # native code derives the call depth from r10
        and len(memory.regions) == REGION_COUNT
        and all(
            isinstance(memory.regions[n], bytearray) for n in memory.mapped if memory.writable[n]
        )
        and compiled.code_for(machine) is not None
    )


def _map_regions(ctx: Context, machine: Machine) -> list[object]:
    """Point the context's region table at the machine's memory; return what must stay alive."""
    memory = machine.memory
    keep: list[object] = []
    for n in memory.mapped:
        store = memory.regions[n]
        if not store:
            continue  # empty: length 0, every access faults (as for the regions not mapped)
        view: ctypes.Array[ctypes.c_char] | ctypes.c_char_p
        if isinstance(store, bytearray):
            # Exporting the buffer also stops anything from resizing it during the run.
            view = (ctypes.c_char * len(store)).from_buffer(store)
            address = ctypes.addressof(view)
            if memory.writable[n]:
                ctx.region_write_len[n] = len(store)
        else:
            # Read-only bytes: native code reads them in place and never gets a write length.
            view = ctypes.c_char_p(store)
            address = ctypes.cast(view, ctypes.c_void_p).value or 0
        keep.append(view)
        ctx.region_base[n] = address
        ctx.region_read_len[n] = len(store)
    return keep


def _native_helper_tables(ctx: Context, machine: Machine, code: NativeCode) -> list[object]:
    """Fill the context's per-call-site tables of native helpers, their costs and
    call counts; return what must stay alive, the counts last. Runs without native
    helpers or inline lookups share empty tables (and count nothing).

    A site whose lookup `code` may run inline is marked `INLINE_MARK` when this run's
    helper there is the Linux lookup and its maps are the ones compiled for
    (`bpfexec.vm.jit.maps`); unmarked, it calls the helper as any other site. Hash
    lookups find the maps' index headers in `map_indexes`, which the run keeps (the
    headers themselves live as long as their maps, which the machine holds)."""
    sites = call_sites(machine.program)
    natives = {
        slot: (address, helper.cost)
        for pc, slot in sites.items()
        if (address := native_address((helper := machine.helpers[pc]).fn))
    }
    headers = None
    if code.inline_lookups and maps_match(machine, code.inline_arrays, code.inline_hashes):
        for pc in code.inline_lookups:
            if site_inlines(machine, pc):
                natives[sites[pc]] = (INLINE_MARK, 0)
        if code.inline_hashes:
            addresses = index_headers(machine, code.inline_hashes)
            headers = (ctypes.c_void_p * len(addresses))(*addresses)
            ctx.map_indexes = ctypes.addressof(headers)
    if not natives:
        functions, costs = _empty_tables(len(sites))
        calls = None
    else:
        functions = (ctypes.c_void_p * max(1, len(sites)))()
        costs = (ctypes.c_int64 * max(1, len(sites)))()
        calls = (ctypes.c_int64 * max(1, len(sites)))()
        for slot, (address, cost) in natives.items():
            functions[slot] = address
            costs[slot] = cost
        ctx.native_calls = ctypes.addressof(calls)
    ctx.native_helpers = ctypes.addressof(functions)
    ctx.native_costs = ctypes.addressof(costs)
    return [headers, functions, costs, calls]


def _report_native_calls(machine: Machine, calls: ctypes.Array[ctypes.c_int64] | None) -> None:
    """Tell each helper function that counts its calls (`count_calls(n)`, as the
    server's counting wrapper has) how many times native code called it."""
    if calls is None:
        return
    for pc, slot in call_sites(machine.program).items():
        if calls[slot]:
            count = getattr(machine.helpers[pc].fn, "count_calls", None)
            if count is not None:
                count(calls[slot])


def native_address(fn: HelperFn) -> int:
    """Where native code calls helper function `fn` directly: a native helper's
    function, or a built-in helper's native twin (`bpfexec.vm.jit.builtins`); 0 if
    it is called through Python. A wrapper (`__wrapped__`, as the server's counting
    one) is looked through."""
    fn = getattr(fn, "__wrapped__", fn)
    if isinstance(fn, NativeHelper):
        return fn.address
    if fn in TWINS:
        return twin_addresses()[fn]
    return 0


@functools.lru_cache(maxsize=64)
def _empty_tables(
    sites: int,
) -> tuple[ctypes.Array[ctypes.c_void_p], ctypes.Array[ctypes.c_int64]]:
    """All-zero tables for `sites` call sites: every call goes through Python. Shared
    by every run of that size; native code only reads them."""
    return (ctypes.c_void_p * max(1, sites))(), (ctypes.c_int64 * max(1, sites))()


def native_context(
    machine: Machine, code: NativeCode
) -> tuple[Context, ctypes.c_int64, list[object], list[object]]:
    """The context that runs `machine` on `code`: its registers, fuel, limits and
    region table filled in; the interrupt flag word it points at; what must stay
    alive while it runs; and the helper tables (`_native_helper_tables`, the call
    counts last)."""
    ctx = Context()
    ctx.regs[:] = machine.registers
    ctx.fuel = machine.fuel
    ctx.poll_at = machine.fuel + 1  # the first poll site reads the interrupt flag
    ctx.deepest_frame = _deepest_frame(machine)
    ctx.frame_size = machine.limits.stack_frame_size
    flag = ctypes.c_int64(0)
    ctx.interrupt = ctypes.addressof(flag)
    keep = _map_regions(ctx, machine)
    tables = _native_helper_tables(ctx, machine, code)
    keep.extend(tables)
    ctx.helper_calls_left = machine.limits.max_helper_calls - machine.helper_calls
    ctx.api = API_ADDRESS
    return ctx, flag, keep, tables


def run_native(compiled: CompiledProgram, machine: Machine) -> int:
    """Run `machine` on native code (see `runs_natively`); return r0 or raise Trap."""
    code = compiled.code_for(machine)
    assert code is not None, "run_native without runs_natively"
    ctx, flag, keep, tables = native_context(machine, code)
    max_calls = machine.limits.max_helper_calls
    address = ctypes.addressof(ctx)
    run = _Run(machine, ctx, code.helper_ops)
    interrupt = machine.interrupt

    def stop(reason: TrapKind) -> None:
        flag.value = 1

    _RUNS[address] = run
    CALLS[address] = run
    interrupt.listeners.append(stop)
    try:
        if interrupt.reason is not None:  # requested before the listener was in place
            flag.value = 1
        status = code.entry(address, machine.entry)
    finally:
        interrupt.listeners.remove(stop)
        del _RUNS[address], CALLS[address]
        machine.fuel = ctx.fuel
        machine.helper_calls = max_calls - ctx.helper_calls_left
        _report_native_calls(machine, tables[-1])  # type: ignore[arg-type]
        del keep
    if status == Status.OK:
        machine.registers[0] = ctx.regs[0]
        return machine.registers[0]
    if status == Status.ENDED:  # a packet load outside the packet: r0 = 0, no trap
        machine.registers[0] = 0
        return 0
    raise locate_trap(_trap(Status(status), ctx, run), machine.program)


def _trap(status: Status, ctx: Context, run: _Run) -> Trap:
    """The Trap the interpreter raises for what native code recorded in `ctx`."""
    machine = run.current()
    pc = ctx.trap_pc
    if status == Status.OUT_OF_FUEL:
        return Trap(
            TrapKind.OUT_OF_FUEL,
            f"fuel exhausted: {machine.budget - machine.fuel} of {machine.budget} used, "
            f"the next block needs {ctx.trap_a}",
            pc=pc,
        )
    if status == Status.MEMORY_FAULT:
        trap = machine.memory.fault(ctx.trap_a, ctx.trap_b, Access(ctx.trap_c).text)
        trap.pc = pc
        return trap
    if status == Status.CALL_DEPTH_EXCEEDED:
        return Trap(
            TrapKind.CALL_DEPTH_EXCEEDED,
            f"call depth limit of {machine.limits.max_call_depth} frames exceeded",
            pc=pc,
        )
    if status == Status.INTERRUPTED:
        return interrupted(machine.interrupt.reason or TrapKind.CANCELLED, pc)
    error = run.error
    if isinstance(error, Trap):
        return error
    assert error is not None, f"native code returned status {status} without an error"
    raise error
