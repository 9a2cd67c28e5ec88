"""What only the JIT has to prove: caching, interruption and the GIL, address hygiene,
and falling back to the interpreter where native code would not be exact.

Semantics shared with the interpreter are tested on both engines elsewhere
(`test_instructions.py`, `test_execution.py`, `test_differential.py`).
"""

from __future__ import annotations

import logging
import threading
import time

import pytest
from support import FIB, SPIN, SPIN_ENTRY_FUEL, SPIN_ROUND_FUEL, broken_ir

pytest.importorskip("llvmlite")

from bpfexec import vm
from bpfexec.vm import HelperRegistry, Limits, TrapKind
from bpfexec.vm.jit import Jit, best_compiled, compile_program, runtime
from bpfexec.vm.loader import load
from bpfexec.vm.memory import STACK_BASE, buffer_base

# About 2 * n instructions; unrolled, native code runs about a billion rounds a second.
COUNT = """
    r0 = 0
loop:
    r0 += 1
    if r0 < r1 goto loop
    exit
"""


def asm(text: str) -> vm.Program:
    return load(text.encode(), name="test.s")


def jit(program: vm.Program, args=(), **kw) -> vm.Result:
    return vm.execute(program, None, args, engine="jit", **kw)


# -- compilation --------------------------------------------------------------------------


def test_compiled_once_and_cached_with_the_program():
    program = asm("r0 = 1\nexit")
    compiled = compile_program(program)
    assert compiled.native, compiled.fallback
    assert program.compiled["jit"] is compiled
    assert compile_program(program) is compiled
    assert jit(program).return_value == 1
    assert program.compiled["jit"] is compiled
    assert compiled.compile_seconds > 0


@pytest.mark.parametrize("quick", [False, True])
def test_one_entry_function_enters_many_exported_functions(quick: bool):
    # The module's entry dispatches on the pc with compares, not a jump table (whose
    # relocations MCJIT cannot resolve: an assertion that ends the process).
    text = "".join(f"f{n}:\n    r0 = r1\n    r0 += {n}\n    exit\n" for n in range(40))
    program = asm(text)
    compile_program(program, quick=quick)
    for n in (0, 17, 39):
        assert vm.execute(program, f"f{n}", [100], engine="jit").return_value == 100 + n


def test_the_quick_tier_runs_until_the_optimized_one_is_compiled(compile_c):
    program = load(compile_c("local_calls").read_bytes())
    reference = [vm.execute(program, fn.name, [9], fuel=5000) for fn in program.functions]
    assert best_compiled(program) is None
    quick = compile_program(program, quick=True)
    assert quick.native and quick.quick and best_compiled(program) is quick
    for fn, expected in zip(program.functions, reference, strict=True):
        result = vm.execute(program, fn.name, [9], engine="jit", fuel=5000)
        assert (result.return_value, result.fuel_used) == (
            expected.return_value,
            expected.fuel_used,
        )
    optimized = compile_program(program)
    assert not optimized.quick and best_compiled(program) is optimized


