"""Capture files for `bpfexec test-run`: read the packets of a pcap or pcapng file lazily, and
write packets back to one.

dpkt decodes and encodes every file header, record header and pcapng block here. Its `Reader`s
and `Writer`s are not used, for what they lack: they carry timestamps as float seconds (this
module keeps integer nanoseconds, exactly), dpkt's pcapng reader applies the first interface's
timestamp resolution to every packet and drops the interface index, its pcap reader returns a
cut-off last packet as if it were whole, and its pcapng writer stamps a packet whose timestamp is
0 with the current time.

    with read_capture("in.pcapng") as capture:
        count = write_capture("out.pcap", capture.link_type, map(run, capture))

Every malformed, truncated or unreadable file raises `CaptureError`, whose message is one line
naming the file (and the packet, from 1, when the trouble is in one).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Literal

import dpkt
from dpkt import pcap, pcapng

__all__ = [
    "MAX_PACKET_SIZE",
    "CaptureError",
    "CaptureReader",
    "Packet",
    "read_capture",
    "write_capture",
]

MAX_PACKET_SIZE = 262144
"""The largest packet `write_capture` writes: libpcap's MAXIMUM_SNAPLEN, the most tcpdump and
Wireshark read back for most link types."""

_MAX_RECORD = 1 << 28  # a length read from a file past this is corruption, not a packet
_NS = 10**9
_PCAP_NANO_MAGICS = {pcap.TCPDUMP_MAGIC_NANO, pcap.PMUDPCT_MAGIC_NANO}
_PCAP_LE_MAGICS = {pcap.PMUDPCT_MAGIC, pcap.PMUDPCT_MAGIC_NANO, pcap.PACPDOM_MAGIC}
_LINKTYPE_MASK = 0x03FFFFFF  # libpcap's LT_LINKTYPE: the upper bits of the field are FCS flags
_SHB_TYPE = pcapng.PCAPNG_BT_SHB.to_bytes(4, "big")  # 0A 0D 0D 0A in both byte orders
_BOM_BE = pcapng.BYTE_ORDER_MAGIC.to_bytes(4, "big")
_BOM_LE = pcapng.BYTE_ORDER_MAGIC.to_bytes(4, "little")
_SPB_TYPE = 3  # Simple Packet Block: dpkt has no class for it
_TSRESOL_NS = b"\x09"  # if_tsresol: 10**-9 s
_MAX_INTERFACES = 0x10000  # interfaces write_capture describes (an IDB each, up to the highest)
# What dpkt raises on bytes it cannot decode (UnicodeDecodeError, from a pcapng comment option,
# is a ValueError).
_DPKT_ERRORS = (dpkt.Error, struct.error, ValueError)


class CaptureError(Exception):
    """A capture file that cannot be read or written. `str(e)` is one line naming the file."""


@dataclass(frozen=True, slots=True)
class Packet:
    """One packet: its bytes, when it was captured, and the pcapng interface (0 for pcap)."""

    data: bytes
    timestamp_ns: int
    interface: int = 0


@dataclass(frozen=True)
class _Interface:
    per_second: int  # timestamp units a second (if_tsresol, 10**6 when absent)
    offset_ns: int  # if_tsoffset


class CaptureReader:
    """The packets of one capture file, read as iterated (never all at once); `read_capture`.

    `format` is "pcap" or "pcapng" (told by the file's magic number, not its name), `link_type`
    the DLT/LINKTYPE number of the capture (1 Ethernet); a pcapng file whose interfaces differ in
    link type is refused. `count` is the number of packets read so far. Iterating to the end, or
    leaving the `with` block, closes the file.
    """

    format: Literal["pcap", "pcapng"]
    link_type: int

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.count = 0
        try:
            self._file: BinaryIO = open(self.path, "rb")  # noqa: SIM115 (closed by close())
        except OSError as exc:
            raise CaptureError(f"{self.path}: cannot open: {exc.strerror or exc}") from exc
        try:
            self._packets = self._open()
        except BaseException:
            self._file.close()
            raise

    def __iter__(self) -> CaptureReader:
        return self

    def __next__(self) -> Packet:
        try:
            return next(self._packets)
        except (StopIteration, CaptureError):
            self.close()
            raise

    def __enter__(self) -> CaptureReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    # -- reading -------------------------------------------------------------------------------

    def _error(self, message: str) -> CaptureError:
        return CaptureError(f"{self.path}: {message}")

    def _packet_error(self, message: str) -> CaptureError:
        return CaptureError(f"{self.path}: packet {self.count + 1}: {message}")

    def _read(self, size: int) -> bytes:
        try:
            return self._file.read(size)
        except OSError as exc:
            raise self._error(f"cannot read: {exc.strerror or exc}") from exc
        except ValueError as exc:  # the reader was closed
            raise self._error("read after the capture was closed") from exc

    def _open(self) -> Iterator[Packet]:
        """Reads the file's header (up to the first interface of a pcapng file): sets `format`
        and `link_type`; returns the packets, as a generator that reads on."""
        magic = self._read(4)
        if len(magic) < 4:
            raise self._error(f"not a capture file: {len(magic)} bytes, too short for a header")
        if magic == _SHB_TYPE:
            self.format = "pcapng"
            return self._open_pcapng(magic)
        number = int.from_bytes(magic, "big")
        if number not in pcap.MAGIC_TO_PKT_HDR:
            raise self._error(f"not a pcap or pcapng capture (magic number 0x{magic.hex()})")
        self.format = "pcap"
        header = magic + self._read(pcap.FileHdr.__hdr_len__ - 4)
        if len(header) < pcap.FileHdr.__hdr_len__:
            raise self._error(f"truncated pcap file header ({len(header)} of 24 bytes)")
        file_header = (pcap.LEFileHdr if number in _PCAP_LE_MAGICS else pcap.FileHdr)(header)
        self.link_type = int(file_header.linktype) & _LINKTYPE_MASK
        unit_ns = 1 if number in _PCAP_NANO_MAGICS else 1000
        return self._pcap_packets(pcap.MAGIC_TO_PKT_HDR[number], unit_ns)

    def _pcap_packets(self, record_header: type[dpkt.Packet], unit_ns: int) -> Iterator[Packet]:
        size = record_header.__hdr_len__
        while raw := self._read(size):
            if len(raw) < size:
                raise self._packet_error(f"truncated record header ({len(raw)} of {size} bytes)")
            header = record_header(raw)
            length = int(header.caplen)
            if length > _MAX_RECORD:
                raise self._packet_error(f"captured length {length} is corrupt")
            data = self._read(length)
            if len(data) < length:
                raise self._packet_error(f"truncated ({len(data)} of {length} bytes)")
            self.count += 1
            yield Packet(data, int(header.tv_sec) * _NS + int(header.tv_usec) * unit_ns)

    # pcapng: a section header block, interface description blocks (each packet names one by
    # its index in the section), packet blocks; other blocks are skipped.

    def _open_pcapng(self, magic: bytes) -> Iterator[Packet]:
        self._little_endian = False
        self._interfaces: list[_Interface] = []
        self.link_type = -1  # the first interface's
        block = self._next_block(magic)
        assert block is not None  # the magic number was the start of one
        self._control_block(*block)
        while not self._interfaces:
            block = self._next_block()
            if block is None:
                raise self._error("pcapng capture without an interface description block")
            if block[0] in (pcapng.PCAPNG_BT_EPB, pcapng.PCAPNG_BT_PB, _SPB_TYPE):
                raise self._packet_error("comes before any interface description block")
            self._control_block(*block)
        return self._pcapng_packets()

    def _pcapng_packets(self) -> Iterator[Packet]:
        while (block := self._next_block()) is not None:
            kind, raw = block
            if kind in (pcapng.PCAPNG_BT_EPB, pcapng.PCAPNG_BT_PB):
                packet = self._packet_block(kind, raw)
                self.count += 1
                yield packet
            elif kind == _SPB_TYPE:
                raise self._packet_error("simple packet blocks are not supported")
            else:
                self._control_block(kind, raw)

    def _next_block(self, start: bytes = b"") -> tuple[int, bytes] | None:
        """The next block's type and bytes (header to trailing length), None at the end."""
        head = start + self._read(8 - len(start))
        if not head:
            return None
        if len(head) < 8:
            raise self._error(f"truncated block header at packet {self.count + 1}")
        if head[:4] == _SHB_TYPE:  # a section: its byte-order magic sets the byte order
            head += self._read(4)
            if head[8:] not in (_BOM_BE, _BOM_LE):
                raise self._error(f"bad pcapng byte-order magic 0x{head[8:].hex()}")
            self._little_endian = head[8:] == _BOM_LE
        kind, length = struct.unpack("<II" if self._little_endian else ">II", head[:8])
        if length < 12 or length % 4 or length > _MAX_RECORD:
            raise self._error(f"block of type 0x{kind:x} has a bad length {length}")
        rest = self._read(length - len(head))
        if len(rest) < length - len(head):
            raise self._error(
                f"truncated block at packet {self.count + 1}"
                f" ({len(head) + len(rest)} of {length} bytes)"
            )
        return kind, head + rest

    def _decode(self, name: str, block: type[dpkt.Packet], raw: bytes) -> dpkt.Packet:
        try:
            return block(raw)
        except _DPKT_ERRORS as exc:
            raise self._error(f"malformed {name} at packet {self.count + 1}: {exc}") from exc

    def _control_block(self, kind: int, raw: bytes) -> None:
        little = self._little_endian
        if kind == pcapng.PCAPNG_BT_SHB:
            name, cls = "section header", pcapng.SectionHeaderBlock
            shb = self._decode(name, pcapng.SectionHeaderBlockLE if little else cls, raw)
            if shb.v_major != pcapng.PCAPNG_VERSION_MAJOR:
                raise self._error(f"unsupported pcapng version {shb.v_major}.{shb.v_minor}")
            self._interfaces = []  # interface indices start again in each section
        elif kind == pcapng.PCAPNG_BT_IDB:
            name, cls = "interface description", pcapng.InterfaceDescriptionBlock
            idb = self._decode(name, pcapng.InterfaceDescriptionBlockLE if little else cls, raw)
            link_type = int(idb.linktype)
            if self.link_type < 0:
                self.link_type = link_type
            elif link_type != self.link_type:
                raise self._error(
                    f"interface {len(self._interfaces)} has link type {link_type}, the first"
                    f" {self.link_type}: a capture of mixed link types is not supported"
                )
            self._interfaces.append(self._interface(idb))

    def _interface(self, idb: dpkt.Packet) -> _Interface:
        per_second, offset_s = 10**6, 0
        for option in idb.opts:
            value = bytes(option.data)
            if option.code == pcapng.PCAPNG_OPT_IF_TSRESOL and value:
                # The high bit set: a negative power of 2; clear: a negative power of 10.
                per_second = (2 if value[0] & 0x80 else 10) ** (value[0] & 0x7F)
            elif option.code == pcapng.PCAPNG_OPT_IF_TSOFFSET:
                if len(value) != 8:
                    raise self._error(f"malformed if_tsoffset option ({len(value)} bytes)")
                offset_s = int.from_bytes(value, "little" if self._little_endian else "big")
                offset_s -= (offset_s >> 63) << 64  # signed
        return _Interface(per_second, offset_s * _NS)

    def _packet_block(self, kind: int, raw: bytes) -> Packet:
        if kind == pcapng.PCAPNG_BT_EPB:
            name = "enhanced packet block"
            le, be = pcapng.EnhancedPacketBlockLE, pcapng.EnhancedPacketBlock
        else:
            name = "packet block"
            le, be = pcapng.PacketBlockLE, pcapng.PacketBlock
        cls = le if self._little_endian else be
        block = self._decode(name, cls, raw)
        length = int(block.caplen)
        if cls.__hdr_len__ + length > len(raw):
            raise self._packet_error(f"captured length {length} overruns its {len(raw)}-byte block")
        index = int(block.iface_id)
        if index >= len(self._interfaces):
            raise self._packet_error(
                f"names interface {index}, but {len(self._interfaces)} are described"
            )
        interface = self._interfaces[index]
        ticks = (int(block.ts_high) << 32) | int(block.ts_low)
        # Exact for any resolution that divides a nanosecond; finer ones are rounded down.
        timestamp = interface.offset_ns + ticks * _NS // interface.per_second
        return Packet(bytes(block.pkt_data), timestamp, index)


def read_capture(path: Path | str) -> CaptureReader:
    """Opens a pcap or pcapng capture (told by its magic number) and reads its header; iterate
    the reader (in a `with` block) for its packets. Raises `CaptureError`."""
    return CaptureReader(path)


def write_capture(path: Path | str, link_type: int, packets: Iterable[Packet]) -> int:
    """Writes `packets` (consumed as written) to `path` and returns how many there were.

    A path ending in `.pcapng` gets pcapng: one section, an interface description (of
    `link_type`, nanosecond timestamps) for each interface up to the highest a packet names,
    each packet an enhanced packet block. Any other gets classic pcap with nanosecond
    timestamps (magic 0xa1b23c4d), where `Packet.interface` is dropped: pcap has no interfaces.
    Both are written little-endian. A packet larger than `MAX_PACKET_SIZE`, a timestamp the
    format cannot hold, or an OS error raises `CaptureError`; the file then holds the packets
    before the one that failed.
    """
    path = Path(path)
    ng = path.name.lower().endswith(".pcapng")
    if not 0 <= link_type <= (0xFFFF if ng else _LINKTYPE_MASK):
        raise CaptureError(f"{path}: link type {link_type} does not fit the file")
    try:
        with open(path, "wb", buffering=1 << 16) as file:
            return (_write_pcapng if ng else _write_pcap)(file, path, link_type, packets)
    except OSError as exc:
        raise CaptureError(f"{path}: cannot write: {exc.strerror or exc}") from exc


def _checked(path: Path, number: int, packet: Packet, max_ns: int) -> bytes:
    if len(packet.data) > MAX_PACKET_SIZE:
        raise CaptureError(
            f"{path}: packet {number}: {len(packet.data)} bytes, more than the"
            f" {MAX_PACKET_SIZE} a capture holds"
        )
    if not 0 <= packet.timestamp_ns <= max_ns:
        raise CaptureError(
            f"{path}: packet {number}: timestamp {packet.timestamp_ns} ns is out of the"
            f" file's range (0 to {max_ns})"
        )
    return bytes(packet.data)


def _write_pcap(file: BinaryIO, path: Path, link_type: int, packets: Iterable[Packet]) -> int:
    magic = pcap.TCPDUMP_MAGIC_NANO  # packed little-endian: 4d 3c b2 a1
    header = pcap.LEFileHdr(magic=magic, snaplen=MAX_PACKET_SIZE, linktype=link_type)
    file.write(bytes(header))
    record = pcap.LEPktHdr()
    count = 0
    for count, packet in enumerate(packets, 1):
        data = _checked(path, count, packet, (1 << 32) * _NS - 1)
        record.tv_sec, record.tv_usec = divmod(packet.timestamp_ns, _NS)
        record.caplen = record.len = len(data)
        file.write(bytes(record))
        file.write(data)
    return count


def _write_pcapng(file: BinaryIO, path: Path, link_type: int, packets: Iterable[Packet]) -> int:
    file.write(bytes(pcapng.SectionHeaderBlockLE()))
    options = [
        pcapng.PcapngOptionLE(code=pcapng.PCAPNG_OPT_IF_TSRESOL, data=_TSRESOL_NS),
        pcapng.PcapngOptionLE(code=pcapng.PCAPNG_OPT_ENDOFOPT),
    ]
    idb = pcapng.InterfaceDescriptionBlockLE(
        linktype=link_type, snaplen=MAX_PACKET_SIZE, opts=options
    )
    file.write(bytes(idb))  # interface 0; the others when a packet names them
    described = 1
    count = 0
    for count, packet in enumerate(packets, 1):
        data = _checked(path, count, packet, (1 << 64) - 1)
        if not 0 <= packet.interface < _MAX_INTERFACES:
            raise CaptureError(
                f"{path}: packet {count}: interface {packet.interface} is out of range"
                f" (0 to {_MAX_INTERFACES - 1})"
            )
        while described <= packet.interface:
            file.write(bytes(idb))
            described += 1
        block = pcapng.EnhancedPacketBlockLE(
            iface_id=packet.interface,
            ts_high=packet.timestamp_ns >> 32,
            ts_low=packet.timestamp_ns & 0xFFFFFFFF,
            pkt_data=data,
        )
        file.write(bytes(block))
    return count
