"""The JIT's native batch loop (`bpfexec.vm.jit.batch_loop`) against input-by-input runs.

A batch on the JIT runs its inputs in one loop of native code, resetting
between two inputs only what a run may have written (`reset_extent`). Every
test here compares the batch's Results with the interpreter's, one fresh
execution per input (maps shared where the batch shares them), and checks that
the native loop, not the per-input path, ran the batch. The stack and globals
tests attack the reset: an input writes, the next reads.
"""

from __future__ import annotations

import itertools
import time
from array import array
from pathlib import Path

import pytest

pytest.importorskip("llvmlite")

from seed_helpers import helper_max, helper_mul
from support import FIB, SPIN

from bpfexec import vm
from bpfexec.vm.batch import CHUNK, run_batch, run_packed
from bpfexec.vm.builtin_helpers import standard_helpers
from bpfexec.vm.errors import RequestError, TrapKind
from bpfexec.vm.helpers import HelperRegistry, HelperResolver
from bpfexec.vm.jit import compile_best
from bpfexec.vm.jit.batch_loop import native_batch, reset_extent
from bpfexec.vm.limits import Limits
from bpfexec.vm.loader import load
from bpfexec.vm.machine import Interrupt, Result, prepare
from bpfexec.vm.maps import MapSet
from bpfexec.vm.program import Program

FIXTURES = Path(__file__).parent / "fixtures"
STACK, FRAME = Limits().stack_size, Limits().stack_frame_size


def outcome(result: Result) -> dict[str, object]:
    return {
        "r0": result.return_value,
        "fuel_used": result.fuel_used,
        "trap": result.trap.to_dict() if result.trap else None,
        "log": result.log,
        "buffers": result.buffers,
    }


def natively(program: Program, function: str | None, helpers: HelperResolver | None) -> bool:
    template = prepare(program, function, (), helpers=helpers)
    batch = native_batch(compile_best(program), template)
    if batch is None:
        return False
    batch.close()
    return True


def same_as_alone(
    program: Program,
    function: str | None,
    inputs: list[list[int | bytes]],
    helpers: HelperResolver | None = None,
    fuel: int | None = None,
) -> list[Result]:
    """Run `inputs` as a JIT batch and one by one on the interpreter; assert the same
    outcomes (and that the native loop ran the batch); return the batch's Results."""
    assert natively(program, function, helpers)
    shared = MapSet(program.maps, init=program.map_init)
    batch = list(run_batch(program, function, inputs, engine="jit", helpers=helpers, fuel=fuel))
    alone = [
        vm.execute(program, function, args, helpers=helpers, fuel=fuel, maps=shared)
        for args in inputs
    ]
    assert [outcome(r) for r in batch] == [outcome(r) for r in alone]
    return batch


def test_scalar_inputs_over_many_chunks() -> None:
    program = load((FIXTURES / "obj" / "example-O2.o").read_bytes(), name="example.o")
    inputs: list[list[int | bytes]] = [[n % 8, n * 7919] for n in range(2000)]
    inputs += [[(1 << 64) - 1, 3], [-1, 5], [4]]
    results = same_as_alone(program, "example", inputs)
    assert results[5].return_value == 5 * 7919


def test_buffers_are_each_inputs_own_and_written_in_place() -> None:
    program = load(b"r0 = *(u8 *)(r1 + 0)\n*(u8 *)(r1 + 1) = r0\nexit\n")
    inputs: list[list[int | bytes]] = [[b"\x07\x00"], [0], [b"\x09\x00\x05"], [b""], [b"\x03"]]
    inputs += [[bytes([n % 256, 0])] for n in range(300)]
    results = same_as_alone(program, None, inputs)
    assert results[0].buffers == (b"\x07\x07",) and results[2].buffers == (b"\x09\x09\x05",)
    assert results[1].trap is not None and results[1].trap.kind == TrapKind.MEMORY_FAULT
    assert results[4].trap is not None  # a one-byte buffer: the store at 1 faults


def test_the_seed_programs_with_python_helpers() -> None:
    helpers = HelperRegistry()
    helpers.register(helper_max, id=1, name="max")
    helpers.register(helper_mul, id=42, name="mul")

    @helpers.helper(name="print")
    def print_(ctx, s, *_):  # type: ignore[no-untyped-def]
        ctx.log(ctx.read_cstring(s).decode())
        return 0

    for name in ("helper_pointers", "local_calls", "loops", "strings"):
        program = load((FIXTURES / "obj" / f"{name}-O2.o").read_bytes(), name=f"{name}.o")
        for fn in program.functions:
            if not fn.exported:
                continue
            inputs: list[list[int | bytes]] = [
                [], [7, 3], [5, 9], [b"\x07\x00\x00\x00\x03\x00\x00\x00"], [b"hello\x00", 4],
                [b"\x05\x00\x00\x00\x09\x00\x00\x00", 2], [0], [1 << 40, 2],
            ]  # fmt: skip
            same_as_alone(program, fn.name, inputs, helpers=helpers, fuel=100_000)


