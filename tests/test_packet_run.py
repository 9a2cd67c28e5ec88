"""Test runs of packet programs (`bpfexec.vm.packet_run`, docs/test-run.md): XDP, tc
and socket filters over crafted packets, on the interpreter and both JIT tiers,
against what the kernel's BPF_PROG_TEST_RUN gives: verdicts, output packets,
context fields and maps; and the context accesses the kernel's verifier refuses.

The programs are tests/fixtures/packets/*.c, compiled here when clang and
libbpf-dev are installed (the committed objects otherwise).
"""

from __future__ import annotations

import dataclasses
import struct
import tracemalloc
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import pytest
from conftest import CompileDirectory

from bpfexec.vm import packet_run
from bpfexec.vm.context_access import with_context
from bpfexec.vm.errors import RequestError, TrapKind, VerifyError
from bpfexec.vm.limits import Limits
from bpfexec.vm.loader import load
from bpfexec.vm.machine import Interrupt
from bpfexec.vm.maps import MapSet
from bpfexec.vm.packet_run import (
    ARENA_BYTES,
    PacketChunk,
    PacketError,
    PacketResult,
    run_packet_chunks,
    run_packets,
)
from bpfexec.vm.program import Program

FIXTURES = Path(__file__).parent / "fixtures" / "packets"
ENGINES = ("interpreter", "optimized", "quick")  # the JIT's two tiers, as test_differential
EINVAL, EACCES = 22, 13
DST = b"\x02\x00\x00\x00\x00\x01"
SRC = b"\x02\x11\x22\x33\x44\x55"


@pytest.fixture(scope="module")
def objects(libbpf_objects: CompileDirectory) -> Path:
    return libbpf_objects(FIXTURES)


def program(objects: Path, name: str) -> Program:
    return load((objects / f"{name}.o").read_bytes(), f"{name}.o")


def run(
    prog: Program, function: str, packets: Iterable[bytes], engine: str, maps: MapSet | None = None
) -> list[PacketResult]:
    """The results on `engine`: "interpreter", or a JIT tier."""
    if engine == "interpreter":
        return list(run_packets(prog, function, packets, maps=maps))
    pytest.importorskip("llvmlite")
    from bpfexec.vm.jit import compile_program

    if engine == "quick":
        compile_program(with_context(prog, function), quick=True)
    return list(run_packets(prog, function, packets, engine="jit", maps=maps))


def ethernet(payload: bytes, ethertype: int = 0x0800, vlan: int | None = None) -> bytes:
    tag = b"" if vlan is None else struct.pack("!HH", 0x8100, vlan)
    return DST + SRC + tag + struct.pack("!H", ethertype) + payload


def internet_checksum(data: bytes) -> int:
    """RFC 1071, written out: the ones'-complement of the ones'-complement sum."""
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4(protocol: int, segment: bytes, checksum_at: int) -> bytes:
    """An IPv4 packet (10.0.0.1 -> 10.0.0.2) of `segment`, whose checksum field at
    `checksum_at` is filled in over the pseudo-header."""
    source, destination = b"\x0a\x00\x00\x01", b"\x0a\x00\x00\x02"
    pseudo = source + destination + struct.pack("!BBH", 0, protocol, len(segment))
    check = internet_checksum(pseudo + segment) or 0xFFFF
    segment = segment[:checksum_at] + struct.pack("!H", check) + segment[checksum_at + 2 :]
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(segment), 0, 0, 64, protocol, 0,
                         source, destination)  # fmt: skip
    header = header[:10] + struct.pack("!H", internet_checksum(header)) + header[12:]
    return header + segment


def udp(port: int, payload: bytes = b"hello") -> bytes:
    segment = struct.pack("!HHHH", 4242, port, 8 + len(payload), 0) + payload
    return ipv4(17, segment, 6)


def tcp(port: int) -> bytes:
    segment = struct.pack("!HHIIBBHHH", 4242, port, 1, 0, 5 << 4, 0x18, 512, 0, 0) + b"x"
    return ipv4(6, segment, 16)


