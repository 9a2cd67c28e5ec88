"""`TestRun` (docs/test-run.md, "Through a server"): packet programs over a stream of
packets through a real server on a free localhost port, with `Client.test_run`, its
asyncio twin and `bpfexec test-run --server`: the same results as a local
`run_packets`, on the server's interpreter and its JIT."""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path

import grpc
import pytest
from conftest import CompileDirectory
from support import SPIN, request_log_lines, wait_until
from test_cli import bpfexec, one_line_error
from test_packet_run import ethernet, tcp, udp

from bpfexec._pb.bpfexec.v1 import executor_pb2 as pb
from bpfexec._pb.bpfexec.v1 import executor_pb2_grpc as pb_grpc
from bpfexec.client.aio import AsyncClient
from bpfexec.client.captures import Packet, write_capture
from bpfexec.client.client import Client, packet_index
from bpfexec.client.errors import DeadlineExceeded, InvalidArgument, NotFound
from bpfexec.client.types import MapDump, Module
from bpfexec.server.app import RunningServer, serve_in_thread
from bpfexec.server.service import MAX_TEST_RUN_PACKETS_PER_MESSAGE
from bpfexec.server.settings import Settings
from bpfexec.vm.context_access import with_context
from bpfexec.vm.errors import VerifyError
from bpfexec.vm.loader import load
from bpfexec.vm.machine import available_engines
from bpfexec.vm.maps import MapSet
from bpfexec.vm.packet_run import run_packets

FIXTURES = Path(__file__).parent / "fixtures" / "packets"
TIMEOUT = 30.0
STOP_BUDGET = 1.0  # seconds from a cancellation or deadline to the worker stopping (as batches)
COMPILE_BUDGET = 60.0  # seconds for the server's JIT to compile a rewritten packet program
PACKETS = [
    ethernet(udp(53)),
    ethernet(udp(9)),
    ethernet(tcp(80)),
    ethernet(udp(9), vlan=3),
    ethernet(udp(53, b"query"), vlan=4),
    ethernet(bytes(40), ethertype=0x86DD),
    ethernet(b"\x45")[:15],
    bytes(range(60)),
]
# (object, program): every fixture type, a redirect (xdp_meta), context fields (tc, socket).
PROGRAMS = [
    ("xdp_count", "xdp"),
    ("xdp_count", "xdp_vlan_strip"),
    ("xdp_frame", "xdp_meta"),
    ("xdp_frame", "xdp_tail"),
    ("tc_mark", "tc"),
    ("socket_filter", "socket"),
]
TYPES = {"xdp_count": "xdp", "xdp_frame": "xdp", "tc_mark": "tc", "socket_filter": "socket"}


@pytest.fixture(scope="module")
def objects(libbpf_objects: CompileDirectory) -> Path:
    return libbpf_objects(FIXTURES)


@pytest.fixture(scope="module", params=available_engines())
def server(request: pytest.FixtureRequest) -> Iterator[RunningServer]:
    settings = Settings(port=0, metrics_port=0, entry_point_helpers=False, engine=request.param)
    with serve_in_thread(settings) as running:
        yield running


@pytest.fixture
def client(server: RunningServer) -> Iterator[Client]:
    with Client(server.address, timeout=TIMEOUT) as connected:
        yield connected


def in_flight(server: RunningServer) -> float:
    return server.metrics.registry.get_sample_value("bpfexec_executions_in_flight") or 0.0


def sample(server: RunningServer, name: str) -> float:
    return server.metrics.registry.get_sample_value(name) or 0.0


def upload(client: Client, objects: Path, name: str) -> Module:
    return client.load((objects / f"{name}.o").read_bytes(), f"{name}.o")


def local(objects: Path, name: str, program: str, packets: list[bytes], **options: object):
    """(the results' dicts and data, the maps' dump) of a local run on the interpreter."""
    prog = load((objects / f"{name}.o").read_bytes(), f"{name}.o")
    maps = MapSet(prog.maps, init=prog.map_init)
    results = list(run_packets(prog, program, packets, maps=maps, **options))  # type: ignore[arg-type]
    return [(r.to_dict(), r.data) for r in results], maps.dump()


