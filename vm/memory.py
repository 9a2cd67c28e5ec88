"""The VM's address space: region-tagged virtual addresses and checked access.

A program never sees a host address. The upper 32 bits of a virtual address
select a region, the lower 32 bits are an offset into it. This module is the one
definition of that map; the interpreter, the JIT and helper contexts all go
through it (the JIT mirrors `Memory.regions` in a native table).

| base                      | region                              | access     |
| 0x1_0000_0000             | read-only data (.rodata*)           | read       |
| 0x2_0000_0000             | stack, one frame per call depth     | read/write |
| 0x3_0000_0000             | writable globals (.data*, .bss*)    | read/write |
| 0x4_0000_0000 + (n << 32) | argument buffer n (n < 5)           | read/write |
| 0x9_0000_0000 + (n << 32) | the values of BPF map n (n < 64)    | read/write |

Address 0 (region 0) is never mapped: map handles (`bpfexec.vm.maps`) live there,
so a program that dereferences one faults.
"""

from __future__ import annotations

from enum import IntEnum

from bpfexec.vm.errors import Trap, TrapKind

REGION_SHIFT = 32
OFFSET_MASK = (1 << REGION_SHIFT) - 1


class Region(IntEnum):
    """Region numbers: the upper 32 bits of a virtual address."""

    RODATA = 1
    STACK = 2
    DATA = 3
    BUFFER0 = 4  # argument buffer n is BUFFER0 + n


MAX_BUFFERS = 5  # argument buffers 0..4, one per argument register r1..r5
MAP0 = Region.BUFFER0 + MAX_BUFFERS  # map n's values are region MAP0 + n
MAX_MAPS = 64  # maps of one program
REGION_COUNT = MAP0 + MAX_MAPS  # every region number a Memory can map


def region_base(region: int) -> int:
    return region << REGION_SHIFT


RODATA_BASE = region_base(Region.RODATA)
STACK_BASE = region_base(Region.STACK)
DATA_BASE = region_base(Region.DATA)


def buffer_base(n: int) -> int:
    return region_base(Region.BUFFER0 + n)


def map_base(n: int) -> int:
    return region_base(MAP0 + n)


def region_name(region: int) -> str:
    if region >= MAP0:
        return f"map {region - MAP0}"
    if region >= Region.BUFFER0:
        return f"buffer {region - Region.BUFFER0}"
    try:
        return Region(region).name.lower()
    except ValueError:
        return "unmapped"


class Memory:
    """The regions of one execution.

    `regions[n]` is the backing store of region n (a bytearray, or bytes for a
    read-only region) or None where nothing is mapped; `writable[n]` says if
    stores may go there.
    """

    __slots__ = ("mapped", "regions", "writable")

    def __init__(
        self,
        rodata: bytes,
        stack_size: int,
        data: bytes,
        buffers: list[bytearray] | tuple[bytearray, ...] = (),
        maps: list[bytearray] | tuple[bytearray, ...] = (),
    ) -> None:
        if len(buffers) > MAX_BUFFERS:
            raise ValueError(f"at most {MAX_BUFFERS} argument buffers, got {len(buffers)}")
        if len(maps) > MAX_MAPS:
            raise ValueError(f"at most {MAX_MAPS} maps, got {len(maps)}")
        count = REGION_COUNT
        self.regions: list[bytes | bytearray | None] = [None] * count
        self.writable = [False] * count
        self.regions[Region.RODATA] = bytes(rodata)
        self.regions[Region.STACK] = bytearray(stack_size)
        self.writable[Region.STACK] = True
        self.regions[Region.DATA] = bytearray(data)
        self.writable[Region.DATA] = True
        for n, buf in enumerate(buffers):
            self.regions[Region.BUFFER0 + n] = buf
            self.writable[Region.BUFFER0 + n] = True
        for n, values in enumerate(maps):
            self.regions[MAP0 + n] = values
            self.writable[MAP0 + n] = True
        # The regions that exist, in order: what a run maps (most of the 73 do not).
        self.mapped = tuple(n for n, region in enumerate(self.regions) if region is not None)

    def with_buffers(self, buffers: list[bytearray] | list[memoryview]) -> Memory:
        """The same regions (the very stores), but these argument buffers."""
        other = Memory.__new__(Memory)
        other.regions = list(self.regions)
        other.writable = list(self.writable)
        for n in range(MAX_BUFFERS):
            store = buffers[n] if n < len(buffers) else None
            other.regions[Region.BUFFER0 + n] = store  # type: ignore[assignment]
            other.writable[Region.BUFFER0 + n] = store is not None
        other.mapped = tuple(n for n, region in enumerate(other.regions) if region is not None)
        return other

    def fault(self, address: int, size: int, access: str) -> Trap:
        region = address >> REGION_SHIFT
        store = self.regions[region] if region < len(self.regions) else None
        if store is None:
            where = "unmapped address"
        elif access != "read" and not self.writable[region]:
            where = f"read-only {region_name(region)} region"
        else:
            where = f"{region_name(region)} region of {len(store)} bytes"
        return Trap(
            TrapKind.MEMORY_FAULT,
            f"{access} of {size} bytes at {address:#x} ({where})",
        )

    def _locate(self, address: int, size: int, access: str, write: bool) -> tuple[bytearray, int]:
        region = address >> REGION_SHIFT
        offset = address & OFFSET_MASK
        if region < len(self.regions):
            store = self.regions[region]
            if (
                store is not None
                and offset + size <= len(store)
                and (self.writable[region] or not write)
            ):
                return store, offset  # type: ignore[return-value]
        raise self.fault(address, size, access)

    def read(self, address: int, size: int) -> bytes:
        store, offset = self._locate(address, size, "read", False)
        return bytes(store[offset : offset + size])

    def write(self, address: int, data: bytes) -> None:
        store, offset = self._locate(address, len(data), "write", True)
        store[offset : offset + len(data)] = data
