"""JIT compile limits and workers: a tier takes a module only within its size limits
(`bpfexec.vm.jit.limits`), compiles run in worker processes in a fair order, a huge module
never holds back the others, and neither a compile nor its worker outlives SIGTERM."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import pytest
from server_process import ServerProcess
from support import free_port, scrape_metrics, wait_until

from bpfexec.client import Client
from bpfexec.server.app import serve_in_thread
from bpfexec.server.settings import Settings
from bpfexec.vm.loader import load
from bpfexec.vm.machine import available_engines

pytestmark = pytest.mark.skipif("jit" not in available_engines(), reason="llvmlite missing")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from bench_compile import branchy  # noqa: E402

SUM = b"r0 = 0\nloop:\nr0 += r1\nr1 += -1\nif r1 != 0 goto loop\nexit\n"


def small(n: int) -> bytes:
    """A distinct small module (its own bytes, so its own cache entry): n + 1 + ... + r1."""
    return SUM.replace(b"r0 = 0", f"r0 = {n}".encode())


def fallbacks(samples: dict, tier: str, reason: str) -> float:
    return samples.get(
        ("bpfexec_jit_fallbacks_total", frozenset({("tier", tier), ("reason", reason)})), 0.0
    )


# -- the rule ------------------------------------------------------------------------------


def test_a_big_branchy_module_gets_the_quick_tier_by_rule():
    from bpfexec.vm.jit import best_compiled, compile_best, compile_program
    from bpfexec.vm.jit.limits import OPTIMIZED_LIMITS, QUICK_LIMITS, over_limit
    from bpfexec.vm.jit.runtime import _interpreter_blocks

    program = load(branchy(40_000).encode(), "big")
    assert len(program.instructions) > 40_000
    blocks = _interpreter_blocks(program)
    assert "more than 4096 instructions" in (over_limit(program, blocks, OPTIMIZED_LIMITS) or "")
    assert over_limit(program, blocks, QUICK_LIMITS) is None
    start = time.perf_counter()
    optimized = compile_program(program)
    assert time.perf_counter() - start < 1  # refused before anything is compiled
    assert not optimized.native and optimized.refused == "limit"
    assert optimized.fallback.startswith("too big for the optimized tier")
    compiled = compile_best(program)  # what `bpfexec.vm.execute(..., engine="jit")` does
    assert compiled.native and compiled.quick
    assert best_compiled(program) is compiled  # a native tier beats a refused one


def test_limits_count_every_function_and_the_module():
    from bpfexec.vm.jit.limits import TierLimits, over_limit
    from bpfexec.vm.jit.runtime import _interpreter_blocks

    program = load(branchy(2_000, functions=4).encode())  # about 500 per function
    blocks = _interpreter_blocks(program)
    assert over_limit(program, blocks, TierLimits.of(600, 4_000)) is None
    assert "the function at pc" in (over_limit(program, blocks, TierLimits.of(400, 4_000)) or "")
    assert "instructions to compile" in (
        over_limit(program, blocks, TierLimits.of(600, 1_500)) or ""
    )
    assert "blocks" in (over_limit(program, blocks, TierLimits(600, 100, 4_000)) or "")


def test_a_module_over_the_quick_limit_runs_on_the_interpreter():
    from bpfexec import vm
    from bpfexec.vm.jit import compile_program
    from bpfexec.vm.jit.limits import TierLimits

    program = load(branchy(1_000).encode())
    tiny = TierLimits.of(100, 100)
    quick = compile_program(program, quick=True, limits=tiny)
    assert not quick.native and quick.refused == "limit" and quick.reason == "limit"
    assert vm.execute(program, args=[3], engine="jit").return_value == (
        vm.execute(program, args=[3]).return_value
    )


def test_the_server_sends_an_over_limit_module_to_the_tier_the_rule_says():
    settings = Settings(
        port=0, metrics_port=free_port(), entry_point_helpers=False, engine="jit",
        jit_optimized_max_function_instructions=500, jit_quick_max_instructions=5_000,
    )  # fmt: skip
    with serve_in_thread(settings) as running, Client(running.address, timeout=20) as client:
        middle = client.load(branchy(2_000).encode())  # quick: yes; optimized: a function > 500
        large = client.load(branchy(6_000).encode())  # quick: > 5,000 in all: the interpreter
        fine = client.load(SUM)
        wait_until(
            lambda: (
                scrape_metrics(running.metrics_port).get(
                    ("bpfexec_jit_compile_seconds_count", frozenset()), 0
                )
                >= 3
            ),
            timeout=20,
        )
        samples = scrape_metrics(running.metrics_port)
        tiers = {
            name: running.service.cache.get(module.id).program.compiled  # type: ignore[union-attr]
            for name, module in (("middle", middle), ("large", large), ("fine", fine))
        }
        results = [client.execute(m, args=[5]).return_value for m in (middle, large, fine)]
    assert tiers["middle"]["jit.quick"].native
    assert tiers["middle"]["jit"].refused == "limit"
    assert tiers["large"]["jit.quick"].refused == "limit"
    assert tiers["large"]["jit"].refused == "limit"
    assert tiers["fine"]["jit"].native
    assert fallbacks(samples, "optimized", "limit") == 2
    assert fallbacks(samples, "quick", "limit") == 1
    assert results[2] == 15
    program = load(branchy(2_000).encode())
    from bpfexec import vm

    assert results[0] == vm.execute(program, args=[5]).return_value


# -- workers -------------------------------------------------------------------------------


def test_a_worker_compile_past_its_timeout_is_abandoned_and_the_next_one_works():
    from bpfexec.vm.jit import compile_program
    from bpfexec.vm.jit.limits import TierLimits
    from bpfexec.vm.jit.worker import CompileWorker

    worker = CompileWorker()
    try:
        program = load(branchy(8_000).encode())  # several seconds optimized
        unlimited = TierLimits.of(1 << 20, 1 << 20)
        start = time.perf_counter()
        slow = compile_program(program, emit=worker.emitter(0.5), limits=unlimited)
        assert time.perf_counter() - start < 5
        assert slow.refused == "abandoned" and not slow.failed
        assert "jit" not in program.compiled  # not cached: it may be asked again
        first = worker.started
        fine = load(SUM)
        compiled = compile_program(fine, emit=worker.emitter(30))
        assert compiled.native and worker.started == first + 1  # a new child
        from bpfexec import vm

        assert vm.execute(fine, args=[10], engine="jit").return_value == 55
    finally:
        worker.close()


@pytest.mark.compiler_fault
def test_a_worker_that_dies_is_a_compiler_error_not_a_server_crash():
    import os
    import threading

    from bpfexec.vm.jit import compile_program
    from bpfexec.vm.jit.worker import CompileWorker

    worker = CompileWorker()
    try:
        compile_program(load(SUM + b"r0 += 9\nexit\n"), emit=worker.emitter(30))
        assert worker.pid is not None
        pid = worker.pid
        # A module whose optimized compile takes about a second: the child dies in the
        # middle of it, as it would on an LLVM assertion or at its memory cap.
        big = load(branchy(3_000).encode(), "big")

        def die(text: str, quick: bool) -> bytes:
            threading.Timer(0.2, lambda: os.kill(pid, signal.SIGKILL)).start()
            return worker.emit(text, quick, 30)

        compiled = compile_program(big, emit=die)
        assert compiled.failed and "compile worker died" in compiled.fallback
    finally:
        worker.close()


def _alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped counts as ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and SIGTERM")
def test_a_huge_compile_holds_back_no_other_module_and_not_sigterm(tmp_path):
    # The optimized limits lifted: the 40k-instruction module's optimized compile takes
    # about a minute (it is what the limits are there to refuse); it must hold back
    # nothing. (Two functions of 20k: one function of 40k overflows LLVM's stack in
    # the worker after a few seconds, a compiler error that would end the compile.)
    server = ServerProcess(
        tmp_path / "server.log", "--engine", "jit", "--grace-period", "2",
        "--jit-optimized-max-function-instructions", "1000000",
        "--jit-optimized-max-instructions", "1000000",
    )  # fmt: skip
    try:
        with Client(server.address, timeout=20) as client:
            big = client.load(branchy(40_000, functions=2).encode())
            # Its quick tier first, then its optimized one starts in a worker.
            wait_until(
                lambda: server.metric("bpfexec_jit_quick_compile_seconds_count") >= 1, 20, "quick"
            )
            modules = [client.load(small(n)) for n in range(4)]
            # Every later module gets both tiers while the big one is compiling.
            wait_until(
                lambda: server.metric("bpfexec_jit_compile_seconds_count") >= 4, 20, "others"
            )
            assert server.metric("bpfexec_jit_compile_seconds_count") == 4  # not the big one
            for n, module in enumerate(modules):
                assert client.execute(module, args=[100]).return_value == 5050 + n
            assert client.execute(big, args=[7]).trap is None  # its quick tier serves
        # The big module's optimized compile is still running.
        assert server.metric("bpfexec_jit_compile_seconds_count") == 4
        children = _children(server.process.pid)
        assert children, "no compile worker process"
        start = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(2 + 8)  # the grace period plus a few seconds
        assert time.monotonic() - start < 10
        assert "shutting down" in server.output()
        wait_until(lambda: not any(_alive(child) for child in children), 5, "workers")
    finally:
        server.kill()
