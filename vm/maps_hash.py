"""Hash maps (`hash`, `percpu_hash`, `lru_hash`): values in preallocated slots of
the map's region, keys beside them in Python.

A dict maps each key to its slot (in insertion order; an LRU map moves a key
last when it is used, and evicts the first when full) and a free list holds
the slots no key uses. `bpfexec.vm.maps_lpm` keeps its prefixes the same way.

A `hash` or `percpu_hash` map also keeps its keys in a `NativeIndex`, a table
that native code reads without the GIL or the map's lock, so the JIT can look
keys up without entering Python (docs/jit.md, "Inline hash lookups"). The dict
stays the one truth for Python; the index mirrors it, and its readers check a
version word to know whether what they read is consistent. An LRU lookup
reorders the keys, a write, so LRU maps keep no index (nor do `lpm_trie` and
`hash_of_maps`, which build on this class: their lookups are not a key's slot).
"""

from __future__ import annotations

import ctypes
import secrets
from array import array
from collections import OrderedDict
from collections.abc import Sequence

from bpfexec.vm.maps_array import slot_size
from bpfexec.vm.maps_base import (
    BPF_EXIST,
    BPF_F_LOCK,
    BPF_NOEXIST,
    E2BIG,
    EEXIST,
    EINVAL,
    ENOENT,
    BpfMap,
    MapDefinition,
    MapType,
)

MASK64 = (1 << 64) - 1
# The hash of a key, computed alike here and in native code (`key_hash`): FNV-1a over
# the key's little-endian 64-bit words (zero-padded), then MurmurHash3's 64-bit
# finalizer, so that its low bits depend on every bit of the key. The low 32 bits
# are the key's tag, kept in its bucket; the tag's low bits pick the first bucket to
# probe, so a rebuild places keys without hashing them again.
# The offset basis is FNV's XOR a secret drawn per process (what native code compiled
# in this process uses too): keys a client chooses cannot be made to pile up in one
# run of buckets, which would make every insert and probe walk it (hash flooding).
FNV_PRIME = 0x0000_0100_0000_01B3
FNV_OFFSET = 0xCBF2_9CE4_8422_2325 ^ secrets.randbits(64)
FMIX_1, FMIX_2 = 0xFF51_AFD7_ED55_8CCD, 0xC4CE_B9FE_1A85_EC53
TAG = 0xFFFF_FFFF
EMPTY, TOMBSTONE = 0, 0xFFFF_FFFF  # what a bucket's slot + 1 is when it holds no key
MIN_BUCKETS = 8
# Keys of more bytes are not indexed: a native lookup would compare too many words.
MAX_INDEXED_KEY = 64
# Nor maps of more entries: a table has fewer than 4 buckets per entry, and a bucket's
# number is the low bits of a 32-bit tag.
MAX_INDEXED_ENTRIES = 1 << 28
INDEXED_TYPES = ("hash", "percpu_hash")  # whose lookup is a key's slot, and a read


def key_words(key: bytes) -> list[int]:
    """The key as little-endian u64 words, the last one zero-padded."""
    if len(key) <= 8:
        return [int.from_bytes(key, "little")]
    return list(array("Q", key + bytes(-len(key) % 8)))  # the JIT's hosts: little-endian


def key_hash(words: Sequence[int]) -> int:
    """The 64-bit hash of a key's words."""
    h = FNV_OFFSET
    for word in words:
        h = ((h ^ word) * FNV_PRIME) & MASK64
    h ^= h >> 33
    h = (h * FMIX_1) & MASK64
    h ^= h >> 33
    h = (h * FMIX_2) & MASK64
    return h ^ (h >> 33)


class IndexHeader(ctypes.Structure):
    """What native code finds at a map's index address; it never moves while the map
    lives. `version` is odd while Python changes the index; `table` is the current
    table: u64 words, the first the bucket mask (buckets - 1, a power of two), then
    the buckets, each a head word `slot + 1 | tag << 32` (slot + 1 is `EMPTY` or
    `TOMBSTONE` when the bucket holds no key) and the key's words."""

    _fields_ = [("version", ctypes.c_uint64), ("table", ctypes.c_void_p)]


