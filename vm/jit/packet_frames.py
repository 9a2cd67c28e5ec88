"""Packet frames in native code: the context and frame of every run of a chunk of packets.

`bpfexec.vm.packet_run` hands a chunk of packets (their bytes end to end) to
`build_frames` when the JIT runs them. One loop in machine code,
`bpfexec_packet_frames` below (compiled once per process), lays out for each
run what `bpfexec.vm.packet_run` documents the kernel's test run building,
byte for byte as its Python `_arguments` does:

- a slot of `stride` bytes in the arena: the context (CONTEXT_SIZE bytes) and
  after it the frame, both zeroed;
- the packet copied into the frame at the headroom (XDP 256, tc and socket
  64); the context's hidden `data`, `data_end`, `data_meta` addresses (the
  frame is argument buffer `PACKET`, mapped at `buffer_base(PACKET)`);
- XDP: `ingress_ifindex`; tc and socket: `len`, `pkt_type` and `protocol` as
  `eth_type_trans` decides them, `ifindex`, `wire_len`;
- the run's row of the native batch loop's buffer table: the context and the
  frame, as host address and length.

Every packet is at least an Ethernet header (the caller checks), and the
packets' bytes are followed by two bytes of padding: the 802.3 test reads
bytes 14..15, and uses them only for packets that have them.
"""

from __future__ import annotations

import ctypes
from array import array

from bpfexec.vm.batch import BUFFER_WORDS
from bpfexec.vm.jit.runtime import NativeFunction
from bpfexec.vm.memory import buffer_base
from bpfexec.vm.packet_helpers import (
    ETH_HLEN,
    PACKET,
    SHARED_INFO,
    SKB_HEADROOM,
    XDP_HEADROOM,
    XDP_PAGE,
)
from bpfexec.vm.packet_run import LOOPBACK, PADDING
from bpfexec.vm.program_types import (
    CONTEXT_SIZE,
    PACKET_DATA,
    PACKET_END,
    PACKET_META,
    SK_BUFF,
    XDP_MD,
    Field,
    ProgramType,
)

FRAMES_SYMBOL = "bpfexec_packet_frames"
KINDS = {ProgramType.XDP: 0, ProgramType.TC: 1, ProgramType.SOCKET: 2}


class PacketFrames(ctypes.Structure):
    """What the loop reads (every field 8 bytes)."""

    _fields_ = [
        ("packets", ctypes.c_void_p),  # the packets' bytes end to end, then PADDING bytes
        ("offsets", ctypes.c_void_p),  # count + 1 u64: where each packet starts, then the end
        ("first", ctypes.c_int64),  # the runs first..first + runs - 1 are laid out: run r
        ("runs", ctypes.c_int64),  # is of packet r / repeat, at (r - first) * stride
        ("repeat", ctypes.c_int64),
        ("arena", ctypes.c_void_p),  # stride bytes a run
        ("stride", ctypes.c_int64),
        ("table", ctypes.c_void_p),  # BUFFER_WORDS u64 a run (only the first 4 written)
        ("kind", ctypes.c_int64),  # KINDS
        ("tailroom", ctypes.c_int64),  # a tc frame has room for a packet this long
        ("bytes_end", ctypes.c_int64),  # where the packets' bytes end (the padding starts)
    ]


def _offset(fields: tuple[Field, ...], name: str) -> int:
    return next(field.offset for field in fields if field.name == name)


