"""Captures read by libpcap in chunks (client/capture_chunks.py) against the dpkt reader.

Every file here is read both ways: the packets must be the same, whatever the
chunk size (libpcap's chunks keep no timestamps). Skipped where libpcap or llvmlite is
missing (`.ci/run` installs libpcap).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from dpkt import pcap
from test_captures import classic

from bpfexec.client.capture_chunks import LibpcapCapture, available
from bpfexec.client.captures import CaptureError, Packet, read_capture, write_capture

pytestmark = pytest.mark.skipif(not available(), reason="libpcap or llvmlite is not installed")
TS = 1_700_000_000_123_456_789


def chunked(path: Path, size: int) -> tuple[int, list[bytes], list[int]]:
    """The link type, the packets, and the size of each chunk."""
    packets: list[bytes] = []
    sizes: list[int] = []
    with LibpcapCapture(path) as capture:
        for chunk in capture.chunks(size):
            sizes.append(len(chunk))
            packets += [chunk.packet(n) for n in range(len(chunk))]
            lengths = [len(chunk.packet(n)) for n in range(len(chunk))]
            assert (chunk.shortest, chunk.longest) == (min(lengths), max(lengths))
            assert chunk.data.endswith(b"\0\0")  # the padding the frame builder reads
        return capture.link_type, packets, sizes


@pytest.mark.parametrize("name", ["a.pcap", "a.pcapng"])
@pytest.mark.parametrize("size", [1, 3, 256])
def test_the_same_packets_as_the_dpkt_reader(tmp_path: Path, name: str, size: int) -> None:
    path = tmp_path / name
    packets = [Packet(bytes([n]) * (14 + n * 37 % 1500), TS + n * 1001) for n in range(10)]
    write_capture(path, 1, packets)
    link_type, read, sizes = chunked(path, size)
    assert link_type == 1 and read == [p.data for p in packets]
    assert sizes == [size] * (10 // size) + ([10 % size] if 10 % size else [])


@pytest.mark.parametrize(
    ("order", "magic", "unit_ns"),
    [("<", pcap.TCPDUMP_MAGIC, 1000), (">", pcap.TCPDUMP_MAGIC, 1000),
     ("<", pcap.TCPDUMP_MAGIC_NANO, 1), (">", pcap.TCPDUMP_MAGIC_NANO, 1)],
    ids=["le-us", "be-us", "le-ns", "be-ns"],
)  # fmt: skip
def test_both_byte_orders_and_resolutions(
    tmp_path: Path, order: str, magic: int, unit_ns: int
) -> None:
    path = tmp_path / "hand.cap"
    records = [(1_700_000_000, 999_999, b"\xaa" * 42), (4_294_967_295, 7, b"\xbb" * 60)]
    path.write_bytes(classic(order, magic, 1, records))
    with read_capture(path) as capture:
        expected = [p.data for p in capture]
    assert chunked(path, 256)[1] == expected


def test_a_long_capture_in_many_chunks(tmp_path: Path) -> None:
    path = tmp_path / "long.pcap"
    count = 20_000
    write_capture(path, 1, (Packet(n.to_bytes(4, "little") * 16, TS + n) for n in range(count)))
    _, packets, sizes = chunked(path, 256)
    assert len(packets) == count and len(sizes) == -(-count // 256)
    assert all(p[:4] == n.to_bytes(4, "little") for n, p in enumerate(packets))


@pytest.mark.parametrize("cut", [1, 30], ids=["in-data", "in-header"])
def test_a_truncated_file_names_the_packet(tmp_path: Path, cut: int) -> None:
    path = tmp_path / "cut.pcap"
    write_capture(path, 1, [Packet(bytes([n]) * 20, TS + n) for n in range(3)])
    path.write_bytes(path.read_bytes()[:-cut])
    with pytest.raises(CaptureError) as info:
        chunked(path, 256)
    message = str(info.value)
    assert message.startswith(f"{path}: packet 3: ") and "truncated" in message
    assert "\n" not in message


@pytest.mark.parametrize("content", [b"", b"GET / HTTP/1.1\r\n\r\n"], ids=["empty", "text"])
def test_not_a_capture(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "file.pcap"
    path.write_bytes(content)
    with pytest.raises(CaptureError) as info:
        LibpcapCapture(path)
    assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)


def test_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CaptureError) as info:
        LibpcapCapture(tmp_path / "nowhere.pcap")
    assert str(info.value) == f"{tmp_path / 'nowhere.pcap'}: No such file or directory"