def test_a_python_helper_logs_to_its_own_input() -> None:
    registry = HelperRegistry()

    @registry.helper(id=9, name="note")
    def note(ctx, a, b, c, d, e):  # type: ignore[no-untyped-def]
        ctx.log(f"saw {a}")
        ctx.write(b, a.to_bytes(8, "little"))
        return a + 1

    # The helper writes r1 = 5 where r2 points: an integer there faults.
    inputs: list[list[int | bytes]] = [[b"12345678"], [3], [b"abcdefgh"], [b"abc"]]
    program = load(b"r6 = r1\nr1 = 5\nr2 = r6\ncall 9\nexit\n")
    results = same_as_alone(program, None, inputs, helpers=registry)
    assert results[0].log == ("saw 5",) and results[0].buffers == ((5).to_bytes(8, "little"),)
    assert results[1].trap is not None and results[3].trap is not None


def test_traps_of_every_kind_and_the_inputs_after_them() -> None:
    spin = load(SPIN.encode())
    results = same_as_alone(spin, None, [[], [], []], fuel=1000)
    assert {r.trap.kind for r in results if r.trap} == {TrapKind.OUT_OF_FUEL}
    fib = load(FIB.encode())
    inputs: list[list[int | bytes]] = [[10], [100], [12]]
    results = same_as_alone(fib, None, inputs, fuel=1_000_000)
    assert results[0].return_value == 55 and results[2].return_value == 144
    assert results[1].trap is not None
    assert results[1].trap.kind == TrapKind.CALL_DEPTH_EXCEEDED


def test_the_globals_are_fresh_for_every_input() -> None:
    program = load((FIXTURES / "obj" / "globals-O2.o").read_bytes(), name="globals.o")
    results = same_as_alone(program, "bump", [[1], [1], [2]])
    assert [r.return_value for r in results] == [42, 42, 43]


# -- the stack reset, attacked --------------------------------------------------------------

# An input with r1 != 0 stores r1 somewhere; one with r1 == 0 reads it back (0 when fresh).
IN_FRAME = """
    if r1 == 0 goto read
    *(u64 *)(r10 - 8) = r1
    exit
read:
    r0 = *(u64 *)(r10 - 8)
    exit
"""
BELOW_THE_FRAME = """
    if r1 == 0 goto read
    r2 = r10
    r2 += -4000
    *(u64 *)(r2 + 0) = r1
    exit
read:
    r0 = *(u64 *)(r10 - 4000)
    exit
"""
FORGED = """
    r2 = 0x200000010 ll
    if r1 == 0 goto read
    *(u64 *)(r2 + 0) = r1
    exit
read:
    r0 = *(u64 *)(r2 + 0)
    exit
"""
# The callee stores in its own frame; the caller reads that slot through r10.
IN_THE_CALLEE = """
    if r1 == 0 goto read
    call store
    exit
read:
    r0 = *(u64 *)(r10 - 528)
    exit
store:
    *(u64 *)(r10 - 16) = r1
    exit
"""
RECURSIVE = """
    if r1 == 0 goto read
    call down
    exit
read:
    r0 = *(u64 *)(r10 - 1032)
    exit
down:
    *(u64 *)(r10 - 8) = r1
    if r1 == 0 goto out
    r1 -= 1
    call down
out:
    exit
"""


@pytest.mark.parametrize(
    "source, reset",
    [(IN_FRAME, 8), (IN_THE_CALLEE, FRAME + 16), (BELOW_THE_FRAME, STACK), (FORGED, STACK),
     (RECURSIVE, STACK)],
    ids=["in-frame", "callee", "below-frame", "forged", "recursive"],
)  # fmt: skip
def test_a_stored_value_never_reaches_the_next_input(source: str, reset: int) -> None:
    program = load(source.encode())
    template = prepare(program, None, ())
    assert reset_extent(program, template.entry, template.helpers, STACK, FRAME)[0] == reset
    results = same_as_alone(program, None, [[5], [0], [6], [6], [0]])
    assert results[1].return_value == 0 and results[4].return_value == 0


def test_a_helper_that_writes_resets_everything() -> None:
    # memset(r10 - 3000, 0x41, 8) on one input; the next reads r10 - 3000.
    source = """
        if r1 == 0 goto read
        r1 = r10
        r1 += -3000
        r2 = 0x41
        r3 = 8
        call memset
        exit
    read:
        r0 = *(u64 *)(r10 - 3000)
        exit
    """
    program = load(source.encode())
    helpers = standard_helpers()
    template = prepare(program, None, (), helpers=helpers)
    assert reset_extent(program, template.entry, template.helpers, STACK, FRAME) == (STACK, True)
    results = same_as_alone(program, None, [[5], [0]], helpers=helpers)
    assert results[1].return_value == 0


