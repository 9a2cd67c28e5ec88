"""bpfexec.client.captures: pcap and pcapng files read lazily and written back, timestamps in
exact nanoseconds, and CaptureError for every bad file."""

from __future__ import annotations

import struct
import sys
import tracemalloc
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import dpkt
import pytest
from dpkt import pcap, pcapng

from bpfexec.client.captures import (
    MAX_PACKET_SIZE,
    CaptureError,
    Packet,
    read_capture,
    write_capture,
)

LE = sys.byteorder == "little"
TS = 1_700_000_000_123_456_789  # ns: more digits than a float of seconds holds
ETHERNET, RAW = 1, 101


def read_all(path: Path) -> list[Packet]:
    with read_capture(path) as capture:
        return list(capture)


def error_of(path: Path) -> str:
    with pytest.raises(CaptureError) as info:
        read_all(path)
    message = str(info.value)
    assert str(path) in message
    assert "\n" not in message
    return message


def classic(order: str, magic: int, link_type: int, records: list[tuple[int, int, bytes]]) -> bytes:
    """A pcap file built by hand: (seconds, fraction, data) records in byte order `order`."""
    out = struct.pack(order + "IHHiIII", magic, 2, 4, 0, 0, 65535, link_type)
    for seconds, fraction, data in records:
        out += struct.pack(order + "IIII", seconds, fraction, len(data), len(data)) + data
    return out


def ng_block(name: str) -> type[dpkt.Packet]:
    """The dpkt pcapng block class dpkt's Writer takes on this machine (LE on little-endian)."""
    cls: type[dpkt.Packet] = getattr(pcapng, name + ("LE" if LE else ""))
    return cls


def ng_option(code: int, data: bytes = b"") -> dpkt.Packet:
    return ng_block("PcapngOption")(code=code, data=data)


# -- classic pcap -------------------------------------------------------------------------------


def test_dpkt_microsecond_pcap(tmp_path: Path) -> None:
    path = tmp_path / "micro.pcap"
    with path.open("wb") as f:
        writer = pcap.Writer(f, linktype=ETHERNET)
        writer.writepkt_time(b"\x01" * 60, 1_700_000_000.25)
        writer.writepkt_time(b"\x02" * 14, Decimal("1700000001.123456"))
    with read_capture(path) as capture:
        assert (capture.format, capture.link_type) == ("pcap", ETHERNET)
        assert list(capture) == [
            Packet(b"\x01" * 60, 1_700_000_000_250_000_000),
            Packet(b"\x02" * 14, 1_700_000_001_123_456_000),
        ]
        assert capture.count == 2


def test_dpkt_nanosecond_pcap_is_exact(tmp_path: Path) -> None:
    path = tmp_path / "nano.pcap"
    with path.open("wb") as f:  # a Decimal keeps dpkt's writer exact
        pcap.Writer(f, linktype=RAW, nano=True).writepkt_time(b"abc", Decimal(TS) / 10**9)
    with read_capture(path) as capture:
        assert (capture.format, capture.link_type) == ("pcap", RAW)
        assert list(capture) == [Packet(b"abc", TS)]


@pytest.mark.parametrize("order", ["<", ">"], ids=["little-endian", "big-endian"])
@pytest.mark.parametrize(
    ("magic", "unit_ns"), [(0xA1B2C3D4, 1000), (0xA1B23C4D, 1)], ids=["usec", "nsec"]
)
def test_both_byte_orders_and_resolutions(
    tmp_path: Path, order: str, magic: int, unit_ns: int
) -> None:
    path = tmp_path / "hand.cap"
    records = [(1_700_000_000, 999_999, b"\xaa" * 42), (4_294_967_295, 7, b"")]
    path.write_bytes(classic(order, magic, 228, records))
    with read_capture(path) as capture:
        assert (capture.format, capture.link_type) == ("pcap", 228)
        assert list(capture) == [
            Packet(b"\xaa" * 42, 1_700_000_000 * 10**9 + 999_999 * unit_ns),
            Packet(b"", 4_294_967_295 * 10**9 + 7 * unit_ns),
        ]


def test_link_type_fcs_bits_are_masked(tmp_path: Path) -> None:
    path = tmp_path / "fcs.pcap"
    path.write_bytes(classic("<", 0xA1B2C3D4, (1 << 28) | (4 << 26) | ETHERNET, []))
    with read_capture(path) as capture:
        assert capture.link_type == ETHERNET


