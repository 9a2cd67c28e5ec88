"""Built-in helpers pay for the memory they work on: 1 fuel per 8 bytes
(`bpfexec.vm.helpers.BYTES_PER_FUEL`), charged before the work, the same on both engines.

Before, `strnlen`, `memcmp` and kin cost 1 fuel whatever the size and ran Python
loops per byte: seconds over 16 MiB, during which no deadline could stop them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from server_process import ServerProcess
from support import wait_until

from bpfexec.client.client import Client
from bpfexec.client.errors import DeadlineExceeded, ResourceExhausted
from bpfexec.vm import Limits, Result, execute, load
from bpfexec.vm.builtin_helpers import standard_helpers
from bpfexec.vm.helpers import BYTES_PER_FUEL, fuel_for
from bpfexec.vm.machine import available_engines

MiB = 1 << 20
BIG = 16 * MiB  # the largest argument buffer by default
B0, B1 = 0x4_0000_0000, 0x5_0000_0000  # argument buffers 0 and 1
LIMITS = Limits(max_fuel=10**12)
QUICK = 0.5  # seconds: a trap before the work comes well within this

# Each program calls one helper on the buffers in r1 (and r2) with the length in r3,
# after saving r3 so r0 = the helper's result; `PROLOGUE_FUEL` instructions besides.
PROGRAMS = {
    "strnlen": "r2 = r3\ncall strnlen\nexit\n",  # strnlen(buf0, n)
    "memset": "r2 = 0x5a\ncall memset\nr0 = 0\nexit\n",  # memset(buf0, 'Z', n)
    "memcpy": "r6 = r1\nr1 = r2\nr2 = r6\ncall memcpy\nr0 = 0\nexit\n",  # memcpy(buf1, buf0, n)
    "memcmp": "call memcmp\nexit\n",  # memcmp(buf0, buf1, n)
}
# Instructions run: each program is one basic block, charged whole on entry.
PROGRAM_FUEL = {"strnlen": 3, "memset": 4, "memcpy": 6, "memcmp": 2}


def run(name: str, engine: str, n: int, buffers: list[bytes], fuel: int) -> Result:
    program = load(PROGRAMS[name].encode())
    args = [*buffers, n] if len(buffers) == 2 else [buffers[0], 0, n]
    return execute(
        program, args=args, fuel=fuel, helpers=standard_helpers(), limits=LIMITS, engine=engine
    )


def buffers_for(name: str, size: int) -> list[bytes]:
    if name == "strnlen":
        return [b"s" * (size - 1) + b"\0"]
    if name == "memcmp":
        return [b"c" * size, b"c" * (size - 1) + b"d"]
    return [b"m" * size, bytes(size)]


def bytes_charged(name: str, n: int) -> int:
    """The bytes a call of `name` with length n pays for, on `buffers_for(name, n)`."""
    return n  # strnlen scans n - 1 bytes and the NUL; the others work on n bytes


@pytest.mark.parametrize("name", list(PROGRAMS))
@pytest.mark.parametrize("size", [1, 7, 8, 9, 4096, BIG])
def test_a_helper_is_charged_by_the_bytes_it_touches(engine: str, name: str, size: int) -> None:
    buffers = buffers_for(name, size)
    result = run(name, engine, size, buffers, fuel=10**9)
    assert result.trap is None
    expected = PROGRAM_FUEL[name] + fuel_for(bytes_charged(name, size))
    assert result.fuel_used == expected
    assert fuel_for(size) == -(-size // BYTES_PER_FUEL) == (size + 7) // 8
    if name == "strnlen":
        assert result.return_value == size - 1
    elif name == "memcmp":
        assert result.return_value == (ord("c") - ord("d")) % 2**64
    elif name == "memset":
        assert result.buffers[0] == b"Z" * size
    else:
        assert result.buffers[1] == b"m" * size


@pytest.mark.parametrize("name", list(PROGRAMS))
def test_engines_report_the_same_fuel_and_trap(name: str) -> None:
    engines = available_engines()
    if len(engines) < 2:
        pytest.skip("the JIT needs llvmlite")
    from bpfexec.vm.jit import compile_best
    from bpfexec.vm.jit.runtime import runs_natively
    from bpfexec.vm.machine import prepare

    size = 3 * MiB + 5
    buffers = buffers_for(name, size)
    needed = PROGRAM_FUEL[name] + fuel_for(size)
    program = load(PROGRAMS[name].encode())
    machine = prepare(program, args=[*buffers, size][:3], helpers=standard_helpers())
    assert runs_natively(compile_best(program), machine), "the JIT would not run native code"
    for fuel in (needed, needed - 1, 10**9):
        results = [run(name, engine, size, buffers, fuel) for engine in engines]
        shown = [
            (r.return_value, r.fuel_used, r.trap and (r.trap.kind, r.trap.pc), r.buffers)
            for r in results
        ]
        assert shown[0] == shown[1], f"{name} with fuel {fuel}"


@pytest.mark.parametrize("name", list(PROGRAMS))
def test_a_small_budget_traps_out_of_fuel_before_the_work(engine: str, name: str) -> None:
    """16 MiB with fuel for a few instructions and 8 KiB of work: OUT_OF_FUEL at the
    call, quickly, memory untouched, nothing of the helper's cost charged."""
    buffers = buffers_for(name, BIG)
    fuel = PROGRAM_FUEL[name] + 1024
    start = time.perf_counter()
    result = run(name, engine, BIG, buffers, fuel)
    took = time.perf_counter() - start
    assert result.trap is not None and result.trap.kind == "OUT_OF_FUEL", result.trap
    assert name in result.trap.message and "fuel" in result.trap.message
    assert result.trap.instruction.startswith("call")
    assert result.fuel_used == PROGRAM_FUEL[name]  # its one block, charged on entry: no more
    assert result.buffers == tuple(buffers)  # memset and memcpy wrote nothing
    assert took < QUICK, f"{took:.3f} s"


