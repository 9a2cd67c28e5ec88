"""The packet helpers of XDP, tc and socket-filter programs, at the kernel's numbers.

Each program type gets its own set (`packet_helpers`), tried before the Linux
helper set, as the kernel gives each type its own: an XDP program cannot call
`bpf_skb_store_bytes`, a socket filter can only read its packet.

A helper's first argument is the context (`bpfexec.vm.program_types`); the
packet's pointers live in the context's hidden words, and a helper that moves
them (`bpf_xdp_adjust_head`) writes them there, where the program's rewritten
loads of `data` and `data_end` find them. The packet itself is a region (an
argument buffer) holding the whole frame: headroom, data, tailroom. The
frame's size never changes during a run, so a helper never remaps memory.

| number | helper | types |
| --- | --- | --- |
| 9 | `bpf_skb_store_bytes(skb, offset, from, len, flags)` | tc |
| 18 | `bpf_skb_vlan_push(skb, vlan_proto, vlan_tci)` | tc |
| 19 | `bpf_skb_vlan_pop(skb)` | tc |
| 10 | `bpf_l3_csum_replace(skb, offset, from, to, flags)` | tc |
| 11 | `bpf_l4_csum_replace(skb, offset, from, to, flags)` | tc |
| 23 | `bpf_redirect(ifindex, flags)`: recorded, not sent | xdp, tc |
| 26 | `bpf_skb_load_bytes(skb, offset, to, len)` | tc, socket |
| 28 | `bpf_csum_diff(from, from_size, to, to_size, seed)` | xdp, tc |
| 38 | `bpf_skb_change_tail(skb, len, flags)` | tc |
| 39 | `bpf_skb_pull_data(skb, len)`: the data is all linear already | tc |
| 44 | `bpf_xdp_adjust_head(xdp, delta)` | xdp |
| 54 | `bpf_xdp_adjust_meta(xdp, delta)` | xdp |
| 65 | `bpf_xdp_adjust_tail(xdp, delta)` | xdp |

Errors are the kernel's negative errnos, returned to the program; a context
argument that is not the context traps (HELPER_ERROR), where the kernel's
verifier would have refused the program.
"""

from __future__ import annotations

import functools
import struct

from bpfexec.vm import checksum
from bpfexec.vm.errors import Trap, TrapKind
from bpfexec.vm.helpers import HelperContext, HelperFn, HelperRegistry
from bpfexec.vm.memory import OFFSET_MASK, buffer_base
from bpfexec.vm.program_types import (
    PACKET_DATA,
    REDIRECT,
    REDIRECTED,
    SK_BUFF,
    ProgramType,
)

MASK64 = (1 << 64) - 1
ENOMEM, EFAULT, EINVAL, EACCES = 12, 14, 22, 13
ETH_HLEN = 14
CONTEXT = buffer_base(0)  # where a test run puts the context
PACKET = 1  # ...and the packet's frame: argument buffer 1

# The XDP frame of a test run, as the kernel lays it out: 256 bytes of headroom
# (XDP_PACKET_HEADROOM) whose first 40 hold the kernel's struct xdp_frame, and
# the frame's last 320 bytes (struct skb_shared_info) out of the packet's reach.
XDP_HEADROOM = 256
XDP_FRAME_STRUCT = 40
XDP_PAGE = 4096
SHARED_INFO = 320
SKB_HEADROOM = 64  # NET_SKB_PAD
MAX_METADATA = 32  # bytes of XDP metadata, a multiple of 4

BPF_F_RECOMPUTE_CSUM, BPF_F_INVALIDATE_HASH = 1, 2
BPF_F_INGRESS = 1
XDP_ABORTED, XDP_REDIRECT = 0, 4
TC_ACT_SHOT, TC_ACT_REDIRECT = 2, 7

_POINTERS = struct.Struct("<QQQ")  # data, data_end, data_meta at PACKET_DATA


def _errno(code: int) -> int:
    return -code & MASK64


