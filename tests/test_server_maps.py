"""Every map type and map helper through a server, as the command line drives it:
`bpfexec run FILE --function F --arg V --state NAME --server HOST:PORT --dump-maps
--json`, run after run on one named state, prints what the same runs print
locally on one set of maps (`vm.execute(..., maps=MapSet)`), on a server of
each engine. Only `duration_ns` may differ.

The programs are the libbpf-style fixtures of tests/fixtures/maps and
tests/fixtures/callbacks (their committed objects: the suite means the same
without clang).
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from support import free_port, scrape_metrics

from bpfexec import vm
from bpfexec.client.cli import main
from bpfexec.server.app import RunningServer, serve_in_thread
from bpfexec.server.settings import Settings
from bpfexec.vm.loader import load
from bpfexec.vm.maps import MapSet

FIXTURES = Path(__file__).parent / "fixtures"
MAX64 = (1 << 64) - 1

# (object, [(function, args), ...]): runs on one state, in order.
SESSIONS = {
    "hash and array": ("maps/counter.o", [("count", [7]), ("count", [7]), ("count", [3]),
                                          ("errors", [0])]),
    "lru_hash": ("maps/lru.o", [("evict", [0]), ("evict", [0])]),
    "lpm_trie": ("maps/lpm.o", [("add_route", [0x0A000000, 8, 1]),
                                ("add_route", [0x0A010000, 16, 2]), ("route", [0x0A010203]),
                                ("del_route", [0x0A010000, 16]), ("route", [0x0A010203]),
                                ("route", [0x0B000000])]),
    "queue and stack": ("maps/queue.o", [("push", [5]), ("push", [6]), ("queue_order", [0]),
                                         ("stack_order", [0]), ("push", [7])]),
    "ringbuf": ("maps/ringbuf.o", [("produce", [3]), ("discard", [0]), ("overflow", [100]),
                                   ("bad_submit", [0])]),
    "maps of maps": ("maps/inner.o", [("bump", [0, 1, 5]), ("rewire", [1]),
                                      ("bump", [0, 1, 5]), ("bump", [1, 2, 9])]),
    "bpf_for_each_map_elem": ("callbacks/foreach.o", [("walk_maps", [3, MAX64]),
                                                      ("read_count", [2])]),
    "bpf_loop": ("callbacks/loop.o", [("loop_sum", [10, 20]), ("loop_errors", [1, 3])]),
    "bpf_tail_call": ("callbacks/tailcall.o", [("first", [0]), ("forever", [0]),
                                               ("missing", [0])]),
}  # fmt: skip


@pytest.fixture(scope="module", params=["interpreter", "jit"])
def server(request: pytest.FixtureRequest) -> Iterator[RunningServer]:
    settings = Settings(port=0, metrics_port=free_port(), entry_point_helpers=False)
    with serve_in_thread(dataclasses.replace(settings, engine=request.param)) as running:
        yield running


def run_cli(*argv: str) -> dict[str, object]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        status = main(list(argv))
    shown: dict[str, object] = json.loads(out.getvalue())
    # A trap is an outcome the JSON shows, with exit status 3.
    assert (status, err.getvalue()) == (3 if shown["trap"] else 0, ""), argv
    shown.pop("duration_ns")
    return shown


def local_runs(path: Path, calls: list[tuple[str, list[int]]]) -> list[dict[str, object]]:
    program = load(path.read_bytes(), name=path.name)
    maps = MapSet(program.maps, init=program.map_init)
    shown = []
    for function, args in calls:
        result = vm.execute(program, function, args, maps=maps).to_dict()
        result.pop("duration_ns")
        result["maps"] = maps.dump()
        shown.append(result)
    return shown


@pytest.mark.parametrize("session", SESSIONS)
def test_a_state_on_a_server_runs_as_local_maps_do(server: RunningServer, session: str) -> None:
    name, calls = SESSIONS[session]
    path = FIXTURES / name
    state = f"{session}-{server.settings.engine}".replace(" ", "-")
    remote = [
        run_cli("run", str(path), "--function", function, *(f"--arg={a}" for a in args),
                "--state", state, "--server", server.address, "--dump-maps", "--json")
        for function, args in calls
    ]  # fmt: skip
    assert remote == local_runs(path, calls)


def operations(server: RunningServer) -> dict[tuple[str, str], float]:
    """Map operations and Linux helper calls, as Prometheus scrapes them."""
    samples = scrape_metrics(server.settings.metrics_port)
    counted = {}
    for (name, labels), value in samples.items():
        label = dict(labels)
        if name == "bpfexec_map_operations_total":
            counted["map", label["operation"]] = value
        elif name == "bpfexec_helper_calls_total" and label["helper"].startswith("bpf_"):
            counted["helper", label["helper"]] = value
    return counted


def test_metrics_count_programs_map_operations(server: RunningServer) -> None:
    """Lookups (inline in the JIT, reported at the end of the run), updates, pushes,
    pops, ring buffer records and for_each's elements, by operation."""
    before = operations(server)
    counter, queue, ringbuf = (
        str(FIXTURES / "maps" / f"{n}.o") for n in ("counter", "queue", "ringbuf")
    )
    foreach = str(FIXTURES / "callbacks" / "foreach.o")
    for path, function, args in (
        (counter, "count", [7]), (queue, "push", [5]), (queue, "queue_order", [0]),
        (ringbuf, "produce", [3]), (foreach, "walk_maps", [3, MAX64]),
    ):  # fmt: skip
        run_cli("run", path, "--function", function, *(f"--arg={a}" for a in args),
                "--server", server.address, "--json")  # fmt: skip
    after = operations(server)
    grown = {key: value - before.get(key, 0) for key, value in after.items()}
    assert grown["map", "lookup"] >= 2  # count looks up counts and totals
    assert grown["map", "update"] >= 1 + 3 + 8  # count's new key, walk_maps' 3 keys and 8 slots
    assert grown["map", "push"] >= 1 and grown["map", "pop"] >= 1
    assert grown["map", "output"] + grown.get(("map", "submit"), 0) >= 3
    assert grown["map", "for_each"] == 3 + 8 + 2  # elements, and the two ends of the walks
    assert grown["helper", "bpf_map_lookup_elem"] == grown["map", "lookup"]
