"""`bpfexec serve` as a process: configured by flags and BPFEXEC_* variables, and
SIGTERM lets an in-flight execution finish before the process exits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest
from support import free_port, wait_until

from bpfexec.client.cli_remote import check_health
from bpfexec.client.client import Client
from bpfexec.client.types import Result

ROOT = Path(__file__).resolve().parent.parent
COUNT_TO_R1 = b"r0 = 0\nloop:\nr0 += 1\nif r0 < r1 goto loop\nexit\n"


def in_flight(metrics_port: int) -> float:
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith("bpfexec_executions_in_flight "):
                return float(line.split()[1])
    return -1.0


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM")
def test_sigterm_lets_the_in_flight_execution_finish() -> None:
    port, metrics_port = free_port(), free_port()
    env = {
        **os.environ,
        "BPFEXEC_PORT": str(port),  # from the environment...
        "BPFEXEC_METRICS_PORT": "1",  # ...unless a flag says otherwise
        "BPFEXEC_GRACE_PERIOD": "20",
        # The interpreter: its run time is predictable (the JIT's quick tier may be
        # ready in milliseconds and finish the run before SIGTERM is sent).
        "BPFEXEC_ENGINE": "interpreter",
    }
    command = [
        sys.executable,
        "-m",
        "bpfexec.client.cli",
        "serve",
        "--metrics-port",
        str(metrics_port),
    ]
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        address = f"127.0.0.1:{port}"
        wait_until(lambda: check_health(address, timeout=0.5) == "SERVING", timeout=20)
        results: list[Result] = []
        with Client(address, timeout=30) as client:
            module = client.load(COUNT_TO_R1)
            # Long enough to be in flight when SIGTERM arrives, well within the grace period.
            runner = threading.Thread(
                target=lambda: results.append(client.execute(module, args=[1_500_000]))
            )
            runner.start()
            wait_until(lambda: in_flight(metrics_port) == 1, timeout=10)
            process.send_signal(signal.SIGTERM)
            runner.join(30)
        assert [(r.return_value, r.trap) for r in results] == [(1_500_000, None)]
        output, _ = process.communicate(timeout=30)
        assert process.returncode == 0, output
        assert "shutting down" in output
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize("busy", ["grpc", "metrics"])
def test_a_busy_port_is_one_line_and_never_shared(tmp_path: Path, busy: str) -> None:
    # A second server on a busy port must neither share it (SO_REUSEPORT, gRPC's
    # default on Linux, would split the connections between the two) nor end in a
    # traceback: one line naming the address, exit status 2.
    from server_process import ServerProcess

    first = ServerProcess(tmp_path / "first.log", "--engine", "interpreter")
    try:
        port = first.port if busy == "grpc" else free_port()
        metrics_port = first.metrics_port if busy == "metrics" else 0
        proc = subprocess.run(
            [sys.executable, "-m", "bpfexec.client.cli", "serve", "--port", str(port),
             "--metrics-port", str(metrics_port), "--no-entry-point-helpers"],
            capture_output=True, text=True, timeout=60, cwd=ROOT,
        )  # fmt: skip
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        busy_port = first.port if busy == "grpc" else first.metrics_port
        assert len(lines) == 1 and f"cannot listen on 127.0.0.1:{busy_port}" in lines[0], lines
        assert "Traceback" not in proc.stderr
        assert check_health(first.address, timeout=5) == "SERVING"  # the first one serves on
        assert "with the interpreter engine" in first.output()  # the start-up line says which
    finally:
        first.kill()