class _Packet:
    """The packet of the context a helper was given: its frame and pointers (as
    offsets into the frame)."""

    def __init__(self, ctx: HelperContext, pointer: int) -> None:
        if pointer != CONTEXT:
            raise Trap(
                TrapKind.HELPER_ERROR, f"helper {ctx.helper}: {pointer:#x} is not the context"
            )
        self.ctx = ctx
        pointers = _POINTERS.unpack(ctx.read(CONTEXT + PACKET_DATA, _POINTERS.size))
        data, end, meta = (int(value) for value in pointers)
        self.base: int = data & ~OFFSET_MASK
        self.frame = ctx.region_view(buffer_base(PACKET))
        self.data, self.end, self.meta = data - self.base, end - self.base, meta - self.base

    @property
    def length(self) -> int:
        return self.end - self.data

    def bytes(self) -> memoryview:
        """The packet's data, writable in place."""
        return memoryview(self.frame)[self.data : self.end]

    def store(self) -> None:
        """Write the pointers back to the context (and skb->len)."""
        pointers = (self.base + self.data, self.base + self.end, self.base + self.meta)
        self.ctx.write(CONTEXT + PACKET_DATA, _POINTERS.pack(*pointers))


def _int(value: int) -> int:
    """A helper's `int` argument (32 bits, signed)."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >> 31 else value


# -- XDP -------------------------------------------------------------------------------


def bpf_xdp_adjust_head(ctx: HelperContext, xdp: int, delta: int, *_: int) -> int:
    packet = _Packet(ctx, xdp)
    delta = _int(delta)
    metadata = packet.data - packet.meta
    data = packet.data + delta
    if data < XDP_FRAME_STRUCT + metadata or data > packet.end - ETH_HLEN:
        return _errno(EINVAL)
    if metadata:
        frame = packet.frame
        frame[packet.meta + delta : data] = frame[packet.meta : packet.data]
    packet.meta += delta
    packet.data = data
    packet.store()
    return 0


def bpf_xdp_adjust_meta(ctx: HelperContext, xdp: int, delta: int, *_: int) -> int:
    packet = _Packet(ctx, xdp)
    meta = packet.meta + _int(delta)
    if meta < XDP_FRAME_STRUCT or meta > packet.data:
        return _errno(EINVAL)
    length = packet.data - meta
    if length > MAX_METADATA or length % 4:
        return _errno(EACCES)
    packet.meta = meta
    packet.store()
    return 0


def bpf_xdp_adjust_tail(ctx: HelperContext, xdp: int, delta: int, *_: int) -> int:
    packet = _Packet(ctx, xdp)
    delta = _int(delta)
    end = packet.end + delta
    if end > len(packet.frame) - SHARED_INFO or end < packet.data + ETH_HLEN:
        return _errno(EINVAL)
    if delta > 0:  # the kernel clears what the packet grows into
        packet.frame[packet.end : end] = bytes(delta)
    packet.end = end
    packet.store()
    return 0


# -- sk_buff ---------------------------------------------------------------------------


def bpf_skb_load_bytes(ctx: HelperContext, skb: int, offset: int, to: int, size: int,
                       *_: int) -> int:  # fmt: skip
    packet = _Packet(ctx, skb)
    offset &= 0xFFFFFFFF
    size &= 0xFFFFFFFF
    target = ctx.view(to, size, write=True)
    if offset > 0x7FFFFFFF or offset + size > packet.length:
        target[:] = bytes(size)
        return _errno(EFAULT)
    target[:] = packet.bytes()[offset : offset + size]
    return 0


def bpf_skb_store_bytes(ctx: HelperContext, skb: int, offset: int, source: int, size: int,
                        flags: int) -> int:  # fmt: skip
    packet = _Packet(ctx, skb)
    offset &= 0xFFFFFFFF
    size &= 0xFFFFFFFF
    if flags & ~(BPF_F_RECOMPUTE_CSUM | BPF_F_INVALIDATE_HASH):
        return _errno(EINVAL)
    if offset > 0x7FFFFFFF or offset + size > packet.length:
        return _errno(EFAULT)
    # The packet has no CHECKSUM_COMPLETE sum to keep (BPF_F_RECOMPUTE_CSUM) nor a
    # hash to clear (BPF_F_INVALIDATE_HASH): the bytes are all there is to change.
    packet.bytes()[offset : offset + size] = ctx.read(source, size)
    return 0


def bpf_l3_csum_replace(ctx: HelperContext, skb: int, offset: int, old: int, new: int,
                        flags: int) -> int:  # fmt: skip
    packet = _Packet(ctx, skb)
    return checksum.l3_csum_replace(packet.bytes(), offset & MASK64, old, new, flags) & MASK64


def bpf_l4_csum_replace(ctx: HelperContext, skb: int, offset: int, old: int, new: int,
                        flags: int) -> int:  # fmt: skip
    packet = _Packet(ctx, skb)
    return checksum.l4_csum_replace(packet.bytes(), offset & MASK64, old, new, flags) & MASK64


# VLAN tags: a tag "present" is the one the sk_buff carries outside its data
# (skb->vlan_proto and vlan_tci, the hardware-accelerated tag), as the kernel's
# skb_vlan_push and skb_vlan_pop keep it; a tag in the data follows the MACs.
VLAN_HLEN = 4
ETH_ALEN = 6
_FIELD = {field.name: field.offset for field in SK_BUFF}


def _network(ethertype: int) -> int:
    """An ethertype as an __sk_buff field holds it: in network byte order."""
    return int.from_bytes(ethertype.to_bytes(2, "big"), "little")


_VLAN_TYPES = (_network(0x8100), _network(0x88A8))  # ETH_P_8021Q, ETH_P_8021AD


class _Skb(_Packet):
    """A tc packet and its __sk_buff fields."""

    def field(self, name: str) -> int:
        return int.from_bytes(self.ctx.read(CONTEXT + _FIELD[name], 4), "little")

    def set(self, name: str, value: int) -> None:
        self.ctx.write(CONTEXT + _FIELD[name], (value & 0xFFFFFFFF).to_bytes(4, "little"))

    def store(self) -> None:
        super().store()
        self.set("len", self.length)

    def put_tag(self, proto: int, tci: int) -> None:
        """`__vlan_hwaccel_put_tag`."""
        self.set("vlan_proto", proto)
        self.set("vlan_tci", tci)
        self.set("vlan_present", 1 if proto or tci else 0)

    def pop_data_tag(self) -> int:
        """`__skb_vlan_pop`: the tag after the MACs out of the data (its TCI), and
        skb->protocol from what it encapsulated; or a negative errno."""
        if self.length < ETH_HLEN + VLAN_HLEN:
            return -ENOMEM
        frame, data = self.frame, self.data
        tci = int.from_bytes(frame[data + ETH_HLEN : data + ETH_HLEN + 2], "big")
        encapsulated = frame[data + ETH_HLEN + 2 : data + ETH_HLEN + 4]
        following = frame[data + ETH_HLEN + 4 : data + ETH_HLEN + 6]
        frame[data + VLAN_HLEN : data + VLAN_HLEN + 2 * ETH_ALEN] = frame[
            data : data + 2 * ETH_ALEN
        ]
        self.data += VLAN_HLEN
        self.meta = self.data
        if int.from_bytes(encapsulated, "big") >= 0x0600:  # vlan_set_encap_proto
            self.set("protocol", int.from_bytes(encapsulated, "little"))
        elif bytes(following) == b"\xff\xff":
            self.set("protocol", _network(0x0001))  # ETH_P_802_3
        else:
            self.set("protocol", _network(0x0004))  # ETH_P_802_2
        return tci


def bpf_skb_vlan_push(ctx: HelperContext, skb: int, vlan_proto: int, vlan_tci: int,
                      *_: int) -> int:  # fmt: skip
    packet = _Skb(ctx, skb)
    proto = vlan_proto & 0xFFFF
    if proto not in _VLAN_TYPES:
        proto = _VLAN_TYPES[0]
    if packet.field("vlan_present"):  # the tag present goes into the data first
        if packet.data < VLAN_HLEN:
            return _errno(ENOMEM)
        frame, data = packet.frame, packet.data - VLAN_HLEN
        frame[data : data + 2 * ETH_ALEN] = frame[data + VLAN_HLEN : data + VLAN_HLEN + 12]
        old = packet.field("vlan_proto")
        frame[data + 12 : data + 14] = (old & 0xFFFF).to_bytes(2, "little")
        frame[data + 14 : data + 16] = (packet.field("vlan_tci") & 0xFFFF).to_bytes(2, "big")
        packet.data = packet.meta = data
        packet.set("protocol", old)
    packet.put_tag(proto, vlan_tci & 0xFFFF)
    packet.store()
    return 0


def bpf_skb_vlan_pop(ctx: HelperContext, skb: int, *_: int) -> int:
    packet = _Skb(ctx, skb)
    if packet.field("vlan_present"):
        packet.put_tag(0, 0)
    elif packet.field("protocol") not in _VLAN_TYPES:
        return 0
    else:
        popped = packet.pop_data_tag()
        if popped < 0:
            return _errno(-popped)
    # The next tag in the data, if any, becomes the one present.
    proto = packet.field("protocol")
    if proto in _VLAN_TYPES:
        tci = packet.pop_data_tag()
        if tci < 0:
            packet.store()
            return _errno(-tci)
        packet.put_tag(proto, tci)
    packet.store()
    return 0


BPF_SKB_CHANGE_TAIL = 38
# __bpf_skb_max_len of the test run's device, the loopback: its MTU and header.
MAX_SKB_LEN = 65536 + ETH_HLEN


def bpf_skb_change_tail(ctx: HelperContext, skb: int, size: int, flags: int, *_: int) -> int:
    """Trim or grow (zero-filled) the packet to `size` bytes, between its network
    header (the test run's `__bpf_skb_min_len`) and MAX_SKB_LEN; a test run gives
    a program that calls this a frame with room for MAX_SKB_LEN bytes."""
    packet = _Skb(ctx, skb)
    size &= 0xFFFFFFFF
    if flags or size > MAX_SKB_LEN or size < ETH_HLEN:
        return _errno(EINVAL)
    end = packet.data + size
    if end > len(packet.frame) - SHARED_INFO:  # a frame without the room (not a test run's)
        return _errno(ENOMEM)
    if end > packet.end:
        packet.frame[packet.end : end] = bytes(end - packet.end)
    packet.end = end
    packet.store()
    return 0


def bpf_skb_pull_data(ctx: HelperContext, skb: int, size: int, *_: int) -> int:
    """The test run's packet is linear: only a length beyond it fails."""
    packet = _Skb(ctx, skb)
    return _errno(ENOMEM) if size & 0xFFFFFFFF > packet.length else 0


# -- every packet type ---------------------------------------------------------------


def bpf_csum_diff(ctx: HelperContext, source: int, source_size: int, target: int,
                  target_size: int, seed: int) -> int:  # fmt: skip
    """As Linux 6.13 and later compute it: any sizes, a 16-bit result."""
    source_size &= 0xFFFFFFFF
    target_size &= 0xFFFFFFFF
    ctx.charge_bytes(source_size + target_size, "bpf_csum_diff's buffers")
    old = ctx.read(source, source_size) if source_size else b""
    new = ctx.read(target, target_size) if target_size else b""
    return checksum.csum_diff(old, new, seed & 0xFFFFFFFF) & MASK64


def _redirect(verdict: int, refused: int) -> HelperFn:
    def bpf_redirect(ctx: HelperContext, ifindex: int, flags: int, *_: int) -> int:
        if flags & ~BPF_F_INGRESS:
            return refused
        target = REDIRECTED | (flags & BPF_F_INGRESS) << 32 | ifindex & 0xFFFFFFFF
        ctx.write(CONTEXT + REDIRECT, target.to_bytes(8, "little"))
        return verdict

    return bpf_redirect


@functools.cache
def packet_helpers(kind: ProgramType) -> HelperRegistry:
    """The helpers of `kind` (empty for syscall programs); shared, they hold no state."""
    registry = HelperRegistry()
    if kind is ProgramType.XDP:
        registry.register(_redirect(XDP_REDIRECT, XDP_ABORTED), id=23, name="bpf_redirect")
        registry.register(bpf_csum_diff, id=28)
        registry.register(bpf_xdp_adjust_head, id=44)
        registry.register(bpf_xdp_adjust_meta, id=54)
        registry.register(bpf_xdp_adjust_tail, id=65)
    elif kind is ProgramType.TC:
        registry.register(bpf_skb_store_bytes, id=9)
        registry.register(bpf_l3_csum_replace, id=10)
        registry.register(bpf_l4_csum_replace, id=11)
        registry.register(bpf_skb_vlan_push, id=18)
        registry.register(bpf_skb_vlan_pop, id=19)
        registry.register(_redirect(TC_ACT_REDIRECT, TC_ACT_SHOT), id=23, name="bpf_redirect")
        registry.register(bpf_skb_load_bytes, id=26)
        registry.register(bpf_csum_diff, id=28)
        registry.register(bpf_skb_change_tail, id=BPF_SKB_CHANGE_TAIL)
        registry.register(bpf_skb_pull_data, id=39)
    elif kind is ProgramType.SOCKET:
        registry.register(bpf_skb_load_bytes, id=26)
    return registry