def transport_checksum_is_valid(ip: bytes) -> bool:
    """Whether the UDP/TCP checksum of an IPv4 packet (20-byte header) verifies."""
    segment = ip[20:]
    pseudo = ip[12:20] + struct.pack("!BBH", 0, ip[9], len(segment))
    return internet_checksum(pseudo + segment) == 0


def numbers(maps: MapSet, name: str, signed: bool = False) -> dict[int, int]:
    """An array map's non-zero entries: index -> value (little-endian)."""
    return {
        int.from_bytes(bytes.fromhex(e["key"]), "little"): int.from_bytes(
            bytes.fromhex(e["value"]), "little", signed=signed
        )
        for e in maps.dump()[name]["entries"]
    }


@pytest.mark.parametrize("engine", ENGINES)
def test_xdp_parses_counts_and_drops(objects: Path, engine: str) -> None:
    prog = program(objects, "xdp_count")
    packets = [
        ethernet(udp(53)),
        ethernet(udp(9)),  # discard port: dropped
        ethernet(tcp(80)),
        ethernet(udp(9), vlan=5),  # tagged: parsed through the tag, dropped
        ethernet(bytes(40), ethertype=0x86DD),  # not IPv4: passed, not counted
        ethernet(b"\x45")[:15],  # an IPv4 header cut short: dropped
    ]
    maps = MapSet(prog.maps)
    results = run(prog, "xdp", packets, engine, maps)  # named by its section
    assert [r.verdict for r in results] == [
        "XDP_PASS", "XDP_DROP", "XDP_PASS", "XDP_DROP", "XDP_PASS", "XDP_DROP",
    ]  # fmt: skip
    assert [r.retval for r in results] == [2, 1, 2, 1, 2, 1]
    assert [r.data for r in results] == packets  # nothing rewritten
    assert numbers(maps, "protocols") == {6: 1, 17: 3}
    assert all(r.trap is None and r.context == {} for r in results)


@pytest.mark.parametrize("engine", ENGINES)
def test_xdp_strips_a_vlan_tag_with_adjust_head(objects: Path, engine: str) -> None:
    prog = program(objects, "xdp_count")
    tagged = ethernet(udp(53), vlan=0x123)
    plain = ethernet(tcp(22))
    strip, keep = run(prog, "xdp_vlan_strip", [tagged, plain], engine)
    assert strip.verdict == "XDP_TX"
    assert strip.data == tagged[:12] + tagged[16:]
    assert (keep.verdict, keep.data) == ("XDP_PASS", plain)


@pytest.mark.parametrize("engine", ENGINES)
def test_xdp_headroom_tail_and_metadata_edges(objects: Path, engine: str) -> None:
    prog = program(objects, "xdp_frame")
    packet = bytes(range(60))

    def results(function: str) -> tuple[PacketResult, dict[int, int]]:
        maps = MapSet(prog.maps)
        (result,) = run(prog, function, [packet], engine, maps)
        return result, numbers(maps, "results", signed=True)

    head, recorded = results("xdp_head")
    # 256 bytes of headroom, the kernel's 40-byte xdp_frame at its start: 216 usable.
    assert recorded == {0: -EINVAL, 2: 60 + 216}
    assert head.data == b"\xab" + bytes(215) + packet

    tail, recorded = results("xdp_tail")
    # +16 (zeroed), then shorter than an Ethernet header and past the frame: refused; -4.
    assert recorded == {1: 76, 2: -EINVAL, 3: -EINVAL}
    assert (tail.verdict, tail.data) == ("XDP_TX", packet + bytes(12))

    meta, recorded = results("xdp_meta")
    assert recorded == {0: -EACCES, 2: 8, 3: 0x1122334455667788, 4: -EACCES}
    assert (meta.verdict, meta.redirect, meta.data) == ("XDP_REDIRECT", (7, False), packet)