class NativeIndex:
    """A hash map's keys in an open-addressing table (linear probing) that native code
    reads without a lock, as a seqlock's readers do.

    Writers are `insert` and `remove`, called with the map's lock held (so one at a
    time), which make `header.version` odd before they change anything and even
    after. A reader reads the version (acquire), probes, then reads it again (after
    an acquire fence); unless both reads are the same even value, no write overlapped
    the probe and what it found is what the dict held then; otherwise it asks Python.
    The stores Python makes are seen by other cores in the order it makes them only
    on a host that keeps stores in order (x86-64's TSO): the JIT uses the index on
    such hosts alone (`bpfexec.vm.jit.maps.ORDERED_STORES`).

    A reader may still read any table this index ever had, at any time: a table never
    changes size (a rebuild that keeps the size rewrites it in place; growth makes a
    new one, and the old ones are kept for the map's life, fewer bytes than the
    current one in all), and its mask is its own first word, so every probe stays
    inside the table it reads. Tables are ctypes arrays, whose memory never moves. At
    most half of the buckets hold a key or a tombstone, so a probe meets an empty
    bucket; a reader racing a writer may not, and gives up after `buckets` probes.
    """

    def __init__(self, key_size: int) -> None:
        self.bucket_words = 1 + (key_size + 7) // 8
        self.header = IndexHeader()
        self.live = 0  # buckets holding a key
        self.tombstones = 0  # buckets whose key was removed
        self.retired: list[ctypes.Array[ctypes.c_uint64]] = []  # older tables, still read
        self._use(self._table([MIN_BUCKETS - 1] + [0] * (MIN_BUCKETS * self.bucket_words)))

    @property
    def address(self) -> int:
        """Where native code finds the header."""
        return ctypes.addressof(self.header)

    def _table(self, words: list[int]) -> ctypes.Array[ctypes.c_uint64]:
        """A new table holding `words`."""
        table = (ctypes.c_uint64 * len(words))()
        _view(table)[:] = array("Q", words)
        return table

    def _use(self, table: ctypes.Array[ctypes.c_uint64]) -> None:
        """Make `table` the current one (the version is odd, or no reader exists yet)."""
        self.table, self.words = table, _view(table)
        self.mask = self.words[0]
        self.header.table = ctypes.addressof(table)

    def insert(self, key: bytes, slot: int) -> None:
        """Index `key` (not indexed yet) at `slot`. An exception (memory) leaves the
        version odd: native lookups of this map then always ask Python."""
        words = key_words(key)
        self.header.version += 1
        buckets = self.mask + 1
        if (self.live + self.tombstones + 1) * 2 > buckets:
            self._rebuild(buckets * 2 if (self.live + 1) * 4 > buckets else buckets)
        if _place(self.words, words, key_hash(words) & TAG, slot):
            self.tombstones -= 1
        self.live += 1
        self.header.version += 1

    def remove(self, key: bytes) -> None:
        """Forget `key` (indexed): its bucket becomes a tombstone."""
        words = key_words(key)
        table, mask, size = self.words, self.mask, len(words) + 1
        bucket = key_hash(words) & mask
        self.header.version += 1
        while True:
            at = 1 + bucket * size
            head = table[at] & TOMBSTONE
            if head == EMPTY:
                raise RuntimeError(f"key {key.hex()} is not in the native index")
            if head != TOMBSTONE and table[at + 1 : at + size].tolist() == words:
                table[at] = TOMBSTONE
                break
            bucket = (bucket + 1) & mask
        self.live -= 1
        self.tombstones += 1
        self.header.version += 1

    def _rebuild(self, buckets: int) -> None:
        """Rewrite the table without tombstones: in place, or (growing) in a new one that
        becomes the current one, the old one kept for readers still probing it."""
        old, size = self.words.tolist(), self.bucket_words
        fresh = [buckets - 1] + [0] * (buckets * size)
        for at in range(1, len(old), size):
            head = old[at]
            if head & TOMBSTONE not in (EMPTY, TOMBSTONE):
                _place(fresh, old[at + 1 : at + size], head >> 32, (head & TOMBSTONE) - 1)
        self.tombstones = 0
        if buckets == self.mask + 1:
            self.words[:] = array("Q", fresh)
        else:
            self.retired.append(self.table)
            self._use(self._table(fresh))


