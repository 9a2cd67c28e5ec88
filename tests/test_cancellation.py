"""A client deadline or cancellation stops a never-ending program within 100 ms, on every engine.

The program loops forever with the largest fuel budget the server allows (ten
billion instructions: seconds of native code, hours of interpretation), so
only the interrupt can stop it. Measured on a real server on localhost, one
per engine: the call returns, and the server's in-flight gauge (the worker
thread has left the VM) is back to 0, within the deadline plus 100 ms.

A JIT server compiles an uploaded module in the background and serves it with
the interpreter meanwhile, so the tests wait for the compilation to finish
(`bpfexec_jit_compile_seconds` has counted it and the module has native code)
before running it: the interrupt must stop native code, not the interpreter.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import pytest
from support import FOREVER, wait_until

from bpfexec._pb.bpfexec.v1 import executor_pb2 as pb
from bpfexec._pb.bpfexec.v1 import executor_pb2_grpc as pb_grpc
from bpfexec.client.client import Client
from bpfexec.client.errors import DeadlineExceeded
from bpfexec.server.app import RunningServer, serve_in_thread
from bpfexec.server.settings import Settings
from bpfexec.vm import Limits
from bpfexec.vm.machine import available_engines

FUEL = Limits().max_fuel
DEADLINE = 0.3
SLACK = 0.1  # the promise: stopped within 100 ms of the deadline or the cancellation
COMPILE_TIMEOUT = 60.0  # a generous bound on compiling three instructions on a busy machine


@pytest.fixture(scope="module", params=available_engines())
def server(request: pytest.FixtureRequest) -> Iterator[RunningServer]:
    settings = Settings(
        port=0, metrics_port=0, entry_point_helpers=False, engine=request.param, grace_period=0
    )
    with serve_in_thread(settings) as running:
        yield running


@pytest.fixture(scope="module")
def module_id(server: RunningServer) -> str:
    """FOREVER, uploaded; on the JIT, once its native code is what the server runs."""
    with Client(server.address, timeout=10) as client:
        module = client.load(FOREVER)
    if server.settings.engine == "jit":
        wait_until(lambda: modules_compiled(server) == 1, timeout=COMPILE_TIMEOUT)
        cached = server.service.cache.get(module.id)
        assert cached is not None
        native = cached.program.compiled["jit"]
        assert native.native, f"the JIT fell back to the interpreter: {native.fallback}"
    return module.id


def modules_compiled(server: RunningServer) -> float:
    """How many compilations to native code the server has finished."""
    count = server.metrics.registry.get_sample_value("bpfexec_jit_compile_seconds_count")
    return count or 0.0


def in_flight(server: RunningServer) -> float:
    return float(server.metrics.in_flight._value.get())


def stopped_at(server: RunningServer, limit: float) -> float:
    """When (monotonic) the in-flight gauge reached 0, polling until `limit`."""
    while in_flight(server) != 0 and time.monotonic() < limit:
        time.sleep(0.001)
    return time.monotonic()


@pytest.mark.parametrize("attempt", range(3))
def test_a_deadline_stops_the_program_within_100_ms(
    server: RunningServer, module_id: str, attempt: int
) -> None:
    with Client(server.address) as client:
        start = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            client.execute(module_id, fuel=FUEL, timeout=DEADLINE)
        returned = time.monotonic()
        stopped = stopped_at(server, start + 5)
    assert returned - start < DEADLINE + SLACK, f"returned {returned - start - DEADLINE:.3f} s late"
    assert stopped - start < DEADLINE + SLACK, f"still running {stopped - start - DEADLINE:.3f} s"


def test_a_cancelled_call_stops_the_program_within_100_ms(
    server: RunningServer, module_id: str
) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ExecutorStub(channel)
        call = stub.Execute.future(pb.ExecuteRequest(module_id=module_id, fuel=FUEL), timeout=30)
        limit = time.monotonic() + 5
        while in_flight(server) != 1:
            assert time.monotonic() < limit, "the execution never started"
            time.sleep(0.001)
        cancelled = time.monotonic()
        call.cancel()
        stopped = stopped_at(server, cancelled + 5)
    assert stopped - cancelled < SLACK, f"still running {stopped - cancelled:.3f} s after cancel"
