"""Test runs: a packet program over packets, as the kernel's BPF_PROG_TEST_RUN runs it.

`run_packets` runs an XDP, tc, socket-filter or syscall program (its type is
its section's: `bpfexec.vm.program_types`) once per packet, with a context
and a packet frame built as the kernel's test run builds them, and yields a
`PacketResult` per packet: the return value and its verdict, the packet's
bytes after the run (`data_out`), the writable context fields, the redirect
asked for. The maps are shared by every packet of the run.

The frames, as the kernel's test run lays them out:

- XDP: a 4096-byte frame, the packet at 256 (the headroom, whose first 40
  bytes the kernel's own `xdp_frame` takes), its last 320 bytes out of reach of
  `bpf_xdp_adjust_tail`. `data_meta` starts equal to `data`; `ingress_ifindex`
  is 1 (the loopback device the kernel runs on).
- tc: the packet at 64 (NET_SKB_PAD), `data` at its Ethernet header; `len`,
  `protocol` (network byte order, as the kernel leaves it) and `pkt_type`
  (from the destination MAC, as `eth_type_trans` decides it against the
  loopback device's all-zero address) filled in; `ifindex` 1.
- socket filter: the same, with `data` at the network header: the kernel
  pulls the Ethernet header before the run, so `len` and `LD_ABS` offsets
  count from there; and, as the kernel does, the Ethernet header of
  `data_out` is zeroed.
- syscall: the packet is the context buffer, and `data_out` is that buffer
  after the run.

With `repeat`, each packet runs `repeat` times on fresh copies of its frame
(the maps going on), and the last run is reported, with the mean duration.
The runs are a batch (`bpfexec.vm.batch.run_chunks`): on the JIT, chunks of
packets run in its native loop, and a run's duration is the mean of its chunk.
The kernel reruns on the same buffer, so an XDP program that moves its head
would see it move again; a copy per run keeps every repetition alike.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import cast

from bpfexec.vm.batch import CHUNK, run_chunks
from bpfexec.vm.context_access import context_type, with_context
from bpfexec.vm.errors import RequestError, Trap
from bpfexec.vm.helpers import HelperChain, HelperResolver
from bpfexec.vm.limits import Limits
from bpfexec.vm.machine import Argument, Engine, Interrupt, Result, Unpassed, get_engine
from bpfexec.vm.maps import MapSet
from bpfexec.vm.memory import buffer_base
from bpfexec.vm.packet_helpers import (
    BPF_SKB_CHANGE_TAIL,
    ETH_HLEN,
    MAX_SKB_LEN,
    PACKET,
    SHARED_INFO,
    SKB_HEADROOM,
    XDP_HEADROOM,
    XDP_PAGE,
    packet_helpers,
)
from bpfexec.vm.program import Program
from bpfexec.vm.program_types import (
    CONTEXT_SIZE,
    PACKET_DATA,
    REDIRECT,
    REDIRECTED,
    SK_BUFF,
    XDP_MD,
    ProgramType,
    verdict,
)

LOOPBACK = 1  # the ifindex of the device the kernel's test run uses
PACKET_HOST, PACKET_BROADCAST, PACKET_MULTICAST, PACKET_OTHERHOST = 0, 1, 2, 3
ETH_P_802_3, ETH_P_802_2, ETH_P_802_3_MIN = 0x0001, 0x0004, 0x0600
_POINTERS = struct.Struct("<QQQ")
_FIELDS = {field.name: field for field in SK_BUFF}
_XDP_FIELDS = {field.name: field for field in XDP_MD}


@dataclass(frozen=True)
class PacketResult:
    """What one packet's run did."""

    retval: int
    verdict: str
    data: bytes  # the packet after the run (data_out)
    context: dict[str, int | list[int]]  # the writable context fields after the run
    fuel_used: int
    duration_ns: int
    trap: Trap | None = None
    log: tuple[str, ...] = ()
    redirect: tuple[int, bool] | None = None  # (ifindex, ingress) if bpf_redirect was called

    def to_dict(self) -> dict[str, object]:
        shown: dict[str, object] = {
            "retval": None if self.trap else self.retval,
            "verdict": self.verdict,
            "ctx_out": self.context,
            "len": len(self.data),
            "fuel_used": self.fuel_used,
        }
        if self.trap is not None:
            shown["trap"] = self.trap.to_dict()
        if self.redirect is not None:
            shown["redirect"] = {"ifindex": self.redirect[0], "ingress": self.redirect[1]}
        if self.log:
            shown["log"] = list(self.log)
        return shown


