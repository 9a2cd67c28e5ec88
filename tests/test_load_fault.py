"""Load and fault tests: a real `bpfexec serve` process on free localhost ports.

Each test starts the server as a subprocess (so its memory is its own, read
from /proc, and signals are real), drives it over gRPC and scrapes its metrics
over HTTP: sustained concurrent executions, clients killed in the middle of
remote helper calls, a flood of malformed uploads, overload, and SIGTERM with
work in flight. They are the short versions, bounded in count and time;
`bench/bench_load.py` runs the long ones and prints their figures
(docs/hardening.md, "Load and fault tests").
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from server_process import (
    ADD_ONE,
    BLOCKED_CLIENT,
    CALL_THEN_COUNT,
    COUNT_TO_R1,
    NEVER_ENDS,
    ROOT,
    TIMEOUT,
    ServerProcess,
    malformed_modules,
    percentile,
)
from support import FOREVER, wait_until

from bpfexec._pb.bpfexec.v1 import executor_pb2 as pb
from bpfexec._pb.bpfexec.v1 import executor_pb2_grpc as pb_grpc
from bpfexec.client.cli_remote import check_health
from bpfexec.client.client import Client
from bpfexec.client.errors import BpfexecError, ResourceExhausted, Unavailable
from bpfexec.server.app import serve_in_thread
from bpfexec.server.settings import Settings
from bpfexec.vm.machine import available_engines

pytestmark = pytest.mark.skipif(
    sys.platform != "linux", reason="reads /proc/PID/status and sends POSIX signals"
)

OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]  # a client's own TCP connection


@contextmanager
def server_process(tmp_path: Path, *flags: str) -> Iterator[ServerProcess]:
    server = ServerProcess(tmp_path / "server.log", *flags)
    try:
        yield server
    except BaseException:
        print(f"--- end of the server's log ---\n{server.output()}")  # shown for a failed test
        raise
    finally:
        server.kill()


# Sustained concurrent executions


def test_sustained_concurrent_executions(tmp_path: Path) -> None:
    """16 client threads, 4000 executions after a warm-up: every result right, no error,
    and the server's resident memory grows by less than 8 MiB over the measured run."""
    threads, warm_up, measured = 16, 800, 4000
    with server_process(tmp_path) as server:
        with Client(server.address, timeout=TIMEOUT) as client:
            add_one, count = client.load(ADD_ONE), client.load(COUNT_TO_R1)
        server.wait_for_jit(2)
        local, clients = threading.local(), []

        def execute(i: int) -> tuple[bool, float]:
            if not hasattr(local, "client"):  # one connection per client thread
                local.client = Client(server.address, timeout=TIMEOUT, options=OWN_CONNECTION)
                clients.append(local.client)
            start = time.perf_counter()
            if i % 2:
                ok = local.client.execute(add_one, args=[i]).return_value == i + 1
            else:  # beyond the inline slice: runs on the execution pool
                n = 2000 + i % 100
                ok = local.client.execute(count, args=[n]).return_value == n
            return ok, time.perf_counter() - start

        with ThreadPoolExecutor(threads) as pool:
            assert all(ok for ok, _ in pool.map(execute, range(warm_up), timeout=60))
            rss_start = server.rss_kib()
            start = time.perf_counter()
            outcomes = list(pool.map(execute, range(measured), timeout=60))
            seconds = time.perf_counter() - start
            rss_end = server.rss_kib()
        for client in clients:
            client.close()
        assert all(ok for ok, _ in outcomes)  # any error would have raised above
        latencies = [latency for _, latency in outcomes]
        p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
        print(
            f"\n{measured} executions, {threads} threads: {measured / seconds:,.0f}/s, "
            f"p50 {p50 * 1e3:.2f} ms, p99 {p99 * 1e3:.2f} ms, "
            f"RSS {rss_start / 1024:.1f} -> {rss_end / 1024:.1f} MiB"
        )
        assert p50 <= p99 < 2.0
        assert rss_end - rss_start < 8 * 1024, server.output()
        assert server.metric("bpfexec_executions_in_flight") == 0


# Clients killed in the middle of remote helper calls