@pytest.mark.parametrize("engine", ENGINES)
def test_tc_marks_and_rewrites_a_port_with_a_valid_checksum(objects: Path, engine: str) -> None:
    pytest.importorskip("bpfexec.vm.checksum")
    prog = program(objects, "tc_mark")
    dns, web, other = ethernet(udp(53, b"query")), ethernet(tcp(443)), ethernet(udp(123))
    rewritten, marked, untouched = run(prog, "tc", [dns, web, other], engine)

    assert rewritten.verdict == "TC_ACT_OK"
    assert struct.unpack_from("!H", rewritten.data, 14 + 20 + 2) == (5353,)
    assert transport_checksum_is_valid(rewritten.data[14:])
    assert rewritten.data[14 + 20 + 6 : 14 + 20 + 8] != dns[14 + 20 + 6 : 14 + 20 + 8]
    assert rewritten.data[:36] == dns[:36] and rewritten.context["cb"] == [1, 0, 0, 0, 0]

    assert (marked.context["mark"], marked.context["priority"]) == (0x42, 7)
    assert marked.data == web
    assert (untouched.data, untouched.context["mark"]) == (other, 0)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_socket_filter_sees_the_packet_from_its_network_header(
    objects: Path, engine: str
) -> None:
    prog = program(objects, "socket_filter")
    maps = MapSet(prog.maps)
    datagram, segment = ethernet(udp(7, bytes(100))), ethernet(tcp(80))
    kept, dropped = run(prog, "socket", [datagram, segment], engine, maps)
    assert (kept.verdict, kept.retval, kept.context["cb"]) == ("KEEP", 64, [0, 99, 0, 0, 0])
    assert (dropped.verdict, dropped.retval) == ("DROP", 0)
    # skb->len counts from the network header; data_out's Ethernet header is zeroed,
    # as the kernel's test run leaves it.
    assert numbers(maps, "seen") == {0: len(datagram) - 14 + len(segment) - 14}
    assert kept.data == bytes(14) + datagram[14:]


@pytest.mark.parametrize(
    ("function", "message"),
    [
        ("xdp_writes_data", "xdp programs may not write the context field data"),
        ("xdp_reads_beyond", "invalid read of 4 bytes at offset 24 of the xdp context"),
        ("xdp_narrow_data", "the context field data must be read whole, as a u32"),
        ("socket_reads_data", "socket programs may not read the context field data"),
        ("socket_writes_mark", "socket programs may not write the context field mark"),
    ],
)
def test_context_accesses_the_kernel_refuses_are_refused(
    objects: Path, function: str, message: str
) -> None:
    prog = program(objects, "bad_context")
    with pytest.raises(VerifyError) as refused:
        list(run_packets(prog, function, [ethernet(tcp(1))]))
    text = str(refused.value)
    assert text.startswith("pc ") and "bad_context.c:" in text and text.endswith(message)


def asm_program(text: str, section: str = "xdp") -> Program:
    """An assembly program whose functions are in `section`."""
    loaded = load(text.encode())
    functions = tuple(dataclasses.replace(fn, section=section) for fn in loaded.functions)
    return dataclasses.replace(loaded, functions=functions)


def test_the_context_is_followed_through_the_stack_and_calls() -> None:
    prog = asm_program(
        """
        entry:
            r6 = r1
            *(u64 *)(r10 - 8) = r6
            r1 = 0
            r1 = *(u64 *)(r10 - 8)
            call read_end
            exit
        read_end:
            r2 = *(u32 *)(r1 + 4)
            r1 = *(u32 *)(r1 + 0)
            r0 = r2
            r0 -= r1
            exit
        """
    )
    for engine in ENGINES:
        (result,) = run(prog, "entry", [bytes(70)], engine)
        assert (result.retval, result.verdict) == (70, "XDP_ABORTED")


def test_a_register_that_is_the_context_on_one_path_only_is_refused() -> None:
    prog = asm_program(
        """
        entry:
            r2 = *(u32 *)(r1 + 12)
            if r2 == 0 goto skip
            r1 = r10
            r1 += -16
        skip:
            r0 = *(u32 *)(r1 + 0)
            exit
        """
    )
    with pytest.raises(VerifyError, match=r"pc 4 .*r1 is the context on some paths only"):
        list(run_packets(prog, "entry", [bytes(20)]))


