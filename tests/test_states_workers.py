"""`--workers N` without an external store: one state per name across the workers.

The workers share a directory (`bpfexec.server.states_directory`): a state is
leased by an exclusive `flock`, so the model of docs/state.md holds between
processes as it does on Redis. The program is tests/fixtures/maps/counter.o:
`count(key)` adds one to `counts[key]` and returns the new count, so a state
used one request at a time answers every count from 1 to the total once.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from test_server_workers import serve_workers

from bpfexec._pb.bpfexec.v1 import executor_pb2, executor_pb2_grpc
from bpfexec.server.metrics import Metrics
from bpfexec.server.state_files import StateKey
from bpfexec.server.states import StateBusy, StateRegistry
from bpfexec.server.states_directory import DirectoryStates
from bpfexec.vm import load

ROOT = Path(__file__).resolve().parent.parent
COUNTER = ROOT / "tests" / "fixtures" / "maps" / "counter.o"
KEY = StateKey("", "sha256:" + "cd" * 32, "shared")
SEVEN = (7).to_bytes(4, "little")


def bump(states: StateRegistry, program: object) -> int:
    """What `count(7)` does to the state, done by the host: the new count."""
    with states.hold(KEY, program) as state:
        counts = state.map("counts")
        found = dict(counts.entries()).get(SEVEN, bytes(8))
        value = int.from_bytes(found, "little") + 1
        counts.update(SEVEN, value.to_bytes(8, "little"), 0)
    return value


def test_processes_sharing_a_directory_keep_one_exact_counter(tmp_path: Path) -> None:
    program = load(COUNTER.read_bytes())
    registries = [
        StateRegistry(metrics=Metrics(), shared=DirectoryStates(tmp_path)) for _ in range(2)
    ]
    answers: list[int] = []

    def hammer(states: StateRegistry) -> None:
        answers.extend(bump(states, program) for _ in range(100))

    threads = [threading.Thread(target=hammer, args=(r,)) for r in registries for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(answers) == list(range(1, 601))
    _, found = registries[1].read(KEY)
    assert dict(found["counts"].entries)[SEVEN] == (600).to_bytes(8, "little")
    assert [s.key for s in registries[0].summaries("")] == [KEY]
    registries[0].delete(KEY)
    assert registries[1].summaries("") == []


HOLDER = """
import sys, time
from bpfexec.server.metrics import Metrics
from bpfexec.server.state_files import StateKey
from bpfexec.server.states import StateBusy, StateRegistry
from bpfexec.server.states_directory import DirectoryStates
from bpfexec.vm import load

key = StateKey("", "sha256:" + "cd" * 32, "shared")
states = StateRegistry(metrics=Metrics(), shared=DirectoryStates(sys.argv[1]))
program = load(open(sys.argv[2], "rb").read())
with states.hold(key, program) as state:  # committed: counts[7] = 1
    state.map("counts").update((7).to_bytes(4, "little"), (1).to_bytes(8, "little"), 0)
with states.hold(key, program) as state:  # killed while holding it: never committed
    state.map("counts").update((7).to_bytes(4, "little"), (99).to_bytes(8, "little"), 0)
    print("holding", flush=True)
    time.sleep(60)
"""


def test_a_process_killed_holding_a_state_leaves_it_as_its_last_commit(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path), str(COUNTER)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "holding\n"
        states = StateRegistry(metrics=Metrics(), shared=DirectoryStates(tmp_path))
        program = load(COUNTER.read_bytes())
        with pytest.raises(StateBusy, match="stayed in use by requests on other worker"):
            bump_within(states, program, 0.2)
        holder.kill()
        holder.wait(timeout=10)
        start = time.monotonic()
        assert bump(states, program) == 2  # the killed request's 99 was never committed
        assert time.monotonic() - start < 1  # the kernel released its lock at once
    finally:
        holder.kill()
        holder.wait(timeout=10)


def bump_within(states: StateRegistry, program: object, wait: float) -> None:
    with states.hold(KEY, program, wait=wait):
        pass


@pytest.mark.skipif(sys.platform != "linux", reason="SO_REUSEPORT load balancing is Linux's")
def test_two_workers_answer_one_state_per_name(tmp_path: Path) -> None:
    connections, runs = 8, 10
    answers: list[int] = []
    with serve_workers(tmp_path) as (_, address):
        for _ in range(connections):  # each on its own connection: spread over both workers
            options = [("grpc.use_local_subchannel_pool", 1)]
            with grpc.insecure_channel(address, options=options) as channel:
                stub = executor_pb2_grpc.ExecutorStub(channel)
                loaded = executor_pb2.LoadModuleRequest(code=COUNTER.read_bytes())
                module = stub.LoadModule(loaded, timeout=10).id
                request = executor_pb2.ExecuteRequest(
                    module_id=module,
                    function="count",
                    args=[executor_pb2.Argument(value=7)],
                    state="s",
                )
                answers += [stub.Execute(request, timeout=10).return_value for _ in range(runs)]
                listed = stub.ListStates(executor_pb2.ListStatesRequest(), timeout=10)
                assert [state.name for state in listed.states] == ["s"]
    assert answers == list(range(1, connections * runs + 1))