def test_killed_clients_free_their_executions(tmp_path: Path) -> None:
    """Client processes blocked inside a remote helper are SIGKILLed: within a second
    the server has stopped their programs and released their calls, and it goes on
    answering correctly."""
    clients, rounds = 3, 2
    flags = ("--max-concurrent-executions", "4", "--remote-helper-timeout", "60")
    with (
        server_process(tmp_path, *flags) as server,
        Client(server.address, timeout=TIMEOUT) as client,
    ):
        module = client.load(CALL_THEN_COUNT)
        for _ in range(rounds):
            children = [
                subprocess.Popen(
                    [sys.executable, "-c", BLOCKED_CLIENT, server.address, module.id],
                    cwd=ROOT,
                    stdout=subprocess.PIPE,
                    text=True,
                )
                for _ in range(clients)
            ]
            try:
                for child in children:  # each is now inside its helper call
                    assert child.stdout is not None and child.stdout.readline() == "in-helper\n"
                assert server.metric("bpfexec_executions_in_flight") == clients
                assert server.metric("bpfexec_requests_in_progress") == clients
                killed = time.monotonic()
                for child in children:
                    child.kill()

                def freed() -> bool:
                    samples = server.samples()
                    return all(
                        samples[(name, frozenset())] == 0
                        for name in ("bpfexec_executions_in_flight", "bpfexec_requests_in_progress")
                    )

                wait_until(freed, timeout=5)
                assert time.monotonic() - killed < 1.0
            finally:
                for child in children:
                    child.kill()
                    child.wait(TIMEOUT)
            assert server.alive(), server.output()
            # Still serving, streams included.
            result = client.execute(module, helpers={100: lambda call, *registers: 0})
            assert (result.return_value, result.trap) == (100_000, None)
            assert client.execute(client.load(ADD_ONE), args=[41]).return_value == 42
        # Every killed stream ended as a cancellation (or, if the server saw the
        # client's side close first, the helper error of a half-closed stream),
        # never as an UNKNOWN status (a server bug).
        samples = server.samples()
        stopped = sum(
            samples.get(("bpfexec_executions_total", frozenset({("outcome", kind)})), 0)
            for kind in ("CANCELLED", "HELPER_ERROR")
        )
        assert stopped == clients * rounds
        unknown = frozenset({
            ("grpc_type", "bidi_stream"), ("grpc_service", "bpfexec.v1.Executor"),
            ("grpc_method", "ExecuteStream"), ("grpc_code", "UNKNOWN"),
        })  # fmt: skip
        assert samples.get(("grpc_server_handled_total", unknown), 0) == 0
        assert server.alive(), server.output()


# A flood of malformed uploads


def test_a_flood_of_malformed_uploads(tmp_path: Path) -> None:
    """400 malformed uploads in flight at once: each is INVALID_ARGUMENT with a one-line
    message and the INVALID_MODULE reason; the modules loaded before are untouched."""
    flood = malformed_modules(400)
    with server_process(tmp_path) as server, Client(server.address, timeout=TIMEOUT) as client:
        good = [client.load(ADD_ONE, "add-one"), client.load(COUNT_TO_R1, "count")]
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.ExecutorStub(channel)
            calls = [
                stub.LoadModule.future(pb.LoadModuleRequest(code=code), timeout=TIMEOUT * 2)
                for code in flood
            ]
            codes: Counter[str] = Counter()
            for call in calls:
                error = call.exception()
                assert isinstance(error, grpc.Call), "a malformed module was accepted"
                codes[error.code().name] += 1
                message = error.details()
                assert message and "\n" not in message, repr(message)
                status, info = rpc_status.from_call(error), error_details_pb2.ErrorInfo()
                assert status is not None and status.details[0].Unpack(info)
                assert info.reason == "INVALID_MODULE"
        assert codes == {"INVALID_ARGUMENT": len(flood)}
        assert server.alive(), server.output()
        assert sorted(m.id for m in client.list_modules()) == sorted(m.id for m in good)
        assert client.execute(good[0], args=[41]).return_value == 42
        assert client.execute(good[1], args=[5000]).return_value == 5000
        assert client.get_module(good[0].id).name == "add-one"


