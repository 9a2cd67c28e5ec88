"""A capture read by libpcap into chunks of packets, with no Python object per packet.

`bpfexec test-run` on the JIT reads its capture here when it needs no packet one
by one (no `--out`, no `--per-packet`): libpcap (the reference reader of pcap
and pcapng, both byte orders, microsecond and nanosecond files) opens the file,
and a loop in native code, `bpfexec_read_packets` below (compiled once per
process with the JIT's LLVM), calls its `pcap_next_ex` for each record and lays
the packets end to end in a `PacketChunk` (timestamps are not kept: the
summary has no use for them). `available()` says whether libpcap and the JIT are there; without
them the command reads with `bpfexec.client.captures`, packet by packet.

    with LibpcapCapture("in.pcap") as capture:
        for chunk in capture.chunks(256):
            ...

Errors are `CaptureError`, one line naming the file (and the packet, from 1,
with libpcap's words for what is wrong with it).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from array import array
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType

from bpfexec.client.captures import MAX_PACKET_SIZE, CaptureError
from bpfexec.vm.packet_run import PADDING, PacketChunk

READ_SYMBOL = "bpfexec_read_packets"
PCAP_ERRBUF_SIZE = 256
TOO_LONG = -100  # the loop's status for a record longer than MAX_PACKET_SIZE
AVERAGE = 2048  # bytes of arena a packet of a chunk is given, besides one of the longest


class _Reader(ctypes.Structure):
    """What the loop reads and writes (every field 8 bytes)."""

    _fields_ = [
        ("pcap", ctypes.c_void_p),  # the pcap_t
        ("next_ex", ctypes.c_void_p),  # libpcap's pcap_next_ex
        ("data", ctypes.c_void_p),  # the packets' bytes go here, end to end...
        ("capacity", ctypes.c_int64),  # ...up to this many
        ("offsets", ctypes.c_void_p),  # max_count + 1 u64
        ("max_count", ctypes.c_int64),
        ("count", ctypes.c_int64),  # out: packets read
        ("status", ctypes.c_int64),  # out: 1 (full), pcap_next_ex's return, or TOO_LONG
        ("shortest", ctypes.c_int64),  # out
        ("longest", ctypes.c_int64),  # out
    ]


def _read_ir() -> str:
    types = ", ".join("ptr" if f[1] is ctypes.c_void_p else "i64" for f in _Reader._fields_)
    index = {field[0]: n for n, field in enumerate(_Reader._fields_)}

    def field(name: str) -> str:
        return f"getelementptr inbounds %reader, ptr %s, i32 0, i32 {index[name]}"

    loads = "\n".join(
        f"  %{name}.p = {field(name)}\n  %{name} = load {kind}, ptr %{name}.p"
        for name, kind in [("pcap", "ptr"), ("next_ex", "ptr"), ("data", "ptr"),
                           ("capacity", "i64"), ("offsets", "ptr"),
                           ("max_count", "i64")]
    )  # fmt: skip
    # struct pcap_pkthdr on LP64: a struct timeval (two longs), then u32 caplen and len.
    return f"""
%reader = type {{ {types} }}

declare void @llvm.memcpy.p0.p0.i64(ptr, ptr, i64, i1)

