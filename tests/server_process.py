"""`bpfexec serve` in a subprocess on free localhost ports, and the programs the
load tests run: shared by tests/test_load_fault.py and bench/bench_load.py.

A subprocess rather than a thread, so that the server's memory is its own (read
from /proc) and signals are real.
"""

from __future__ import annotations

import os
import random
import statistics
import subprocess
import sys
from pathlib import Path

from support import Samples, free_port, scrape_metrics, wait_until

from bpfexec.client.cli_remote import check_health
from bpfexec.vm.machine import available_engines

ROOT = Path(__file__).resolve().parent.parent
ENGINE = available_engines()[-1]  # the server's default: jit when llvmlite is installed
OBJECTS = ROOT / "tests" / "fixtures" / "obj"
TIMEOUT = 20.0  # no single call or wait of the load tests lasts longer

ADD_ONE = b"r0 = r1\nr0 += 1\nexit\n"
COUNT_TO_R1 = b"r0 = 0\nloop:\nr0 += 1\nif r0 < r1 goto loop\nexit\n"
# Calls helper #100 (answered by the client), then counts to 100000.
CALL_THEN_COUNT = b"call 100\nr0 = 0\nloop:\nr0 += 1\nif r0 < 100000 goto loop\nexit\n"
NEVER_ENDS = 10**15  # fuel for programs that must outlive their test

# A client process that blocks inside a remote helper until it is killed.
BLOCKED_CLIENT = """
import sys, time
from bpfexec.client.client import Client

def block(call, *registers):
    print("in-helper", flush=True)
    time.sleep(60)
    return 0

with Client(sys.argv[1], timeout=30) as client:
    client.execute(sys.argv[2], helpers={100: block})
"""


class ServerProcess:
    """`bpfexec serve` in a subprocess, its output in a file, killed on close."""

    def __init__(self, log: Path, *flags: str) -> None:
        self.port, self.metrics_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log = log
        command = [
            # -X faulthandler: a crash shows its traceback in the log
            sys.executable, "-X", "faulthandler", "-m", "bpfexec.client.cli", "serve",
            "--port", str(self.port), "--metrics-port", str(self.metrics_port),
            "--no-entry-point-helpers", *flags,
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("BPFEXEC_")}
        with open(log, "w") as output:  # a file, not a pipe nobody reads: logging never blocks
            self.process = subprocess.Popen(
                command, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT, env=env
            )
        try:
            wait_until(self._serving, timeout=TIMEOUT)
        except BaseException:
            self.kill()
            raise

    def _serving(self) -> bool:
        assert self.process.poll() is None, f"the server exited:\n{self.output()}"
        return check_health(self.address, timeout=0.5) == "SERVING"

    def rss_kib(self) -> int:
        with open(f"/proc/{self.process.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError("no VmRSS line")

    def samples(self) -> Samples:
        """Every sample of the metrics endpoint, fetched over HTTP like Prometheus does."""
        return scrape_metrics(self.metrics_port, TIMEOUT)

    def metric(self, name: str, **labels: str) -> float:
        return self.samples().get((name, frozenset(labels.items())), 0.0)

    def wait_for_jit(self, modules: int, engine: str = ENGINE, timeout: float = TIMEOUT) -> None:
        """Wait until the background JIT has compiled `modules` modules (if it is the engine)."""
        if engine == "jit":
            wait_until(
                lambda: self.metric("bpfexec_jit_compile_seconds_count") >= modules,
                timeout,
                "the JIT",
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def crash(self) -> str | None:
        """None while the server runs; else its exit status and the frame it crashed in."""
        if self.alive():
            return None
        lines = self.log.read_text(errors="replace").splitlines()
        current = [i for i, line in enumerate(lines) if line.startswith("Current thread")]
        frame = lines[current[-1] + 1].strip() if current and current[-1] + 1 < len(lines) else ""
        frame = frame.replace(f"{ROOT}{os.sep}", "")
        return f"exit status {self.process.returncode} {frame}".strip()

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(TIMEOUT)


def percentile(values: list[float], q: float) -> float:
    """The `q`-th percentile (0 < q < 100) of `values`, by linear interpolation."""
    return statistics.quantiles(values, n=1000, method="inclusive")[round(q * 10) - 1]


def malformed_modules(count: int, seed: int = 6) -> list[bytes]:
    """Random bytes, random 8-byte-aligned "bytecode", and truncated ELF objects."""
    rng = random.Random(seed)
    objects = [path.read_bytes() for path in sorted(OBJECTS.glob("*-O2.o"))]
    modules = []
    for i in range(count):
        if i % 3 == 0:
            modules.append(rng.randbytes(rng.randrange(1, 400)))
        elif i % 3 == 1:
            modules.append(rng.randbytes(8 * rng.randrange(1, 64)))
        else:
            whole = rng.choice(objects)
            modules.append(whole[: rng.randrange(len(whole))])
    return modules