# Overload


@pytest.mark.parametrize("engine", available_engines())
def test_overload_refuses_the_excess_promptly(tmp_path: Path, engine: str) -> None:
    """With room for 2 executions, 12 more arrive while 2 long ones run: each of the
    12 is refused with RESOURCE_EXHAUSTED within a second, health checks answer
    within a second throughout, and the 2 admitted runs finish with the right result.
    On the interpreter the running programs hold the GIL most of the time."""
    excess = 12
    flags = ("--max-concurrent-executions", "2", "--max-fuel", str(NEVER_ENDS))
    with (
        server_process(tmp_path, "--engine", engine, *flags) as server,
        Client(server.address, timeout=TIMEOUT) as client,
    ):
        module = client.load(COUNT_TO_R1)
        server.wait_for_jit(1, engine)
        # Long enough to outlast the refusals: about 2 s, whatever the engine's speed.
        probe = 10**8 if engine == "jit" else 2 * 10**5
        start = time.perf_counter()
        assert client.execute(module, args=[probe], fuel=NEVER_ENDS).return_value == probe
        n = int(probe * 2.0 / (time.perf_counter() - start))

        health: list[tuple[str, float]] = []
        overloaded = threading.Event()

        def probe_health() -> None:
            while not overloaded.is_set():
                begin = time.perf_counter()
                status = check_health(server.address, timeout=TIMEOUT)
                health.append((status, time.perf_counter() - begin))
                time.sleep(0.02)

        def attempt(_: int) -> tuple[str, float]:
            begin = time.perf_counter()
            try:
                result = client.execute(module, args=[n], fuel=NEVER_ENDS, timeout=60)
            except BpfexecError as error:
                return error.code.name, time.perf_counter() - begin
            return ("OK" if result.return_value == n else "WRONG"), time.perf_counter() - begin

        with ThreadPoolExecutor(2 + excess) as pool:
            admitted = [pool.submit(attempt, i) for i in range(2)]
            wait_until(lambda: server.metric("bpfexec_executions_in_flight") == 2, TIMEOUT)
            prober = threading.Thread(target=probe_health)
            prober.start()
            try:
                refused = list(pool.map(attempt, range(excess), timeout=TIMEOUT))
                time.sleep(0.2)  # a few more probes while the admitted runs go on
            finally:
                overloaded.set()
                prober.join(TIMEOUT)
            finished = [future.result(timeout=60) for future in admitted]
        assert [code for code, _ in refused] == ["RESOURCE_EXHAUSTED"] * excess
        assert max(seconds for _, seconds in refused) < 1.0
        assert [code for code, _ in finished] == ["OK", "OK"]
        assert health and {status for status, _ in health} == {"SERVING"}
        assert max(seconds for _, seconds in health) < 1.0
        assert server.metric("bpfexec_executions_rejected_total") == excess


def test_calls_beyond_max_concurrent_requests_are_refused() -> None:
    """Streams that never send their first message hold calls, not executions: past
    --max-concurrent-requests the next call is refused at once, health stays open,
    and the calls are released when the streams go."""
    config = Settings(port=0, metrics_port=0, entry_point_helpers=False, max_concurrent_requests=4)
    with (
        serve_in_thread(config) as running,
        grpc.insecure_channel(running.address) as channel,
        Client(running.address, timeout=TIMEOUT) as client,
    ):
        module = client.load(ADD_ONE)
        stub = pb_grpc.ExecutorStub(channel)
        silent = threading.Event()

        def nothing() -> Iterator[pb.ExecuteStreamRequest]:
            silent.wait(TIMEOUT)
            yield from ()

        idle = [stub.ExecuteStream(nothing(), timeout=TIMEOUT) for _ in range(4)]
        try:
            wait_until(lambda: running.metrics.requests_in_progress._value.get() == 4)
            start = time.monotonic()
            with pytest.raises(ResourceExhausted) as caught:
                client.execute(module, args=[1])
            assert time.monotonic() - start < 1.0
            assert str(caught.value) == (
                "the server is already handling its maximum of 4 concurrent requests "
                "(max_concurrent_requests): retry later or on another replica"
            )
            assert caught.value.reason == "TOO_MANY_REQUESTS"
            assert check_health(running.address) == "SERVING"
        finally:
            silent.set()
            for call in idle:
                call.cancel()
        wait_until(lambda: running.metrics.requests_in_progress._value.get() == 0)
        assert client.execute(module, args=[1]).return_value == 2