def native_on_the_server(server: RunningServer, module: Module, program: str) -> None:
    """With the JIT, wait until the code a test run runs (the module's packet program,
    its context accesses rewritten) has its native tier: the next run is the JIT's."""
    if server.settings.engine != "jit":
        return
    from bpfexec.vm.jit import best_compiled

    cached = server.service.cache.get(module.id)
    assert cached is not None
    rewritten = with_context(cached.program, program)

    def ready() -> bool:
        compiled = best_compiled(rewritten)
        return compiled is not None and compiled.native

    wait_until(ready, COMPILE_BUDGET, "the JIT tier of the test run's program")
    assert server.service._engine_for(rewritten) == "jit"


@pytest.mark.parametrize(("name", "program"), PROGRAMS)
def test_results_and_maps_are_a_local_runs(
    server: RunningServer, client: Client, objects: Path, name: str, program: str
) -> None:
    module = upload(client, objects, name)
    with client.test_run(module, program, PACKETS[:1]) as first:  # the JIT: queues its compile
        first.start()
    native_on_the_server(server, module, program)
    run = client.test_run(module, program, iter(PACKETS), dump_maps=True)
    remote = list(run)
    expected, maps = local(objects, name, program, PACKETS)
    assert [(r.to_dict(), r.data) for r in remote] == expected
    assert run.maps is not None
    assert {name: dump.to_dict() for name, dump in run.maps.items()} == maps
    assert all(r.duration_ns > 0 for r in remote)
    assert run.program_type == TYPES[name]


def test_the_program_type_comes_first_even_without_packets(client: Client, objects: Path) -> None:
    module = upload(client, objects, "tc_mark")
    run = client.test_run(module, "tc", [], dump_maps=True)
    assert run.start() == "tc"
    assert list(run) == []
    assert run.maps == {}
    socket = client.test_run(upload(client, objects, "socket_filter"), "socket_udp", [])
    assert (list(socket), socket.program_type, socket.maps) == ([], "socket", None)


def test_many_packets_come_back_in_order(server: RunningServer, client: Client, objects: Path):
    """More packets than a request or a response message carries: order is kept."""
    packets = [ethernet(udp(port)) if port % 3 else ethernet(tcp(port)) for port in range(5000)]
    packets[::7] = [ethernet(udp(9))] * len(packets[::7])
    module = upload(client, objects, "xdp_count")
    before = sample(server, "bpfexec_test_run_packets_total")
    runs = sample(server, "bpfexec_test_runs_total")
    remote = [(r.verdict, r.data) for r in client.test_run(module, "xdp", iter(packets))]
    expected, _ = local(objects, "xdp_count", "xdp", packets)
    assert remote == [(shown["verdict"], data) for shown, data in expected]
    assert sample(server, "bpfexec_test_run_packets_total") - before == len(packets)
    assert sample(server, "bpfexec_test_runs_total") - runs == 1


def test_packets_are_read_lazily_and_a_client_that_stops_reading_stops_the_server(
    server: RunningServer, client: Client, objects: Path
) -> None:
    """An endless generator of packets: the client reads, and the server takes, only as
    far as the queues and HTTP/2's windows let them while nobody reads the results."""
    module = upload(client, objects, "xdp_count")
    read = itertools.count()
    packet = ethernet(udp(53, bytes(4000)))

    def endless() -> Iterator[bytes]:
        for _ in read:
            yield packet

    run = client.test_run(module, "xdp", endless())
    results = iter(run)
    assert next(results).verdict == "XDP_PASS"
    time.sleep(1.0)  # the windows and queues fill, then everything stops
    first = (next(read), sample(server, "bpfexec_test_run_packets_total"))
    time.sleep(0.5)
    second = (next(read) - 1, sample(server, "bpfexec_test_run_packets_total"))
    assert second == first
    assert first[0] * len(packet) < 64 << 20  # windows and queues, nothing unbounded
    assert in_flight(server) == 1  # the worker is parked, not finished
    run.close()
    wait_until(lambda: in_flight(server) == 0, STOP_BUDGET, "the test run's worker stopping")


def test_a_trap_is_that_packets_result(client: Client, objects: Path) -> None:
    module = upload(client, objects, "xdp_count")
    remote = [r.to_dict() for r in client.test_run(module, "xdp", PACKETS[:3], fuel=12)]
    expected, _ = local(objects, "xdp_count", "xdp", PACKETS[:3], fuel=12)
    assert remote == [shown for shown, _ in expected]
    assert remote[0]["verdict"] == "TRAP" and remote[0]["retval"] is None
    assert remote[0]["trap"]["kind"] == "OUT_OF_FUEL"  # type: ignore[index]


