"""Helpers: host functions a program calls, and the registry that names them.

A helper is `fn(ctx, r1, r2, r3, r4, r5) -> int`. `ctx` is a `HelperContext`:
bounds-checked access to the calling program's memory, the execution's log,
and its interruption state. The result is taken modulo 2**64.

    reg = HelperRegistry()

    @reg.helper(id=42, name="mul")
    def mul(ctx, a, b, c, d, e):
        return a * b

This module does not run programs; engines call helpers through `Helper.fn`.

Fuel: the call instruction costs 1 and a helper may declare a fixed extra
`cost`, both charged before it runs. A helper whose work grows with the memory
it is given also charges for that work, before doing it, through
`HelperContext.charge_bytes`: one fuel per `BYTES_PER_FUEL` bytes, rounded up
(see `bpfexec.vm.builtin_helpers` and docs/hardening.md). Both engines run helpers
through `Machine.call_helper`, so they report the same fuel.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from bpfexec.vm.errors import Trap, TrapKind
from bpfexec.vm.maps import MapSet
from bpfexec.vm.memory import Memory
from bpfexec.vm.program import HelperRef

HelperFn = Callable[..., int]

# Fuel a helper charges for the memory it works on: one per 8 bytes (a 64-bit
# word), rounded up. Measured on the 2-core development machine, the built-in
# helpers scan, copy, fill or compare 0.013 to 0.14 ns per byte (bytes.find,
# memoryview copies, 64 KiB chunked compares), so 8 bytes take 0.1 to 1.1 ns:
# the order of what one fuel buys as native code (a byte loop on the JIT runs
# 0.09 ns per instruction). A program doing the same in its own loop pays at
# least 4 instructions per 8 bytes (load, store or compare, add, branch), so a
# helper stays the cheaper way. docs/hardening.md has the figures.
BYTES_PER_FUEL = 8


class FuelMeter(Protocol):
    """What a `HelperContext` charges: the running execution's `fuel` (a `Machine`)."""

    fuel: int


