"""A client deadline or cancellation stops a never-ending program within 100 ms.

The program loops forever with a fuel budget of a billion instructions (minutes
of interpretation), so only the interrupt can stop it. Measured on a real
server on localhost: the call returns, and the server's in-flight gauge (the
worker thread has left the VM) is back to 0, within the deadline plus 100 ms.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator

import grpc
import pytest

from client._pb.bpfexec.v1 import executor_pb2 as pb
from client._pb.bpfexec.v1 import executor_pb2_grpc as pb_grpc
from client.client import Client
from client.errors import DeadlineExceeded
from server.app import RunningServer, serve_in_thread
from server.settings import Settings

FOREVER = b"r0 = 0\nloop:\nr0 += 1\ngoto loop\n"
FUEL = 10**9
DEADLINE = 0.3
SLACK = 0.1  # the promise: stopped within 100 ms of the deadline or the cancellation


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    base = Settings(port=0, metrics_port=0, entry_point_helpers=False, engine="interpreter")
    with serve_in_thread(dataclasses.replace(base, grace_period=0)) as running:
        yield running


def in_flight(server: RunningServer) -> float:
    return float(server.metrics.in_flight._value.get())


def stopped_at(server: RunningServer, limit: float) -> float:
    """When (monotonic) the in-flight gauge reached 0, polling until `limit`."""
    while in_flight(server) != 0 and time.monotonic() < limit:
        time.sleep(0.001)
    return time.monotonic()


@pytest.mark.parametrize("attempt", range(3))
def test_a_deadline_stops_the_program_within_100_ms(server: RunningServer, attempt: int) -> None:
    with Client(server.address) as client:
        module = client.load(FOREVER)
        start = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            client.execute(module, fuel=FUEL, timeout=DEADLINE)
        returned = time.monotonic()
        stopped = stopped_at(server, start + 5)
    assert returned - start < DEADLINE + SLACK
    assert stopped - start < DEADLINE + SLACK, f"still running {stopped - start - DEADLINE:.3f} s"


def test_a_cancelled_call_stops_the_program_within_100_ms(server: RunningServer) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ExecutorStub(channel)
        module = stub.LoadModule(pb.LoadModuleRequest(code=FOREVER), timeout=5)
        call = stub.Execute.future(pb.ExecuteRequest(module_id=module.id, fuel=FUEL), timeout=30)
        limit = time.monotonic() + 5
        while in_flight(server) != 1:
            assert time.monotonic() < limit, "the execution never started"
            time.sleep(0.001)
        cancelled = time.monotonic()
        call.cancel()
        stopped = stopped_at(server, cancelled + 5)
    assert stopped - cancelled < SLACK, f"still running {stopped - cancelled:.3f} s after cancel"
