"""`ModuleCache`: loaded programs by content hash, least recently used evicted first.

A module's id is the sha256 of its bytes, so the cache never holds two copies
of one module and any replica can rebuild an entry from the bytes alone; that
is why evicting is always safe (the client re-uploads on NOT_FOUND). The
cache keeps the `vm.Program` itself, and with it whatever engines derived from
it (`Program.compiled`), so a module is parsed, verified and compiled once.

The cache is bounded by module count and by total uploaded bytes (the size of
a Program is proportional to the bytes it was loaded from). It is thread-safe;
loading happens outside the lock so a large upload never blocks lookups.
It does not load anything itself: callers pass the loader.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from server.metrics import Metrics
from vm import LimitError, Program
from vm.isa import OP_CALLX
from vm.program import content_id


@dataclass(frozen=True)
class CachedModule:
    """A cached program, the size of the bytes it came from, and who uploaded it.

    `tenants` is the one mutable part: the same bytes uploaded by two tenants
    are one entry that both may see (`ExecutionService` decides visibility).
    """

    program: Program
    size: int
    tenants: set[str] = field(default_factory=set, compare=False)

    @property
    def id(self) -> str:
        return self.program.id

    @functools.cached_property
    def calls_helpers(self) -> bool:
        """Whether the program can call a helper (a `call` site, or any `callx`)."""
        program = self.program
        return bool(program.helper_calls) or any(
            insn.opcode == OP_CALLX for insn in program.instructions
        )


class ModuleCache:
    def __init__(self, max_modules: int, max_bytes: int, metrics: Metrics) -> None:
        self.max_modules = max_modules
        self.max_bytes = max_bytes
        self._metrics = metrics
        self._entries: OrderedDict[str, CachedModule] = OrderedDict()  # LRU first
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, module_id: str) -> CachedModule | None:
        """The module with this id, marked as recently used; None if not cached."""
        with self._lock:
            entry = self._entries.get(module_id)
            if entry is not None:
                self._entries.move_to_end(module_id)
        (self._metrics.cache_hits if entry else self._metrics.cache_misses).inc()
        return entry

    def load(self, code: bytes, loader: Callable[[bytes], Program]) -> CachedModule:
        """The cached module for `code`, calling `loader(code)` only if it is not cached."""
        module_id = content_id(code)
        cached = self.get(module_id)
        if cached is not None:
            return cached
        if len(code) > self.max_bytes:
            raise LimitError(
                f"module of {len(code)} bytes exceeds the cache capacity of {self.max_bytes} bytes"
            )
        program = loader(code)
        if program.id != module_id:  # the cache key is the content hash, whatever the loader says
            program = dataclasses.replace(program, id=module_id)
        entry = CachedModule(program, len(code))
        with self._lock:
            # Another request may have loaded the same bytes meanwhile: keep the first.
            existing = self._entries.get(module_id)
            if existing is not None:
                self._entries.move_to_end(module_id)
                return existing
            self._entries[module_id] = entry
            self._bytes += entry.size
            evicted = self._evict()
            self._publish()
        if evicted:
            self._metrics.cache_evictions.inc(evicted)
        return entry

    def delete(self, module_id: str) -> bool:
        """Drop a module; False if it was not cached."""
        with self._lock:
            entry = self._entries.pop(module_id, None)
            if entry is not None:
                self._bytes -= entry.size
                self._publish()
        return entry is not None

    def modules(self) -> list[CachedModule]:
        """Every cached module, least recently used first."""
        with self._lock:
            return list(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def total_bytes(self) -> int:
        return self._bytes

    def _evict(self) -> int:
        """Drop least recently used entries until within bounds (lock held)."""
        evicted = 0
        while len(self._entries) > self.max_modules or self._bytes > self.max_bytes:
            _, entry = self._entries.popitem(last=False)
            self._bytes -= entry.size
            evicted += 1
        return evicted

    def _publish(self) -> None:
        self._metrics.modules_cached.set(len(self._entries))
        self._metrics.cache_bytes.set(self._bytes)
