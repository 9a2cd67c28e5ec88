"""`bpfexec serve --workers 2` as a process: two servers on one port, one /metrics.

Every client below opens its own connection, so the kernel spreads them over
both workers (SO_REUSEPORT); the parent's /metrics must then count every
execution exactly once, SIGTERM to the parent must stop every worker, and the
workers must log in the parent's `--log-format`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import free_port, wait_until

from bpfexec._pb.bpfexec.v1 import executor_pb2, executor_pb2_grpc
from bpfexec.client.cli_remote import check_health

ROOT = Path(__file__).resolve().parent.parent
ADD_ONE = b"r0 = r1\nr0 += 1\nexit\n"
CONNECTIONS = 16  # all on one worker by chance: 2**-15
RUNS_PER_CONNECTION = 5
SERVING = "serving bpfexec.v1.Executor on "  # what each worker logs once it listens
LOG = "serve.log"  # the server's stdout and stderr


def metric_values(metrics_port: int) -> dict[str, float]:
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as reply:
        text = reply.read().decode()
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.labels or sample.labels == {"outcome": "OK"}
    }


def run_on_own_connection(address: str, code: bytes, runs: int) -> list[int]:
    # A local subchannel pool: a new TCP connection per channel, not a shared one.
    options = [("grpc.use_local_subchannel_pool", 1)]
    with grpc.insecure_channel(address, options=options) as channel:
        stub = executor_pb2_grpc.ExecutorStub(channel)
        module = stub.LoadModule(executor_pb2.LoadModuleRequest(code=code), timeout=10)
        request = executor_pb2.ExecuteRequest(
            module_id=module.id, args=[executor_pb2.Argument(value=41)]
        )
        return [stub.Execute(request, timeout=10).return_value for _ in range(runs)]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@contextmanager
def serve_workers(tmp_path: Path, *flags: str) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """`bpfexec serve --workers 2 FLAGS...` on a free port; its output goes to `tmp_path/LOG`.

    Yields once both workers serve (health answers as soon as one does, and
    until the other listens the kernel gives it no connection), then stops it.
    """
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BPFEXEC_")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    command = [
        sys.executable, "-m", "bpfexec.client.cli", "serve", "--workers", "2",
        "--host", "127.0.0.1",
        "--port", str(port), "--no-entry-point-helpers", *flags,
    ]  # fmt: skip
    with (tmp_path / LOG).open("w") as sink:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=sink, stderr=sink)
    try:
        address = f"127.0.0.1:{port}"
        wait_until(lambda: len(serving_workers(tmp_path / LOG)) == 2, timeout=60)
        assert check_health(address, timeout=5) == "SERVING"
        yield process, address
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def serving_workers(log: Path) -> list[str]:
    """The lines in which a worker said it serves, text or JSON."""
    return [line for line in log.read_text().splitlines() if SERVING in line]


@pytest.mark.skipif(sys.platform != "linux", reason="SO_REUSEPORT load balancing is Linux's")
def test_two_workers_share_the_port_and_sum_their_metrics(tmp_path: Path) -> None:
    metrics_port = free_port()
    output = tmp_path / LOG
    with serve_workers(tmp_path, "--metrics-port", str(metrics_port)) as (process, address):
        started = re.findall(r"bpfexec-worker-\d \(pid (\d+)\)", output.read_text())
        worker_pids = [int(pid) for pid in started]
        assert len(worker_pids) == 2, output.read_text()

        for _ in range(CONNECTIONS):
            assert run_on_own_connection(address, ADD_ONE, RUNS_PER_CONNECTION) == [42] * 5

        values = metric_values(metrics_port)
        assert values["bpfexec_executions_total"] == CONNECTIONS * RUNS_PER_CONNECTION
        # Each worker caches its own copy of the module: the gauge sums both.
        assert values["bpfexec_modules_cached"] == 2

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, output.read_text()
        assert not any(alive(pid) for pid in worker_pids)


@pytest.mark.skipif(sys.platform != "linux", reason="SO_REUSEPORT load balancing is Linux's")
def test_workers_log_json_lines_like_the_parent(tmp_path: Path) -> None:
    """`--log-format json` reaches the workers: every line on stderr is a JSON object."""
    output = tmp_path / LOG
    flags = ("--metrics-port", "0", "--log-format", "json")
    with serve_workers(tmp_path, *flags) as (process, address):
        for _ in range(CONNECTIONS):  # a LoadModule and an Execute each
            assert run_on_own_connection(address, ADD_ONE, 1) == [42]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, output.read_text()

    lines = output.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line, the parent's and the workers'
    assert sum(SERVING in record["message"] for record in records) == 2
    requests = [record for record in records if record["logger"] == "bpfexec.requests"]
    assert len(requests) == 2 * CONNECTIONS
    assert sorted(record["method"] for record in requests) == sorted(
        ["LoadModule", "Execute"] * CONNECTIONS
    )
    module_id = requests[0]["module"]
    for record in requests:
        assert record["level"] == "INFO" and record["outcome"] == "OK"
        assert record["module"] == module_id and str(module_id).startswith("sha256:")
        assert isinstance(record["duration_ms"], float)
        assert str(record["peer"]).startswith("ipv4:127.0.0.1:")
        assert record["message"].startswith(record["method"] + " ")
    assert {record["fuel"] for record in requests if record["method"] == "Execute"} == {3}
