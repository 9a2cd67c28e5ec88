"""Ring buffers (`ringbuf`), as the kernel's kernel/bpf/ringbuf.c, drained by the run.

A program sends records to userspace through a ring buffer: it copies one in
(`bpf_ringbuf_output`), or reserves room (`bpf_ringbuf_reserve`, a pointer
into the ring), fills it in place and submits or discards it. Here the
consumer is the run itself: a submitted record becomes an `Event` of the run
(`HelperContext.emit`, then `Result.events`) at once, and the ring is drained
when the run ends. So the space is accounted per run, as the kernel accounts
it with a consumer that reads nothing until the end: every record reserved or
written takes an 8-byte header plus its data rounded up to 8, discarded ones
included, and the producer may not get `max_entries` bytes (the ring's size,
a power of 2 and a multiple of 4096) ahead of the consumer, so a run holds at
most `max_entries - 8` bytes of records. A reservation still open when the
run ends is dropped; nothing of a run is left for the next.

Runs that share the map (a named state, `--repeat`, threads) must not see
each other's reservations. Each run therefore maps a region of its own:
`RingBuffer.values` makes a fresh `RunRing` every time `prepare` asks for the
map's region, a bytearray of `max_entries` bytes that also keeps that run's
producer position and open reservations, out of the program's reach. The
helpers find it from the address they are given (`HelperContext.view(...).obj`),
never through the map, so the map itself holds no state and needs no lock;
a run is single-threaded. The memory a ring takes, `max_entries`, is then
allocated per run (and counted once by `map_bytes`, as per run limits are).
"""

from __future__ import annotations

from bpfexec.vm.errors import Trap, TrapKind
from bpfexec.vm.maps_base import BpfMap, MapDefinition

HEADER_BYTES = 8  # the kernel's BPF_RINGBUF_HDR_SZ
MAX_RECORD_BYTES = (1 << 32) // 4 - 1  # the kernel's RINGBUF_MAX_RECORD_SZ
PAGE_SIZE = 4096
# bpf_ringbuf_query's flags
BPF_RB_AVAIL_DATA, BPF_RB_RING_SIZE, BPF_RB_CONS_POS, BPF_RB_PROD_POS = 0, 1, 2, 3


class RunRing(bytearray):
    """One run's ring buffer region: the bytes its records are written in (a record's
    data follows the 8 bytes of its header's place), the producer position and the
    reservations still open (data offset -> size)."""

    __slots__ = ("open", "producer")

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.producer = 0
        self.open: dict[int, int] = {}

    def claim(self, size: int) -> int | None:
        """Room for a record of `size` bytes: the offset of its data, or None if the
        ring has no room (the kernel's NULL)."""
        if size > MAX_RECORD_BYTES:
            return None
        length = (size + HEADER_BYTES + 7) // 8 * 8
        if self.producer + length >= len(self):  # the kernel's `new_prod_pos - cons_pos > mask`
            return None
        offset = self.producer + HEADER_BYTES
        self.producer += length
        return offset

    def reserve(self, size: int) -> int | None:
        """`claim`, kept open until `close`."""
        offset = self.claim(size)
        if offset is not None:
            self.open[offset] = size
        return offset

    def close(self, offset: int) -> bytes | None:
        """End the reservation whose data is at `offset`: its data, or None if no
        reservation open in this run starts there."""
        size = self.open.pop(offset, None)
        return None if size is None else bytes(self[offset : offset + size])

    def query(self, flag: int) -> int:
        """`bpf_ringbuf_query`: the consumer is at 0 until the run ends."""
        if flag in (BPF_RB_AVAIL_DATA, BPF_RB_PROD_POS):
            return self.producer
        if flag == BPF_RB_RING_SIZE:
            return len(self)
        return 0  # BPF_RB_CONS_POS, and unknown flags as in the kernel


class RingBuffer(BpfMap):
    """A ring buffer map: no keys, no values, no shared state (see the module)."""

    @classmethod
    def problem(cls, spec: MapDefinition, name: str) -> str | None:
        if spec.key_size != 0 or spec.value_size != 0:
            return "a ring buffer's key_size and value_size must be 0"
        size = spec.max_entries
        if size & (size - 1) or size % PAGE_SIZE:
            return (
                "a ring buffer's max_entries (its size in bytes) must be a power of 2 and a "
                f"multiple of {PAGE_SIZE}, got {size}"
            )
        return None

    @classmethod
    def region_bytes(cls, spec: MapDefinition) -> int:
        return 0  # each run maps a RunRing of its own

    @classmethod
    def memory(cls, spec: MapDefinition) -> int:
        return spec.max_entries

    @property
    def values(self) -> bytearray:
        """A fresh region for the run about to start (`bpfexec.vm.machine.prepare`)."""
        return RunRing(self.spec.max_entries)

    def run_ring(self, region: object) -> RunRing:
        """The running program's ring of this map, given its region (HELPER_ERROR if
        the run did not map one, which `prepare` always does)."""
        if not isinstance(region, RunRing):
            raise Trap(
                TrapKind.HELPER_ERROR,
                f"ring buffer {self.spec.name!r} has no region of this run",
            )
        return region
