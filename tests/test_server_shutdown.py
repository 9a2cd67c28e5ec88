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

from client.cli_remote import check_health
from client.client import Client
from client.types import Result

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
    command = [sys.executable, "-m", "client.cli", "serve", "--metrics-port", str(metrics_port)]
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
