"""Running programs: fuel, memory, calls, helpers, arguments and interruption.

Programs are written in the assembler's syntax (what `llvm-objdump -d` prints).
Every test runs on every engine (the `engine` fixture).
"""

from __future__ import annotations

import threading
import time

import pytest

from bpfexec import vm
from bpfexec.vm import HelperRegistry, Limits, TrapKind
from bpfexec.vm.loader import load
from bpfexec.vm.memory import STACK_BASE, buffer_base

MASK64 = (1 << 64) - 1


def asm(text: str) -> vm.Program:
    return load(text.encode(), name="test.s")


def run(text: str, args=(), engine="interpreter", **kw) -> vm.Result:
    return vm.execute(asm(text), None, args, engine=engine, **kw)


SUM_LOOP = """
    r0 = 0
loop:
    r0 += r1
    r1 += -1
    if r1 != 0 goto loop
    exit
"""


# -- fuel ------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 10, 1000])
def test_fuel_used_is_instructions_executed(engine, n):
    result = run(SUM_LOOP, (n,), engine)
    assert result.return_value == n * (n + 1) // 2
    assert result.fuel_used == 1 + 3 * n + 1


def test_lddw_costs_one(engine):
    result = run("r0 = 0x123456789 ll\nexit", engine=engine)
    assert (result.return_value, result.fuel_used) == (0x123456789, 2)


# Blocks of SUM_LOOP: [r0 = 0] costs 1, the loop body 3, the exit 1.
@pytest.mark.parametrize(
    ("budget", "used", "pc"),
    [(1, 1, 1), (3, 1, 1), (4, 4, 1), (5, 4, 1), (100, 100, 1), (3001, 3001, 4)],
)
def test_out_of_fuel_stops_before_the_block(engine, budget, used, pc):
    result = run(SUM_LOOP, (1000,), engine, fuel=budget)
    assert result.trap is not None and result.trap.kind == TrapKind.OUT_OF_FUEL
    assert (result.fuel_used, result.trap.pc) == (used, pc)


def test_exact_budget_succeeds(engine):
    result = run(SUM_LOOP, (10,), engine, fuel=32)
    assert (result.trap, result.fuel_used) == (None, 32)
    assert run(SUM_LOOP, (10,), engine, fuel=31).trap.kind == TrapKind.OUT_OF_FUEL


def test_fuel_above_the_maximum_is_a_request_error():
    with pytest.raises(vm.LimitError, match="exceeds the maximum"):
        run(SUM_LOOP, (1,), fuel=10, limits=Limits(max_fuel=5))


def test_helper_cost_is_charged(engine):
    reg = HelperRegistry()
    reg.register(lambda ctx, *a: 1, id=9, name="costly", cost=100)
    result = run("call 9\nexit", engine=engine, helpers=reg, fuel=1000)
    assert (result.trap, result.fuel_used) == (None, 102)
    result = run("call 9\nexit", engine=engine, helpers=reg, fuel=50)
    assert result.trap.kind == TrapKind.OUT_OF_FUEL and result.trap.pc == 0


# -- memory ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("r1 = 0\nr0 = *(u64 *)(r1 + 0)\nexit", "read of 8 bytes at 0x0 (unmapped address)"),
        (
            "r0 = *(u32 *)(r1 + 6)\nexit",
            "read of 4 bytes at 0x400000006 (buffer 0 region of 8 bytes)",
        ),
        ("*(u8 *)(r1 + 8) = 1\nexit", "write of 1 bytes at 0x400000008"),
        ("r0 = *(u64 *)(r10 + 0)\nexit", "read of 8 bytes"),
        ("r1 = 0x100000000 ll\n*(u8 *)(r1 + 0) = 1\nexit", "read-only rodata region"),
        ("r1 = 0x900000000 ll\nr0 = *(u8 *)(r1 + 0)\nexit", "unmapped address"),
        ("r1 = -1\nr0 = *(u8 *)(r1 + 0)\nexit", "0xffffffffffffffff"),
    ],
)
def test_memory_faults(engine, text, message):
    result = run(text, (bytes(8),), engine)
    assert result.trap is not None and result.trap.kind == TrapKind.MEMORY_FAULT
    assert message in result.trap.message
    assert result.trap.instruction  # the faulting instruction, disassembled