def test_settings_reject_a_request_limit_below_one() -> None:
    with pytest.raises(ValueError, match="max_concurrent_requests must be at least 1"):
        Settings(max_concurrent_requests=0)
    assert (
        Settings.from_args(None, {"BPFEXEC_MAX_CONCURRENT_REQUESTS": "7"}).max_concurrent_requests
        == 7
    )


# SIGTERM with work in flight


def test_sigterm_with_work_in_flight(tmp_path: Path) -> None:
    """SIGTERM while uploads and executions are in flight, grace period 4 s: the runs
    that fit in the grace period finish with their result, the one that never ends is
    cancelled with UNAVAILABLE, later calls get UNAVAILABLE, the process exits 0 within
    the grace period plus 3 s, and every upload answered OK is there after a restart."""
    store, grace = tmp_path / "store", 4.0
    flags = (
        "--store", str(store), "--grace-period", str(grace), "--engine", "interpreter",
        "--max-fuel", str(NEVER_ENDS),
    )  # fmt: skip
    uploaded: list[str] = []
    upload_errors: Counter[str] = Counter()
    outcomes: dict[str, str] = {}
    stop = threading.Event()
    with server_process(tmp_path, *flags) as server:
        with Client(server.address, timeout=TIMEOUT) as client:
            count, forever = client.load(COUNT_TO_R1), client.load(FOREVER)

        def upload(worker: int) -> None:
            with Client(server.address, timeout=TIMEOUT) as own:
                for n in range(10**6):
                    if stop.is_set():
                        return
                    try:
                        uploaded.append(own.load(f"r0 = {worker}\nr0 += {n}\nexit\n".encode()).id)
                    except BpfexecError as error:
                        upload_errors[error.code.name] += 1
                        if isinstance(error, Unavailable):
                            return

        def run(name: str) -> None:
            with Client(server.address, timeout=60) as own:
                try:
                    if name == "forever":
                        own.execute(forever, fuel=NEVER_ENDS)
                        outcomes[name] = "finished"
                    else:  # about half a second alone, a few seconds shared
                        ok = own.execute(count, args=[10**6]).return_value == 10**6
                        outcomes[name] = "OK" if ok else "WRONG"
                except BpfexecError as error:
                    outcomes[name] = type(error).__name__

        workers = [threading.Thread(target=upload, args=(i,)) for i in range(3)]
        workers += [threading.Thread(target=run, args=(name,)) for name in ("a", "b", "forever")]
        for worker in workers:
            worker.start()
        try:
            wait_until(lambda: server.metric("bpfexec_executions_in_flight") == 3, TIMEOUT)
            wait_until(lambda: len(uploaded) >= 3, TIMEOUT)
            server.process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            assert server.process.wait(grace + 10) == 0, server.output()
            exited = time.monotonic() - signalled
        finally:
            stop.set()
            for worker in workers:
                worker.join(TIMEOUT)
        log = server.output()
    assert exited < grace + 3.0, log
    assert "shutting down" in log and "stopped" in log
    assert outcomes in (
        {"a": "OK", "b": "OK", "forever": "Unavailable"},
        {"a": "OK", "b": "OK", "forever": "Cancelled"},
    ), log
    assert set(upload_errors) <= {"UNAVAILABLE", "CANCELLED"}, upload_errors
    # Nothing accepted is lost: a restarted server on the same store has every module.
    restarted = Settings(port=0, metrics_port=0, entry_point_helpers=False, store=str(store))
    with serve_in_thread(restarted) as running, Client(running.address, timeout=TIMEOUT) as client:
        present = {module.id for module in client.list_modules()}
        assert set(uploaded) <= present
        assert {count.id, forever.id} <= present
        assert client.execute(uploaded[-1]).trap is None
