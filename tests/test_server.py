"""The gRPC service end to end: a real server on a free localhost port, the real client.

Programs are assembly text; each test says what it sends and what it expects
back, as a result or as a status code with its message.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from support import FOREVER, Samples, free_port, scrape_metrics, wait_until

from bpfexec.client.cli_remote import check_health
from bpfexec.client.client import Client
from bpfexec.client.errors import (
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from bpfexec.server.app import RunningServer, serve_in_thread
from bpfexec.server.cache import estimate_bytes
from bpfexec.server.settings import Settings
from bpfexec.vm import Limits, load

ADD_ONE = b"r0 = r1\nr0 += 1\nexit\n"
COUNT_TO_R1 = b"r0 = 0\nloop:\nr0 += 1\nif r0 < r1 goto loop\nexit\n"
LOAD_NULL = b"r0 = *(u64 *)(r1 + 0)\nexit\n"
CALL_999 = b"call 999\nexit\n"
# bpf_trace_printk(fmt = buffer in r1, size in r2, r3, r4, r5)
PRINTK = b"call 6\nexit\n"

TIMEOUT = 10.0  # no single call of these tests may hang longer


# Fuel for programs that must outlive their deadline: days, even for native code.
NEVER_ENDS = 10**15


def settings(**changes: object) -> Settings:
    limits = Limits(max_fuel=NEVER_ENDS)
    base = Settings(port=0, metrics_port=0, entry_point_helpers=False, limits=limits)
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    limits = Limits(max_module_bytes=4096, max_buffer_bytes=1024, max_fuel=NEVER_ENDS)
    with serve_in_thread(settings(metrics_port=free_port(), limits=limits)) as running:
        yield running


@pytest.fixture
def client(server: RunningServer) -> Iterator[Client]:
    with Client(server.address, timeout=TIMEOUT) as c:
        yield c


def scrape(server: RunningServer) -> Samples:
    """Every sample of the metrics endpoint, fetched over HTTP like Prometheus does."""
    return scrape_metrics(server.metrics_port, TIMEOUT)


def sample(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def in_flight(server: RunningServer) -> float:
    return server.metrics.in_flight._value.get()


# Modules


def test_load_execute_list_delete(client: Client) -> None:
    module = client.load(ADD_ONE, "add_one.s")
    assert module.id.startswith("sha256:") and len(module.id) == 7 + 64
    assert [(f.name, f.pc, f.size, f.exported) for f in module.functions] == [("main", 0, 3, True)]
    assert (module.name, module.size, module.instruction_count) == ("add_one.s", 21, 3)

    assert client.execute(module, args=[41]).return_value == 42
    assert module.id in [m.id for m in client.list_modules()]
    assert client.get_module(module.id) == module

    client.delete_module(module)
    assert module.id not in [m.id for m in client.list_modules()]
    with pytest.raises(NotFound, match="upload it again"):
        client.execute(module.id, args=[1])


def test_loading_the_same_bytes_again_hits_the_cache(server: RunningServer, client: Client) -> None:
    before = scrape(server)
    first = client.load(b"r0 = 7\nexit\n")
    again = client.load(b"r0 = 7\nexit\n", "another name")
    after = scrape(server)
    assert again.id == first.id
    assert again.name == first.name  # the cached module, not a reload
    assert (
        sample(after, "bpfexec_module_cache_misses_total")
        - sample(before, "bpfexec_module_cache_misses_total")
        == 1
    )
    assert (
        sample(after, "bpfexec_module_cache_hits_total")
        - sample(before, "bpfexec_module_cache_hits_total")
        >= 1
    )


@pytest.mark.parametrize(
    "bounds",
    [
        {"cache_max_modules": 2},
        # Room for the estimated memory of 2 such modules (the interpreter: no native code).
        {"cache_max_bytes": 5 * estimate_bytes(load(b"r0 = 0\nexit\n")) // 2,
         "engine": "interpreter"},
    ],
)  # fmt: skip
def test_least_recently_used_modules_are_evicted(bounds: dict) -> None:
    with serve_in_thread(settings(**bounds)) as running, Client(running.address) as c:
        modules = [c.load(f"r0 = {n}\nexit\n".encode()) for n in range(3)]
        assert {m.size for m in modules} == {12}
        assert [m.id for m in c.list_modules()][-2:] == [m.id for m in modules[1:]]
        with pytest.raises(NotFound):
            c.get_module(modules[0].id)
        assert running.metrics.cache_evictions._value.get() == 1
        # A Module from load() survives eviction: the client uploads it again.
        assert c.execute(modules[0]).return_value == 0


# Results: what the program did, trap or not, is never a gRPC error.


@pytest.mark.parametrize(
    ("code", "args", "fuel", "return_value", "trap_kind", "message"),
    [
        (ADD_ONE, [-2], None, (1 << 64) - 1, None, ""),
        (COUNT_TO_R1, [5000], None, 5000, None, ""),  # longer than the inline slice
        (FOREVER, [], 1000, 0, "OUT_OF_FUEL", "fuel exhausted"),
        (LOAD_NULL, [0], None, 0, "MEMORY_FAULT", "unmapped address"),
    ],
)
def test_program_outcomes_are_results(
    client: Client, code, args, fuel, return_value, trap_kind, message
) -> None:
    result = client.execute(client.load(code), args=args, fuel=fuel)
    assert result.return_value == return_value
    if trap_kind is None:
        assert result.trap is None
    else:
        assert result.trap is not None
        assert (result.trap.kind, result.trap.function) == (trap_kind, "main")
        assert message in result.trap.message
        assert result.trap.instruction


def test_builtin_trace_printk_writes_the_log_and_buffers_come_back(client: Client) -> None:
    fmt = b"x=%d y=%llx s=%u\n\0"
    result = client.execute(client.load(PRINTK), args=[fmt, len(fmt), -5, 255, 7])
    assert result.trap is None
    assert result.log == ("x=-5 y=ff s=7",)
    assert result.buffers == (fmt,)


# Request problems: a gRPC status with a message a person can act on.


@pytest.mark.parametrize(
    ("request_", "error", "message", "reason"),
    [
        (("load", b"\x01\x02\x03"), InvalidArgument, "", "INVALID_MODULE"),
        (("load", b"r0 = \n"), InvalidArgument, "", "INVALID_MODULE"),
        (("load", b"r0 = 0\n" * 1000), ResourceExhausted, "4096", "LIMIT_EXCEEDED"),
        (("execute", ADD_ONE, {"function": "nope"}), InvalidArgument, "available: main",
         "INVALID_REQUEST"),
        (("execute", CALL_999, {}), InvalidArgument, "#999", "UNKNOWN_HELPER"),
        (("execute", ADD_ONE, {"args": [1] * 6}), InvalidArgument, "at most 5", "INVALID_REQUEST"),
        (("execute", ADD_ONE, {"fuel": NEVER_ENDS + 1}), ResourceExhausted,
         f"maximum of {NEVER_ENDS}", "LIMIT_EXCEEDED"),
        (("execute", ADD_ONE, {"args": [b"x" * 2000]}), ResourceExhausted, "1024",
         "LIMIT_EXCEEDED"),
        (("execute_id", "sha256:" + "0" * 64), NotFound, "upload it again", "MODULE_NOT_FOUND"),
        (("get", "sha256:" + "0" * 64), NotFound, "upload it again", "MODULE_NOT_FOUND"),
        (("delete", "nope"), NotFound, "not cached", "MODULE_NOT_FOUND"),
    ],
)  # fmt: skip
def test_request_problems_are_status_codes(client: Client, request_, error, message, reason):
    action, payload, *rest = request_
    with pytest.raises(error) as caught:
        if action == "load":
            client.load(payload)
        elif action == "execute":
            client.execute(client.load(payload), **rest[0])
        elif action == "execute_id":
            client.execute(payload)
        elif action == "get":
            client.get_module(payload)
        else:
            client.delete_module(payload)
    assert message in str(caught.value)
    assert caught.value.reason == reason


def test_missing_helper_message_names_the_helper_and_its_call_site(client: Client) -> None:
    with pytest.raises(InvalidArgument) as caught:
        client.execute(client.load(CALL_999))
    assert str(caught.value) == "unknown helper: #999 (called at pc 0 in main)"


def test_module_helpers_say_which_the_server_answers(client: Client) -> None:
    module = client.load(b"call 6\ncall 999\nexit\n")
    assert [(h.number, h.in_process) for h in module.helpers] == [(6, True), (999, False)]


def test_deadline_stops_a_never_ending_program(server: RunningServer, client: Client) -> None:
    """The client's deadline bounds the execution: the server interrupts the program
    and the call fails with DEADLINE_EXCEEDED (a result could not arrive in time anyway)."""
    module = client.load(FOREVER)
    start = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        client.execute(module, fuel=NEVER_ENDS, timeout=0.5)
    assert time.monotonic() - start < 2
    wait_until(lambda: in_flight(server) == 0, timeout=2)


def test_cancelled_call_stops_its_program(server: RunningServer) -> None:
    from bpfexec._pb.bpfexec.v1 import executor_pb2 as pb
    from bpfexec._pb.bpfexec.v1 import executor_pb2_grpc as pb_grpc

    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ExecutorStub(channel)
        module = stub.LoadModule(pb.LoadModuleRequest(code=FOREVER))
        call = stub.Execute.future(pb.ExecuteRequest(module_id=module.id, fuel=NEVER_ENDS))
        wait_until(lambda: in_flight(server) == 1)
        call.cancel()
        wait_until(lambda: in_flight(server) == 0, timeout=2)


def test_concurrency_limit_answers_resource_exhausted() -> None:
    limited = settings(max_concurrent_executions=1)
    with serve_in_thread(limited) as running, Client(running.address, timeout=TIMEOUT) as c:
        forever, quick = c.load(FOREVER), c.load(ADD_ONE)
        errors: list[Exception] = []

        def long_run() -> None:
            try:
                c.execute(forever, fuel=NEVER_ENDS, timeout=1.5)
            except Exception as exc:
                errors.append(exc)

        runner = threading.Thread(target=long_run)
        runner.start()
        wait_until(lambda: in_flight(running) == 1)
        with pytest.raises(ResourceExhausted, match="maximum of 1 concurrent executions"):
            c.execute(quick, args=[1])
        # The event loop is not stalled by the running program.
        start = time.monotonic()
        c.list_modules()
        assert time.monotonic() - start < 0.5
        runner.join(TIMEOUT)
        assert [type(e) for e in errors] == [DeadlineExceeded]
        wait_until(lambda: in_flight(running) == 0)
        assert c.execute(quick, args=[1]).return_value == 2


# Standard services


def test_health_is_serving(server: RunningServer) -> None:
    assert check_health(server.address) == "SERVING"
    with grpc.insecure_channel(server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(
            health_pb2.HealthCheckRequest(service="bpfexec.v1.Executor"), timeout=TIMEOUT
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert check_health(f"127.0.0.1:{free_port()}", timeout=0.5).startswith("unhealthy")


def test_reflection_lists_the_executor(server: RunningServer) -> None:
    with grpc.insecure_channel(server.address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        assert "bpfexec.v1.Executor" in database.get_services()
        file = database.FindFileContainingSymbol("bpfexec.v1.Executor")
    assert file.name == "bpfexec/v1/executor.proto"
    assert "Execute" in [method.name for method in file.service[0].method]


def test_metrics_move(server: RunningServer, client: Client) -> None:
    module = client.load(PRINTK)
    before = scrape(server)
    printed = client.execute(module, args=[b"hi\0", 3])
    starved = client.execute(client.load(FOREVER), fuel=100)
    with pytest.raises(NotFound):
        client.get_module("sha256:" + "1" * 64)
    # An aborted call's status reaches the client before the server's interceptor
    # has counted it: wait (boundedly) for the last count to land.
    not_found = ("grpc_server_handled_total", frozenset({
        ("grpc_type", "unary"), ("grpc_service", "bpfexec.v1.Executor"),
        ("grpc_method", "GetModule"), ("grpc_code", "NOT_FOUND"),
    }))  # fmt: skip
    deadline = time.monotonic() + TIMEOUT
    after = scrape(server)
    while after.get(not_found, 0) == before.get(not_found, 0) and time.monotonic() < deadline:
        time.sleep(0.01)
        after = scrape(server)

    def moved(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert moved("bpfexec_executions_total", outcome="OK") == 1
    assert moved("bpfexec_executions_total", outcome="OUT_OF_FUEL") == 1
    assert moved("bpfexec_execution_seconds_count") == 2
    assert moved("bpfexec_fuel_used_sum") == printed.fuel_used + starved.fuel_used > 90
    assert moved("bpfexec_helper_calls_total", helper="bpf_trace_printk", location="inprocess") == 1
    assert moved("bpfexec_module_cache_misses_total") >= 1
    assert sample(after, "bpfexec_executions_in_flight") == 0
    assert sample(after, "bpfexec_modules_cached") >= 2
    assert sample(after, "bpfexec_module_cache_bytes") > 0
    grpc_labels = {"grpc_type": "unary", "grpc_service": "bpfexec.v1.Executor"}
    assert moved("grpc_server_started_total", grpc_method="Execute", **grpc_labels) == 2
    assert (
        moved("grpc_server_handled_total", grpc_method="Execute", grpc_code="OK", **grpc_labels)
        == 2
    )
    assert (
        moved(
            "grpc_server_handled_total",
            grpc_method="GetModule",
            grpc_code="NOT_FOUND",
            **grpc_labels,
        )
        == 1
    )
    assert moved("grpc_server_handling_seconds_count", grpc_method="Execute", **grpc_labels) == 2