def test_buffers_come_back_modified(engine):
    text = "r2 = *(u32 *)(r1 + 0)\nr2 += 1\n*(u32 *)(r1 + 0) = r2\n*(u8 *)(r1 + 7) = 255\nexit"
    result = run(text, (bytes(8),), engine)
    assert result.buffers == (b"\x01\x00\x00\x00\x00\x00\x00\xff",)


def test_argument_registers_and_buffers(engine):
    text = "r0 = r1\nr0 ^= r2\nr0 ^= r3\nexit"
    result = run(text, (b"ab", 5, b""), engine)
    assert result.return_value == buffer_base(0) ^ 5 ^ buffer_base(1)
    assert result.buffers == (b"ab", b"")


def test_negative_arguments_are_twos_complement(engine):
    assert run("r0 = r1\nexit", (-2,), engine).return_value == MASK64 - 1


def test_stack_is_fresh_and_r10_is_virtual(engine):
    text = "r0 = *(u64 *)(r10 - 8)\n*(u64 *)(r10 - 8) = r10\nexit"
    for _ in range(2):
        result = run(text, engine=engine)
        assert result.return_value == 0
    top = STACK_BASE + Limits().stack_size
    assert run("r0 = r10\nexit", engine=engine).return_value == top


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((1, 2, 3, 4, 5, 6), "at most 5 arguments"),
        ((1 << 64,), "does not fit in 64 bits"),
        ((1.5,), "expected int or bytes"),
    ],
)
def test_bad_arguments_are_request_errors(args, message):
    with pytest.raises(vm.RequestError, match=message):
        run("exit", args)


def test_buffer_size_limit():
    with pytest.raises(vm.LimitError, match="exceeds the maximum of 4"):
        run("exit", (bytes(5),), limits=Limits(max_buffer_bytes=4))


# -- calls -----------------------------------------------------------------------

CALLS = """
main:
    r6 = 1
    r7 = 2
    r8 = 3
    r9 = 4
    *(u64 *)(r10 - 8) = r6
    r1 = r10
    call clobber
    r0 += r6
    r0 += r7
    r0 += r8
    r0 += r9
    r1 = *(u64 *)(r10 - 8)
    r0 += r1
    exit
clobber:
    r6 = 100
    r7 = 100
    r8 = 100
    r9 = 100
    *(u64 *)(r10 - 8) = r6
    r0 = r10
    r0 -= r1
    exit
"""


def test_local_call_preserves_r6_to_r9_and_gets_a_new_frame(engine):
    result = run(CALLS, engine=engine)
    # callee's r10 is one frame below the caller's: r0 = -512, plus 1+2+3+4, plus 1.
    assert result.trap is None
    assert result.return_value == (-512 + 10 + 1) & MASK64


RECURSE = """
main:
    r0 = 0
    call down
    exit
down:
    r0 += 1
    call down
    exit
"""


@pytest.mark.parametrize("depth", [2, 8, 64])
def test_call_depth_limit(engine, depth):
    result = run(RECURSE, engine=engine, limits=Limits(max_call_depth=depth))
    assert result.trap.kind == TrapKind.CALL_DEPTH_EXCEEDED
    assert result.trap.function == "down"
    assert f"{depth} frames" in result.trap.message


FIB = """
main:
    call fib
    exit
fib:
    r0 = r1
    if r1 < 2 goto done
    r6 = r1
    r1 += -1
    call fib
    r7 = r0
    r1 = r6
    r1 += -2
    call fib
    r0 += r7
done:
    exit
"""


def test_recursion_within_the_depth_limit(engine):
    result = run(FIB, (15,), engine)
    assert (result.trap, result.return_value) == (None, 610)


# -- helpers ---------------------------------------------------------------------------


def test_missing_helpers_are_named_with_their_call_sites():
    text = "call 7\ncall 7\ncall mystery\nexit"
    with pytest.raises(vm.LinkError) as info:
        run(text, helpers=HelperRegistry())
    message = str(info.value)
    assert "#7 (called at pc 0 in main, pc 1 in main)" in message
    assert "mystery (called at pc 2 in main)" in message


def test_helper_exception_is_a_helper_error_trap(engine):
    reg = HelperRegistry()

    @reg.helper(id=3, name="boom")
    def boom(ctx, *args):
        raise RuntimeError("it broke")

    result = run("r1 = 1\ncall 3\nexit", engine=engine, helpers=reg)
    assert result.trap.kind == TrapKind.HELPER_ERROR
    assert result.trap.pc == 1
    assert "boom" in result.trap.message and "it broke" in result.trap.message