def fuel_for(nbytes: int) -> int:
    """The fuel `nbytes` of helper work cost: one per `BYTES_PER_FUEL`, rounded up."""
    return -(-nbytes // BYTES_PER_FUEL) if nbytes > 0 else 0


@dataclass(frozen=True)
class Helper:
    fn: HelperFn
    number: int | None = None
    name: str | None = None
    cost: int = 0  # extra fuel charged per call, on top of the call instruction

    @property
    def ref(self) -> HelperRef:
        return HelperRef(self.number, self.name)

    def __str__(self) -> str:
        return str(self.ref)


class HelperResolver(Protocol):
    """Anything that maps a call site's reference to a helper."""

    def resolve(self, ref: HelperRef) -> Helper | None: ...


class HelperRegistry:
    """Helpers keyed by number and by name."""

    def __init__(self) -> None:
        self._by_number: dict[int, Helper] = {}
        self._by_name: dict[str, Helper] = {}
        self._all: list[Helper] = []

    def helper(
        self, id: int | None = None, name: str | None = None, cost: int = 0
    ) -> Callable[[HelperFn], HelperFn]:
        """Decorator: register fn under number `id` and/or `name` (default: its __name__)."""

        def register(fn: HelperFn) -> HelperFn:
            self.register(fn, id=id, name=name, cost=cost)
            return fn

        return register

    def register(
        self, fn: HelperFn, id: int | None = None, name: str | None = None, cost: int = 0
    ) -> Helper:
        if name is None:
            name = getattr(fn, "__name__", None)
        if id is not None and not 0 <= id < 1 << 32:
            raise ValueError(f"helper number {id} is outside 0..2**32-1")
        if cost < 0:
            raise ValueError(f"helper cost {cost} is negative")
        if id is not None and id in self._by_number:
            raise ValueError(f"helper number {id} is already registered ({self._by_number[id]})")
        if name is not None and name in self._by_name:
            raise ValueError(f"helper name {name!r} is already registered")
        entry = Helper(fn, id, name, cost)
        if id is not None:
            self._by_number[id] = entry
        if name is not None:
            self._by_name[name] = entry
        self._all.append(entry)
        return entry

    def native(
        self,
        library: str,
        symbol: str,
        id: int | None = None,
        name: str | None = None,
        cost: int = 0,
    ) -> Helper:
        """Register the C function `symbol` of the shared library `library` (a path) as
        a native helper (`bpfexec.vm.native`), named `name` (default: `symbol`).
        ValueError with a one-line message if the library or the symbol is missing."""
        from bpfexec.vm.native import NativeHelper

        return self.register(NativeHelper(library, symbol), id=id, name=name or symbol, cost=cost)

    def update(self, other: HelperRegistry) -> None:
        """Add every helper of `other` (a clash is an error)."""
        for entry in other:
            self.register(entry.fn, entry.number, entry.name, entry.cost)

    def resolve(self, ref: HelperRef) -> Helper | None:
        if ref.name is not None and ref.name in self._by_name:
            return self._by_name[ref.name]
        if ref.number is not None:
            return self._by_number.get(ref.number)
        return None

    def __iter__(self) -> Iterator[Helper]:
        return iter(self._all)

    def __len__(self) -> int:
        return len(self._all)

    def __contains__(self, ref: object) -> bool:
        return isinstance(ref, HelperRef) and self.resolve(ref) is not None


class HelperChain:
    """Resolvers tried in order: the first that knows a helper answers it."""

    def __init__(self, *resolvers: HelperResolver) -> None:
        self.resolvers = resolvers

    def resolve(self, ref: HelperRef) -> Helper | None:
        for resolver in self.resolvers:
            found = resolver.resolve(ref)
            if found is not None:
                return found
        return None


@dataclass(frozen=True)
class Event:
    """A ring buffer record, as submitted (`bpf_ringbuf_output`, `_submit`)."""

    map: str
    data: bytes


class HelperContext:
    """What a helper may touch of the running program: its memory and its log."""

    __slots__ = (
        "_limits_bytes",
        "_limits_lines",
        "_log",
        "_log_bytes",
        "_memory",
        "_meter",
        "events",
        "helper",
        "maps",
        "on_event",
        "tail_calls",
    )

    def __init__(self, memory: Memory, log: list[str], max_lines: int, max_bytes: int) -> None:
        self._memory = memory
        self._log = log
        self._limits_lines = max_lines
        self._limits_bytes = max_bytes
        self._log_bytes = 0
        self._meter: weakref.ref[FuelMeter] | None = None
        self.helper: Helper | None = None  # the helper being called, for messages
        self.maps: MapSet | None = None  # the execution's BPF maps (`bpfexec.vm.maps`)
        # Ring buffer records submitted so far (None: the program has no ring buffer),
        # and who hears of each as it is submitted (a stream sends it on).
        self.events: list[Event] | None = None
        self.on_event: Callable[[Event], None] | None = None
        self.tail_calls = 0  # made so far (`bpfexec.vm.callbacks.MAX_TAIL_CALLS`)

    def emit(self, event: Event) -> None:
        """Record a submitted ring buffer record (a ring buffer helper calls this)."""
        if self.events is None:
            self.events = []
        self.events.append(event)
        if self.on_event is not None:
            self.on_event(event)

    def bind(self, meter: FuelMeter) -> None:
        """Charge `meter.fuel` (the Machine's) from now on. A weak reference: the
        machine holds this context, and a cycle would keep its memory until a GC."""
        self._meter = weakref.ref(meter)

    @property
    def fuel_left(self) -> int | None:
        """Fuel left to the execution; None when nothing meters it (a bare context)."""
        meter = self._meter() if self._meter is not None else None
        return meter.fuel if meter is not None else None

    def charge(self, fuel: int, what: str) -> None:
        """Take `fuel` from the execution's budget for `what`, before doing it.

        Not enough left is an OUT_OF_FUEL trap and nothing is taken, as for a
        helper's fixed cost: the work is then never done. Engines resync their
        fuel counter after every helper call, so the charge shows in both alike.
        """
        meter = self._meter() if self._meter is not None else None
        if meter is None or fuel <= 0:
            return
        if fuel > meter.fuel:
            raise Trap(
                TrapKind.OUT_OF_FUEL,
                f"helper {self.helper} needs {fuel} fuel for {what}, {meter.fuel} left",
            )
        meter.fuel -= fuel

    def charge_bytes(self, nbytes: int, what: str = "") -> None:
        """Charge for `nbytes` of memory work: `fuel_for(nbytes)` (1 per 8 bytes)."""
        self.charge(fuel_for(nbytes), what or f"{nbytes} bytes of memory")

    def affordable_bytes(self) -> int | None:
        """How many bytes of work the fuel left pays for (None: unmetered)."""
        left = self.fuel_left
        return None if left is None else left * BYTES_PER_FUEL

    def read(self, addr: int, size: int) -> bytes:
        """`size` bytes of VM memory at virtual address `addr`; a bad range traps."""
        if size < 0:
            raise Trap(TrapKind.MEMORY_FAULT, f"read of negative size {size}")
        return self._memory.read(addr, size)

    def view(self, addr: int, size: int, *, write: bool = False) -> memoryview:
        """VM memory at `addr` as a memoryview, bounds-checked like `read` (or like
        `write`: writable memory only), without copying. Use it within the call only."""
        if size < 0:
            raise Trap(TrapKind.MEMORY_FAULT, f"read of negative size {size}")
        store, offset = self._memory._locate(addr, size, "write" if write else "read", write)
        return memoryview(store)[offset : offset + size]

    def region_view(self, addr: int) -> memoryview:
        """The whole writable region `addr` lies in, as a memoryview (a packet
        helper's frame); a read-only or unmapped address traps."""
        store, _ = self._memory._locate(addr, 0, "write", True)
        return memoryview(store)

    def write(self, addr: int, data: bytes) -> None:
        """Store `data` at virtual address `addr`; a bad or read-only range traps."""
        self._memory.write(addr, bytes(data))

    def read_cstring(self, addr: int, max_len: int = 4096) -> bytes:
        """The NUL-terminated string at `addr` (without the NUL), at most max_len bytes.

        Scans with `bytes.find`, never byte by byte. A string that runs past the
        end of its region before max_len bytes traps at the first byte beyond, as
        a byte-by-byte read would.
        """
        if max_len <= 0:
            return b""
        memory = self._memory
        store, offset = memory._locate(addr, 1, "read", False)
        end = offset + max_len
        nul = store.find(0, offset, end)
        if nul >= 0:
            return bytes(memoryview(store)[offset:nul])
        if end <= len(store):
            return bytes(memoryview(store)[offset:end])
        raise memory.fault(addr + len(store) - offset, 1, "read")

    def log(self, text: str) -> None:
        """Append a line to the execution's log (dropped past the log limits)."""
        size = len(text.encode("utf-8", "replace"))
        if self.would_log(size):
            self._log_bytes += size
            self._log.append(text)

    def would_log(self, nbytes: int) -> bool:
        """Whether a line of `nbytes` bytes (UTF-8) fits in the log limits."""
        return (
            len(self._log) < self._limits_lines and self._log_bytes + nbytes <= self._limits_bytes
        )


def import_registry(spec: str) -> HelperRegistry:
    """The HelperRegistry named by `MODULE:ATTR` (e.g. `myhelpers:registry`).

    Like `python -m`, the working directory is searched first, so that
    `bpfexec run --helpers myhelpers:registry` (or `serve`) finds ./myhelpers.py.
    """
    import importlib
    import os
    import sys

    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())

    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"helpers {spec!r}: expected MODULE:ATTR")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import-time failure of user code
        raise ValueError(f"helpers {spec!r}: cannot import {module_name}: {exc}") from exc
    try:
        registry = getattr(module, attr)
    except AttributeError:
        raise ValueError(f"helpers {spec!r}: {module_name} has no attribute {attr!r}") from None
    if not isinstance(registry, HelperRegistry):
        raise ValueError(
            f"helpers {spec!r}: expected a HelperRegistry, got {type(registry).__name__}"
        )
    return registry