def _frames_ir() -> str:
    struct_type = "{ " + ", ".join(
        "ptr" if field[1] is ctypes.c_void_p else "i64" for field in PacketFrames._fields_
    ) + " }"  # fmt: skip
    loads = "\n".join(
        f"  %{name}.p = getelementptr inbounds %frames, ptr %s, i32 0, i32 {index}\n"
        f"  %{name} = load {'ptr' if kind is ctypes.c_void_p else 'i64'}, ptr %{name}.p"
        for index, (name, kind, *_) in enumerate(PacketFrames._fields_)
    )
    base = buffer_base(PACKET)
    xdp_ifindex = _offset(XDP_MD, "ingress_ifindex")
    skb = {name: _offset(SK_BUFF, name) for name in
           ("len", "pkt_type", "protocol", "ifindex", "wire_len")}  # fmt: skip

    def at(name: str, offset: int) -> str:
        return f"  %{name} = getelementptr i8, ptr %slot, i64 {offset}"

    return f"""
%frames = type {struct_type}

declare void @llvm.memset.p0.i64(ptr, i8, i64, i1)
declare void @llvm.memcpy.p0.p0.i64(ptr, ptr, i64, i1)
declare i16 @llvm.bswap.i16(i16)

define i64 @{FRAMES_SYMBOL}(ptr noalias %s) nounwind {{
start:
{loads}
  %is_xdp = icmp eq i64 %kind, {KINDS[ProgramType.XDP]}
  %is_socket = icmp eq i64 %kind, {KINDS[ProgramType.SOCKET]}
  %head = select i1 %is_xdp, i64 {XDP_HEADROOM}, i64 {SKB_HEADROOM}
  %pulled = select i1 %is_socket, i64 {ETH_HLEN}, i64 0
  %data_at = add i64 %head, %pulled
  %data_address = add i64 %data_at, {base}
  %start_address = add i64 %head, {base}
  br label %loop
loop:
  %r = phi i64 [ 0, %start ], [ %next, %done ]
  %more = icmp ult i64 %r, %runs
  br i1 %more, label %body, label %out
body:
  %run = add i64 %r, %first
  %p = udiv i64 %run, %repeat
  %from.p = getelementptr i64, ptr %offsets, i64 %p
  %from = load i64, ptr %from.p
  %to.p = getelementptr i64, ptr %from.p, i64 1
  %to = load i64, ptr %to.p
  %len = sub i64 %to, %from
  %src = getelementptr i8, ptr %packets, i64 %from
  %xdp_wanted = add i64 %len, {XDP_HEADROOM + SHARED_INFO}
  %xdp_grown = icmp ugt i64 %xdp_wanted, {XDP_PAGE}
  %xdp_size = select i1 %xdp_grown, i64 %xdp_wanted, i64 {XDP_PAGE}
  %roomy = icmp ugt i64 %tailroom, %len
  %room = select i1 %roomy, i64 %tailroom, i64 %len
  %skb_size = add i64 %room, {SKB_HEADROOM + SHARED_INFO}
  %size = select i1 %is_xdp, i64 %xdp_size, i64 %skb_size
  %slot.o = mul i64 %r, %stride
  %slot = getelementptr i8, ptr %arena, i64 %slot.o
  %used = add i64 %size, {CONTEXT_SIZE}
  ; A packet within the bytes, an Ethernet header at least, its slot within the stride:
  ; or the loop stops here (the caller made the chunk wrong).
  %backwards = icmp ugt i64 %from, %to
  %beyond = icmp ugt i64 %to, %bytes_end
  %runt = icmp ult i64 %len, {ETH_HLEN}
  %overflows = icmp ugt i64 %used, %stride
  %bad1 = or i1 %backwards, %beyond
  %bad2 = or i1 %runt, %overflows
  %bad = or i1 %bad1, %bad2
  br i1 %bad, label %refused, label %fill
refused:
  ret i64 %r
fill:
  call void @llvm.memset.p0.i64(ptr %slot, i8 0, i64 %used, i1 false)
  %frame = getelementptr i8, ptr %slot, i64 {CONTEXT_SIZE}
  %dst = getelementptr i8, ptr %frame, i64 %head
  call void @llvm.memcpy.p0.p0.i64(ptr %dst, ptr %src, i64 %len, i1 false)
  %end_address = add i64 %start_address, %len
{at("data.p", PACKET_DATA)}
  store i64 %data_address, ptr %data.p, align 1
{at("end.p", PACKET_END)}
  store i64 %end_address, ptr %end.p, align 1
{at("meta.p", PACKET_META)}
  store i64 %data_address, ptr %meta.p, align 1
  %row.o = mul i64 %r, {BUFFER_WORDS}
  %row = getelementptr i64, ptr %table, i64 %row.o
  store ptr %slot, ptr %row
  %row1 = getelementptr i64, ptr %row, i64 1
  store i64 {CONTEXT_SIZE}, ptr %row1
  %row2 = getelementptr i64, ptr %row, i64 2
  store ptr %frame, ptr %row2
  %row3 = getelementptr i64, ptr %row, i64 3
  store i64 %size, ptr %row3
  br i1 %is_xdp, label %xdp, label %skb
xdp:
{at("ifindex.p", xdp_ifindex)}
  store i32 {LOOPBACK}, ptr %ifindex.p, align 1
  br label %done
skb:
  %len32 = trunc i64 %len to i32
  %pulled32 = trunc i64 %pulled to i32
  %skb_len = sub i32 %len32, %pulled32
{at("len.p", skb["len"])}
  store i32 %skb_len, ptr %len.p, align 1
  %mac = load i48, ptr %src, align 1
  %mac0 = trunc i48 %mac to i8
  %group_bit = and i8 %mac0, 1
  %group = icmp ne i8 %group_bit, 0
  %broadcast = icmp eq i48 %mac, -1
  %ours = icmp eq i48 %mac, 0
  %group_type = select i1 %broadcast, i32 1, i32 2
  %unicast_type = select i1 %ours, i32 0, i32 3
  %pkt_type = select i1 %group, i32 %group_type, i32 %unicast_type
{at("pkt_type.p", skb["pkt_type"])}
  store i32 %pkt_type, ptr %pkt_type.p, align 1
  %type.p = getelementptr i8, ptr %src, i64 12
  %type.be = load i16, ptr %type.p, align 1
  %type = call i16 @llvm.bswap.i16(i16 %type.be)
  %ethernet = icmp uge i16 %type, 1536
  %llc.p = getelementptr i8, ptr %src, i64 14
  %llc = load i16, ptr %llc.p, align 1
  %llc_ff = icmp eq i16 %llc, -1
  %has_llc = icmp uge i64 %len, 16
  %raw = and i1 %has_llc, %llc_ff
  %ieee = select i1 %raw, i16 1, i16 4
  %protocol = select i1 %ethernet, i16 %type, i16 %ieee
  %protocol.be = call i16 @llvm.bswap.i16(i16 %protocol)
{at("protocol.p", skb["protocol"])}
  store i16 %protocol.be, ptr %protocol.p, align 1
{at("skb_ifindex.p", skb["ifindex"])}
  store i32 {LOOPBACK}, ptr %skb_ifindex.p, align 1
{at("wire_len.p", skb["wire_len"])}
  store i32 %len32, ptr %wire_len.p, align 1
  br label %done
done:
  %next = add i64 %r, 1
  br label %loop
out:
  ret i64 %runs
}}
"""


