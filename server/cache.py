"""`ModuleCache`: loaded programs by content hash, least recently used evicted first.

A module's id is the sha256 of its bytes, so any replica can rebuild an entry
from the bytes alone; that is why evicting is always safe (the client
re-uploads on NOT_FOUND). The cache keeps the `bpfexec.vm.Program` itself, and with it
whatever engines derived from it (`Program.compiled`), so a module is parsed,
verified and compiled once per namespace.

Entries live in namespaces: the key is `(namespace, id)`. `ExecutionService`
gives every tenant its own namespace unless modules are shared, so the same
bytes uploaded by two tenants are two entries, loaded (and timed, and counted
in the hit/miss metrics) separately: nothing one tenant does shows in what
another sees (docs/hardening.md, "Memory accounting and tenant isolation").

The cache is bounded by module count and by an estimate of the memory its
modules really take (`estimate_bytes`): the decoded instructions, the
interpreter's pre-decoded blocks, functions, line tables, data images, the
module's name, and the native code of the JIT tiers compiled so far
(`native_bytes`, charged again whenever the cache is `refresh`ed). A module
whose estimate alone exceeds the capacity is refused. The cache is
thread-safe; loading happens outside the lock so a large upload never blocks
lookups. It does not load anything itself: callers pass the loader.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from bpfexec.server.metrics import Metrics
from bpfexec.vm import LimitError, Program, isa
from bpfexec.vm.interpreter import block_leaders
from bpfexec.vm.isa import OP_CALLX
from bpfexec.vm.program import content_id

# Bytes of memory a module takes, by what it holds. Measured with tracemalloc
# (Python 3, 64-bit) on raw-bytecode modules of 50,000 to 1,000,000 slots of
# one instruction kind each (ALU with random immediates, loads, stores, lddw,
# helper calls, a conditional jump every other slot) and on a clang -O2 object
# of 300 functions and 36,039 slots (with and without -g): memory after
# `bpfexec.vm.load()` plus the interpreter's `decode_blocks()`, divided out.
# docs/hardening.md has the figures.
MODULE_BYTES = 2_000  # Program, CachedModule, their dicts and tuples: any module
SLOT_BYTES = 120  # an Instruction, its tuple slot and its immediate
OP_BYTES = {  # the interpreter's closure for one straight-line instruction, per slot
    isa.ALU: 340,
    isa.ALU64: 340,
    isa.LDX: 630,
    isa.ST: 740,
    isa.STX: 740,
    isa.LD: 175,  # an lddw: one closure for its two slots
}
CALL_OP_BYTES = 300  # the closure of a helper call or callx (other jumps end a block)
BLOCK_BYTES = 730  # a basic block: Block, its ops tuple, its branch closure
HELPER_CALL_BYTES = 200  # a call site in Program.helper_calls (pc -> HelperRef)
FUNCTION_BYTES = 250  # a Function (plus its name, counted apart)
LINE_BYTES = 64  # an entry of the -g line table (pc -> "file:line")
# Native code of one compiled JIT variant: MCJIT loads the object code LLVM
# emitted (in a compile worker or in this process) into an engine of its own.
# Measured as the RSS 30 kept engines add after `malloc_trim(0)`, compiled by a
# worker: 6.4 to 9.0 times the object's size (27 to 58 KiB objects of
# bench/programs, both tiers), so 8 times plus a fixed part per engine.
NATIVE_BYTES_PER_OBJECT_BYTE = 8
ENGINE_BYTES = 32 << 10


def estimate_bytes(program: Program) -> int:
    """An estimate of the memory `program` takes once the interpreter has decoded it.

    Within a factor of 2 of what tracemalloc measures for large modules of any
    instruction mix (tests/test_cache_limits.py checks some); native code is
    `native_bytes`, charged once it exists.
    """
    code = program.instructions
    opcodes = Counter(insn.opcode for insn in code)
    total = MODULE_BYTES + SLOT_BYTES * len(code)
    for opcode, count in opcodes.items():
        total += OP_BYTES.get(opcode & isa.CLASS_MASK, 0) * count
    total += CALL_OP_BYTES * (len(program.helper_calls) + opcodes.get(OP_CALLX, 0))
    total += BLOCK_BYTES * (len(block_leaders(program)) if code else 0)
    total += HELPER_CALL_BYTES * len(program.helper_calls)
    total += sum(FUNCTION_BYTES + _str_bytes(fn.name) for fn in program.functions)
    total += LINE_BYTES * len(program.lines)
    total += len(program.rodata) + len(program.data) + _str_bytes(program.name)
    return total


def native_bytes(program: Program) -> int:
    """Estimated memory of the JIT's native code compiled so far for `program`."""
    total = 0
    for artifact in list(program.compiled.values()):  # the JIT's CompiledPrograms
        for variant in (getattr(artifact, "fast", None), getattr(artifact, "checked", None)):
            loaded = getattr(variant, "object_bytes", 0)
            if isinstance(loaded, int) and loaded > 0:
                total += ENGINE_BYTES + loaded * NATIVE_BYTES_PER_OBJECT_BYTE
    return total


