"""`bpfexec serve --workers 2` as a process: two servers on one port, one /metrics.

Every client below opens its own connection, so the kernel spreads them over
both workers (SO_REUSEPORT); the parent's /metrics must then count every
execution exactly once, and SIGTERM to the parent must stop every worker.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import free_port, wait_until

from client._pb.bpfexec.v1 import executor_pb2, executor_pb2_grpc
from client.cli_remote import check_health

ROOT = Path(__file__).resolve().parent.parent
ADD_ONE = b"r0 = r1\nr0 += 1\nexit\n"
CONNECTIONS = 16  # all on one worker by chance: 2**-15
RUNS_PER_CONNECTION = 5


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


@pytest.mark.skipif(sys.platform != "linux", reason="SO_REUSEPORT load balancing is Linux's")
def test_two_workers_share_the_port_and_sum_their_metrics(tmp_path: Path) -> None:
    port, metrics_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BPFEXEC_")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    command = [
        sys.executable, "-m", "client.cli", "serve", "--workers", "2", "--host", "127.0.0.1",
        "--port", str(port), "--metrics-port", str(metrics_port), "--no-entry-point-helpers",
    ]  # fmt: skip
    output = tmp_path / "serve.log"
    with output.open("w") as sink:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=sink, stderr=sink)
    try:
        address = f"127.0.0.1:{port}"
        wait_until(lambda: check_health(address, timeout=0.5) == "SERVING", timeout=30)
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
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