def test_a_moved_context_pointer_is_refused() -> None:
    prog = asm_program("r1 += 4\nr0 = *(u32 *)(r1 + 0)\nexit\n")
    with pytest.raises(VerifyError, match="context pointer moved by arithmetic"):
        list(run_packets(prog, None, [bytes(20)]))


def test_a_packet_shorter_than_an_ethernet_header_is_refused_after_the_others(
    objects: Path,
) -> None:
    prog = program(objects, "xdp_count")
    results = run_packets(prog, "xdp_count", [ethernet(tcp(1)), b"\x00" * 13])
    assert next(results).verdict == "XDP_PASS"
    with pytest.raises(PacketError, match="packet 2: 13 bytes, shorter than an Ethernet"):
        next(results)


def test_repeat_runs_each_packet_on_a_fresh_frame(objects: Path) -> None:
    prog = program(objects, "xdp_count")
    maps = MapSet(prog.maps)
    tagged = ethernet(udp(53), vlan=1)
    (result,) = run_packets(prog, "xdp_vlan_strip", [tagged], repeat=3, maps=maps)
    assert result.data == tagged[:12] + tagged[16:]  # stripped once, not three times
    (counted,) = run_packets(prog, "xdp_count", [tagged], repeat=4, maps=maps)
    assert counted.verdict == "XDP_PASS"
    assert numbers(maps, "protocols") == {17: 4}
    with pytest.raises(RequestError, match="repeat must be at least 1"):
        list(run_packets(prog, "xdp_count", [tagged], repeat=0))


def test_a_syscall_program_gets_the_packet_as_its_context() -> None:
    prog = load(b"r0 = *(u8 *)(r1 + 2)\n*(u8 *)(r1 + 0) = r0\nexit\n")
    (result,) = run_packets(prog, None, [b"\x01\x02\x03"])
    assert (result.retval, result.verdict, result.data) == (3, "3", b"\x03\x02\x03")


@pytest.mark.parametrize("engine", ENGINES)
def test_tc_pops_vlan_tags_as_the_kernel_does(objects: Path, engine: str) -> None:
    prog = program(objects, "tc_vlan")
    payload = bytes(range(30))
    tagged = ethernet(payload, vlan=5)
    qinq = DST + SRC + struct.pack("!HHHH", 0x88A8, 10, 0x8100, 5) + b"\x08\x00" + payload
    plain = ethernet(payload)
    short = DST + SRC + b"\x81\x00\x00\x05"
    results = run(prog, "vlan_pop", [tagged, qinq, plain, short], engine)
    ip, q = 0x0008, 0x0081  # ETH_P_IP, ETH_P_8021Q as the __sk_buff holds them (network order)
    # [result, vlan_present, vlan_tci, vlan_proto, protocol]
    assert [r.context["cb"] for r in results] == [
        [0, 0, 0, 0, ip],
        [0, 1, 5, q, ip],  # the outer tag out of the data, the inner one into the sk_buff
        [0, 0, 0, 0, ip],
        [-12 & 0xFFFFFFFF, 0, 0, 0, q],  # -ENOMEM: shorter than a VLAN Ethernet header
    ]
    assert [r.data for r in results] == [plain, plain, plain, short]
    assert [r.verdict for r in results] == ["TC_ACT_OK"] * 4


@pytest.mark.parametrize("engine", ENGINES)
def test_tc_pushes_vlan_tags_the_second_into_the_packet(objects: Path, engine: str) -> None:
    prog = program(objects, "tc_vlan")
    payload = bytes(range(30))
    (pushed,) = run(prog, "vlan_push", [ethernet(payload)], engine)
    # The first push only sets the sk_buff's tag; the second moves it into the data.
    assert pushed.context["cb"] == [0, 1, 9, 0xA888, 0x0081]
    assert pushed.data == ethernet(payload, vlan=7)
    assert pushed.context["mark"] == len(ethernet(payload)) + 4  # skb->len grew


@pytest.mark.parametrize("engine", ENGINES)
def test_tc_pull_data_fails_only_beyond_the_packet(objects: Path, engine: str) -> None:
    (pulled,) = run(program(objects, "tc_vlan"), "pull", [ethernet(bytes(30))], engine)
    assert pulled.context["cb"] == [0, 0, 12, 0, 0]  # -ENOMEM for len + 1