def _str_bytes(text: str) -> int:
    return sys.getsizeof(text)


@dataclass(frozen=True)
class CachedModule:
    """A cached program, the size of the bytes it came from, and who uploaded it.

    `size` is the upload's length (what `Module.size` reports); `cost` is the
    estimate of its memory the cache counts (`estimate_bytes`), without native
    code, which `ModuleCache` adds as it appears. `tenants` is the one mutable
    part: with shared modules the same bytes uploaded by two tenants are one
    entry that both may see (`ExecutionService` decides visibility).
    """

    program: Program
    size: int
    tenants: set[str] = field(default_factory=set, compare=False)
    cost: int = 0

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


Key = tuple[str, str]  # (namespace, module id)


class ModuleCache:
    def __init__(self, max_modules: int, max_bytes: int, metrics: Metrics) -> None:
        self.max_modules = max_modules
        self.max_bytes = max_bytes
        self._metrics = metrics
        self._entries: OrderedDict[Key, CachedModule] = OrderedDict()  # LRU first
        self._charged: dict[Key, int] = {}  # bytes counted for each entry
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, module_id: str, namespace: str = "") -> CachedModule | None:
        """The module with this id in `namespace`, marked as recently used; None if not cached."""
        key = (namespace, module_id)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
        (self._metrics.cache_hits if entry else self._metrics.cache_misses).inc()
        return entry

    def load(
        self, code: bytes, loader: Callable[[bytes], Program], namespace: str = ""
    ) -> CachedModule:
        """The cached module for `code` in `namespace`, calling `loader(code)` if it is not cached.

        Raises LimitError, without caching it, for a module whose estimated
        memory exceeds the whole capacity.
        """
        module_id = content_id(code)
        key = (namespace, module_id)
        cached = self.get(module_id, namespace)
        if cached is not None:
            return cached
        if len(code) > self.max_bytes:  # a lower bound of the estimate: no need to parse
            raise self._too_large(len(code), f"module of {len(code)} bytes")
        program = loader(code)
        if program.id != module_id:  # the cache key is the content hash, whatever the loader says
            program = dataclasses.replace(program, id=module_id)
        cost = estimate_bytes(program)
        if cost > self.max_bytes:
            raise self._too_large(
                cost,
                f"module {program.name} of {len(program.instructions)} instructions needs "
                f"an estimated {cost} bytes of memory",
            )
        entry = CachedModule(program, len(code), cost=cost)
        with self._lock:
            # Another request may have loaded the same bytes meanwhile: keep the first.
            existing = self._entries.get(key)
            if existing is not None:
                self._entries.move_to_end(key)
                return existing
            self._entries[key] = entry
            self._charge(key, entry)
            self._recharge_all()
            evicted = self._evict()
            self._publish()
        if evicted:
            self._metrics.cache_evictions.inc(evicted)
        return entry

    def refresh(self) -> None:
        """Count the native code compiled since the last look; evict to stay within bounds."""
        with self._lock:
            self._recharge_all()
            evicted = self._evict()
            self._publish()
        if evicted:
            self._metrics.cache_evictions.inc(evicted)

    def delete(self, module_id: str, namespace: str = "") -> bool:
        """Drop a module; False if it was not cached."""
        key = (namespace, module_id)
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is not None:
                self._bytes -= self._charged.pop(key)
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

    def _too_large(self, cost: int, what: str) -> LimitError:
        return LimitError(
            f"{what}, more than the module cache's capacity of {self.max_bytes} bytes "
            "(cache_max_bytes)"
        )

    def _charge(self, key: Key, entry: CachedModule) -> None:
        """Count `entry` at its current cost (lock held)."""
        cost = entry.cost + native_bytes(entry.program)
        self._bytes += cost - self._charged.get(key, 0)
        self._charged[key] = cost

    def _recharge_all(self) -> None:
        for key, entry in self._entries.items():
            self._charge(key, entry)

    def _evict(self) -> int:
        """Drop least recently used entries until within bounds (lock held)."""
        evicted = 0
        while self._entries and (
            len(self._entries) > self.max_modules or self._bytes > self.max_bytes
        ):
            key, _ = self._entries.popitem(last=False)
            self._bytes -= self._charged.pop(key)
            evicted += 1
        return evicted

    def _publish(self) -> None:
        self._metrics.modules_cached.set(len(self._entries))
        self._metrics.cache_bytes.set(self._bytes)
