"""The server's JIT: compiled once per module in the background, then used.

Until the native code is ready the interpreter serves, so results never
depend on which engine ran them.
"""

from __future__ import annotations

import time
import urllib.request

import pytest
from support import broken_ir, free_port, scrape_metrics

from bpfexec.client import Client
from bpfexec.server.app import serve_in_thread
from bpfexec.server.settings import Settings
from bpfexec.vm.machine import available_engines

pytestmark = pytest.mark.skipif("jit" not in available_engines(), reason="llvmlite missing")

SUM = b"r0 = 0\nloop:\nr0 += r1\nr1 += -1\nif r1 != 0 goto loop\nexit\n"


def compile_count(metrics_port: int, tier: str = "jit") -> float:
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith(f"bpfexec_{tier}_compile_seconds_count"):
                return float(line.split()[-1])
    return 0.0


def test_jit_is_the_default_engine_when_llvmlite_is_installed():
    assert Settings().engine == "jit"


def test_a_module_is_compiled_once_and_gives_the_interpreters_results():
    settings = Settings(port=0, metrics_port=free_port(), entry_point_helpers=False, engine="jit")
    with serve_in_thread(settings) as running, Client(running.address, timeout=10) as client:
        module = client.load(SUM)
        client.load(SUM)  # the same bytes: cached, not compiled again
        first = client.execute(module, args=[1000])
        deadline = time.monotonic() + 30
        while compile_count(running.metrics_port) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert compile_count(running.metrics_port) == 1
        assert compile_count(running.metrics_port, "jit_quick") == 1  # the tier before
        assert running.service.cache.get(module.id).program.compiled["jit"].native
        native = client.execute(module, args=[1000])
    assert (native.return_value, native.fuel_used) == (first.return_value, first.fuel_used)
    assert native.return_value == 500500


@pytest.mark.compiler_fault
def test_a_compiler_fault_is_counted_and_the_interpreter_serves(monkeypatch):
    broken_ir(monkeypatch)
    settings = Settings(port=0, metrics_port=free_port(), entry_point_helpers=False, engine="jit")
    with serve_in_thread(settings) as running, Client(running.address, timeout=10) as client:
        module = client.load(SUM)
        deadline = time.monotonic() + 30
        while compile_count(running.metrics_port) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        samples = scrape_metrics(running.metrics_port)
        result = client.execute(module, args=[1000])
    for tier in ("quick", "optimized"):
        labels = frozenset({("tier", tier), ("reason", "compiler_error")})
        assert samples[("bpfexec_jit_fallbacks_total", labels)] == 1
    assert result.return_value == 500500