def test_strnlen_scans_no_further_than_the_fuel_pays(engine: str) -> None:
    """A string longer than the fuel pays for is OUT_OF_FUEL, not a MEMORY_FAULT at the
    end of its region: the scan stopped where the budget did."""
    unterminated = b"u" * BIG  # no NUL: a full scan would fault past the region's end
    result = run("strnlen", engine, 2 * BIG, [unterminated], fuel=3 + 100)
    assert result.trap is not None and result.trap.kind == "OUT_OF_FUEL"
    assert "800 bytes the 100 fuel left pays for" in result.trap.message
    # With the fuel for the whole region, the same call reaches its end and faults.
    result = run("strnlen", engine, 2 * BIG, [unterminated], fuel=3 + fuel_for(BIG) + 1)
    assert result.trap is not None and result.trap.kind == "MEMORY_FAULT"


def test_an_exact_budget_is_enough(engine: str) -> None:
    size = 1000
    needed = PROGRAM_FUEL["memcmp"] + fuel_for(size)
    buffers = buffers_for("memcmp", size)
    assert run("memcmp", engine, size, buffers, needed).trap is None
    short = run("memcmp", engine, size, buffers, needed - 1).trap
    assert short is not None and short.kind == "OUT_OF_FUEL"
    assert "needs 125 fuel for comparing 1000 bytes, 124 left" in short.message


def test_an_out_of_range_length_is_a_memory_fault_not_a_charge(engine: str) -> None:
    result = run("memset", engine, 2**40, [bytes(16)], fuel=10**9)
    assert result.trap is not None and result.trap.kind == "MEMORY_FAULT"
    assert result.fuel_used == PROGRAM_FUEL["memset"]


def test_trace_printk_pays_for_its_format_and_strings(engine: str) -> None:
    fmt = b"%s and %s\0"  # then two strings: 5 + NUL and 1000 + NUL bytes scanned
    program = load(b"r3 = r2\nr4 = r2\nr4 += 6\nr2 = 10\ncall 6\nexit\n")
    text = b"short\0" + b"L" * 1000 + b"\0"
    result = execute(
        program,
        args=[fmt, text],
        fuel=10**6,
        helpers=standard_helpers(),
        limits=LIMITS,
        engine=engine,
    )
    assert result.trap is None
    assert result.log == ("short and " + "L" * 1000,)
    assert result.fuel_used == 6 + fuel_for(10) + fuel_for(6) + fuel_for(1001)


# Against a real server: a deadline stops a program that loops over big helper calls


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A subprocess: its execution threads do not share a GIL with the test's clients,
    so what is timed is the server freeing its slots, not this process's scheduling."""
    log = tmp_path_factory.mktemp("helper-cost") / "server.log"
    server = ServerProcess(log, "--max-concurrent-executions", "2", "--max-fuel", str(10**15))
    try:
        yield server
    finally:
        server.kill()


# strnlen over an 8 MiB string, a million times: 1 M fuel a call, far beyond any deadline.
LOOPED_STRNLEN = b"""
    r6 = r1
    r7 = 0
loop:
    r1 = r6
    r2 = 0x800000
    call strnlen
    r7 += 1
    if r7 < 1000000 goto loop
    r0 = r7
    exit
"""


def test_a_deadline_frees_both_slots_promptly(server: ServerProcess) -> None:
    """The review's case: a 1 s deadline used to hold both execution slots for 22 s,
    each strnlen call taking seconds that no deadline could interrupt. Both slots are
    taken by runs past their deadline; a third run queues for a slot and must get one
    soon after the deadline, not when the loops would have ended."""
    deadline = 2.0  # long enough for both 8 MiB uploads to start running on a slow machine
    with Client(server.address, timeout=30.0) as client:
        module = client.load(LOOPED_STRNLEN)
        quick = client.load(b"r0 = 3\nexit\n")

        def hog(_: int) -> None:
            with pytest.raises(DeadlineExceeded):
                client.execute(module, args=[b"x" * (8 * MiB)], fuel=10**14, timeout=deadline)

        def quick_run() -> bool:
            try:
                return client.execute(quick).return_value == 3
            except ResourceExhausted:
                return False

        with ThreadPoolExecutor(2) as pool:
            hogs = [pool.submit(hog, i) for i in range(2)]
            start = time.monotonic()
            # Both runs hold their slots: a third is refused...
            wait_until(lambda: not quick_run(), timeout=deadline, what="both slots taken")
            # ...until the deadline frees one.
            wait_until(quick_run, timeout=10.0, what="a slot freed")
            waited = time.monotonic() - start
            for future in hogs:
                future.result()
        # Before, 20 s and more; now a slot frees once the current strnlen returns.
        assert waited < deadline + 3.0, waited