@pytest.mark.parametrize("engine", ENGINES)
def test_tc_changes_its_packets_tail(objects: Path, engine: str) -> None:
    prog = program(objects, "tc_vlan")
    packet = ethernet(bytes(range(1, 31)))
    (grown,) = run(prog, "grow", [packet], engine)
    assert (grown.context["mark"], grown.data) == (0, packet + bytes(6))  # zero-filled
    (resized,) = run(prog, "resize", [packet], engine)
    size = len(packet)
    # grow by 100, trim to 10 below the start, then 70000 and 10 bytes: -EINVAL
    assert resized.context["cb"] == [0, size + 100, 0, size - 10, 22]
    assert (resized.context["mark"], resized.data) == (22, packet[: size - 10])


# -- chunks of packets (`run_packet_chunks`) ------------------------------------------------

MIXED = [
    ethernet(udp(53)), ethernet(udp(9)), ethernet(tcp(80)), ethernet(udp(9), vlan=5),
    ethernet(bytes(40), ethertype=0x86DD), ethernet(b"\x45")[:15], ethernet(udp(53), vlan=1),
]  # fmt: skip


def shown(results: Iterable[PacketResult]) -> list[tuple[object, ...]]:
    return [(r.retval, r.verdict, r.data, r.context, r.fuel_used, r.trap) for r in results]


@pytest.mark.parametrize(
    ("arena", "expected"),
    [(1, 21), (3 * 4400, 7), (ARENA_BYTES, 2)],  # a run, 3 runs (of 4,384 bytes), a chunk
    ids=["a-run", "3-runs", "whole"],
)
@pytest.mark.parametrize("function", ["xdp_count", "xdp_vlan_strip"])
def test_a_chunk_in_pieces_gives_what_the_interpreter_gives(
    objects: Path, monkeypatch: pytest.MonkeyPatch, arena: int, expected: int, function: str
) -> None:
    pytest.importorskip("llvmlite")
    prog = program(objects, "xdp_count")
    alone_maps = MapSet(prog.maps)
    alone = list(run_packets(prog, function, MIXED, repeat=3, maps=alone_maps))
    monkeypatch.setattr(packet_run, "ARENA_BYTES", arena)
    maps = MapSet(prog.maps)
    chunks = [PacketChunk.of(MIXED[:4]), PacketChunk.of(MIXED[4:])]
    pieces = list(run_packet_chunks(prog, function, chunks, engine="jit", repeat=3, maps=maps))
    assert len(pieces) == expected  # 4 packets, then 3, 3 runs each
    assert sum(p.count for p in pieces) == len(MIXED)
    native = [r for p in pieces for r in p.results()]
    assert shown(native) == shown(alone)
    assert maps.dump() == alone_maps.dump()
    counted: Counter[str] = Counter()
    for piece in pieces:
        counted += piece.verdicts()
    assert counted == Counter(r.verdict for r in alone)


@pytest.mark.parametrize("engine", ENGINES)
def test_verdicts_are_counted_as_the_results_say(objects: Path, engine: str) -> None:
    # Traps (no fuel for the longer paths) and every verdict, in chunks of 3.
    prog = program(objects, "xdp_count")
    if engine == "quick":
        pytest.importorskip("llvmlite")
        from bpfexec.vm.jit import compile_program

        compile_program(with_context(prog, "xdp_count"), quick=True)
    chunks = PacketChunk.chunks(MIXED * 3, 3)
    counted: Counter[str] = Counter()
    results: list[PacketResult] = []
    trapped = False
    runner = "interpreter" if engine == "interpreter" else "jit"
    for runs in run_packet_chunks(prog, "xdp_count", chunks, engine=runner, fuel=40):
        counted += runs.verdicts()
        results += runs.results()
        trapped = trapped or runs.trapped
    assert counted == Counter(r.verdict for r in results)
    assert counted["TRAP"] == 9 and trapped  # the longest paths run out of fuel
    assert counted["XDP_PASS"] == 6 and counted["XDP_DROP"] == 6


