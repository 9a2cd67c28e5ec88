"""Read BTF (the BPF Type Format of an object's `.BTF` section) and the map
definitions libbpf-style programs declare with it.

A libbpf-style map is a global variable of section `.maps` whose type is an
anonymous struct that exists only to carry BTF:

    struct {
        __uint(type, BPF_MAP_TYPE_HASH);    // int (*type)[1]: a number as an array length
        __type(key, struct flow_key);       // struct flow_key *key: a type by pointer
        __uint(max_entries, 1024);
    } flows SEC(".maps");

so the definition is read from the types, never from the section's bytes
(which are zero, except for the pointers of a `values = { ... }` initialiser).
`map_specs` accepts what libbpf's `parse_btf_map_def` accepts in its default
strict mode and refuses the rest with a `BtfError` naming the map and member;
`legacy_map_specs` reads the older `maps` section of `struct bpf_map_def`
records.

In an object straight from clang a DATASEC's size and its variables' offsets
are 0: the offsets are relocations (`.rel.BTF`) against the variables' symbols.
`fixup_datasec` fills them in from the ELF section and symbols, as libbpf does,
and `map_specs` refuses a DATASEC that was not (its maps would all be at 0).

The format is the kernel's (Documentation/bpf/btf.rst, include/uapi/linux/btf.h):
a header, a type section of variable-length records whose position gives the
type id (0 is void), and a string section. `parse_btf` reads little-endian BTF
of kinds 1 to 19 and checks, before anyone walks it, every offset, every type
id a record refers to, and that no type contains itself (a cycle is only legal
through a pointer or a function prototype), so the walks here end. Bytes that
are not such BTF raise `BtfError` and nothing else.

Pure Python on purpose: no maintained Python library reads BTF, and pyelftools
(which reads the ELF around it) does not.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from enum import IntEnum

__all__ = [
    "Btf",
    "BtfError",
    "BtfType",
    "Enumerator",
    "Kind",
    "MapSpec",
    "Member",
    "Param",
    "VarSecinfo",
    "fixup_datasec",
    "legacy_map_specs",
    "map_specs",
    "parse_btf",
]


class BtfError(ValueError):
    """The BTF or a map definition in it is malformed or refused: one line saying
    what and where (type id, map, member)."""


class Kind(IntEnum):
    """BTF_KIND_*: bits 24-30 of a type's info word."""

    VOID = 0  # BTF_KIND_UNKN: only type id 0, never a record
    INT = 1
    PTR = 2
    ARRAY = 3
    STRUCT = 4
    UNION = 5
    ENUM = 6
    FWD = 7
    TYPEDEF = 8
    VOLATILE = 9
    CONST = 10
    RESTRICT = 11
    FUNC = 12
    FUNC_PROTO = 13
    VAR = 14
    DATASEC = 15
    FLOAT = 16
    DECL_TAG = 17
    TYPE_TAG = 18
    ENUM64 = 19


@dataclass(frozen=True)
class Member:
    """A member of a STRUCT or UNION."""

    name: str
    type: int
    bit_offset: int
    bitfield_size: int = 0  # 0: not a bitfield (always 0 unless the struct's kind_flag is set)


@dataclass(frozen=True)
class Param:
    """A parameter of a FUNC_PROTO; a last one of type 0 and no name is `...`."""

    name: str
    type: int


@dataclass(frozen=True)
class Enumerator:
    """A constant of an ENUM or ENUM64 (signed if the type's kind_flag is set)."""

    name: str
    value: int


@dataclass(frozen=True)
class VarSecinfo:
    """A variable of a DATASEC: its VAR type, offset and size in the section."""

    type: int
    offset: int
    size: int


@dataclass(frozen=True)
class BtfType:
    """One type record. The fields a kind does not use keep their defaults."""

    kind: Kind
    name: str = ""
    kind_flag: bool = False
    # INT, ENUM, ENUM64, STRUCT, UNION, DATASEC, FLOAT (and FWD's kind_flag: a union)
    size: int = 0
    # The type referred to: PTR, TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG,
    # FUNC (its FUNC_PROTO), FUNC_PROTO (the return type), VAR, DECL_TAG; ARRAY: the element.
    type: int = 0
    nelems: int = 0  # ARRAY
    index_type: int = 0  # ARRAY
    members: tuple[Member, ...] = ()  # STRUCT, UNION
    params: tuple[Param, ...] = ()  # FUNC_PROTO
    enumerators: tuple[Enumerator, ...] = ()  # ENUM, ENUM64
    secinfos: tuple[VarSecinfo, ...] = ()  # DATASEC
    linkage: int = 0  # VAR (BTF_VAR_*), FUNC (BTF_FUNC_*, its vlen)
    encoding: int = 0  # INT: BTF_INT_SIGNED | BTF_INT_CHAR | BTF_INT_BOOL
    bits: int = 0  # INT
    bits_offset: int = 0  # INT
    component_idx: int = -1  # DECL_TAG: -1 for the whole type, else a member or parameter


VOID = BtfType(Kind.VOID)

