"""Running a program: the state of one execution, and `execute()`.

`execute()` is the one entry point every caller uses (CLI, server, tests). It
links the program's helper call sites, builds fresh memory and registers, hands
the `Machine` to an engine and packs what happened into a `Result`. Engines
(`bpfexec.vm.interpreter`, `bpfexec.vm.jit`) only run a prepared Machine; they never set one up.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from bpfexec.vm.callbacks import TailCall
from bpfexec.vm.errors import HelperSite, LimitError, LinkError, RequestError, Trap, TrapKind
from bpfexec.vm.helpers import Event, Helper, HelperChain, HelperContext, HelperResolver
from bpfexec.vm.isa import FRAME_POINTER, MASK64, NUM_REGISTERS
from bpfexec.vm.limits import Limits
from bpfexec.vm.maps import BPF_MAP_TYPE_RINGBUF, MapSet
from bpfexec.vm.memory import STACK_BASE, Memory, buffer_base
from bpfexec.vm.program import Program

Argument = int | bytes | bytearray


class Unpassed(bytes):
    """An argument buffer mapped as any other, its register left 0: memory the
    program reaches only through another argument (a test run's packet frame,
    whose address the context holds)."""


TraceFn = Callable[[str], None]


class Interrupt:
    """A request, from any thread, that a running execution stop.

    The interpreter polls `reason` on every backward jump and every call. The
    JIT mirrors it into native memory through `listeners` and reads that at the
    same places, once per `bpfexec.vm.jit.compiler.POLL_INTERVAL` fuel and at the first
    such place after a helper call (see docs/jit.md).
    """

    __slots__ = ("_lock", "listeners", "reason")

    def __init__(self) -> None:
        self.reason: TrapKind | None = None
        self.listeners: list[Callable[[TrapKind], None]] = []
        self._lock = threading.Lock()

    def request(self, reason: TrapKind = TrapKind.CANCELLED) -> None:
        with self._lock:
            if self.reason is not None:
                return
            self.reason = reason
            listeners = list(self.listeners)
        for listener in listeners:
            listener(reason)

    def after(
        self, seconds: float, reason: TrapKind = TrapKind.DEADLINE_EXCEEDED
    ) -> threading.Timer:
        """Request an interrupt after `seconds`; cancel the returned timer when done."""
        timer = threading.Timer(seconds, self.request, (reason,))
        timer.daemon = True
        timer.start()
        return timer


@dataclass(frozen=True)
class Result:
    return_value: int
    fuel_used: int
    trap: Trap | None = None
    log: tuple[str, ...] = ()
    buffers: tuple[bytes, ...] = ()
    duration_ns: int = 0
    # Ring buffer records submitted during the run, in order, as (map name, data);
    # None when the program has no ring buffer (the JSON then has no "events").
    events: tuple[Event, ...] | None = None

    def to_dict(self) -> dict[str, object]:
        shown: dict[str, object] = {
            "return_value": None if self.trap else self.return_value,  # a trap returns nothing
            "fuel_used": self.fuel_used,
            "trap": self.trap.to_dict() if self.trap else None,
            "log": list(self.log),
            "buffers": [buf.hex() for buf in self.buffers],
            "duration_ns": self.duration_ns,
        }
        if self.events is not None:
            shown["events"] = [{"map": e.map, "data": e.data.hex()} for e in self.events]
        return shown


@dataclass
class Machine:
    """Everything one execution touches. Created by `prepare()`, run by an engine."""

    program: Program
    entry: int  # pc of the function to run
    memory: Memory
    registers: list[int]
    fuel: int  # what is left of the budget
    budget: int
    helpers: dict[int, Helper]  # pc of each helper call site -> its helper
    resolver: HelperResolver | None  # for `callx`, resolved at run time
    context: HelperContext
    limits: Limits
    interrupt: Interrupt
    log: list[str] = field(default_factory=list)
    buffer_count: int = 0
    helper_calls: int = 0
    trace: TraceFn | None = None

    def __post_init__(self) -> None:
        self.context.bind(self)  # helpers charge fuel for their memory work (bpfexec.vm.helpers)

    def restart(self, entry: int, r1: int) -> None:
        """Start over at `entry` with r1 and a fresh stack (a tail call), keeping the
        fuel left, the helper calls made, memory and maps."""
        self.entry = entry
        self.registers[:] = [0] * NUM_REGISTERS
        self.registers[1] = r1
        self.registers[FRAME_POINTER] = STACK_BASE + self.limits.stack_size

    def call_helper(self, helper: Helper, pc: int) -> None:
        """Call `helper` with r1..r5, leave the result in r0; any failure is a trap."""
        regs = self.registers
        self.helper_calls += 1
        if self.helper_calls > self.limits.max_helper_calls:
            raise Trap(
                TrapKind.HELPER_ERROR,
                f"more than {self.limits.max_helper_calls} helper calls in one execution",
            )
        regs[0] = self.helper_value(helper, regs[1], regs[2], regs[3], regs[4], regs[5])
        # r1-r5 are clobbered by a call, as the calling convention allows.

    def helper_value(self, helper: Helper, r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
        """What `helper` returns for these arguments, its cost charged first (a call
        already counted); any failure is a trap."""
        if helper.cost:
            if helper.cost > self.fuel:
                raise Trap(
                    TrapKind.OUT_OF_FUEL,
                    f"helper {helper} costs {helper.cost} fuel, {self.fuel} left",
                )
            self.fuel -= helper.cost
        self.context.helper = helper
        try:
            value = helper.fn(self.context, r1, r2, r3, r4, r5)
        except Trap:
            raise
        except Exception as exc:  # a helper's own failure ends the run, never the host
            raise Trap(TrapKind.HELPER_ERROR, f"helper {helper} failed: {_describe(exc)}") from exc
        if isinstance(value, bool) or not isinstance(value, int):
            raise Trap(
                TrapKind.HELPER_ERROR,
                f"helper {helper} returned {type(value).__name__}, expected int",
            )
        return value & MASK64


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


class Engine(Protocol):
    name: str

    def run(self, machine: Machine) -> int:
        """Run until the entry function exits; return r0 or raise Trap."""
        ...


def link(program: Program, resolver: HelperResolver | None) -> dict[int, Helper]:
    """Resolve every helper call site before the run, naming all that are missing."""
    bound: dict[int, Helper] = {}
    missing: dict[str, list[HelperSite]] = {}
    for pc, ref in program.helper_calls.items():
        helper = resolver.resolve(ref) if resolver is not None else None
        if helper is None:
            fn = program.function_at(pc)
            site = HelperSite(pc, fn.name if fn else "?", program.location(pc))
            missing.setdefault(str(ref), []).append(site)
        else:
            bound[pc] = helper
    if missing:
        raise LinkError(missing)
    return bound


def encode_arguments(args: Sequence[Argument], limits: Limits) -> tuple[list[int], list[bytearray]]:
    """r1..r5 for `args` (ints as they are, each buffer as the address of its region)
    and the buffers, in order; RequestError or LimitError for arguments that cannot run."""
    if len(args) > 5:
        raise RequestError(f"at most 5 arguments (r1..r5), got {len(args)}")
    registers = [0] * 5
    buffers: list[bytearray] = []
    for i, arg in enumerate(args, start=1):
        if isinstance(arg, (bytes, bytearray)):
            if len(buffers) >= limits.max_buffers:
                raise LimitError(f"at most {limits.max_buffers} argument buffers")
            if len(arg) > limits.max_buffer_bytes:
                raise LimitError(
                    f"argument {i}: buffer of {len(arg)} bytes exceeds the maximum of "
                    f"{limits.max_buffer_bytes}"
                )
            registers[i - 1] = 0 if isinstance(arg, Unpassed) else buffer_base(len(buffers))
            buffers.append(bytearray(arg))
        elif isinstance(arg, int) and not isinstance(arg, bool):
            if not -(1 << 63) <= arg < 1 << 64:
                raise RequestError(f"argument {i}: {arg} does not fit in 64 bits")
            registers[i - 1] = arg & MASK64
        else:
            raise RequestError(f"argument {i}: expected int or bytes, got {type(arg).__name__}")
    return registers, buffers


def prepare(
    program: Program,
    function: str | None = None,
    args: Sequence[Argument] = (),
    *,
    fuel: int | None = None,
    helpers: HelperResolver | None = None,
    limits: Limits | None = None,
    interrupt: Interrupt | None = None,
    trace: TraceFn | None = None,
    maps: MapSet | None = None,
    linux: HelperResolver | None = None,
) -> Machine:
    """Check the request and build a fresh Machine for it: with fresh maps, or with
    `maps` (a `MapSet` of the program's maps, shared with other executions). A
    libbpf-style program's numbered helpers resolve first to `linux`, by default the
    Linux helper set (`bpfexec.vm.linux_helpers`; a server passes a counted copy)."""
    limits = limits or Limits()
    fn = program.function(function)
    budget = limits.fuel(fuel)
    registers = [0] * NUM_REGISTERS
    registers[1:6], buffers = encode_arguments(args, limits)
    if program.kernel_helpers:
        if linux is None:
            from bpfexec.vm.linux_helpers import linux_helpers

            linux = linux_helpers()
        helpers = linux if helpers is None else HelperChain(linux, helpers)
    bound = link(program, helpers)
    if maps is None:
        maps = MapSet(program.maps, init=program.map_init)
    elif len(maps.maps) != len(program.maps):
        raise RequestError(f"{len(maps.maps)} maps given, the program has {len(program.maps)}")
    values = [bpf_map.values for bpf_map in maps.maps]
    memory = Memory(program.rodata, limits.stack_size, program.data, buffers, values)
    registers[FRAME_POINTER] = STACK_BASE + limits.stack_size
    log: list[str] = []
    context = HelperContext(memory, log, limits.max_log_lines, limits.max_log_bytes)
    context.maps = maps
    if any(spec.type == BPF_MAP_TYPE_RINGBUF for spec in program.maps):
        context.events = []
    return Machine(
        program=program,
        entry=fn.pc,
        memory=memory,
        registers=registers,
        fuel=budget,
        budget=budget,
        helpers=bound,
        resolver=helpers,
        context=context,
        limits=limits,
        interrupt=interrupt or Interrupt(),
        log=log,
        buffer_count=len(buffers),
        trace=trace,
    )


def available_engines() -> tuple[str, ...]:
    """The engines this installation can run: the JIT needs llvmlite."""
    import importlib.util

    return ("interpreter", "jit") if importlib.util.find_spec("llvmlite") else ("interpreter",)


def get_engine(name: str) -> Engine:
    if name == "interpreter":
        from bpfexec.vm.interpreter import Interpreter

        return Interpreter()
    if name == "jit":
        try:
            from bpfexec.vm.jit import Jit
        except ImportError as exc:
            raise RequestError(str(exc)) from None
        return Jit()
    raise RequestError(f"unknown engine {name!r} (available: interpreter, jit)")


def run(machine: Machine, engine: Engine) -> Result:
    """Run a prepared machine; traps become part of the Result."""
    start = time.perf_counter_ns()
    trap: Trap | None = None
    value = 0
    while True:
        try:
            value = engine.run(machine)
        except TailCall as call:  # bpf_tail_call: run the target instead, from its entry
            target = machine.program.function_at(call.entry)
            refusal = machine.program.tail_refusals.get(call.entry)
            if target is not None and target.pc == call.entry and refusal is None:
                machine.restart(call.entry, call.context)
                continue
            # A program array seeded by a client may hold any id: only entries run,
            # and of a packet program only those the kernel's array could hold.
            refusal = refusal or f"program id {call.entry + 1} is no function of the program"
            trap = Trap(TrapKind.HELPER_ERROR, f"bpf_tail_call: {refusal}").at(
                call.pc, call.instruction, call.function, call.location
            )
        except Trap as caught:
            trap = caught
        break
    duration = time.perf_counter_ns() - start
    return Result(
        return_value=value & MASK64,
        fuel_used=machine.budget - machine.fuel,
        trap=trap,
        log=tuple(machine.log),
        buffers=tuple(
            bytes(machine.memory.regions[buffer_base(n) >> 32] or b"")
            for n in range(machine.buffer_count)
        ),
        duration_ns=duration,
        events=None if machine.context.events is None else tuple(machine.context.events),
    )


def execute(
    program: Program,
    function: str | None = None,
    args: Sequence[Argument] = (),
    *,
    fuel: int | None = None,
    helpers: HelperResolver | None = None,
    limits: Limits | None = None,
    engine: str | Engine = "interpreter",
    interrupt: Interrupt | None = None,
    trace: TraceFn | None = None,
    maps: MapSet | None = None,
    linux: HelperResolver | None = None,
) -> Result:
    """Run `function` of `program` with `args` (ints in r1..r5, bytes as buffers).

    Request problems raise (`RequestError`, `LimitError`, `LinkError`); what the
    program does, traps included, is the Result.
    """
    machine = prepare(
        program,
        function,
        args,
        fuel=fuel,
        helpers=helpers,
        limits=limits,
        interrupt=interrupt,
        trace=trace,
        maps=maps,
        linux=linux,
    )
    return run(machine, get_engine(engine) if isinstance(engine, str) else engine)
