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
import time
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bpfexec.vm.batch import (
    BUFFER_WORDS,
    CHUNK,
    PACKED_RESULT_WORDS,
    BatchInputError,
    run_chunks,
    start_native,
)
from bpfexec.vm.context_access import context_type, with_context
from bpfexec.vm.errors import RequestError, Trap
from bpfexec.vm.helpers import HelperChain, HelperResolver
from bpfexec.vm.limits import Limits
from bpfexec.vm.machine import (
    Argument,
    Engine,
    Interrupt,
    Result,
    Unpassed,
    get_engine,
    prepare,
)
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
    TC_VERDICTS,
    XDP_MD,
    XDP_VERDICTS,
    ProgramType,
    verdict,
)

if TYPE_CHECKING:
    from bpfexec.vm.jit.batch_loop import NativeBatch

LOOPBACK = 1  # the ifindex of the device the kernel's test run uses
PADDING = 2  # zero bytes after a PacketChunk's packets (`bpfexec.vm.jit.packet_frames`)
RESULT_WORDS = PACKED_RESULT_WORDS  # r0, fuel used, trap code: a native run's result
ARENA_BYTES = 8 << 20  # the most frames one native piece of a chunk lays out
# Frames built by native code: the packet program types (syscall runs its buffer as is).
KINDS = frozenset({ProgramType.XDP, ProgramType.TC, ProgramType.SOCKET})
_MASK32, _MASK64 = (1 << 32) - 1, (1 << 64) - 1
# The return values counted without a Python object a packet (`_NativeRuns.verdicts`).
_COMMON_VALUES = {
    ProgramType.XDP: tuple(XDP_VERDICTS),
    ProgramType.TC: tuple({v & mask for v in TC_VERDICTS for mask in (_MASK32, _MASK64)}),
    ProgramType.SOCKET: (0, _MASK32, _MASK64),
}
PACKET_HOST, PACKET_BROADCAST, PACKET_MULTICAST, PACKET_OTHERHOST = 0, 1, 2, 3
ETH_P_802_3, ETH_P_802_2, ETH_P_802_3_MIN = 0x0001, 0x0004, 0x0600
_POINTERS = struct.Struct("<QQQ")
_BASE = buffer_base(PACKET)  # the frame's address
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


@dataclass(frozen=True)
class PacketChunk:
    """Packets end to end: `data` holds their bytes, then PADDING zero bytes; packet
    n is `data[offsets[n]:offsets[n + 1]]`. `longest` and `shortest` are their
    lengths' extremes (0 for no packets)."""

    data: bytes
    offsets: array[int]  # len(self) + 1 words
    longest: int
    shortest: int

    @classmethod
    def of(cls, packets: Sequence[bytes]) -> PacketChunk:
        lengths = list(map(len, packets))
        offsets = array("Q", itertools.accumulate(lengths, initial=0))
        return cls(b"".join(packets) + bytes(PADDING), offsets, max(lengths, default=0),
                   min(lengths, default=0))  # fmt: skip

    @classmethod
    def chunks(cls, packets: Iterable[bytes], size: int) -> Iterator[PacketChunk]:
        """`packets`, `size` a chunk (each read before it runs)."""
        source = iter(packets)
        while chunk := list(itertools.islice(source, size)):
            yield cls.of(chunk)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def packet(self, n: int) -> bytes:
        return self.data[self.offsets[n] : self.offsets[n + 1]]

    def first_shorter_than(self, size: int) -> int | None:
        """The index of the first packet shorter than `size` bytes, or None."""
        if self.shortest >= size:
            return None
        return next(n for n in range(len(self)) if len(self.packet(n)) < size)

    def head(self, count: int) -> PacketChunk:
        """The first `count` packets."""
        return PacketChunk.of([self.packet(n) for n in range(count)])


class PacketRuns:
    """Runs of a chunk of packets (`run_packet_chunks`): the results of `count`
    packets, the next after those of the PacketRuns before; the last of the test
    run if `interrupted` (the packet stopped is the last with a result)."""

    count: int
    duration_ns: int  # the runs' total: each packet's mean of its repetitions, summed
    interrupted: bool

    def results(self) -> Iterator[PacketResult]:
        """A PacketResult a packet, in order."""
        raise NotImplementedError

    def verdicts(self) -> Counter[str]:
        """How many packets got each verdict (`TRAP` for those whose run trapped)."""
        return Counter(result.verdict for result in self.results())

    @property
    def trapped(self) -> bool:
        """Whether a packet's run trapped."""
        return any(result.trap is not None for result in self.results())