class PacketError(RequestError):
    """Packet `index` (0-based) cannot run: the kernel's test run refuses it too."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(f"packet {index + 1}: {message}")
        self.index = index


def run_packets(
    program: Program,
    function: str | None,
    packets: Iterable[bytes],
    *,
    fuel: int | None = None,
    helpers: HelperResolver | None = None,
    limits: Limits | None = None,
    engine: str | Engine = "interpreter",
    interrupt: Interrupt | None = None,
    maps: MapSet | None = None,
    linux: HelperResolver | None = None,
    repeat: int = 1,
) -> Iterator[PacketResult]:
    """Run `function` (a function or section name) on each packet, in order.

    Raises what `execute` raises for the request (an unknown function, a missing
    helper), a VerifyError for a context access the program's type forbids (both
    before any packet runs), and PacketError for a packet shorter than an
    Ethernet header (the results before it were yielded)."""
    if repeat < 1:
        raise RequestError(f"repeat must be at least 1, got {repeat}")
    kind = context_type(program, function)
    rewritten = with_context(program, function)
    runner = get_engine(engine) if isinstance(engine, str) else engine
    if maps is None:
        maps = MapSet(program.maps, init=program.map_init)
    if kind is not ProgramType.SYSCALL:
        from bpfexec.vm.linux_helpers import linux_helpers

        linux = HelperChain(packet_helpers(kind), linux or linux_helpers())
    refused: list[PacketError] = []  # a packet the kernel refuses: raised after those before
    # A program that may grow its packet gets the room the kernel would give it.
    grows = any(ref.number == BPF_SKB_CHANGE_TAIL for ref in rewritten.helper_calls.values())
    tailroom = MAX_SKB_LEN if grows and kind is ProgramType.TC else 0
    size = CHUNK if runner.name == "jit" else 1
    chunks = _chunks(kind, packets, repeat, size, tailroom, refused)
    results = run_chunks(
        rewritten, function, chunks, fuel=fuel, helpers=helpers, limits=limits, engine=runner,
        interrupt=interrupt, maps=maps, linux=linux,
    )  # fmt: skip
    runs: list[Result] = []
    for result in cast(Iterator[Result], results):  # lists of arguments: Results
        runs.append(result)
        if len(runs) == repeat:
            yield _outcome(kind, result, sum(r.duration_ns for r in runs) // repeat)
            runs = []
    if runs:  # interrupted during a packet's repetitions: its last run is its result
        yield _outcome(kind, runs[-1], sum(r.duration_ns for r in runs) // len(runs))
    if refused:
        raise refused[0]


def _chunks(
    kind: ProgramType,
    packets: Iterable[bytes],
    repeat: int,
    size: int,
    tailroom: int,
    refused: list[PacketError],
) -> Iterator[list[Sequence[Argument]]]:
    """The arguments of each run, `size` packets (each `repeat` times) a chunk; a
    packet shorter than an Ethernet header ends them, its error in `refused`."""
    source = iter(packets)
    index = 0
    while True:
        chunk: list[Sequence[Argument]] = []
        for packet in itertools.islice(source, size):
            if kind is not ProgramType.SYSCALL and len(packet) < ETH_HLEN:
                message = f"{len(packet)} bytes, shorter than an Ethernet header ({ETH_HLEN})"
                refused.append(PacketError(index, message))
                break
            chunk.extend([_arguments(kind, packet, tailroom)] * repeat)
            index += 1
        if chunk:
            yield chunk
        if refused or len(chunk) < size * repeat:
            return


def _arguments(kind: ProgramType, packet: bytes, tailroom: int = 0) -> tuple[Argument, ...]:
    """The context and the frame of a packet's run (the packet alone for syscall); a
    tc frame has room for a packet of `tailroom` bytes, if that is more."""
    if kind is ProgramType.SYSCALL:
        return (packet,)
    base = buffer_base(PACKET)
    context = bytearray(CONTEXT_SIZE)
    if kind is ProgramType.XDP:
        size = max(XDP_PAGE, XDP_HEADROOM + len(packet) + SHARED_INFO)
        frame = bytearray(size)
        data = XDP_HEADROOM
        _put(context, _XDP_FIELDS["ingress_ifindex"].offset, LOOPBACK)
    else:
        frame = bytearray(SKB_HEADROOM + max(len(packet), tailroom) + SHARED_INFO)
        data = SKB_HEADROOM + (ETH_HLEN if kind is ProgramType.SOCKET else 0)
        _put(context, _FIELDS["len"].offset, len(packet) - (data - SKB_HEADROOM))
        _put(context, _FIELDS["pkt_type"].offset, _packet_type(packet))
        protocol = _protocol(packet)
        network_order = int.from_bytes(protocol.to_bytes(2, "big"), "little")
        _put(context, _FIELDS["protocol"].offset, network_order)
        _put(context, _FIELDS["ifindex"].offset, LOOPBACK)
        _put(context, _FIELDS["wire_len"].offset, len(packet))
    start = XDP_HEADROOM if kind is ProgramType.XDP else SKB_HEADROOM
    frame[start : start + len(packet)] = packet
    pointers = (base + data, base + start + len(packet), base + data)
    context[PACKET_DATA : PACKET_DATA + _POINTERS.size] = _POINTERS.pack(*pointers)
    return bytes(context), Unpassed(frame)  # the frame's address is the context's to give


def _put(context: bytearray, offset: int, value: int) -> None:
    context[offset : offset + 4] = value.to_bytes(4, "little")


def _packet_type(packet: bytes) -> int:
    """What `eth_type_trans` makes of the destination MAC on the loopback device."""
    destination = packet[:6]
    if destination[0] & 1:
        return PACKET_BROADCAST if destination == b"\xff" * 6 else PACKET_MULTICAST
    return PACKET_HOST if destination == bytes(6) else PACKET_OTHERHOST


def _protocol(packet: bytes) -> int:
    """`skb->protocol` as `eth_type_trans` sets it."""
    ethertype = int.from_bytes(packet[12:14], "big")
    if ethertype >= ETH_P_802_3_MIN:
        return ethertype
    return ETH_P_802_3 if packet[14:16] == b"\xff\xff" else ETH_P_802_2


def _outcome(kind: ProgramType, result: Result, duration: int) -> PacketResult:
    if kind is ProgramType.SYSCALL:
        data = result.buffers[0] if result.buffers else b""
        return PacketResult(
            result.return_value, verdict(kind, result.return_value), data, {},
            result.fuel_used, duration, result.trap, result.log,
        )  # fmt: skip
    context, frame = result.buffers
    base = buffer_base(PACKET)
    data, end, _ = _POINTERS.unpack_from(context, PACKET_DATA)
    packet = frame[data - base : end - base]
    if kind is ProgramType.SOCKET:  # the kernel pushes the Ethernet header back, zeroed
        packet = bytes(ETH_HLEN) + packet
    fields: dict[str, int | list[int]] = {}
    if kind is not ProgramType.XDP:
        for field in SK_BUFF:
            if kind in field.writable:
                raw = context[field.offset : field.offset + field.size]
                if field.name == "cb":
                    fields["cb"] = list(struct.unpack("<5I", raw))
                else:
                    fields[field.name] = int.from_bytes(raw, "little")
    target = int.from_bytes(context[REDIRECT : REDIRECT + 8], "little")
    redirect = (target & 0xFFFFFFFF, bool(target >> 32 & 1)) if target & REDIRECTED else None
    value = result.return_value
    return PacketResult(
        value, "TRAP" if result.trap else verdict(kind, value), packet, fields,
        result.fuel_used, duration, result.trap, result.log, redirect,
    )  # fmt: skip