def test_concurrent_first_runs_compile_once():
    program = asm(COUNT)
    seen: list[object] = []
    barrier = threading.Barrier(4)

    def first_use() -> None:
        barrier.wait()
        seen.append(compile_program(program))

    threads = [threading.Thread(target=first_use) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(seen) == 4 and all(c is seen[0] for c in seen)


def test_engine_by_name():
    assert vm.execute(asm("r0 = 5\nexit"), engine="jit").return_value == 5
    assert Jit.name == "jit"


# -- interruption and threads ---------------------------------------------------------------


def test_interrupt_from_another_thread_stops_native_code_quickly():
    program = asm(SPIN)
    assert compile_program(program).native
    interrupt = vm.Interrupt()
    requested: list[float] = []

    def stop() -> None:
        time.sleep(0.05)
        requested.append(time.perf_counter())
        interrupt.request(TrapKind.DEADLINE_EXCEEDED)

    threading.Thread(target=stop).start()
    # Ten billion instructions: seconds of native work if the interrupt were missed.
    result = jit(program, fuel=Limits().max_fuel, interrupt=interrupt)
    stopped = time.perf_counter()
    assert result.trap is not None and result.trap.kind == TrapKind.DEADLINE_EXCEEDED
    assert result.trap.pc == 1  # the target of the backward jump, as the interpreter reports
    assert stopped - requested[0] < 0.1
    assert 0 < result.fuel_used < Limits().max_fuel


def test_interrupt_requested_before_the_run_stops_at_the_first_backward_jump():
    interrupt = vm.Interrupt()
    interrupt.request()
    result = jit(asm(SPIN), interrupt=interrupt)
    assert result.trap is not None and result.trap.kind == TrapKind.CANCELLED
    assert result.fuel_used == SPIN_ENTRY_FUEL + SPIN_ROUND_FUEL
    assert interrupt.listeners == []  # the run removed its listener


def test_interrupt_stops_native_recursion_at_a_call():
    program = asm(FIB)
    assert jit(program, (10,)).return_value == 55
    interrupt = vm.Interrupt()
    timer = interrupt.after(0.05)
    start = time.perf_counter()
    result = jit(program, (40,), fuel=Limits().max_fuel, interrupt=interrupt)
    timer.cancel()
    assert result.trap is not None and result.trap.kind == TrapKind.DEADLINE_EXCEEDED
    assert result.trap.instruction.startswith("call")  # type: ignore[union-attr]
    assert time.perf_counter() - start < 0.05 + 0.1


def test_an_interrupt_a_helper_requests_stops_both_engines_at_the_same_place():
    """After a helper call native code reads the flag at its next poll site, whatever
    fuel it has left: a backward jump here, exactly where the interpreter stops."""
    program = asm("""
        r6 = 0
    loop:
        r6 += 1
        call 7
        if r6 < 1000 goto loop
        exit
    """)
    outcomes = []
    for engine in ("interpreter", "jit"):
        interrupt = vm.Interrupt()
        registry = HelperRegistry()
        calls: list[int] = []

        @registry.helper(id=7, name="stop_on_the_third_call")
        def stop(ctx, a, b, c, d, e, interrupt=interrupt, calls=calls):
            calls.append(a)
            if len(calls) == 3:
                interrupt.request()
            return 0

        result = vm.execute(program, None, (), engine=engine, helpers=registry, interrupt=interrupt)
        assert result.trap is not None and result.trap.kind == TrapKind.CANCELLED
        outcomes.append((result.trap.to_dict(), result.fuel_used))
    assert outcomes[0] == outcomes[1]
    assert outcomes[1][0]["pc"] == 1 and outcomes[1][1] == 1 + 3 * 3


def test_native_code_runs_without_the_gil():
    """Python keeps running while native code does, and two native runs overlap in time."""
    program = asm(COUNT)
    n = 300_000_000  # a few hundred milliseconds each
    assert jit(program, (1000,)).return_value == 1000  # compiled before timing
    spans: dict[str, tuple[float, float]] = {}

    def run(name: str) -> None:
        start = time.perf_counter()
        assert jit(program, (n,), fuel=Limits().max_fuel).return_value == n
        spans[name] = (start, time.perf_counter())

    first = threading.Thread(target=run, args=("first",))
    first.start()
    time.sleep(0.005)
    second = threading.Thread(target=run, args=("second",))
    second.start()
    ticks = 0
    while first.is_alive() or second.is_alive():
        ticks += 1
    first.join()
    second.join()
    assert ticks > 1000, "the main thread stalled while native code ran"
    (a_start, a_end), (b_start, b_end) = spans["first"], spans["second"]
    assert b_start < a_end and a_start < b_end, "the two runs did not overlap"


# -- no host address reaches the program ------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("r0 = r10\nexit", STACK_BASE + Limits().stack_size),
        ("r0 = r10\nr0 += -8\nexit", STACK_BASE + Limits().stack_size - 8),
        ("*(u64 *)(r10 - 8) = r10\nr0 = *(u64 *)(r10 - 8)\nexit", STACK_BASE + Limits().stack_size),
        ("r0 = r1\nexit", buffer_base(0)),
        ("*(u64 *)(r1 + 0) = r1\nr0 = *(u64 *)(r1 + 0)\nexit", buffer_base(0)),
        ("r2 = r10\nr2 = atomic_fetch_add((u64 *)(r1 + 0), r2)\nr0 = *(u64 *)(r1 + 0)\nexit",
         STACK_BASE + Limits().stack_size),
    ],
)  # fmt: skip
def test_programs_see_only_virtual_addresses(text, expected):
    result = jit(asm(text), (bytes(8),))
    assert result.trap is None, str(result.trap)
    assert result.return_value == expected