class _ListedRuns(PacketRuns):
    """Runs made packet by packet: their results already made."""

    def __init__(self, outcomes: list[PacketResult], interrupted: bool) -> None:
        self._outcomes = outcomes
        self.interrupted = interrupted
        self.count = len(outcomes)
        self.duration_ns = sum(result.duration_ns for result in outcomes)

    def results(self) -> Iterator[PacketResult]:
        return iter(self._outcomes)


class _NativeRuns(PacketRuns):
    """Runs `first`.. of a chunk's runs (packet n's are n * repeat.. (n + 1) * repeat - 1),
    made by native code: RESULT_WORDS words a run (r0, fuel used, trap code), the
    contexts and frames after the runs in `arena` (`stride` bytes a run, as
    `build_frames` laid them out). A packet's result is its last run's; these runs
    have the results of the packets whose last run they hold, and, when
    `interrupted`, of the packet whose run was stopped (its last run made)."""

    def __init__(
        self,
        kind: ProgramType,
        repeat: int,
        first: int,
        words: array[int],
        traps: dict[int, Trap],
        logs: dict[int, tuple[str, ...]],
        mean_ns: int,
        arena: bytearray,
        stride: int,
        interrupted: bool,
    ) -> None:
        self.kind, self.repeat, self.first, self.words = kind, repeat, first, words
        self.traps, self.logs, self.mean_ns = traps, logs, mean_ns
        self.arena, self.stride, self.interrupted = arena, stride, interrupted
        made = len(words) // RESULT_WORDS
        self._skip = (repeat - 1 - first) % repeat  # this piece's first packet-ending run
        self._ends = list(range(self._skip, made, repeat))
        if interrupted and made and (not self._ends or self._ends[-1] != made - 1):
            self._ends.append(made - 1)
        self.count = len(self._ends)
        self.duration_ns = mean_ns * self.count

    def results(self) -> Iterator[PacketResult]:
        words, view, stride, kind = self.words, memoryview(self.arena), self.stride, self.kind
        traps, logs, mean = self.traps, self.logs, self.mean_ns
        for run in self._ends:
            at, word = run * stride, RESULT_WORDS * run
            made = (words[word], words[word + 1], traps.get(run), logs.get(run, ()))
            context = view[at : at + CONTEXT_SIZE]
            yield _frame_outcome(kind, made, context, view[at + CONTEXT_SIZE : at + stride], mean)

    def verdicts(self) -> Counter[str]:
        if self.interrupted or self.trapped:
            return super().verdicts()
        # Each packet's last run, with no Python object a packet: counted in C.
        values = self.words[RESULT_WORDS * self._skip :: RESULT_WORDS * self.repeat]
        counts: Counter[str] = Counter()
        left = len(values)
        common = _COMMON_VALUES[self.kind]
        for value in common:
            found = values.count(value)
            if found:
                counts[verdict(self.kind, value)] += found
                left -= found
        if left:  # values with no name of their own
            known = set(common)
            counts.update(verdict(self.kind, v) for v in values if v not in known)
        return counts

    @property
    def trapped(self) -> bool:
        return bool(self.traps) and any(run in self.traps for run in self._ends)


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
    chunks = PacketChunk.chunks(packets, CHUNK)
    for runs in run_packet_chunks(
        program, function, chunks, fuel=fuel, helpers=helpers, limits=limits, engine=engine,
        interrupt=interrupt, maps=maps, linux=linux, repeat=repeat,
    ):  # fmt: skip
        yield from runs.results()