# -- pcapng ---------------------------------------------------------------------------------------


def test_dpkt_pcapng_two_interfaces(tmp_path: Path) -> None:
    """Interface 0 in microseconds (the default), interface 1 in nanoseconds: dpkt's own reader
    would apply the first one's resolution to both."""
    idbs = [
        ng_block("InterfaceDescriptionBlock")(linktype=ETHERNET),
        ng_block("InterfaceDescriptionBlock")(
            linktype=ETHERNET,
            opts=[ng_option(pcapng.PCAPNG_OPT_IF_TSRESOL, b"\x09"), ng_option(0)],
        ),
    ]
    epb = ng_block("EnhancedPacketBlock")
    path = tmp_path / "two.pcapng"
    with path.open("wb") as f:
        writer = pcapng.Writer(f, idb=idbs)
        for iface, ticks, data in [(0, 1_700_000_000_123_456, b"zero"), (1, TS, b"one!")]:
            block = epb(iface_id=iface, ts_high=ticks >> 32, ts_low=ticks & 0xFFFFFFFF)
            block.pkt_data = data
            writer.writepkt(block)
    with read_capture(path) as capture:
        assert (capture.format, capture.link_type) == ("pcapng", ETHERNET)
        assert list(capture) == [
            Packet(b"zero", 1_700_000_000_123_456_000, 0),
            Packet(b"one!", TS, 1),
        ]


def test_dpkt_pcapng_writer_and_binary_resolution_with_offset(tmp_path: Path) -> None:
    path = tmp_path / "plain.pcapng"
    with path.open("wb") as f:
        pcapng.Writer(f, linktype=RAW).writepkt_time(b"\x45" * 20, 1_700_000_000.5)
    assert read_all(path) == [Packet(b"\x45" * 20, 1_700_000_000_500_000_000)]

    # if_tsresol 0x8a: units of 1/1024 s; if_tsoffset: 100 s added to every timestamp.
    offset = (100).to_bytes(8, sys.byteorder)
    idb = ng_block("InterfaceDescriptionBlock")(
        linktype=RAW,
        opts=[
            ng_option(pcapng.PCAPNG_OPT_IF_TSRESOL, b"\x8a"),
            ng_option(pcapng.PCAPNG_OPT_IF_TSOFFSET, offset),
            ng_option(0),
        ],
    )
    path = tmp_path / "binary.pcapng"
    with path.open("wb") as f:
        block = ng_block("EnhancedPacketBlock")(ts_low=5 * 1024 + 512)
        block.pkt_data = b"x"
        pcapng.Writer(f, idb=idb).writepkt(block)
    assert read_all(path) == [Packet(b"x", 105_500_000_000)]


def test_mixed_link_types_and_unknown_interfaces_are_refused(tmp_path: Path) -> None:
    idbs = [ng_block("InterfaceDescriptionBlock")(linktype=lt) for lt in (ETHERNET, RAW)]
    path = tmp_path / "mixed.pcapng"
    with path.open("wb") as f:
        pcapng.Writer(f, idb=idbs).writepkt_time(b"p", 1.0)
    assert "mixed link types" in error_of(path)

    path = tmp_path / "nointerface.pcapng"
    with path.open("wb") as f:
        block = ng_block("EnhancedPacketBlock")(iface_id=3, ts_low=1)
        block.pkt_data = b"p"
        pcapng.Writer(f).writepkt(block)
    assert "packet 1: names interface 3" in error_of(path)


# -- write_capture --------------------------------------------------------------------------------

PACKETS = [
    Packet(b"\x00" * 64, TS, 0),
    Packet(b"", 0, 2),
    Packet(bytes(range(256)) * 4, 4_294_967_295_999_999_999, 1),
]


def test_write_pcap_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "out.pcap"
    assert write_capture(path, RAW, iter(PACKETS)) == 3
    assert path.read_bytes()[:4] == bytes.fromhex("4d3cb2a1")  # nanosecond, little-endian
    with read_capture(path) as capture:
        assert (capture.format, capture.link_type) == ("pcap", RAW)
        # pcap has no interfaces: every packet reads back on interface 0.
        assert list(capture) == [Packet(p.data, p.timestamp_ns) for p in PACKETS]
    with path.open("rb") as f:  # dpkt reads it too, exactly (nanosecond files give Decimals)
        reader = pcap.Reader(f)
        assert reader.datalink() == RAW
        assert [(ts * 10**9, data) for ts, data in reader] == [
            (p.timestamp_ns, p.data) for p in PACKETS
        ]