def _view(table: ctypes.Array[ctypes.c_uint64]) -> memoryview:
    """A table's words, for Python (each word read or written whole)."""
    return memoryview(table).cast("B").cast("Q")


def _place(table: memoryview | list[int], words: list[int], tag: int, slot: int) -> bool:
    """Write a key absent from `table` into the first free bucket of its probe; whether
    that bucket was a tombstone. The key's words first, then the bucket's head."""
    mask, size = table[0], len(words) + 1
    bucket = tag & mask
    while table[1 + bucket * size] & TOMBSTONE not in (EMPTY, TOMBSTONE):
        bucket = (bucket + 1) & mask
    at = 1 + bucket * size
    reused = table[at] & TOMBSTONE == TOMBSTONE
    for n, word in enumerate(words, at + 1):
        table[n] = word
    table[at] = (slot + 1) | tag << 32
    return reused


class HashMap(BpfMap):
    full = -E2BIG  # what an update of a new key into a full map returns

    def __init__(self, spec: MapDefinition, index: int, kind: MapType) -> None:
        super().__init__(spec, index, kind)
        self.slot = slot_size(spec, kind.name.startswith("percpu"))
        self.lru = kind.name == "lru_hash"
        self.slots: OrderedDict[bytes, int] = OrderedDict()
        self.keys: dict[int, bytes] = {}  # slot -> key, for walking in slot order
        self.free = list(range(spec.max_entries - 1, -1, -1))
        indexed = kind.name in INDEXED_TYPES and spec.key_size <= MAX_INDEXED_KEY
        indexed = indexed and spec.max_entries <= MAX_INDEXED_ENTRIES
        self.native = NativeIndex(spec.key_size) if indexed else None

    @classmethod
    def region_bytes(cls, spec: MapDefinition) -> int:
        return slot_size(spec, spec.type == 5) * spec.max_entries

    def lookup(self, key: bytes) -> int | None:
        with self.lock:
            slot = self.slots.get(key)
            if slot is not None and self.lru:
                self.slots.move_to_end(key)
            return slot

    def update(self, key: bytes, value: bytes, flags: int) -> int:
        if flags & ~BPF_F_LOCK > BPF_EXIST:
            return -EINVAL
        with self.lock:
            return self._set(key, value, flags & ~BPF_F_LOCK)

    def _set(self, key: bytes, value: bytes, flags: int) -> int:
        """Store `value` under `key` (flags checked, the lock held)."""
        slot = self.slots.get(key)
        if slot is not None:
            if flags == BPF_NOEXIST:
                return -EEXIST
            if self.lru:
                self.slots.move_to_end(key)
            self._store(slot, value)
            return 0
        if flags == BPF_EXIST:
            return -ENOENT
        if not self.free:
            if not self.lru:
                return self.full
            _, evicted = self.slots.popitem(last=False)  # the least recently used
            del self.keys[evicted]
            self.free.append(evicted)
        slot = self.free[-1]
        self._store(slot, value)  # before native code can find it
        if self.native is not None:
            self.native.insert(key, slot)
        self.free.pop()
        self.slots[key] = slot
        self.keys[slot] = key
        return 0

    def delete(self, key: bytes) -> int:
        with self.lock:
            return self._delete(key)

    def _delete(self, key: bytes) -> int:
        """Remove `key` (the lock held)."""
        slot = self.slots.pop(key, None)
        if slot is None:
            return -ENOENT
        if self.native is not None:
            self.native.remove(key)
        del self.keys[slot]
        self.free.append(slot)
        return 0

    def next_element(self, position: int) -> tuple[int, bytes, int] | None:
        """Walks the slots in order, so a callback may delete the element it is given
        (or any other) without the walk skipping one; a fresh map fills its slots in
        insertion order."""
        with self.lock:
            for slot in range(position, self.spec.max_entries):
                key = self.keys.get(slot)
                if key is not None:
                    return slot + 1, key, self.address(slot)
        return None

    def entries(self) -> list[tuple[bytes, bytes]]:
        """Every element, in insertion order (an LRU map's: least recently used first)."""
        with self.lock:
            return [(key, self.value(slot)) for key, slot in self.slots.items()]