def test_repeat_runs_each_packet_again_on_the_same_maps(client: Client, objects: Path) -> None:
    module = upload(client, objects, "xdp_count")
    run = client.test_run(module, "xdp", PACKETS[:3], repeat=3, dump_maps=True)
    remote = [r.to_dict() for r in run]
    expected, maps = local(objects, "xdp_count", "xdp", PACKETS[:3], repeat=3)
    assert remote == [shown for shown, _ in expected]
    assert run.maps is not None and run.maps["protocols"].to_dict() == maps["protocols"]
    with pytest.raises(InvalidArgument, match="repeat"):
        client.test_run(module, "xdp", PACKETS, repeat=0)


def counts(run_maps: Mapping[str, MapDump] | None) -> dict[int, int]:
    """The protocol counts of xdp_count's map: protocol -> packets."""
    assert run_maps is not None
    return {
        int.from_bytes(key, "little"): int.from_bytes(value, "little")
        for key, value in run_maps["protocols"].entries
    }


def test_a_state_is_shared_by_test_runs_and_kept(client: Client, objects: Path) -> None:
    module = upload(client, objects, "xdp_count")
    udp_and_tcp = [ethernet(udp(53)), ethernet(tcp(80)), ethernet(udp(9))]
    first = client.test_run(module, "xdp", udp_and_tcp, state="tr", dump_maps=True)
    assert [r.verdict for r in first] == ["XDP_PASS", "XDP_PASS", "XDP_DROP"]
    assert counts(first.maps) == {6: 1, 17: 2}
    again = client.test_run(module, "xdp", udp_and_tcp[:1], state="tr", dump_maps=True)
    list(again)
    assert counts(again.maps) == {6: 1, 17: 3}
    state = client.get_state(module, "tr")
    assert counts(state.maps) == {6: 1, 17: 3}
    fresh = client.test_run(module, "xdp", udp_and_tcp[:1], dump_maps=True)
    list(fresh)
    assert counts(fresh.maps) == {17: 1}
    client.delete_state(module, "tr")


def test_a_context_access_the_kernel_refuses_is_invalid_argument(
    client: Client, objects: Path
) -> None:
    module = upload(client, objects, "bad_context")
    taken = []
    with pytest.raises(InvalidArgument) as refused:
        taken.extend(client.test_run(module, "xdp_writes_data", iter(PACKETS)))
    assert taken == []
    prog = load((objects / "bad_context.o").read_bytes(), "bad_context.o")
    with pytest.raises(VerifyError) as locally:
        with_context(prog, "xdp_writes_data")
    assert str(refused.value) == str(locally.value)
    assert "\n" not in str(refused.value)
    assert "xdp programs may not write the context field data" in str(refused.value)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.reason == "INVALID_MODULE"


def test_module_and_program_problems_come_before_any_packet(client: Client, objects: Path):
    module = upload(client, objects, "xdp_count")
    with pytest.raises(InvalidArgument, match="no function 'nope'"):
        client.test_run(module, "nope", PACKETS).start()
    with pytest.raises(NotFound):
        list(client.test_run("sha256:" + "0" * 64, "xdp", PACKETS))


def test_a_short_packet_mid_stream_is_invalid_argument_naming_it(
    client: Client, objects: Path
) -> None:
    module = upload(client, objects, "xdp_count")
    packets = [PACKETS[0], PACKETS[1], b"\x00" * 10, PACKETS[2]]
    taken = []
    with pytest.raises(InvalidArgument) as refused:
        for result in client.test_run(module, "xdp", iter(packets)):
            taken.append(result.verdict)
    assert taken == ["XDP_PASS", "XDP_DROP"]  # the results before it
    assert str(refused.value) == "packet 3: 10 bytes, shorter than an Ethernet header (14)"
    assert packet_index(refused.value) == 2
    assert refused.value.reason == "INVALID_PACKET"