def test_helpers_receive_virtual_addresses():
    seen: list[int] = []
    registry = HelperRegistry()

    @registry.helper(id=7, name="record")
    def record(ctx, a, b, c, d, e):
        seen.extend([a, b])
        return 0

    program = asm("r1 = r10\nr1 += -16\nr2 = r10\ncall 7\nexit")
    jit(program, helpers=registry)
    top = STACK_BASE + Limits().stack_size
    assert seen == [top - 16, top]


# -- where native code would not be exact, the interpreter runs -------------------------------


def test_trace_runs_on_the_interpreter():
    lines: list[str] = []
    result = vm.execute(asm("r0 = 3\nexit"), engine="jit", trace=lines.append)
    assert result.return_value == 3 and len(lines) == 2


FRAMED = """
    call inner
    exit
inner:
    *(u64 *)(r10 - 64) = 1
    r0 = *(u64 *)(r10 - 64)
    exit
"""


def test_frames_outside_the_stack_use_the_checked_code():
    """Unchecked frame accesses assume every frame fits the stack; when a run's limits
    break that, the fully checked variant runs and traps exactly where the interpreter does."""
    program = asm(FRAMED)
    limits = Limits(max_call_depth=2, stack_frame_size=32)  # a 64-byte stack
    expected = vm.execute(program, limits=limits)
    result = jit(program, limits=limits)
    assert result.trap is not None and result.trap.kind == TrapKind.MEMORY_FAULT
    assert result.trap.to_dict() == expected.trap.to_dict()  # type: ignore[union-attr]
    compiled = compile_program(program)
    assert compiled.checked is not None
    assert jit(program).return_value == 1  # default limits: the fast code again


@pytest.mark.compiler_fault
def test_a_compiler_fault_leaves_the_program_to_the_interpreter(monkeypatch, caplog):
    # A bug of the compiler or of LLVM costs speed, never a run: logged, not raised.
    broken_ir(monkeypatch)
    program = asm(COUNT)
    with caplog.at_level(logging.ERROR, logger=runtime.__name__):
        compiled = compile_program(program)
    assert compiled.failed and not compiled.native
    assert compiled.fallback.startswith("internal compiler error: RuntimeError: LLVM IR parsing")
    assert "JIT compile of test.s failed" in caplog.text
    result = jit(program, [10])
    assert (result.return_value, result.fuel_used) == (10, 22)


@pytest.mark.compiler_fault
def test_a_compiler_fault_in_the_checked_variant_leaves_that_run_to_the_interpreter(monkeypatch):
    program = asm(FRAMED)
    compile_program(program)  # the fast variant, before the fault
    broken_ir(monkeypatch)
    limits = Limits(max_call_depth=2, stack_frame_size=32)  # needs the checked variant
    result = jit(program, limits=limits)
    expected = vm.execute(program, limits=limits)
    assert result.trap is not None and result.trap.to_dict() == expected.trap.to_dict()  # type: ignore[union-attr]
    compiled = compile_program(program)
    assert compiled.checked is None
    assert compiled.checked_fallback.startswith("internal compiler error: RuntimeError")
    assert jit(program).return_value == 1  # default limits: the fast code, unharmed


def test_a_helper_interrupt_exception_propagates():
    registry = HelperRegistry()

    @registry.helper(id=3, name="ouch")
    def ouch(ctx, a, b, c, d, e):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        jit(asm("call 3\nexit"), helpers=registry)


def test_fuel_is_exact_on_native_code():
    result = jit(asm(COUNT), (1_000_000,), fuel=Limits().max_fuel)
    assert result.fuel_used == 1 + 2 * 1_000_000 + 1
    starved = jit(asm(COUNT), (1_000_000,), fuel=1000)
    assert starved.trap is not None and starved.trap.kind == TrapKind.OUT_OF_FUEL
    assert (starved.fuel_used, starved.trap.pc) == (999, 1)
