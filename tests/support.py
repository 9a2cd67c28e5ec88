"""Small helpers shared by the tests: test programs, free ports, bounded waits,
metrics, the request log, the JIT's loop analysis, a stand-in for a compiler bug."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import socket
import time
import urllib.request
from collections.abc import Callable, Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bpfexec.server.request_log import JsonFormatter
from bpfexec.vm.interpreter import Block, decode_blocks
from bpfexec.vm.jit import runtime
from bpfexec.vm.jit.unroll import Loop, unrollable_loops
from bpfexec.vm.liveness import reachable, successors
from bpfexec.vm.program import Program

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

# A loop that never ends and that no compiler can shorten: each round is a chain of
# dependent shifts and xors (xorshift64), so even unrolled native code runs about
# a billion rounds per second, and the largest default budget (ten billion fuel,
# ten instructions a round) lasts about a second. An interrupt has to stop it.
SPIN = """
    r0 = 1
loop:
    r2 = r0
    r2 <<= 13
    r0 ^= r2
    r2 = r0
    r2 >>= 7
    r0 ^= r2
    r2 = r0
    r2 <<= 17
    r0 ^= r2
    goto loop
"""
FOREVER = SPIN.encode()
SPIN_ENTRY_FUEL = 1  # fuel `SPIN` spends before its first backward jump: `r0 = 1` ...
SPIN_ROUND_FUEL = 10  # ... then each round of the loop

# A loop whose rounds cost 6 or 4 fuel (even or odd r0): the costliest path sets
# the fuel check of an unrolled group.
TWO_PATHS = """
    r0 = 0
loop:
    r0 += 1
    if r0 & 1 goto odd
    r0 += 2
    r0 += 2
odd:
    r1 -= 1
    if r1 != 0 goto loop
    exit
"""

# Binary recursion without a single backward jump: only calls are poll sites.
# fib(40) is about 3e8 calls, seconds of native work.
FIB = """
    call fib
    exit
fib:
    if r1 < 2 goto small
    r6 = r1
    r1 -= 1
    call fib
    r7 = r0
    r1 = r6
    r1 -= 2
    call fib
    r0 += r7
    exit
small:
    r0 = r1
    exit
"""


def inner_loops(
    program: Program,
) -> tuple[dict[int, Loop], list[Block | None], dict[int, list[int]]]:
    """The loops the optimized tier unrolls in code reachable from pc 0, with the
    blocks and the jumps between them they were found in."""
    blocks = decode_blocks(program)
    pcs = reachable(0, blocks, program.instructions)
    jumps = {pc: successors(blocks[pc], program.instructions) for pc in pcs}  # type: ignore[arg-type]
    return unrollable_loops(pcs, blocks, program.instructions, jumps), blocks, jumps


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def request_log_lines() -> Iterator[io.StringIO]:
    """What the `bpfexec.requests` logger writes meanwhile, one JSON object a line."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("bpfexec.requests")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def wait_until(
    condition: Callable[[], object], timeout: float = 5.0, what: str = "condition"
) -> None:
    """Poll `condition` until it holds; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} not met in time"
        time.sleep(0.01)


def scrape_metrics(port: int, timeout: float = 10.0) -> Samples:
    """Every sample of the metrics endpoint on `port`, fetched over HTTP like Prometheus."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as reply:
        text = reply.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def broken_ir(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every compile generate IR that LLVM rejects: a stand-in for a compiler bug."""
    real = runtime.build_module

    def build_module(*args, **kw):
        module = real(*args, **kw)
        return dataclasses.replace(module, text=module.text + "\nnot IR\n")

    monkeypatch.setattr(runtime, "build_module", build_module)