# A type's size passes through these unchanged (libbpf's skip_mods_and_typedefs).
_MODIFIERS = frozenset({Kind.TYPEDEF, Kind.VOLATILE, Kind.CONST, Kind.RESTRICT, Kind.TYPE_TAG})
_SIZED = frozenset({Kind.INT, Kind.ENUM, Kind.ENUM64, Kind.FLOAT, Kind.STRUCT, Kind.UNION})
POINTER_SIZE = 8  # eBPF is 64-bit
_U32_MAX = 0xFFFF_FFFF
_MAX_TYPE_ID = 0xF_FFFF  # BTF_MAX_TYPE
_MAX_STRING_OFFSET = 0xFF_FFFF  # BTF_MAX_NAME_OFFSET


def _label(type_id: int, btf_type: BtfType) -> str:
    """`[7] STRUCT 'flow_key'`: how messages name a type."""
    if type_id == 0:
        return "void"
    name = f" {btf_type.name!r}" if btf_type.name else ""
    return f"[{type_id}] {btf_type.kind.name}{name}"


@dataclass(frozen=True)
class Btf:
    """Parsed BTF: `types[id]` is the type of that id, `types[0]` is void."""

    types: tuple[BtfType, ...]

    def get(self, type_id: int) -> BtfType:
        if not 0 <= type_id < len(self.types):
            raise BtfError(f"BTF type id {type_id} out of range (0..{len(self.types) - 1})")
        return self.types[type_id]

    def name_of(self, type_id: int) -> str:
        return self.get(type_id).name

    # What the walks below found, so that a hostile BTF of long chains (a million
    # typedefs, each the key of a map) costs linear time, not quadratic.
    _bases: dict[int, tuple[int, int]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    _ends: dict[int, tuple[int, int]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def _follow(self, type_id: int, through_arrays: bool) -> tuple[int, int]:
        """The end of the chain of modifiers (and arrays) from `type_id`, and the
        product of the arrays' lengths, capped past 4 GiB (0 stays 0)."""
        cache = self._ends if through_arrays else self._bases
        path: list[int] = []
        current = type_id
        while current not in cache:
            kind = self.get(current).kind
            if kind not in _MODIFIERS and not (through_arrays and kind == Kind.ARRAY):
                cache[current] = (current, 1)
                break
            if len(path) >= len(self.types):  # only a hand-built Btf: parse_btf refuses cycles
                raise BtfError(f"BTF type [{type_id}]: reference cycle")
            path.append(current)
            current = self.types[current].type
        end, count = cache[current]
        for node in reversed(path):
            if self.types[node].kind == Kind.ARRAY:
                count = min(count * self.types[node].nelems, _U32_MAX + 1)
            cache[node] = (end, count)
        return cache[type_id]

    def skip_modifiers(self, type_id: int) -> int:
        """The id behind typedef, const, volatile, restrict and type tags."""
        return self._follow(type_id, through_arrays=False)[0]

    def size_of(self, type_id: int) -> int:
        """Bytes of a type, through modifiers and arrays; BtfError for one without a
        size (void, FWD, FUNC, FUNC_PROTO, VAR, DATASEC, DECL_TAG) or over 4 GiB."""
        end, count = self._follow(type_id, through_arrays=True)
        end_type = self.types[end]
        if end_type.kind in _SIZED:
            size = end_type.size
        elif end_type.kind == Kind.PTR:
            size = POINTER_SIZE
        else:
            what = _label(type_id, self.types[type_id])
            if end != type_id:
                what += f", which resolves to {_label(end, end_type)},"
            raise BtfError(f"BTF type {what} has no size")
        if count * size > _U32_MAX:
            raise BtfError(f"BTF type {_label(type_id, self.types[type_id])}: over 4 GiB")
        return count * size


# -- parsing -----------------------------------------------------------------------

_HEADER = struct.Struct("<HBBIIIII")  # magic, version, flags, hdr_len, type/str off+len
_LAYOUT = struct.Struct("<II")  # layout_off, layout_len: newer headers, 32 bytes
_RECORD = struct.Struct("<III")  # name_off, info, size or type
_MAGIC = 0xEB9F
_VERSION = 1

# Bytes after the 12-byte record: a fixed part, then vlen items of this size.
_EXTRA: dict[Kind, tuple[int, int]] = {
    Kind.INT: (4, 0),
    Kind.PTR: (0, 0),
    Kind.ARRAY: (12, 0),
    Kind.STRUCT: (0, 12),
    Kind.UNION: (0, 12),
    Kind.ENUM: (0, 8),
    Kind.FWD: (0, 0),
    Kind.TYPEDEF: (0, 0),
    Kind.VOLATILE: (0, 0),
    Kind.CONST: (0, 0),
    Kind.RESTRICT: (0, 0),
    Kind.FUNC: (0, 0),
    Kind.FUNC_PROTO: (0, 8),
    Kind.VAR: (4, 0),
    Kind.DATASEC: (0, 12),
    Kind.FLOAT: (0, 0),
    Kind.DECL_TAG: (4, 0),
    Kind.TYPE_TAG: (0, 0),
    Kind.ENUM64: (0, 12),
}


def parse_btf(data: bytes) -> Btf:
    """Parse the bytes of a `.BTF` section; BtfError if they are not valid BTF."""
    data = bytes(data)
    if len(data) < _HEADER.size:
        raise BtfError(f"BTF header truncated: {len(data)} bytes, need {_HEADER.size}")
    fields = _HEADER.unpack_from(data)
    magic, version, _flags, hdr_len, type_off, type_len, str_off, str_len = fields
    if magic == 0x9FEB:
        raise BtfError("big-endian BTF is not supported (compile with -target bpf or bpfel)")
    if magic != _MAGIC:
        raise BtfError(f"bad BTF magic {magic:#06x}, expected {_MAGIC:#06x}")
    if version != _VERSION:
        raise BtfError(f"BTF version {version} is not supported (only {_VERSION})")
    if hdr_len < _HEADER.size:
        raise BtfError(f"BTF header length {hdr_len} is less than {_HEADER.size}")
    if hdr_len > len(data):
        raise BtfError(f"BTF header length {hdr_len} exceeds the {len(data)} bytes of data")
    # A longer header is a newer one: its fields past ours are optional (libbpf
    # reads those it knows and ignores the rest).
    header = data[: min(hdr_len, _HEADER.size + _LAYOUT.size)].ljust(
        _HEADER.size + _LAYOUT.size, b"\0"
    )
    layout_off, layout_len = _LAYOUT.unpack_from(header, _HEADER.size)
    body = len(data) - hdr_len
    if str_off + str_len > body:
        raise BtfError(
            f"BTF string section ({str_len} bytes at {str_off}) exceeds the {body} bytes "
            "after the header"
        )
    if type_off + type_len > str_off:
        raise BtfError(
            f"BTF type section ({type_len} bytes at {type_off}) overlaps or follows the "
            f"string section at {str_off}"
        )
    if type_off % 4:
        raise BtfError(f"BTF type section offset {type_off} is not 4-byte aligned")
    if layout_len and (
        layout_off % 4 or layout_off < type_off + type_len or layout_off + layout_len > str_off
    ):
        raise BtfError(
            f"BTF layout section ({layout_len} bytes at {layout_off}) is misaligned or "
            "not between the type and string sections"
        )
    strings = data[hdr_len + str_off : hdr_len + str_off + str_len]
    if not strings or strings[-1] != 0 or strings[0] != 0:
        raise BtfError(
            "BTF string section is empty, does not start with an empty string or does "
            "not end with a NUL"
        )
    if len(strings) - 1 > _MAX_STRING_OFFSET:
        raise BtfError(f"BTF string section of {len(strings)} bytes is too large")
    records = data[hdr_len + type_off : hdr_len + type_off + type_len]
    types = _Reader(records, strings).read()
    _check_references(types)
    _check_cycles(types)
    return Btf(types)


class _Reader:
    """Decodes the type section, record by record."""

    def __init__(self, records: bytes, strings: bytes) -> None:
        self.records = records
        self.strings = strings
        self.names: dict[int, str] = {0: ""}
        # Names may overlap (one can be the tail of another), so distinct offsets
        # into one long string would cost quadratic time and memory: the bytes of
        # all the names together are bounded, far above what a compiler writes.
        self.budget = 4 * len(strings) + 65536

    def name(self, offset: int, type_id: int, what: str = "name") -> str:
        known = self.names.get(offset)
        if known is not None:
            return known
        if offset >= len(self.strings):
            raise BtfError(
                f"BTF type [{type_id}]: {what} offset {offset} is outside the "
                f"{len(self.strings)}-byte string section"
            )
        end = self.strings.find(b"\0", offset, offset + self.budget + 1)
        if end < 0:
            raise BtfError(
                f"BTF type [{type_id}]: {what} at offset {offset}: the names overlap too "
                f"much (more than {4 * len(self.strings) + 65536} bytes in all)"
            )
        self.budget -= end - offset
        text = self.strings[offset:end].decode("utf-8", "backslashreplace")
        self.names[offset] = text
        return text

    def read(self) -> tuple[BtfType, ...]:
        types = [VOID]
        position = 0
        end = len(self.records)
        while position < end:
            type_id = len(types)
            if type_id > _MAX_TYPE_ID:
                raise BtfError(f"BTF has more than {_MAX_TYPE_ID} types")
            if position + _RECORD.size > end:
                raise BtfError(
                    f"BTF type [{type_id}] at offset {position} of the type section is "
                    f"truncated ({end - position} of {_RECORD.size} bytes)"
                )
            name_off, info, size_or_type = _RECORD.unpack_from(self.records, position)
            number = (info >> 24) & 0x7F
            if not 0 < number <= max(Kind):
                raise BtfError(
                    f"BTF type [{type_id}] at offset {position} of the type section: "
                    f"unknown kind {number}"
                )
            kind = Kind(number)
            vlen = info & 0xFF_FFFF
            fixed, item = _EXTRA[kind]
            extra = fixed + vlen * item
            position += _RECORD.size
            if position + extra > end:
                raise BtfError(
                    f"BTF type [{type_id}] {kind.name} with vlen {vlen} is truncated: needs "
                    f"{extra} more bytes, the type section has {end - position}"
                )
            tail = self.records[position : position + extra]
            position += extra
            name = self.name(name_off, type_id)
            types.append(
                self.decode(type_id, kind, name, bool(info >> 31), vlen, size_or_type, tail)
            )
        return tuple(types)

    def decode(
        self,
        type_id: int,
        kind: Kind,
        name: str,
        kind_flag: bool,
        vlen: int,
        value: int,
        tail: bytes,
    ) -> BtfType:
        """One record; `value` is its size-or-type word, `tail` what follows it."""
        if kind == Kind.INT:
            (word,) = struct.unpack("<I", tail)
            encoding, bits_offset, bits = (word >> 24) & 0x0F, (word >> 16) & 0xFF, word & 0xFF
            return BtfType(
                kind,
                name,
                kind_flag,
                size=value,
                encoding=encoding,
                bits=bits,
                bits_offset=bits_offset,
            )
        if kind == Kind.ARRAY:
            element, index_type, nelems = struct.unpack("<III", tail)
            return BtfType(
                kind, name, kind_flag, type=element, index_type=index_type, nelems=nelems
            )
        if kind in (Kind.STRUCT, Kind.UNION):
            members = []
            for index, (member_name, member_type, offset) in enumerate(
                struct.iter_unpack("<III", tail)
            ):
                bit_offset, bitfield = (
                    (offset & 0xFF_FFFF, offset >> 24) if kind_flag else (offset, 0)
                )
                what = f"member #{index} name"
                members.append(
                    Member(self.name(member_name, type_id, what), member_type, bit_offset, bitfield)
                )
            return BtfType(kind, name, kind_flag, size=value, members=tuple(members))
        if kind == Kind.ENUM:
            enumerators = tuple(
                Enumerator(
                    self.name(name_off, type_id, f"enumerator #{index} name"),
                    _signed(raw, 32) if kind_flag else raw,
                )
                for index, (name_off, raw) in enumerate(struct.iter_unpack("<II", tail))
            )
            return BtfType(kind, name, kind_flag, size=value, enumerators=enumerators)
        if kind == Kind.ENUM64:
            enumerators = tuple(
                Enumerator(
                    self.name(name_off, type_id, f"enumerator #{index} name"),
                    _signed(low | high << 32, 64) if kind_flag else low | high << 32,
                )
                for index, (name_off, low, high) in enumerate(struct.iter_unpack("<III", tail))
            )
            return BtfType(kind, name, kind_flag, size=value, enumerators=enumerators)
        if kind == Kind.FUNC_PROTO:
            params = tuple(
                Param(self.name(name_off, type_id, f"parameter #{index} name"), param_type)
                for index, (name_off, param_type) in enumerate(struct.iter_unpack("<II", tail))
            )
            return BtfType(kind, name, kind_flag, type=value, params=params)
        if kind == Kind.DATASEC:
            secinfos = tuple(VarSecinfo(*entry) for entry in struct.iter_unpack("<III", tail))
            return BtfType(kind, name, kind_flag, size=value, secinfos=secinfos)
        if kind == Kind.VAR:
            (linkage,) = struct.unpack("<I", tail)
            return BtfType(kind, name, kind_flag, type=value, linkage=linkage)
        if kind == Kind.DECL_TAG:
            (component,) = struct.unpack("<i", tail)
            return BtfType(kind, name, kind_flag, type=value, component_idx=component)
        if kind == Kind.FUNC:
            return BtfType(kind, name, kind_flag, type=value, linkage=vlen)
        if kind in (Kind.FLOAT, Kind.FWD):
            return BtfType(kind, name, kind_flag, size=value if kind == Kind.FLOAT else 0)
        return BtfType(kind, name, kind_flag, type=value)  # PTR and the modifiers


def _signed(value: int, bits: int) -> int:
    return value - (1 << bits) if value >> (bits - 1) else value


def _references(btf_type: BtfType) -> Iterator[tuple[str, int]]:
    """Every type id a record refers to, with what refers to it (for messages)."""
    kind = btf_type.kind
    if kind in _MODIFIERS or kind in (Kind.PTR, Kind.FUNC, Kind.VAR, Kind.DECL_TAG):
        yield "type", btf_type.type
    elif kind == Kind.ARRAY:
        yield "element type", btf_type.type
        yield "index type", btf_type.index_type
    elif kind == Kind.FUNC_PROTO:
        yield "return type", btf_type.type
        for index, param in enumerate(btf_type.params):
            yield f"parameter #{index}", param.type
    elif kind in (Kind.STRUCT, Kind.UNION):
        for index, member in enumerate(btf_type.members):
            yield f"member #{index} {member.name!r}", member.type
    elif kind == Kind.DATASEC:
        for index, info in enumerate(btf_type.secinfos):
            yield f"variable #{index}", info.type


def _check_references(types: tuple[BtfType, ...]) -> None:
    count = len(types)
    for type_id, btf_type in enumerate(types):
        for what, target in _references(btf_type):
            if target >= count:
                raise BtfError(
                    f"BTF type {_label(type_id, btf_type)}: {what} refers to type "
                    f"[{target}], but the last type is [{count - 1}]"
                )
        if btf_type.kind == Kind.FUNC and types[btf_type.type].kind != Kind.FUNC_PROTO:
            raise BtfError(
                f"BTF type {_label(type_id, btf_type)}: refers to "
                f"{_label(btf_type.type, types[btf_type.type])}, not a FUNC_PROTO"
            )


def _contained(btf_type: BtfType) -> list[int]:
    """The types a type is made of: the ones it cannot contain itself through.
    A pointer or a function prototype may lead back (a list's `next`); a
    typedef, an array element, a member or a variable may not."""
    kind = btf_type.kind
    if kind in _MODIFIERS or kind in (Kind.ARRAY, Kind.FUNC, Kind.VAR, Kind.DECL_TAG):
        return [btf_type.type] if btf_type.type else []
    if kind in (Kind.STRUCT, Kind.UNION):
        return [member.type for member in btf_type.members if member.type]
    if kind == Kind.DATASEC:
        return [info.type for info in btf_type.secinfos if info.type]
    return []


def _check_cycles(types: tuple[BtfType, ...]) -> None:
    """BtfError if a type contains itself; iterative (Kahn), so depth costs no stack."""
    parts = [_contained(btf_type) for btf_type in types]
    users: list[list[int]] = [[] for _ in types]
    pending = [len(part) for part in parts]  # parts not yet known to be acyclic
    for type_id, part in enumerate(parts):
        for target in part:
            users[target].append(type_id)
    ready = [type_id for type_id, count in enumerate(pending) if count == 0]
    done = 0
    while ready:
        target = ready.pop()
        done += 1
        for user in users[target]:
            pending[user] -= 1
            if pending[user] == 0:
                ready.append(user)
    if done == len(types):
        return
    # Every type left has a part left: following those parts must come round.
    seen: dict[int, int] = {}
    current = next(type_id for type_id, count in enumerate(pending) if count)
    while current not in seen:
        seen[current] = len(seen)
        current = next(part for part in parts[current] if pending[part])
    cycle = [type_id for type_id, step in seen.items() if step >= seen[current]]
    shown = " -> ".join(_label(type_id, types[type_id]) for type_id in cycle[:4])
    more = " -> ..." if len(cycle) > 4 else ""
    raise BtfError(f"BTF reference cycle: {shown}{more} -> [{cycle[0]}]")


# -- map definitions ---------------------------------------------------------------

BPF_MAP_TYPE_PROG_ARRAY = 3
BPF_MAP_TYPE_ARRAY_OF_MAPS = 12
BPF_MAP_TYPE_HASH_OF_MAPS = 13
LIBBPF_PIN_NONE, LIBBPF_PIN_BY_NAME = 0, 1
BTF_VAR_STATIC, BTF_VAR_GLOBAL_ALLOCATED, BTF_VAR_GLOBAL_EXTERN = 0, 1, 2
_LINKAGES = {BTF_VAR_STATIC: "static", BTF_VAR_GLOBAL_EXTERN: "extern"}
_LEGACY_RECORD = struct.Struct("<5I")  # struct bpf_map_def


@dataclass(frozen=True)
class MapSpec:
    """A map's definition, as libbpf reads it.

    For an inner map (`MapSpec.inner`), which is a type and not a variable,
    `offset` is 0 and `size` is the size of its definition struct.
    """

    name: str  # the variable's name; an inner map's: its struct's (else "<outer>.inner")
    offset: int  # of the variable in its section
    size: int  # of the variable
    type: int  # BPF_MAP_TYPE_*
    key_size: int
    value_size: int  # 4 (a map or program fd) when there is a `values` member, as in libbpf
    max_entries: int
    map_flags: int
    pinning: int  # LIBBPF_PIN_NONE or LIBBPF_PIN_BY_NAME
    numa_node: int
    inner: MapSpec | None  # ARRAY_OF_MAPS, HASH_OF_MAPS: the maps it holds
    # Byte offset of `values` in the variable: `values = { [i] = &x }` is a
    # relocation at offset + values_offset + 8 * i. None without `values`.
    values_offset: int | None
    values_count: int  # nelems of `values`: always 0 (libbpf takes only a flexible array)
    map_extra: int = 0  # `__uint(map_extra, N)`: a bloom filter's hash count, an arena's address


class _Definition:
    """What the members of one definition struct set, in libbpf's order of checks."""

    def __init__(self, btf: Btf, name: str, where: str, inner: bool) -> None:
        self.btf = btf
        self.name = name
        self.where = where  # "map 'name'", for messages
        self.is_inner = inner
        self.type = 0
        self.key_size = 0
        self.value_size = 0
        self.max_entries = 0
        self.map_flags = 0
        self.numa_node = 0
        self.pinning = LIBBPF_PIN_NONE
        self.map_extra = 0
        self.inner: MapSpec | None = None
        self.values_offset: int | None = None
        self.values_count = 0

    def error(self, member: str, message: str) -> BtfError:
        return BtfError(f"{self.where}: member {member!r}: {message}")

    def label(self, type_id: int) -> str:
        return _label(type_id, self.btf.get(type_id))

    def read(self, definition: BtfType) -> None:
        last = len(definition.members) - 1
        for index, member in enumerate(definition.members):
            name = member.name
            if not name:
                raise BtfError(f"{self.where}: member #{index} has no name")
            if name == "type":
                self.type = self.number(member)
            elif name == "max_entries":
                self.max_entries = self.number(member)
            elif name == "map_flags":
                self.map_flags = self.number(member)
            elif name == "numa_node":
                self.numa_node = self.number(member)
            elif name == "key_size":
                self.key_size = self.check_size(name, "key", self.key_size, self.number(member))
            elif name == "value_size":
                self.value_size = self.check_size(
                    name, "value", self.value_size, self.number(member)
                )
            elif name == "key":
                self.key_size = self.check_size(name, "key", self.key_size, self.pointee(member))
            elif name == "value":
                self.value_size = self.check_size(
                    name, "value", self.value_size, self.pointee(member)
                )
            elif name == "values":
                self.values(member, index == last)
            elif name == "pinning":
                if self.is_inner:
                    raise self.error(name, "an inner map cannot be pinned")
                self.pinning = self.number(member)
                if self.pinning not in (LIBBPF_PIN_NONE, LIBBPF_PIN_BY_NAME):
                    raise self.error(name, f"invalid pinning {self.pinning} (0 or 1)")
            elif name == "map_extra":
                self.map_extra = self.long_number(member)
            else:
                raise self.error(name, "unknown member (libbpf refuses it)")
        if self.type == 0:
            raise BtfError(f"{self.where}: no map type (`__uint(type, ...)`)")

    def check_size(self, member: str, what: str, known: int, size: int) -> int:
        if known and known != size:
            raise self.error(member, f"conflicting {what} size {known} != {size}")
        return size

    def number(self, member: Member) -> int:
        """`__uint(name, N)`: a pointer to an array of N elements (`int (*name)[N]`)."""
        pointer_id = self.btf.skip_modifiers(member.type)
        pointer = self.btf.get(pointer_id)
        if pointer.kind != Kind.PTR:
            raise self.error(member.name, f"expected a PTR, got {self.label(pointer_id)}")
        array = self.btf.get(pointer.type)
        if array.kind != Kind.ARRAY:
            raise self.error(
                member.name, f"expected a PTR to an ARRAY, got a PTR to {self.label(pointer.type)}"
            )
        return array.nelems

    def long_number(self, member: Member) -> int:
        """`__uint(name, N)`, or `__ulong(name, N)`: an enum of one constant N."""
        type_id = self.btf.skip_modifiers(member.type)
        btf_type = self.btf.get(type_id)
        if btf_type.kind == Kind.PTR:
            return self.number(member)
        if btf_type.kind not in (Kind.ENUM, Kind.ENUM64):
            raise self.error(member.name, f"expected a PTR or an ENUM, got {self.label(type_id)}")
        if len(btf_type.enumerators) != 1:
            raise self.error(
                member.name,
                f"{self.label(type_id)} has {len(btf_type.enumerators)} constants, not 1",
            )
        return btf_type.enumerators[0].value & 0xFFFF_FFFF_FFFF_FFFF

    def pointee(self, member: Member) -> int:
        """`__type(name, T)`: a pointer to T (`typeof(T) *name`); the size of T."""
        pointer = self.btf.get(member.type)
        if pointer.kind != Kind.PTR:
            raise self.error(member.name, f"expected a PTR, got {self.label(member.type)}")
        try:
            return self.btf.size_of(pointer.type)
        except BtfError as exc:
            raise self.error(member.name, str(exc)) from None

    def values(self, member: Member, is_last: bool) -> None:
        """`__array(values, T)`: `typeof(T) *values[]`, for programs or inner maps."""
        name = member.name
        if self.is_inner:
            raise self.error(name, "an inner map cannot hold maps (one level only)")
        if not is_last:
            raise self.error(name, "must be the last member")
        map_in_map = self.type in (BPF_MAP_TYPE_ARRAY_OF_MAPS, BPF_MAP_TYPE_HASH_OF_MAPS)
        if not map_in_map and self.type != BPF_MAP_TYPE_PROG_ARRAY:
            raise self.error(name, f"map type {self.type} is not a map-in-map or a program array")
        self.value_size = self.check_size(name, "value", self.value_size, 4)
        array = self.btf.get(member.type)
        if array.kind != Kind.ARRAY or array.nelems:
            length = f" of {array.nelems}" if array.kind == Kind.ARRAY else ""
            got = f"{self.label(member.type)}{length}"
            raise self.error(name, f"expected a zero-length ARRAY (`__array`), got {got}")
        pointer_id = self.btf.skip_modifiers(array.type)
        pointer = self.btf.get(pointer_id)
        if pointer.kind != Kind.PTR:
            raise self.error(name, f"expected an ARRAY of PTR, got {self.label(pointer_id)}")
        target_id = self.btf.skip_modifiers(pointer.type)
        target = self.btf.get(target_id)
        if member.bit_offset % 8:
            raise self.error(name, f"at bit offset {member.bit_offset}, not on a byte")
        self.values_offset = member.bit_offset // 8
        self.values_count = array.nelems
        if not map_in_map:
            if target.kind != Kind.FUNC_PROTO:
                raise self.error(
                    name, f"a program array holds FUNC_PROTO pointers, not {self.label(target_id)}"
                )
            return
        if target.kind != Kind.STRUCT:
            raise self.error(
                name, f"an inner map is defined by a STRUCT, not {self.label(target_id)}"
            )
        # libbpf names it "<outer>.inner"; its struct's name says more, when it has one.
        inner_name = target.name or f"{self.name}.inner"
        where = f"{self.where}'s inner map {_label(target_id, target)}"
        inner = _Definition(self.btf, inner_name, where, inner=True)
        inner.read(target)
        self.inner = inner.spec(0, target.size)

    def spec(self, offset: int, size: int) -> MapSpec:
        return MapSpec(
            name=self.name,
            offset=offset,
            size=size,
            type=self.type,
            key_size=self.key_size,
            value_size=self.value_size,
            max_entries=self.max_entries,
            map_flags=self.map_flags,
            pinning=self.pinning,
            numa_node=self.numa_node,
            inner=self.inner,
            values_offset=self.values_offset,
            values_count=self.values_count,
            map_extra=self.map_extra,
        )


def _datasec(btf: Btf, section: str) -> int | None:
    """The id of the DATASEC named `section`, None if there is none."""
    found = [
        type_id
        for type_id, btf_type in enumerate(btf.types)
        if btf_type.kind == Kind.DATASEC and btf_type.name == section
    ]
    if len(found) > 1:
        raise BtfError(f"BTF has {len(found)} DATASECs named {section!r}: {found[:4]}")
    return found[0] if found else None


def fixup_datasec(btf: Btf, section: str, size: int, symbols: Mapping[str, int]) -> Btf:
    """The BTF with the DATASEC `section` sized and its variables placed, as libbpf's
    btf_fixup_datasec does for an object straight from clang.

    clang writes a DATASEC's size and its variables' offsets as 0 and leaves the
    offsets to relocations (`.rel.BTF`); a linked object (bpftool gen object) has
    them. So when the size is 0 it becomes `size` (the ELF section's) and each
    variable's offset the value of its ELF symbol (`symbols`: name -> st_value in
    that section); a sized DATASEC, or none, is left as it is. BtfError for an
    entry that is not a VAR or a global variable without a symbol.
    """
    datasec_id = _datasec(btf, section)
    if datasec_id is None:
        return btf
    datasec = btf.types[datasec_id]
    if datasec.size:
        return btf
    secinfos = []
    for index, info in enumerate(datasec.secinfos):
        var = btf.get(info.type)
        if var.kind != Kind.VAR:
            raise BtfError(f"{section!r} variable #{index} ({_label(info.type, var)}): not a VAR")
        offset = symbols.get(var.name)
        if offset is None:
            if var.linkage in (BTF_VAR_STATIC, BTF_VAR_GLOBAL_EXTERN):
                offset = info.offset  # libbpf leaves these: no symbol needs to exist
            else:
                raise BtfError(
                    f"{section!r} variable #{index} {var.name!r}: no ELF symbol gives its offset"
                )
        secinfos.append(VarSecinfo(info.type, offset, info.size))
    types = list(btf.types)
    types[datasec_id] = replace(datasec, size=size, secinfos=tuple(secinfos))
    return Btf(tuple(types))


def map_specs(btf: Btf, section: str = ".maps") -> list[MapSpec]:
    """The maps of the DATASEC `section`, by offset; [] if the BTF has no such section.

    The DATASEC must be sized: for an object straight from clang, `fixup_datasec`
    first (else every offset would read 0).
    """
    datasec_id = _datasec(btf, section)
    if datasec_id is None:
        return []
    datasec = btf.types[datasec_id]
    if not datasec.size and datasec.secinfos:
        raise BtfError(
            f"{_label(datasec_id, datasec)} has size 0: its variables' offsets are unset "
            "(an object straight from clang); fixup_datasec() it with the ELF symbols first"
        )
    order = sorted(range(len(datasec.secinfos)), key=lambda i: datasec.secinfos[i].offset)
    return [_map_spec(btf, datasec_id, datasec, index) for index in order]


def _map_spec(btf: Btf, datasec_id: int, datasec: BtfType, index: int) -> MapSpec:
    info = datasec.secinfos[index]
    var = btf.get(info.type)
    where = f"{datasec.name!r} variable #{index} ({_label(info.type, var)})"
    if var.kind != Kind.VAR:
        raise BtfError(f"{where}: not a VAR")
    if not var.name:
        raise BtfError(f"{where}: no name")
    name = var.name
    if var.linkage != BTF_VAR_GLOBAL_ALLOCATED:
        linkage = _LINKAGES.get(var.linkage, f"unknown ({var.linkage})")
        raise BtfError(f"map {name!r}: {linkage} linkage; a map must be a global variable")
    if info.offset + info.size > datasec.size:
        raise BtfError(
            f"map {name!r}: {info.size} bytes at offset {info.offset} exceed the "
            f"{datasec.size} bytes of {_label(datasec_id, datasec)}"
        )
    definition_id = btf.skip_modifiers(var.type)
    definition = btf.get(definition_id)
    if definition.kind != Kind.STRUCT:
        what = _label(definition_id, definition)
        raise BtfError(f"map {name!r}: defined by {what}, not a STRUCT")
    if definition.size > info.size:
        raise BtfError(
            f"map {name!r}: its definition {_label(definition_id, definition)} has "
            f"{definition.size} bytes, the variable {info.size}"
        )
    reader = _Definition(btf, name, f"map {name!r}", inner=False)
    reader.read(definition)
    return reader.spec(info.offset, info.size)


def legacy_map_specs(data: bytes, symbols: list[tuple[str, int, int]]) -> list[MapSpec]:
    """Maps of a legacy `maps` section: a `struct bpf_map_def` per symbol, given as
    (name, offset, size). A record shorter than the struct reads as zero-padded; a
    longer one (a newer or tool-specific struct) must be zero past it, as libbpf required."""
    specs = []
    for name, offset, size in sorted(symbols, key=lambda symbol: (symbol[1], symbol[0])):
        where = f"map {name!r} at offset {offset} of the maps section"
        if not name:
            raise BtfError(f"the symbol at offset {offset} of the maps section has no name")
        if size <= 0 or offset < 0 or offset + size > len(data):
            raise BtfError(f"{where}: {size} bytes do not fit the section's {len(data)}")
        record = data[offset : offset + size]
        if any(record[_LEGACY_RECORD.size :]):
            raise BtfError(
                f"{where}: non-zero bytes past the {_LEGACY_RECORD.size} of struct "
                "bpf_map_def (options this loader does not know)"
            )
        map_type, key_size, value_size, max_entries, map_flags = _LEGACY_RECORD.unpack(
            record[: _LEGACY_RECORD.size].ljust(_LEGACY_RECORD.size, b"\0")
        )
        specs.append(
            MapSpec(
                name=name,
                offset=offset,
                size=size,
                type=map_type,
                key_size=key_size,
                value_size=value_size,
                max_entries=max_entries,
                map_flags=map_flags,
                pinning=LIBBPF_PIN_NONE,
                numa_node=0,
                inner=None,
                values_offset=None,
                values_count=0,
            )
        )
    return specs


# -- .BTF.ext: only to find CO-RE relocations, which this VM cannot apply ------------------

_EXT_HEADER = struct.Struct("<HBBI")  # magic, version, flags, hdr_len
_CORE_KINDS = (
    "field byte offset", "field byte size", "field exists", "field signed", "field lshift",
    "field rshift", "type id local", "type id target", "type exists", "type size",
    "enum value exists", "enum value", "type matches",
)  # fmt: skip


@dataclass(frozen=True)
class CoreRelocation:
    """One CO-RE relocation of `.BTF.ext` (`struct bpf_core_relo`)."""

    section: str  # of the instruction
    offset: int  # of the instruction in its section, in bytes
    type: str  # the local type it is relative to
    access: str  # the access string, "0:1" for the second member
    kind: str


def first_core_relocation(ext: bytes, btf_data: bytes) -> CoreRelocation | None:
    """The first CO-RE relocation of a `.BTF.ext` section, or None; `btf_data` is the
    object's `.BTF`. BtfError if either is malformed."""
    ext = bytes(ext)
    if len(ext) < _EXT_HEADER.size:
        raise BtfError(f".BTF.ext header truncated: {len(ext)} bytes")
    magic, _version, _flags, hdr_len = _EXT_HEADER.unpack_from(ext)
    if magic != _MAGIC:
        raise BtfError(f"bad .BTF.ext magic {magic:#06x}, expected {_MAGIC:#06x}")
    if hdr_len < 32 or hdr_len > len(ext):
        return None  # a header without the CO-RE fields: no relocations
    core_off, core_len = struct.unpack_from("<II", ext, 24)
    start = hdr_len + core_off
    if core_len == 0:
        return None
    if start + core_len > len(ext) or core_len < 4:
        raise BtfError(f".BTF.ext CO-RE section ({core_len} bytes at {core_off}) is truncated")
    (record_size,) = struct.unpack_from("<I", ext, start)
    at, end = start + 4, start + core_len
    while at + 8 <= end:
        name_off, count = struct.unpack_from("<II", ext, at)
        at += 8
        if count == 0:
            continue
        if record_size < 16 or at + 16 > end:
            raise BtfError(f".BTF.ext CO-RE record of {record_size} bytes is truncated")
        insn_off, type_id, access_off, kind = struct.unpack_from("<IIII", ext, at)
        btf = parse_btf(btf_data)
        strings = btf_strings(btf_data)
        return CoreRelocation(
            _string(strings, name_off),
            insn_off,
            _label(type_id, btf.get(type_id)),
            _string(strings, access_off),
            _CORE_KINDS[kind] if kind < len(_CORE_KINDS) else f"kind {kind}",
        )
    return None


def btf_strings(data: bytes) -> bytes:
    """The string section of `.BTF` bytes that `parse_btf` accepted."""
    _magic, _version, _flags, hdr_len, _t_off, _t_len, str_off, str_len = _HEADER.unpack_from(data)
    return bytes(data[hdr_len + str_off : hdr_len + str_off + str_len])


def _string(strings: bytes, offset: int) -> str:
    if offset >= len(strings):
        raise BtfError(f".BTF.ext: string offset {offset} is outside the string section")
    end = strings.find(b"\0", offset, offset + 1024)
    return strings[offset : end if end >= 0 else offset + 1024].decode("utf-8", "backslashreplace")