def test_a_packet_that_is_not_bytes_is_refused_by_the_client(client: Client, objects: Path):
    module = upload(client, objects, "xdp_count")
    taken = []
    with pytest.raises(InvalidArgument, match="packet 2: expected bytes, got int") as refused:
        taken.extend(r.verdict for r in client.test_run(module, "xdp", [PACKETS[0], 7]))  # type: ignore[list-item]
    assert taken == ["XDP_PASS"]
    assert packet_index(refused.value) == 1


def test_the_first_message_must_carry_the_header(server: RunningServer) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ExecutorStub(channel)
        calls = stub.TestRun(iter([pb.TestRunRequest(packets=[PACKETS[0]])]), timeout=TIMEOUT)
        with pytest.raises(grpc.RpcError) as failed:
            list(calls)
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "must carry the `header`" in failed.value.details()


def test_a_request_message_carries_a_bounded_number_of_packets(
    server: RunningServer, client: Client, objects: Path
) -> None:
    module = upload(client, objects, "xdp_count")
    header = pb.TestRunHeader(module_id=module.id, program="xdp")
    packets = [PACKETS[0]] * (MAX_TEST_RUN_PACKETS_PER_MESSAGE + 1)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ExecutorStub(channel)
        requests = [pb.TestRunRequest(header=header), pb.TestRunRequest(packets=packets)]
        with pytest.raises(grpc.RpcError) as failed:
            list(stub.TestRun(iter(requests), timeout=TIMEOUT))
    assert failed.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_test_run_packets_per_message" in failed.value.details()


def test_the_deadline_stops_an_endless_test_run(server: RunningServer, client: Client) -> None:
    """An endless program, as a syscall program (assembly has no section): each packet is
    its context buffer."""
    module = client.load(SPIN.encode())
    start = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        list(client.test_run(module, None, itertools.repeat(b"x"), fuel=10**10, timeout=0.5))
    assert time.monotonic() - start < 0.5 + STOP_BUDGET
    wait_until(lambda: in_flight(server) == 0, STOP_BUDGET, "the test run's worker stopping")


def test_cancelling_the_call_stops_an_endless_test_run(server: RunningServer) -> None:
    async def main() -> float:
        async with AsyncClient(server.address, timeout=TIMEOUT) as bpf:
            module = await bpf.load(SPIN.encode())

            async def packets() -> AsyncIterator[bytes]:
                while True:
                    yield b"x"

            async def drain() -> None:
                async for _ in bpf.test_run(module, None, packets(), fuel=10**10):
                    pass

            task = asyncio.ensure_future(drain())
            await asyncio.sleep(0.3)
            assert in_flight(server) == 1  # the run runs its first packet
            task.cancel()
            cancelled = time.monotonic()
            with pytest.raises(asyncio.CancelledError):
                await task
            return cancelled

    cancelled = asyncio.run(main())
    wait_until(lambda: in_flight(server) == 0, STOP_BUDGET, "the test run's worker stopping")
    assert time.monotonic() - cancelled < STOP_BUDGET


def test_closing_the_results_stops_the_run(server: RunningServer, client: Client) -> None:
    module = client.load(SPIN.encode())
    run = client.test_run(module, None, itertools.repeat(b"x"), fuel=10**10)
    assert run.start() == "syscall"
    wait_until(lambda: in_flight(server) == 1, STOP_BUDGET, "the test run running")
    run.close()
    wait_until(lambda: in_flight(server) == 0, STOP_BUDGET, "the test run's worker stopping")


def test_the_async_client_gives_the_same_results(
    server: RunningServer, client: Client, objects: Path
) -> None:
    module = upload(client, objects, "tc_mark")

    async def main(plain: bool) -> tuple[list[dict[str, object]], str | None]:
        async with AsyncClient(server.address, timeout=TIMEOUT) as bpf:

            async def packets() -> AsyncIterator[bytes]:
                for packet in PACKETS:
                    yield packet

            run = bpf.test_run(module, "tc", iter(PACKETS) if plain else packets(), dump_maps=True)
            results = [r.to_dict() async for r in run]
            assert run.maps == {}
            return results, run.program_type

    expected, _ = local(objects, "tc_mark", "tc", PACKETS)
    for plain in (True, False):
        assert asyncio.run(main(plain)) == ([shown for shown, _ in expected], "tc")