def test_helper_must_return_an_int(engine):
    reg = HelperRegistry()
    reg.register(lambda ctx, *a: "x", id=3, name="bad")
    result = run("call 3\nexit", engine=engine, helpers=reg)
    assert result.trap.kind == TrapKind.HELPER_ERROR and "returned str" in result.trap.message


def test_helper_results_are_taken_modulo_2_64(engine):
    reg = HelperRegistry()
    reg.register(lambda ctx, *a: -1, id=3, name="neg")
    reg.register(lambda ctx, *a: 1 << 70 | 5, id=4, name="big")
    assert run("call 3\nexit", engine=engine, helpers=reg).return_value == MASK64
    assert run("call 4\nexit", engine=engine, helpers=reg).return_value == 5


def test_helper_context_reads_writes_and_logs(engine):
    reg = HelperRegistry()

    @reg.helper(id=10, name="upper")
    def upper(ctx, addr, size, out, d, e):
        text = ctx.read_cstring(addr, size)
        ctx.write(out, text.upper())
        ctx.log(f"saw {text.decode()}")
        return len(text)

    text = "r3 = r2\nr2 = 64\ncall 10\nexit"
    result = run(text, (b"hello\0junk", bytes(5)), engine, helpers=reg)
    assert result.return_value == 5
    assert result.buffers == (b"hello\0junk", b"HELLO")
    assert result.log == ("saw hello",)


def test_helper_memory_fault_is_a_trap_at_the_call(engine):
    reg = HelperRegistry()
    reg.register(lambda ctx, a, *r: ctx.read(a, 100)[0], id=10, name="reader")
    result = run("r0 = 0\ncall 10\nexit", (b"tiny",), engine, helpers=reg)
    assert result.trap.kind == TrapKind.MEMORY_FAULT and result.trap.pc == 1
    assert "read of 100 bytes" in result.trap.message


def test_callx_calls_the_helper_numbered_in_a_register(engine):
    reg = HelperRegistry()
    reg.register(lambda ctx, a, *r: a + 1, id=6, name="inc")
    assert run("r1 = 41\nr2 = 6\ncallx r2\nexit", engine=engine, helpers=reg).return_value == 42
    result = run("r2 = 99\ncallx r2\nexit", engine=engine, helpers=reg)
    assert result.trap.kind == TrapKind.UNKNOWN_HELPER and "#99" in result.trap.message


def test_runtime_function_calls_resolve_like_helper_numbers(engine):
    # `call` with src 2 names a kfunc by BTF id in the kernel; here the host resolves the id.
    reg = HelperRegistry()
    reg.register(lambda ctx, a, *r: a * 2, id=42, name="twice")
    assert run("r1 = 21\ncall runtime 42\nexit", engine=engine, helpers=reg).return_value == 42
    with pytest.raises(vm.LinkError, match="unknown helper: #43"):
        run("call runtime 43\nexit", engine=engine, helpers=reg)


def test_log_limits_drop_extra_lines(engine):
    reg = HelperRegistry()
    reg.register(lambda ctx, *a: ctx.log("line") or 0, id=3, name="say")
    text = "r6 = 10\nloop:\ncall 3\nr6 += -1\nif r6 != 0 goto loop\nexit"
    result = run(text, engine=engine, helpers=reg, limits=Limits(max_log_lines=4))
    assert result.log == ("line",) * 4


# -- interruption ------------------------------------------------------------------------


@pytest.mark.parametrize("reason", [TrapKind.CANCELLED, TrapKind.DEADLINE_EXCEEDED])
def test_interrupt_from_another_thread_stops_an_endless_loop(engine, reason):
    interrupt = vm.Interrupt()
    text = "r0 = 0\nloop:\nr0 += 1\ngoto loop"
    timer = threading.Timer(0.05, interrupt.request, (reason,))
    timer.start()
    start = time.monotonic()
    result = run(
        text, engine=engine, interrupt=interrupt, fuel=10**12, limits=Limits(max_fuel=10**12)
    )
    assert time.monotonic() - start < 5
    assert result.trap.kind == reason
    assert result.return_value == 0 and result.fuel_used > 0