def run_packet_chunks(
    program: Program,
    function: str | None,
    chunks: Iterable[PacketChunk],
    *,
    fuel: int | None = None,
    helpers: HelperResolver | None = None,
    limits: Limits | None = None,
    engine: str | Engine = "interpreter",
    interrupt: Interrupt | None = None,
    maps: MapSet | None = None,
    linux: HelperResolver | None = None,
    repeat: int = 1,
    jit_ready: Callable[[], bool] | None = None,
) -> Iterator[PacketRuns]:
    """`run_packets` over packets that come in chunks: a `PacketRuns` a chunk, each
    yielded before the next chunk is read (fewer packets than its chunk's when
    interrupted, and then the last). On the JIT, the frames of a chunk are built
    and its runs made in native code (`bpfexec.vm.jit.packet_frames`,
    `bpfexec.vm.jit.batch_loop`), with no Python object per packet until its
    PacketRuns is asked for its `results()`. On the interpreter, `jit_ready` is
    asked before each chunk: once it says True (the program's native code is
    ready), the chunks after run on the JIT, whose results are the same. Raises
    as `run_packets` does."""
    if repeat < 1:
        raise RequestError(f"repeat must be at least 1, got {repeat}")
    kind = context_type(program, function)
    rewritten = with_context(program, function)
    runner = get_engine(engine) if isinstance(engine, str) else engine
    limits = limits or Limits()
    interrupt = interrupt or Interrupt()
    if maps is None:
        maps = MapSet(program.maps, init=program.map_init)
    if kind is not ProgramType.SYSCALL:
        from bpfexec.vm.linux_helpers import linux_helpers

        linux = HelperChain(packet_helpers(kind), linux or linux_helpers())
    # A program that may grow its packet gets the room the kernel would give it.
    grows = any(ref.number == BPF_SKB_CHANGE_TAIL for ref in rewritten.helper_calls.values())
    tailroom = MAX_SKB_LEN if grows and kind is ProgramType.TC else 0
    options: dict[str, Any] = {
        "fuel": fuel, "helpers": helpers, "limits": limits, "interrupt": interrupt,
        "maps": maps, "linux": linux,
    }  # fmt: skip
    native = None
    if kind in KINDS:
        native = start_native(rewritten, function, runner, context=True, **options)
    else:  # syscall: checked here too, before any packet (run as `run_chunks` runs)
        prepare(rewritten, function, (), **options)
    try:
        index = 0  # of the chunk's first packet
        for chunk in chunks:
            if interrupt.reason is not None:
                return
            if jit_ready is not None and native is None and kind in KINDS and jit_ready():
                jit_ready, runner = None, get_engine("jit")
                native = start_native(rewritten, function, runner, context=True, **options)
            short = chunk.first_shorter_than(ETH_HLEN) if kind is not ProgramType.SYSCALL else None
            whole = chunk if short is None else chunk.head(short)
            if len(whole):
                if native is not None and _fits(kind, whole, tailroom, limits):
                    pieces = _native_runs(native, kind, whole, repeat, tailroom)
                else:
                    pieces = _listed_runs(kind, rewritten, function, whole, index * repeat,
                                          runner, repeat, tailroom, options)  # fmt: skip
                for runs in pieces:
                    yield runs
                    if runs.interrupted:
                        return
            if short is not None:
                length = len(chunk.packet(short))
                message = f"{length} bytes, shorter than an Ethernet header ({ETH_HLEN})"
                raise PacketError(index + short, message)
            index += len(chunk)
    finally:
        if native is not None:
            native.close()


def _fits(kind: ProgramType, chunk: PacketChunk, tailroom: int, limits: Limits) -> bool:
    """Whether every frame of the chunk is within the limits (if not, the runs go
    packet by packet, where the one too big is refused as any argument is)."""
    return limits.max_buffers >= 2 and frame_size(kind, chunk.longest, tailroom) <= (
        limits.max_buffer_bytes
    )