def test_a_long_repeat_keeps_memory_bounded(objects: Path) -> None:
    pytest.importorskip("llvmlite")
    prog = program(objects, "xdp_count")
    maps = MapSet(prog.maps)
    tracemalloc.start()
    try:
        (result,) = run_packets(prog, "xdp_count", [MIXED[0]], repeat=20_000, engine="jit",
                                maps=maps)  # fmt: skip
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result.verdict == "XDP_PASS" and numbers(maps, "protocols") == {17: 20_000}
    assert peak < 3 * ARENA_BYTES  # two pieces at most, not 20,000 frames (88 MB)


@pytest.mark.parametrize("engine", ["interpreter", "jit"])
def test_an_interrupt_ends_the_chunks_with_the_packet_it_stopped(
    objects: Path, engine: str
) -> None:
    if engine == "jit":
        pytest.importorskip("llvmlite")
    prog = asm_program("loop:\n    goto loop\n")
    interrupt = Interrupt()
    interrupt.after(0.2, TrapKind.DEADLINE_EXCEEDED)
    chunks = PacketChunk.chunks([MIXED[0]] * 10, 4)
    pieces = list(run_packet_chunks(prog, "loop", chunks, engine=engine, interrupt=interrupt,
                                    fuel=1 << 40, limits=Limits(max_fuel=1 << 40)))  # fmt: skip
    results = [r for p in pieces for r in p.results()]
    assert pieces[-1].interrupted and len(results) == 1
    assert results[0].trap is not None and results[0].trap.kind is TrapKind.DEADLINE_EXCEEDED


@pytest.mark.parametrize("engine", ENGINES)
def test_a_tail_call_enters_only_what_the_kernels_array_could_hold(
    objects: Path, engine: str
) -> None:
    # The first payload byte picks the slot: an XDP program, one the verifier refuses, a
    # tc program, an empty slot.
    prog = program(objects, "xdp_tail")
    packets = [ethernet(bytes([slot]) + bytes(40)) for slot in range(4)]
    results = run(prog, "xdp_jump", packets, engine)
    assert [r.verdict for r in results] == ["XDP_TX", "TRAP", "TRAP", "XDP_PASS"]
    refused, other = results[1].trap, results[2].trap
    assert refused is not None and other is not None
    assert refused.kind is other.kind is TrapKind.HELPER_ERROR
    assert refused.message.startswith("bpf_tail_call: xdp_writes_data would not load: pc ")
    assert "(xdp_tail.c:" in refused.message
    assert refused.message.endswith("xdp programs may not write the context field data")
    assert other.message == (
        "bpf_tail_call: tc_marks is of type tc, and the prog_array of a program of type xdp "
        "holds only programs of that type"
    )
    assert refused.location is not None and "xdp_tail.c:" in refused.location


def test_a_run_on_the_interpreter_moves_to_the_jit_once_it_is_ready(objects: Path) -> None:
    # A server starts a module's first test run on the interpreter while its native
    # code compiles, then moves on to the JIT between two chunks.
    pytest.importorskip("llvmlite")
    prog = program(objects, "xdp_count")
    asked: list[int] = []

    def ready() -> bool:
        asked.append(1)
        return len(asked) >= 2  # from the second chunk on

    maps = MapSet(prog.maps)
    chunks = PacketChunk.chunks(MIXED * 3, 5)
    pieces = list(run_packet_chunks(prog, "xdp_count", chunks, maps=maps, jit_ready=ready))
    alone_maps = MapSet(prog.maps)
    alone = list(run_packets(prog, "xdp_count", MIXED * 3, maps=alone_maps))
    assert shown(r for p in pieces for r in p.results()) == shown(alone)
    assert maps.dump() == alone_maps.dump()
    assert len(asked) == 2  # not asked again once on the JIT
    kinds = [type(p).__name__ for p in pieces]
    assert kinds == ["_ListedRuns", "_NativeRuns", "_NativeRuns", "_NativeRuns", "_NativeRuns"]