_frames = NativeFunction(
    FRAMES_SYMBOL, _frames_ir, ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_void_p)
)


def build_frames(
    kind: ProgramType,
    packets: bytes,
    offsets: array[int],
    first: int,
    runs: int,
    repeat: int,
    arena: bytearray,
    stride: int,
    table: array[int],
    tailroom: int = 0,
) -> None:
    """Lay out runs `first`..`first + runs - 1` of the packets, each run `repeat`
    times (`offsets`: a word a packet and one for the end; `packets` ends in PADDING
    bytes), in `arena`, `stride` bytes a run, and their rows in `table`. ValueError
    for a chunk or an arena that does not hold together (checked before any write
    outside its run's slot: the loop checks each packet before laying it out)."""
    count = len(offsets) - 1
    if not (
        kind in KINDS and repeat >= 1 and first >= 0 and runs >= 0
        and first + runs <= count * repeat and len(arena) >= runs * stride
        and len(table) >= runs * BUFFER_WORDS and len(packets) >= PADDING
        and offsets.typecode == "Q"
    ):  # fmt: skip
        raise ValueError("build_frames: the chunk, arena or table does not fit together")
    spec = PacketFrames()
    source = ctypes.c_char_p(packets)  # read only: no copy of the bytes
    view = (ctypes.c_char * len(arena)).from_buffer(arena)
    try:
        spec.packets = ctypes.cast(source, ctypes.c_void_p).value
        spec.offsets = offsets.buffer_info()[0]
        spec.first = first
        spec.runs = runs
        spec.repeat = repeat
        spec.arena = ctypes.addressof(view)
        spec.stride = stride
        spec.table = table.buffer_info()[0]
        spec.kind = KINDS[kind]
        spec.tailroom = tailroom
        spec.bytes_end = len(packets) - PADDING
        built = _frames(ctypes.addressof(spec))
    finally:
        del view
    if built != runs:
        packet = (first + built) // repeat
        raise ValueError(f"build_frames: packet {packet} of the chunk is out of its bounds")