def _native_runs(
    native: NativeBatch, kind: ProgramType, chunk: PacketChunk, repeat: int, tailroom: int
) -> Iterator[PacketRuns]:
    """The chunk's frames built and run by native code, ARENA_BYTES of frames at a
    time (one piece for a chunk of common packets)."""
    from bpfexec.vm.jit.packet_frames import build_frames

    stride = CONTEXT_SIZE + frame_size(kind, chunk.longest, tailroom)
    stride += -stride % 8
    total = len(chunk) * repeat
    per_piece = max(1, ARENA_BYTES // stride)
    for first in range(0, total, per_piece):
        runs = min(per_piece, total - first)
        arena = bytearray(runs * stride)
        table = array("Q", bytes(8 * BUFFER_WORDS * runs))
        build_frames(kind, chunk.data, chunk.offsets, first, runs, repeat, arena, stride, table,
                     tailroom)  # fmt: skip
        inputs = array("Q", (buffer_base(0), 0, 0, 0, 0)) * runs
        out = array("Q", bytes(8 * RESULT_WORDS * runs))
        traps: dict[int, Trap] = {}
        logs: dict[int, tuple[str, ...]] = {}
        began = time.perf_counter_ns()
        done = native.in_arena(inputs, table, arena, out, traps, logs)
        mean = (time.perf_counter_ns() - began) // max(1, done)
        del out[RESULT_WORDS * done :]
        interrupted = done < runs
        runs_made = _NativeRuns(kind, repeat, first, out, traps, logs, mean, arena, stride,
                                interrupted)  # fmt: skip
        del arena, table, out  # the piece's own now: gone with it
        yield runs_made
        if interrupted:
            return


def _listed_runs(
    kind: ProgramType,
    program: Program,
    function: str | None,
    chunk: PacketChunk,
    first: int,
    runner: Engine,
    repeat: int,
    tailroom: int,
    options: dict[str, Any],
) -> Iterator[PacketRuns]:
    """The chunk run packet by packet (`run_chunks`): on the interpreter, and where
    native code does not run the program. `first` is the run index of its first
    run in the whole test run (a BatchInputError counts from there)."""

    def inputs() -> Iterator[list[Sequence[Argument]]]:
        for n in range(len(chunk)):
            arguments = _arguments(kind, chunk.packet(n), tailroom)
            for done in range(0, repeat, CHUNK):
                yield [arguments] * min(CHUNK, repeat - done)

    outcomes: list[PacketResult] = []
    made, spent, last = 0, 0, None  # the runs of the packet running, their time, the last
    try:
        for result in run_chunks(program, function, inputs(), engine=runner, **options):
            assert isinstance(result, Result)
            made, spent, last = made + 1, spent + result.duration_ns, result
            if made == repeat:
                outcomes.append(_outcome(kind, result, spent // repeat))
                made, spent, last = 0, 0, None
    except BatchInputError as exc:
        raise BatchInputError(first + exc.index, exc.reason) from None
    interrupted = last is not None or len(outcomes) < len(chunk)
    if last is not None:  # interrupted during a packet's repetitions: its last run
        outcomes.append(_outcome(kind, last, spent // made))
    yield _ListedRuns(outcomes, interrupted)


def frame_size(kind: ProgramType, length: int, tailroom: int = 0) -> int:
    """The bytes of the frame of a `length`-byte packet (its context apart); a tc
    frame has room for a packet of `tailroom` bytes, if that is more."""
    if kind is ProgramType.XDP:
        return max(XDP_PAGE, XDP_HEADROOM + length + SHARED_INFO)
    return SKB_HEADROOM + max(length, tailroom) + SHARED_INFO


def _arguments(kind: ProgramType, packet: bytes, tailroom: int = 0) -> tuple[Argument, ...]:
    """The context and the frame of a packet's run (the packet alone for syscall); a
    tc frame has room for a packet of `tailroom` bytes, if that is more."""
    if kind is ProgramType.SYSCALL:
        return (packet,)
    base = _BASE
    context = bytearray(CONTEXT_SIZE)
    frame = bytearray(frame_size(kind, len(packet), tailroom))
    if kind is ProgramType.XDP:
        data = XDP_HEADROOM
        _put(context, _XDP_FIELDS["ingress_ifindex"].offset, LOOPBACK)
    else:
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
    run = (result.return_value, result.fuel_used, result.trap, result.log)
    return _frame_outcome(kind, run, memoryview(context), memoryview(frame), duration)


_WRITABLE = {
    kind: tuple(field for field in SK_BUFF if kind in field.writable)
    for kind in (ProgramType.TC, ProgramType.SOCKET)
}


def _frame_outcome(
    kind: ProgramType,
    run: tuple[int, int, Trap | None, tuple[str, ...]],
    context: memoryview,
    frame: memoryview,
    duration: int,
) -> PacketResult:
    """The PacketResult of a packet program's run (r0, fuel used, trap, log) from its
    context and frame after it."""
    value, fuel_used, trap, log = run
    data, end, _ = _POINTERS.unpack_from(context, PACKET_DATA)
    packet = bytes(frame[data - _BASE : end - _BASE])
    if kind is ProgramType.SOCKET:  # the kernel pushes the Ethernet header back, zeroed
        packet = bytes(ETH_HLEN) + packet
    fields: dict[str, int | list[int]] = {}
    for field in _WRITABLE.get(kind, ()):
        raw = context[field.offset : field.offset + field.size]
        if field.name == "cb":
            fields["cb"] = list(struct.unpack("<5I", raw))
        else:
            fields[field.name] = int.from_bytes(raw, "little")
    target = int.from_bytes(context[REDIRECT : REDIRECT + 8], "little")
    redirect = (target & 0xFFFFFFFF, bool(target >> 32 & 1)) if target & REDIRECTED else None
    return PacketResult(
        value, "TRAP" if trap else verdict(kind, value), packet, fields, fuel_used, duration,
        trap, log, redirect,
    )  # fmt: skip