def test_an_interrupt_stops_the_native_loop() -> None:
    program = load(FIB.encode())  # fib(40): seconds of native work
    interrupt = Interrupt()
    limits = Limits(max_fuel=1 << 40)
    batch = run_batch(
        program, None, itertools.repeat([40]), interrupt=interrupt, engine="jit", limits=limits,
        fuel=1 << 40,
    )  # fmt: skip
    interrupt.after(0.05, TrapKind.DEADLINE_EXCEEDED)
    start = time.monotonic()
    first = next(batch)
    assert first.trap is not None and first.trap.kind == TrapKind.DEADLINE_EXCEEDED
    assert list(batch) == []
    assert time.monotonic() - start < 1


# -- packed inputs and results ----------------------------------------------------------------


def packed_expected(program: Program, function: str | None, rows: list[list[int]],
                    **kw: object) -> list[int]:  # fmt: skip
    words = []
    for args in rows:
        result = vm.execute(program, function, args, **kw)  # type: ignore[arg-type]
        code = result.trap.kind.code if result.trap else 0
        words += [result.return_value, result.fuel_used, code]
    return words


@pytest.mark.parametrize("engine_name", ["interpreter", "jit"])
def test_packed_results_are_the_results(engine_name: str) -> None:
    program = load((FIXTURES / "obj" / "example-O2.o").read_bytes(), name="example.o")
    rows = [[n % 8, n * 31, 0, 0, 0] for n in range(3000)]
    packed = run_packed(program, "example", array("Q", [w for r in rows for w in r]),
                        engine=engine_name)  # fmt: skip
    assert packed.tolist() == packed_expected(program, "example", rows)


@pytest.mark.parametrize("engine_name", ["interpreter", "jit"])
def test_packed_traps_have_their_kind_and_the_batch_goes_on(engine_name: str) -> None:
    program = load(b"if r1 == 0 goto fault\nr0 = r1\nexit\nfault:\nr0 = *(u8 *)(r1 + 0)\nexit\n")
    rows = [[5, 0, 0, 0, 0], [0, 0, 0, 0, 0], [7, 0, 0, 0, 0], [0, 0, 0, 0, 0]]
    packed = run_packed(program, None, array("Q", [w for r in rows for w in r]), engine=engine_name)
    assert packed.tolist() == packed_expected(program, None, rows)
    assert TrapKind.from_code(packed[5]) == TrapKind.MEMORY_FAULT and packed[6] == 7
    fib = load(FIB.encode())
    rows = [[n, 0, 0, 0, 0] for n in (10, 100, 5)]
    packed = run_packed(fib, None, array("Q", [w for r in rows for w in r]), engine=engine_name)
    assert packed.tolist() == packed_expected(fib, None, rows)
    assert TrapKind.from_code(packed[5]) == TrapKind.CALL_DEPTH_EXCEEDED


def test_packed_inputs_must_be_whole() -> None:
    program = load(b"r0 = r1\nexit\n")
    with pytest.raises(RequestError, match="5 words an input"):
        run_packed(program, None, array("Q", [1, 2, 3]))
    with pytest.raises(RequestError, match="array\\('l'\\)"):
        run_packed(program, None, array("l", [1, 2, 3, 4, 5]))


def test_an_interrupt_ends_packed_results_early() -> None:
    program = load(FIB.encode())
    interrupt = Interrupt()
    interrupt.after(0.05, TrapKind.CANCELLED)
    limits = Limits(max_fuel=1 << 40)
    packed = run_packed(program, None, array("Q", [40, 0, 0, 0, 0] * 10), interrupt=interrupt,
                        limits=limits, fuel=1 << 40)  # fmt: skip
    assert len(packed) == 3 and TrapKind.from_code(packed[2]) == TrapKind.CANCELLED


def test_a_chunk_without_buffers_sees_no_buffer_of_the_chunk_before() -> None:
    # Reads the first byte of argument buffer 0 by its address, given one or not.
    program = load(b"r1 = 0x400000000 ll\nr0 = *(u8 *)(r1 + 0)\nexit\n")
    # A chunk (CHUNK inputs) with buffers, two without, then buffers again.
    inputs: list[list[int | bytes]] = [[b"\x2a"]] * CHUNK + [[]] * 2 * CHUNK + [[b"\x07"]] * 3
    results = same_as_alone(program, None, inputs)
    assert results[0].return_value == 42 and results[-1].return_value == 7
    faults = [r.trap.kind if r.trap else None for r in results[CHUNK : 3 * CHUNK]]
    assert faults == [TrapKind.MEMORY_FAULT] * 2 * CHUNK
    words = array("Q", [0, 0, 0, 0, 0] * 10)  # packed inputs never have buffers
    packed = run_packed(program, None, words, engine="jit")
    assert {TrapKind.from_code(code) for code in packed[2::3]} == {TrapKind.MEMORY_FAULT}