@pytest.mark.parametrize("name", ["out.pcapng", "OUT.PCAPNG"])
def test_write_pcapng_round_trip(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    assert write_capture(str(path), ETHERNET, PACKETS) == 3
    with read_capture(str(path)) as capture:
        assert (capture.format, capture.link_type) == ("pcapng", ETHERNET)
        assert list(capture) == PACKETS
    with path.open("rb") as f:
        reader = pcapng.Reader(f)
        assert reader.datalink() == ETHERNET
        assert [data for _, data in reader] == [p.data for p in PACKETS]


def test_format_comes_from_the_magic_number_not_the_name(tmp_path: Path) -> None:
    ng, classic_file = tmp_path / "a.pcapng", tmp_path / "b.pcap"
    write_capture(ng, ETHERNET, PACKETS[:1])
    write_capture(classic_file, ETHERNET, PACKETS[:1])
    swapped_ng, swapped_classic = tmp_path / "really-ng.pcap", tmp_path / "really-classic.pcapng"
    swapped_ng.write_bytes(ng.read_bytes())
    swapped_classic.write_bytes(classic_file.read_bytes())
    with read_capture(swapped_ng) as capture:
        assert capture.format == "pcapng"
        assert list(capture) == PACKETS[:1]
    with read_capture(swapped_classic) as capture:
        assert capture.format == "pcap"
        assert list(capture) == PACKETS[:1]


@pytest.mark.parametrize(
    ("packet", "wrong"),
    [
        (Packet(b"\x00" * (MAX_PACKET_SIZE + 1), 0), f"more than the {MAX_PACKET_SIZE}"),
        (Packet(b"", -1), "timestamp -1 ns"),
        (Packet(b"", 1 << 32 << 30), "out of the file's range"),
    ],
)
def test_write_refuses_what_the_file_cannot_hold(
    tmp_path: Path, packet: Packet, wrong: str
) -> None:
    path = tmp_path / "bad.pcap"
    with pytest.raises(CaptureError, match="packet 2: .*" + wrong) as info:
        write_capture(path, ETHERNET, [PACKETS[0], packet])
    assert str(path) in str(info.value)


def test_write_errors(tmp_path: Path) -> None:
    with pytest.raises(CaptureError, match="cannot write"):
        write_capture(tmp_path / "missing" / "x.pcap", ETHERNET, [])
    with pytest.raises(CaptureError, match="link type 65536"):
        write_capture(tmp_path / "x.pcapng", 0x10000, [])
    with pytest.raises(CaptureError, match="interface -1"):
        write_capture(tmp_path / "x.pcapng", ETHERNET, [Packet(b"", 0, -1)])


# -- empty, streaming -----------------------------------------------------------------------------


def test_empty_captures(tmp_path: Path) -> None:
    with (tmp_path / "dpkt.pcap").open("wb") as f:
        pcap.Writer(f, linktype=RAW, nano=True)
    with (tmp_path / "dpkt.pcapng").open("wb") as f:
        pcapng.Writer(f, linktype=RAW)
    assert write_capture(tmp_path / "ours.pcap", RAW, []) == 0
    assert write_capture(tmp_path / "ours.pcapng", RAW, iter(())) == 0
    for name in ["dpkt.pcap", "dpkt.pcapng", "ours.pcap", "ours.pcapng"]:
        with read_capture(tmp_path / name) as capture:
            assert capture.link_type == RAW
            assert list(capture) == []
            assert capture.count == 0


@pytest.mark.parametrize("name", ["big.pcap", "big.pcapng"])
def test_streams_100k_packets(tmp_path: Path, name: str) -> None:
    """Written as the generator yields (the file grows while it runs) and read back in
    constant memory: neither side builds a list."""
    path = tmp_path / name
    count, record = 100_000, 80  # bytes a packet takes in either format, at least
    made = 0

    def generate() -> Iterator[Packet]:
        nonlocal made
        for i in range(count):
            if i and i % 20_000 == 0:  # what was yielded so far is (nearly all) on disk
                assert path.stat().st_size >= i * record - (1 << 20)
            made += 1
            yield Packet(i.to_bytes(4, "little") * 16, TS + i, 0)

    assert write_capture(path, ETHERNET, generate()) == count == made
    assert path.stat().st_size >= count * record

    # Memory is traced over the opening and the first 10,000 packets (tracing slows it):
    # a reader that loaded the file or listed its packets would show here.
    tracemalloc.start()
    try:
        seen = total = 0
        with read_capture(path) as capture:
            for packet in capture:
                assert packet.timestamp_ns == TS + seen
                total += int.from_bytes(packet.data[:4], "little")
                seen += 1
                if seen == 10_000:
                    _, peak = tracemalloc.get_traced_memory()
                    tracemalloc.stop()
    finally:
        tracemalloc.stop()
    assert seen == count
    assert total == count * (count - 1) // 2
    assert peak < (1 << 20) < path.stat().st_size


# -- bad files ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cut.pcap", "cut.pcapng"])
@pytest.mark.parametrize("cut", [1, 10, 30], ids=["in-data", "in-data-10", "in-header"])
def test_truncated_file_names_the_packet(tmp_path: Path, name: str, cut: int) -> None:
    path = tmp_path / name
    packets = [Packet(bytes([n]) * 20, TS + n) for n in range(3)]
    write_capture(path, ETHERNET, packets)
    path.write_bytes(path.read_bytes()[:-cut])
    with read_capture(path) as capture:
        assert next(capture) == packets[0]
        assert next(capture) == packets[1]
        with pytest.raises(CaptureError) as info:
            next(capture)
    message = str(info.value)
    assert str(path) in message
    assert "packet 3" in message
    assert "truncated" in message


@pytest.mark.parametrize(
    ("content", "wrong"),
    [
        (b"", "too short"),
        (b"\xd4\xc3", "too short"),
        (b"GET / HTTP/1.1\r\nHost: example\r\n\r\n", "not a pcap or pcapng capture"),
        (b"\xd4\xc3\xb2\xa1\x02\x00\x04\x00", "truncated pcap file header"),
        (b"\x0a\x0d\x0d\x0a\x1c\x00\x00\x00\x00\x00\x00\x00", "byte-order magic"),
        (b"\x0a\x0d\x0d\x0a\x1c\x00\x00\x00\x4d\x3c\x2b\x1a", "truncated block"),
    ],
    ids=["empty", "two-bytes", "text", "short-pcap-header", "bad-bom", "short-shb"],
)
def test_not_a_capture(tmp_path: Path, content: bytes, wrong: str) -> None:
    path = tmp_path / "file.pcap"
    path.write_bytes(content)
    assert wrong in error_of(path)


def test_pcapng_without_interfaces_or_with_a_malformed_block(tmp_path: Path) -> None:
    shb = bytes(ng_block("SectionHeaderBlock")())
    path = tmp_path / "shb-only.pcapng"
    path.write_bytes(shb)
    assert "without an interface description block" in error_of(path)

    # A block whose length is not a multiple of 4.
    path.write_bytes(shb + struct.pack("=II", 1, 13) + b"\x00" * 5)
    assert "bad length 13" in error_of(path)

    # A packet whose captured length overruns its block.
    write_capture(path, ETHERNET, [Packet(b"\x00" * 8, 0)])
    content = bytearray(path.read_bytes())
    epb = content.rindex(struct.pack("<I", pcapng.PCAPNG_BT_EPB))
    content[epb + 20 : epb + 24] = struct.pack("<I", 200)
    path.write_bytes(bytes(content))
    assert "packet 1: captured length 200 overruns" in error_of(path)


def test_unreadable_paths(tmp_path: Path) -> None:
    assert "cannot open" in error_of(tmp_path / "missing.pcap")
    assert "cannot open" in error_of(tmp_path)  # a directory


def test_iterating_a_closed_reader(tmp_path: Path) -> None:
    path = tmp_path / "two.pcap"
    write_capture(path, ETHERNET, PACKETS[:2])
    with read_capture(path) as capture:
        assert next(capture) == Packet(PACKETS[0].data, PACKETS[0].timestamp_ns)
    with pytest.raises(CaptureError, match="closed"):
        next(capture)