define void @{READ_SYMBOL}(ptr noalias %s) nounwind {{
start:
{loads}
  %header.slot = alloca ptr
  %bytes.slot = alloca ptr
  %n.slot = alloca i64
  %used.slot = alloca i64
  %short.slot = alloca i64
  %long.slot = alloca i64
  %status.slot = alloca i64
  store i64 0, ptr %n.slot
  store i64 0, ptr %used.slot
  store i64 -1, ptr %short.slot
  store i64 0, ptr %long.slot
  store i64 1, ptr %status.slot
  store i64 0, ptr %offsets
  br label %loop
loop:
  %n = load i64, ptr %n.slot
  %used = load i64, ptr %used.slot
  %full = icmp uge i64 %n, %max_count
  %room = sub i64 %capacity, %used
  %tight = icmp slt i64 %room, {MAX_PACKET_SIZE + PADDING}
  %stop = or i1 %full, %tight
  br i1 %stop, label %out, label %read
read:
  %rc = call i32 %next_ex(ptr %pcap, ptr %header.slot, ptr %bytes.slot)
  %ok = icmp eq i32 %rc, 1
  br i1 %ok, label %got, label %ended
ended:
  %rc64 = sext i32 %rc to i64
  store i64 %rc64, ptr %status.slot
  br label %out
got:
  %header = load ptr, ptr %header.slot
  %bytes = load ptr, ptr %bytes.slot
  %caplen.p = getelementptr i8, ptr %header, i64 16
  %caplen32 = load i32, ptr %caplen.p
  %caplen = zext i32 %caplen32 to i64
  %long_packet = icmp ugt i64 %caplen, {MAX_PACKET_SIZE}
  br i1 %long_packet, label %too_long, label %copy
too_long:
  store i64 {TOO_LONG}, ptr %status.slot
  br label %out
copy:
  %to = getelementptr i8, ptr %data, i64 %used
  call void @llvm.memcpy.p0.p0.i64(ptr %to, ptr %bytes, i64 %caplen, i1 false)
  %used1 = add i64 %used, %caplen
  store i64 %used1, ptr %used.slot
  %n1 = add i64 %n, 1
  %offset.p = getelementptr i64, ptr %offsets, i64 %n1
  store i64 %used1, ptr %offset.p
  store i64 %n1, ptr %n.slot
  %short = load i64, ptr %short.slot
  %shorter = icmp ult i64 %caplen, %short
  %short1 = select i1 %shorter, i64 %caplen, i64 %short
  store i64 %short1, ptr %short.slot
  %long = load i64, ptr %long.slot
  %longer = icmp ugt i64 %caplen, %long
  %long1 = select i1 %longer, i64 %caplen, i64 %long
  store i64 %long1, ptr %long.slot
  br label %loop
out:
  %count = load i64, ptr %n.slot
  %count.p = {field("count")}
  store i64 %count, ptr %count.p
  %status = load i64, ptr %status.slot
  %status.p = {field("status")}
  store i64 %status, ptr %status.p
  %shortest = load i64, ptr %short.slot
  %shortest.p = {field("shortest")}
  store i64 %shortest, ptr %shortest.p
  %longest = load i64, ptr %long.slot
  %longest.p = {field("longest")}
  store i64 %longest, ptr %longest.p
  ret void
}}
"""


@functools.cache
def _libpcap() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("pcap")
    if name is None:
        return None
    try:
        library = ctypes.CDLL(name)
    except OSError:
        return None
    library.pcap_open_offline.restype = ctypes.c_void_p
    library.pcap_open_offline.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    library.pcap_datalink.argtypes = [ctypes.c_void_p]
    library.pcap_datalink.restype = ctypes.c_int
    library.pcap_geterr.argtypes = [ctypes.c_void_p]
    library.pcap_geterr.restype = ctypes.c_char_p
    library.pcap_close.argtypes = [ctypes.c_void_p]
    library.pcap_close.restype = None
    return library


def available() -> bool:
    """Whether libpcap and the JIT's LLVM (llvmlite) are there to read with."""
    if _libpcap() is None:
        return False
    try:
        import llvmlite  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _read_function() -> Callable[[int], None]:
    from bpfexec.vm.jit.runtime import NativeFunction  # the JIT: imported once needed

    return NativeFunction(READ_SYMBOL, _read_ir, ctypes.CFUNCTYPE(None, ctypes.c_void_p))


class LibpcapCapture:
    """A capture file open in libpcap; `chunks()` reads its packets (once)."""

    link_type: int

    def __init__(self, path: Path | str) -> None:
        library = _libpcap()
        if library is None:
            raise CaptureError(f"{path}: libpcap is not installed")
        self.path = Path(path)
        self.count = 0
        self._library = library
        error = ctypes.create_string_buffer(PCAP_ERRBUF_SIZE)
        handle = library.pcap_open_offline(os.fsencode(self.path), error)
        if not handle:
            reason = error.value.decode(errors="replace").strip() or "cannot open"
            reason = reason.removeprefix(f"{self.path}: ")  # libpcap names the file too
            raise CaptureError(f"{self.path}: {reason}")
        self._handle: int | None = handle
        self.link_type = library.pcap_datalink(handle)

    def chunks(self, size: int) -> Iterator[PacketChunk]:
        """The packets, up to `size` a chunk."""
        reader = _Reader()
        capacity = size * AVERAGE + MAX_PACKET_SIZE + PADDING
        data = (ctypes.c_char * capacity)()
        offsets = array("Q", bytes(8 * (size + 1)))
        read = _read_function()
        while self._handle is not None:
            reader.pcap = self._handle
            reader.next_ex = ctypes.cast(self._library.pcap_next_ex, ctypes.c_void_p).value
            reader.data = ctypes.addressof(data)
            reader.capacity = capacity
            reader.offsets = offsets.buffer_info()[0]
            reader.max_count = size
            read(ctypes.addressof(reader))
            count = reader.count
            if count:
                used = offsets[count]
                chunk = PacketChunk(
                    ctypes.string_at(data, used) + bytes(PADDING), offsets[: count + 1],
                    reader.longest, reader.shortest,
                )  # fmt: skip
                self.count += count
                yield chunk
            if reader.status != 1:
                self._end(reader.status)
                return

    def _end(self, status: int) -> None:
        """The loop stopped on `status`: the end of the file, or an error (raised)."""
        number = self.count + 1
        try:
            if status == TOO_LONG:
                raise CaptureError(
                    f"{self.path}: packet {number}: longer than {MAX_PACKET_SIZE} bytes"
                )
            if status == -1:
                assert self._handle is not None
                reason = (self._library.pcap_geterr(self._handle) or b"").decode(errors="replace")
                raise CaptureError(f"{self.path}: packet {number}: {reason.strip()}")
        finally:
            self.close()

    def close(self) -> None:
        if self._handle is not None:
            self._library.pcap_close(self._handle)
            self._handle = None

    def __enter__(self) -> LibpcapCapture:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