def test_the_async_client_raises_a_short_packet_after_the_results_before(
    server: RunningServer, client: Client, objects: Path
) -> None:
    module = upload(client, objects, "xdp_count")

    async def main() -> list[str]:
        taken: list[str] = []
        async with AsyncClient(server.address, timeout=TIMEOUT) as bpf:
            with pytest.raises(InvalidArgument, match="packet 2: 3 bytes") as refused:
                async for result in bpf.test_run(module, "xdp", [PACKETS[0], b"abc"]):
                    taken.append(result.verdict)
        assert packet_index(refused.value) == 1
        return taken

    assert asyncio.run(main()) == ["XDP_PASS"]


def test_a_test_run_is_one_request_log_line(client: Client, objects: Path) -> None:
    module = upload(client, objects, "xdp_count")
    with request_log_lines() as stream:
        list(client.test_run(module, "xdp", PACKETS[:2]))
        wait_until(lambda: "TestRun" in stream.getvalue(), TIMEOUT, "the request log line")
    (line,) = [json.loads(text) for text in io.StringIO(stream.getvalue())]
    assert (line["method"], line["module"], line["function"], line["outcome"]) == (
        "TestRun", module.id, "xdp", "OK",
    )  # fmt: skip


@pytest.fixture
def capture(tmp_path: Path) -> Path:
    path = tmp_path / "in.pcap"
    ethernet_only = [packet for packet in PACKETS if len(packet) >= 14]
    write_capture(path, 1, (Packet(p, 1_700_000_000_000_000_123 + n * 1000)
                            for n, p in enumerate(ethernet_only)))  # fmt: skip
    return path


@pytest.mark.parametrize(("name", "program"), [("xdp_count", "xdp_vlan_strip"), ("tc_mark", "tc")])
def test_the_command_gives_a_local_runs_json(
    server: RunningServer, objects: Path, capture: Path, tmp_path: Path, name: str, program: str
) -> None:
    common = [
        "test-run", str(objects / f"{name}.o"), "--program", program, "--pcap", str(capture),
        "--per-packet", "--dump-maps", "--json",
    ]  # fmt: skip
    here = bpfexec(*common, "--out", str(tmp_path / "here.pcap"))
    there = bpfexec(*common, "--out", str(tmp_path / "there.pcap"), "--server", server.address)
    assert (here.returncode, there.returncode) == (0, 0), there.stderr
    shown_here, shown_there = json.loads(here.stdout), json.loads(there.stdout)
    assert shown_there.pop("duration_ns") > 0
    shown_here.pop("duration_ns")
    assert shown_there == shown_here
    assert list(shown_there) == ["program_type", "packets", "verdicts", "maps", "results"]
    assert (tmp_path / "there.pcap").read_bytes() == (tmp_path / "here.pcap").read_bytes()


def test_the_command_on_a_server_refuses_what_is_local_only(
    server: RunningServer, objects: Path, capture: Path, tmp_path: Path
) -> None:
    xdp = str(objects / "xdp_count.o")
    common = ["test-run", xdp, "--program", "xdp", "--pcap", str(capture)]
    error = one_line_error(bpfexec(*common, "--server", server.address, "--engine", "jit"))
    assert "--engine applies only to a local run" in error
    assert "--state needs --server" in one_line_error(bpfexec(*common, "--state", "s"))
    assert "need --server" in one_line_error(bpfexec(*common, "--token", "t"))
    runt = tmp_path / "runt.pcap"
    write_capture(runt, 1, [Packet(ethernet(tcp(1)), 0), Packet(b"\x00" * 10, 1)])
    error = one_line_error(bpfexec("test-run", xdp, "--program", "xdp", "--pcap", str(runt),
                                   "--server", server.address))  # fmt: skip
    assert error.endswith(
        f"--pcap {runt}: packet 2: 10 bytes, shorter than an Ethernet header (14)"
    )
    bad = str(objects / "bad_context.o")
    error = one_line_error(bpfexec("test-run", bad, "--program", "xdp_writes_data", "--pcap",
                                   str(capture), "--server", server.address))  # fmt: skip
    assert "xdp programs may not write the context field data" in error
    cooked = tmp_path / "cooked.pcap"
    write_capture(cooked, 113, [Packet(ethernet(tcp(1)), 0)])
    error = one_line_error(bpfexec("test-run", xdp, "--program", "xdp", "--pcap", str(cooked),
                                   "--server", server.address))  # fmt: skip
    assert "link type 113 is not Ethernet (1)" in error
