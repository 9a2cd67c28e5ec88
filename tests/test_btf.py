"""`bpfexec.vm.btf`: BTF parsing and libbpf-style map definitions.

The objects are `tests/fixtures/libbpf/*.c`: compiled here when clang and
libbpf's headers are installed ("fresh"), and the committed `*.o` next to them
(`build.sh`) in every case ("committed"), so every expectation below holds for
both. `maps.c` declares a map of every kind, `legacy.c` the old `maps`
section, `refused.c` one definition libbpf refuses per section.

Malformed BTF (hand-built records, and truncations and byte flips of a real
`.BTF`) raises `BtfError` with a one-line message, and nothing else.
"""

from __future__ import annotations

import functools
import io
import shutil
import struct
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from elftools.elf.elffile import ELFFile
from elftools.elf.relocation import RelocationSection
from elftools.elf.sections import SymbolTableSection
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bpfexec.vm.btf import (
    Btf,
    BtfError,
    BtfType,
    Kind,
    MapSpec,
    fixup_datasec,
    legacy_map_specs,
    map_specs,
    parse_btf,
)

FIXTURES = Path(__file__).parent / "fixtures" / "libbpf"
CLANG = shutil.which("clang")
LIBBPF_HEADERS = Path("/usr/include/bpf/bpf_helpers.h")

# BPF_MAP_TYPE_* (include/uapi/linux/bpf.h)
HASH, ARRAY, PROG_ARRAY, PERCPU_HASH, PERCPU_ARRAY = 1, 2, 3, 5, 6
LRU_HASH, LPM_TRIE, ARRAY_OF_MAPS, HASH_OF_MAPS = 9, 11, 12, 13
QUEUE, STACK, RINGBUF, BLOOM_FILTER = 22, 23, 27, 30
BPF_F_NO_PREALLOC, BPF_F_NO_COMMON_LRU, BPF_F_NUMA_NODE = 1, 2, 4
LIBBPF_PIN_BY_NAME = 1


# -- the objects ------------------------------------------------------------------------


@dataclass(frozen=True)
class Symbol:
    section: str
    value: int
    size: int


@dataclass(frozen=True)
class Object:
    """What the tests need of an ELF object, read with pyelftools."""

    btf_bytes: bytes
    btf: Btf
    sections: dict[str, tuple[int, bytes]]  # name -> (size, contents)
    symbols: dict[str, Symbol]  # named data symbols
    relocations: dict[str, list[tuple[int, str]]]  # target section -> (offset, symbol)

    def symbol_values(self, section: str) -> dict[str, int]:
        return {name: s.value for name, s in self.symbols.items() if s.section == section}

    def fixed(self, section: str = ".maps") -> Btf:
        """The BTF with `section`'s DATASEC placed, as a loader does before map_specs."""
        size, _ = self.sections[section]
        return fixup_datasec(self.btf, section, size, self.symbol_values(section))

    def specs(self, section: str = ".maps") -> list[MapSpec]:
        return map_specs(self.fixed(section), section)


def read_object(path: Path) -> Object:
    elf = ELFFile(io.BytesIO(path.read_bytes()))
    btf_section = elf.get_section_by_name(".BTF")
    assert btf_section is not None, f"{path.name} has no .BTF"
    btf_bytes = btf_section.data()
    names = {index: elf.get_section(index).name for index in range(elf.num_sections())}
    sections = {
        section.name: (section["sh_size"], section.data()) for section in elf.iter_sections()
    }
    symbols: dict[str, Symbol] = {}
    relocations: dict[str, list[tuple[int, str]]] = {}
    for section in elf.iter_sections():
        if isinstance(section, SymbolTableSection):
            for symbol in section.iter_symbols():
                if symbol["st_info"]["type"] == "STT_OBJECT" and symbol.name:
                    where = names[symbol["st_shndx"]]
                    symbols[symbol.name] = Symbol(where, symbol["st_value"], symbol["st_size"])
    for section in elf.iter_sections():
        if isinstance(section, RelocationSection):
            table = elf.get_section(section["sh_link"])
            target = names[section["sh_info"]]
            relocations[target] = [
                (reloc["r_offset"], table.get_symbol(reloc["r_info_sym"]).name)
                for reloc in section.iter_relocations()
            ]
    return Object(btf_bytes, parse_btf(btf_bytes), sections, symbols, relocations)


def compile_fixture(name: str, out_dir: Path) -> Path:
    """The fixture compiled as the brief of this module says (build.sh adds only
    flags that keep paths out of the DWARF)."""
    assert CLANG is not None
    multiarch = subprocess.run(
        [CLANG, "-print-multiarch"], capture_output=True, text=True, check=False
    ).stdout.strip()
    out = out_dir / f"{name}.o"
    subprocess.run(
        [
            CLANG,
            "-O2",
            "-g",
            "-target",
            "bpf",
            f"-I/usr/include/{multiarch}",
            "-c",
            str(FIXTURES / f"{name}.c"),
            "-o",
            str(out),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return out


@pytest.fixture(scope="module", params=["fresh", "committed"])
def origin(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def objects(origin: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Object]:
    """name -> Object for each fixture, compiled now or committed."""
    names = ("maps", "legacy", "refused")
    if origin == "fresh":
        if CLANG is None or not LIBBPF_HEADERS.exists():
            pytest.skip("clang or libbpf's headers (/usr/include/bpf) are not installed")
        out_dir = tmp_path_factory.mktemp("libbpf-objects")
        return {name: read_object(compile_fixture(name, out_dir)) for name in names}
    missing = [name for name in names if not (FIXTURES / f"{name}.o").exists()]
    if missing:
        pytest.skip(f"no committed object for {missing} (tests/fixtures/libbpf/build.sh)")
    return {name: read_object(FIXTURES / f"{name}.o") for name in names}


def one_line(exc: pytest.ExceptionInfo[BtfError]) -> str:
    message = str(exc.value)
    assert message and "\n" not in message and "\r" not in message, repr(message)
    return message


# -- maps.c: every kind of map -------------------------------------------------------


def spec(
    name: str,
    size: int,
    map_type: int,
    key_size: int,
    value_size: int,
    max_entries: int,
    **more: Any,
) -> MapSpec:
    """A MapSpec of offset 0 and the defaults of a plain map (the test fills in offsets)."""
    plain = MapSpec(
        name, 0, size, map_type, key_size, value_size, max_entries, 0, 0, 0, None, None, 0
    )
    return replace(plain, **more)


INNER_MAP = spec("inner_map", 32, ARRAY, 4, 8, 8)  # an inner map: offset 0, its struct's size
ANONYMOUS_INNER = spec("outer_hash.inner", 40, HASH, 4, 4, 32, map_flags=BPF_F_NO_PREALLOC)

EXPECTED = [
    spec("flows", 32, HASH, 16, 24, 1024),
    spec("counters", 32, ARRAY, 4, 32, 16),  # value __u64[4]
    spec("lru", 40, LRU_HASH, 8, 24, 128, map_flags=BPF_F_NO_COMMON_LRU),
    spec("percpu_counters", 32, PERCPU_ARRAY, 4, 2, 4),  # through const volatile typedef
    spec("percpu_hash", 48, PERCPU_HASH, 8, 12, 64, map_flags=BPF_F_NUMA_NODE, numa_node=1),
    spec("routes", 40, LPM_TRIE, 8, 4, 255, map_flags=BPF_F_NO_PREALLOC),
    spec("queue", 24, QUEUE, 0, 4, 10),
    spec("stack", 24, STACK, 0, 8, 32),
    spec("events", 16, RINGBUF, 0, 0, 256 * 1024),
    spec("pinned", 40, HASH, 4, 4, 8, pinning=LIBBPF_PIN_BY_NAME),
    spec("both_ways", 40, ARRAY, 4, 8, 2),
    spec("inner_a", 32, ARRAY, 4, 8, 8),
    spec("inner_b", 32, ARRAY, 4, 8, 8),
    # type, max_entries, key: 24 bytes, then values[4] from the initialiser
    spec("outer_array", 56, ARRAY_OF_MAPS, 4, 4, 4, inner=INNER_MAP, values_offset=24),
    # type, max_entries, key, pinning: 32 bytes, and no initialiser
    spec(
        "outer_hash",
        32,
        HASH_OF_MAPS,
        4,
        4,
        16,
        pinning=LIBBPF_PIN_BY_NAME,
        inner=ANONYMOUS_INNER,
        values_offset=32,
    ),
    spec("bloom", 32, BLOOM_FILTER, 0, 4, 100, map_extra=3),
    # type, max_entries, key_size: 24 bytes, then values[3]
    spec("jump_table", 48, PROG_ARRAY, 4, 4, 3, values_offset=24),
]


def test_every_map_of_maps_c_is_read_exactly(objects: dict[str, Object]) -> None:
    obj = objects["maps"]
    found = obj.specs()
    # The variable's place comes from its ELF symbol, the rest from the types.
    expected = [replace(s, offset=obj.symbols[s.name].value) for s in EXPECTED]
    expected.sort(key=lambda s: s.offset)
    assert found == expected
    for map_spec in found:
        assert obj.symbols[map_spec.name] == Symbol(".maps", map_spec.offset, map_spec.size)


def test_maps_are_in_offset_order_and_tile_the_section(objects: dict[str, Object]) -> None:
    obj = objects["maps"]
    found = obj.specs()
    assert [s.offset for s in found] == sorted(s.offset for s in found)
    end = 0
    for map_spec in found:
        assert map_spec.offset >= end
        end = map_spec.offset + map_spec.size
    assert end == obj.sections[".maps"][0]


def test_values_initialisers_are_relocations_at_values_offset(
    objects: dict[str, Object],
) -> None:
    """`values = { [i] = &x }` is a relocation at offset + values_offset + 8*i."""
    obj = objects["maps"]
    specs = {s.name: s for s in obj.specs()}
    slots: dict[str, dict[int, str]] = {}
    for offset, symbol in obj.relocations[".maps"]:
        owner = next(s for s in specs.values() if s.offset <= offset < s.offset + s.size)
        assert owner.values_offset is not None
        slot, rest = divmod(offset - owner.offset - owner.values_offset, 8)
        assert rest == 0 and slot >= 0
        slots.setdefault(owner.name, {})[slot] = symbol
    assert slots == {
        "outer_array": {0: "inner_a", 3: "inner_b"},
        "jump_table": {0: "tail", 2: "tail"},
    }
    # The initialised slots fit the variable: flexible arrays grow it.
    for name, used in slots.items():
        s = specs[name]
        assert s.values_offset is not None
        assert s.values_offset + 8 * (max(used) + 1) <= s.size


def test_map_specs_wants_the_datasec_placed_first(objects: dict[str, Object]) -> None:
    """clang leaves the DATASEC's size and offsets 0 (they are .rel.BTF relocations)."""
    obj = objects["maps"]
    datasec = next(t for t in obj.btf.types if t.kind == Kind.DATASEC and t.name == ".maps")
    assert datasec.size == 0 and {info.offset for info in datasec.secinfos} == {0}
    assert len(obj.relocations[".BTF"]) >= len(datasec.secinfos)
    with pytest.raises(BtfError, match="fixup_datasec") as exc:
        map_specs(obj.btf)
    one_line(exc)
    # Placed, it is left alone the second time (a linked object is already placed).
    fixed = obj.fixed()
    assert fixup_datasec(fixed, ".maps", 1, {}) is fixed


def test_fixup_needs_a_symbol_for_every_global_variable(objects: dict[str, Object]) -> None:
    obj = objects["maps"]
    values = obj.symbol_values(".maps")
    del values["routes"]
    with pytest.raises(BtfError, match="'routes'") as exc:
        fixup_datasec(obj.btf, ".maps", obj.sections[".maps"][0], values)
    one_line(exc)
    assert fixup_datasec(obj.btf, ".no-such-section", 8, {}) is obj.btf


def test_an_object_without_maps_has_none(objects: dict[str, Object]) -> None:
    assert map_specs(objects["legacy"].btf) == []


def type_named(btf: Btf, kind: Kind, name: str) -> int:
    return next(i for i, t in enumerate(btf.types) if t.kind == kind and t.name == name)


def test_size_of_and_name_of(objects: dict[str, Object]) -> None:
    btf = objects["maps"].btf
    assert btf.types[0].kind == Kind.VOID and btf.name_of(0) == ""
    flow_key = type_named(btf, Kind.STRUCT, "flow_key")
    assert btf.name_of(flow_key) == "flow_key"
    assert btf.size_of(flow_key) == 16
    assert btf.size_of(type_named(btf, Kind.STRUCT, "flow_stats")) == 24
    assert btf.size_of(type_named(btf, Kind.TYPEDEF, "counter_t")) == 2
    assert btf.size_of(type_named(btf, Kind.TYPEDEF, "__u64")) == 8
    lpm = btf.types[type_named(btf, Kind.STRUCT, "lpm_v4_key")]
    addr = next(m for m in lpm.members if m.name == "addr")
    assert btf.types[addr.type].kind == Kind.ARRAY and btf.size_of(addr.type) == 4
    assert addr.bit_offset == 32
    pointers = [i for i, t in enumerate(btf.types) if t.kind == Kind.PTR]
    assert pointers and all(btf.size_of(i) == 8 for i in pointers)
    enum = next(i for i, t in enumerate(btf.types) if t.kind == Kind.ENUM)
    assert btf.size_of(enum) == 4
    for unsized in (0, type_named(btf, Kind.FUNC, "entry"), type_named(btf, Kind.VAR, "flows")):
        with pytest.raises(BtfError) as exc:
            btf.size_of(unsized)
        assert "has no size" in one_line(exc)
    for out_of_range in (-1, len(btf.types)):
        with pytest.raises(BtfError, match="out of range"):
            btf.name_of(out_of_range)
        with pytest.raises(BtfError, match="out of range"):
            btf.size_of(out_of_range)


def test_the_types_of_a_map_definition_read_as_clang_wrote_them(
    objects: dict[str, Object],
) -> None:
    btf = objects["maps"].btf
    var = btf.types[type_named(btf, Kind.VAR, "flows")]
    assert var.linkage == 1  # BTF_VAR_GLOBAL_ALLOCATED
    definition = btf.types[btf.skip_modifiers(var.type)]
    assert definition.kind == Kind.STRUCT and definition.name == "" and definition.size == 32
    assert [(m.name, m.bit_offset) for m in definition.members] == [
        ("type", 0),
        ("key", 64),
        ("value", 128),
        ("max_entries", 192),
    ]
    entry = btf.types[type_named(btf, Kind.FUNC, "entry")]
    assert entry.linkage == 1 and btf.types[entry.type].kind == Kind.FUNC_PROTO


# -- refused.c: what libbpf refuses ------------------------------------------------------

REFUSED = {
    "unknown_member": ("'unknown_member'", "'flags'", "unknown member"),
    "int_not_pointer": ("'int_not_pointer'", "'max_entries'", "expected a PTR, got"),
    "pointer_not_array": ("'pointer_not_array'", "'max_entries'", "PTR to an ARRAY"),
    "key_by_value": ("'key_by_value'", "'key'", "expected a PTR, got"),
    "void_key": ("'void_key'", "'key'", "void has no size"),
    "incomplete_key": ("'incomplete_key'", "'key'", "FWD 'undefined_key' has no size"),
    "conflicting_key": ("'conflicting_key'", "'key'", "conflicting key size 8 != 4"),
    "conflicting_value": ("'conflicting_value'", "'values'", "conflicting value size 8 != 4"),
    "values_not_last": ("'values_not_last'", "'values'", "last member"),
    "values_in_hash": ("'values_in_hash'", "'values'", "map type 1 is not"),
    "values_without_type": ("'values_without_type'", "'values'", "map type 0 is not"),
    "pinned_inner": ("'pinned_inner'", "'inner_pinned'", "'pinning'", "cannot be pinned"),
    "nested_inner": ("'nested_inner'", "'inner_nested'", "'values'", "one level only"),
    "programs_of_structs": ("'programs_of_structs'", "'values'", "FUNC_PROTO", "STRUCT"),
    "maps_of_functions": ("'maps_of_functions'", "'values'", "not [", "FUNC_PROTO"),
    "fixed_values": ("'fixed_values'", "'values'", "zero-length ARRAY", "of 2"),
    "bad_pinning": ("'bad_pinning'", "'pinning'", "invalid pinning 2"),
    "no_type": ("'no_type'", "no map type"),
    "static_map": ("'static_map'", "static linkage"),
    "not_a_struct": ("'not_a_struct'", "INT 'int', not a STRUCT"),
    "two_constants": ("'two_constants'", "'map_extra'", "has 2 constants"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_what_libbpf_refuses_is_refused_naming_map_and_member(
    objects: dict[str, Object], case: str
) -> None:
    obj = objects["refused"]
    with pytest.raises(BtfError) as exc:
        obj.specs(f".maps.{case}")
    message = one_line(exc)
    for part in REFUSED[case]:
        assert part in message


def test_every_refused_case_has_its_section(objects: dict[str, Object]) -> None:
    sections = {name for name in objects["refused"].sections if name.startswith(".maps.")}
    assert sections == {f".maps.{case}" for case in REFUSED}


# -- legacy.c: the `maps` section ---------------------------------------------------------


def legacy_symbols(obj: Object) -> list[tuple[str, int, int]]:
    return [(n, s.value, s.size) for n, s in obj.symbols.items() if s.section == "maps"]


def test_legacy_maps(objects: dict[str, Object]) -> None:
    obj = objects["legacy"]
    _, data = obj.sections["maps"]
    found = legacy_map_specs(data, legacy_symbols(obj))
    offsets = {name: s.value for name, s in obj.symbols.items()}
    expected = [
        spec("legacy_hash", 20, HASH, 4, 8, 256, offset=offsets["legacy_hash"]),
        spec(
            "legacy_array",
            20,
            ARRAY,
            4,
            24,
            8,
            map_flags=BPF_F_NO_PREALLOC,
            offset=offsets["legacy_array"],
        ),
    ]
    assert found == sorted(expected, key=lambda s: s.offset)


def test_legacy_records_longer_or_shorter_than_bpf_map_def() -> None:
    # iproute2's struct bpf_elf_map: bpf_map_def then id, pinning, inner_id, inner_idx.
    long_record = struct.pack("<9I", HASH, 4, 8, 16, 0, 0, 0, 0, 0)
    short_record = struct.pack("<3I", QUEUE, 0, 4)  # reads as zero-padded
    data = long_record + short_record
    assert legacy_map_specs(data, [("short", 36, 12), ("long", 0, 36)]) == [
        spec("long", 36, HASH, 4, 8, 16),
        spec("short", 12, QUEUE, 0, 4, 0, offset=36),
    ]
    pinned = struct.pack("<9I", HASH, 4, 8, 16, 0, 0, 2, 0, 0)  # PIN_GLOBAL_NS
    with pytest.raises(BtfError, match=r"'pinned'.*non-zero bytes") as exc:
        legacy_map_specs(pinned, [("pinned", 0, 36)])
    one_line(exc)


@pytest.mark.parametrize(
    "symbols",
    [[("beyond", 8, 20)], [("empty", 0, 0)], [("negative", -4, 20)], [("", 0, 20)]],
)
def test_legacy_symbols_outside_the_section_are_refused(
    symbols: list[tuple[str, int, int]],
) -> None:
    with pytest.raises(BtfError) as exc:
        legacy_map_specs(bytes(20), symbols)
    one_line(exc)


# -- hand-built BTF ---------------------------------------------------------------------


class Builder:
    """BTF written record by record, to break it on purpose."""

    def __init__(self) -> None:
        self.strings = bytearray(b"\0")
        self.records = bytearray()
        self.count = 0

    def name(self, text: str) -> int:
        if not text:
            return 0
        offset = len(self.strings)
        self.strings += text.encode() + b"\0"
        return offset

    def add(
        self,
        kind: int,
        name: str = "",
        value: int = 0,
        vlen: int = 0,
        kflag: int = 0,
        tail: bytes = b"",
    ) -> int:
        info = kflag << 31 | kind << 24 | vlen
        self.records += struct.pack("<III", self.name(name), info, value) + tail
        self.count += 1
        return self.count

    def int(self, name: str = "int", size: int = 4) -> int:
        return self.add(Kind.INT, name, size, tail=struct.pack("<I", size * 8))

    def ptr(self, target: int) -> int:
        return self.add(Kind.PTR, "", target)

    def array(self, element: int, nelems: int, index: int = 1) -> int:
        return self.add(Kind.ARRAY, "", 0, tail=struct.pack("<III", element, index, nelems))

    def struct(self, name: str, size: int, members: list[tuple[str, int, int]]) -> int:
        tail = b"".join(struct.pack("<III", self.name(n), t, off) for n, t, off in members)
        return self.add(Kind.STRUCT, name, size, len(members), tail=tail)

    def var(self, name: str, target: int, linkage: int = 1) -> int:
        return self.add(Kind.VAR, name, target, tail=struct.pack("<I", linkage))

    def datasec(self, name: str, size: int, entries: list[tuple[int, int, int]]) -> int:
        tail = b"".join(struct.pack("<III", *entry) for entry in entries)
        return self.add(Kind.DATASEC, name, size, len(entries), tail=tail)

    def number(self, value: int) -> int:
        """`__uint(x, value)`'s type: a pointer to an array of `value` ints."""
        return self.ptr(self.array(1, value))

    def build(self, **header: int) -> bytes:
        fields = {
            "magic": 0xEB9F,
            "version": 1,
            "flags": 0,
            "hdr_len": 24,
            "type_off": 0,
            "type_len": len(self.records),
            "str_off": len(self.records),
            "str_len": len(self.strings),
        }
        fields.update(header)
        head = struct.pack("<HBBIIIII", *fields.values())
        return head.ljust(fields["hdr_len"], b"\0") + bytes(self.records) + bytes(self.strings)


def simple_map(b: Builder, **members: int) -> bytes:
    """A BTF with one `.maps` variable 'm' whose definition has `__uint` members."""
    fields = [(name, b.number(value), 64 * i) for i, (name, value) in enumerate(members.items())]
    definition = b.struct("", 8 * len(fields), fields)
    var = b.var("m", definition)
    b.datasec(".maps", 8 * len(fields), [(var, 0, 8 * len(fields))])
    return b.build()


def test_a_hand_built_map_reads_back() -> None:
    b = Builder()
    b.int()
    data = simple_map(b, type=HASH, key_size=4, value_size=8, max_entries=2, map_flags=1)
    assert map_specs(parse_btf(data)) == [
        spec("m", 40, HASH, 4, 8, 2, map_flags=1),
    ]


def malformed(data: bytes) -> str:
    with pytest.raises(BtfError) as exc:
        parse_btf(data)
    return one_line(exc)


def good() -> Builder:
    b = Builder()
    b.int()
    b.ptr(1)
    return b


def test_headers() -> None:
    data = good().build()
    assert len(parse_btf(data).types) == 3
    assert "truncated" in malformed(data[:23])
    assert "magic" in malformed(b"\x00\x00" + data[2:])
    assert "big-endian" in malformed(b"\xeb\x9f" + data[2:])
    assert "version 2" in malformed(good().build(version=2))
    assert "header length 16" in malformed(good().build(hdr_len=16)[:16] + data[24:])
    assert "header length" in malformed(data[:4] + struct.pack("<I", 1000) + data[8:])
    assert "string section" in malformed(good().build(str_len=1000))
    assert "string section" in malformed(good().build(str_off=0xFFFF_FFF0))
    assert "overlaps" in malformed(good().build(type_len=40))
    assert "aligned" in malformed(good().build(type_off=2, type_len=0))
    b = good()
    b.strings[-1] = ord("x")
    assert "NUL" in malformed(b.build())
    b = good()
    b.strings[0] = ord("x")
    assert "empty string" in malformed(b.build())
    assert "string section" in malformed(good().build(str_len=0))


def test_a_newer_longer_header_is_read() -> None:
    b = good()
    records, strings = len(b.records), len(b.strings)
    # 32 bytes: a layout section (4 bytes a kind) between types and strings.
    layout = bytes(4 * 20)
    head = struct.pack(
        "<HBBIIIIIII",
        0xEB9F,
        1,
        0,
        32,
        0,
        records,
        records + len(layout),
        strings,
        records,
        len(layout),
    )
    data = head + bytes(b.records) + layout + bytes(b.strings)
    assert len(parse_btf(data).types) == 3
    misplaced = head[:24] + struct.pack("<II", records + 2, len(layout)) + data[32:]
    assert "layout" in malformed(misplaced)
    # Unknown header fields past those: ignored.
    assert len(parse_btf(good().build(hdr_len=40)).types) == 3


def test_records() -> None:
    b = good()
    data = b.build()
    assert "truncated" in malformed(good().build(type_len=len(b.records) - 4))
    for kind in (0, 20, 0x7F):
        bad = good()
        bad.add(kind)
        assert f"unknown kind {kind}" in malformed(bad.build())
    wide = good()
    wide.add(Kind.STRUCT, "s", 4, vlen=0xFF_FFFF)
    assert "truncated" in malformed(wide.build())
    named = good()
    named.add(Kind.TYPEDEF, "", 1)
    named.records[-12:-8] = struct.pack("<I", 999)
    assert "name offset 999" in malformed(named.build())
    member = good()
    member.add(Kind.STRUCT, "s", 4, vlen=1, tail=struct.pack("<III", 999, 1, 0))
    assert "member #0 name" in malformed(member.build())
    assert parse_btf(data).types[1] == BtfType(Kind.INT, "int", size=4, bits=32)


@pytest.mark.parametrize(
    "make",
    [
        lambda b: b.ptr(99),
        lambda b: b.array(1, 4, index=99),
        lambda b: b.array(99, 4),
        lambda b: b.struct("s", 4, [("a", 99, 0)]),
        lambda b: b.datasec(".maps", 4, [(99, 0, 4)]),
        lambda b: b.add(Kind.FUNC_PROTO, "", 1, 1, tail=struct.pack("<II", 0, 99)),
        lambda b: b.add(Kind.FUNC_PROTO, "", 99),
        lambda b: b.var("v", 99),
        lambda b: b.add(Kind.DECL_TAG, "tag", 99, tail=struct.pack("<i", -1)),
    ],
)
def test_type_ids_out_of_range(make: Callable[[Builder], object]) -> None:
    b = good()
    make(b)
    assert "refers to type [99]" in malformed(b.build())


def test_a_func_is_of_a_func_proto() -> None:
    b = good()
    b.add(Kind.FUNC, "f", 1)
    assert "not a FUNC_PROTO" in malformed(b.build())


@pytest.mark.parametrize(
    "make",
    [
        lambda b: b.add(Kind.TYPEDEF, "self", 3),
        lambda b: (b.add(Kind.CONST, "", 4), b.add(Kind.VOLATILE, "", 3)),
        lambda b: b.array(3, 2),
        lambda b: b.struct("s", 8, [("me", 3, 0)]),
        lambda b: (
            b.struct("a", 8, [("b", 4, 0)]),
            b.add(Kind.TYPEDEF, "b_t", 5),
            b.struct("b", 8, [("a", 3, 0)]),
        ),
    ],
)
def test_cycles_are_refused(make: Callable[[Builder], object]) -> None:
    b = good()
    make(b)
    assert "cycle" in malformed(b.build())


def test_a_cycle_through_a_pointer_is_legal() -> None:
    b = good()
    node = b.struct("node", 16, [("next", 4, 0), ("value", 1, 64)])
    b.ptr(node)
    b.add(Kind.TYPEDEF, "fn_t", 6)
    b.add(Kind.FUNC_PROTO, "", 5, 1, tail=struct.pack("<II", 0, 5))  # fn_t *(fn_t)
    btf = parse_btf(b.build())
    assert btf.size_of(node) == 16 and btf.skip_modifiers(5) == 6


def test_sizes_are_bounded() -> None:
    b = good()
    big = b.array(b.array(1, 1 << 20), 1 << 20)
    empty = b.array(b.array(1, 1 << 31), 0)
    btf = parse_btf(b.build())
    with pytest.raises(BtfError, match="over 4 GiB"):
        btf.size_of(big)
    assert btf.size_of(empty) == 0


def test_a_hand_made_btf_with_a_cycle_does_not_hang() -> None:
    looped = Btf(
        (
            BtfType(Kind.VOID),
            BtfType(Kind.TYPEDEF, "t", type=2),
            BtfType(Kind.ARRAY, type=1, nelems=2),
        )
    )
    with pytest.raises(BtfError, match="cycle"):
        looped.size_of(1)
    with pytest.raises(BtfError, match="cycle"):
        Btf((BtfType(Kind.VOID), BtfType(Kind.CONST, type=1))).skip_modifiers(1)


def test_datasec_checks() -> None:
    b = good()
    definition = b.struct("", 8, [("type", b.number(HASH), 0)])
    var = b.var("m", definition)
    b.datasec(".maps", 8, [(var, 4, 8)])
    with pytest.raises(BtfError, match="'m': 8 bytes at offset 4 exceed") as exc:
        map_specs(parse_btf(b.build()))
    one_line(exc)

    b = good()
    definition = b.struct("", 16, [("type", b.number(HASH), 0)])
    b.datasec(".maps", 8, [(b.var("m", definition), 0, 8)])
    with pytest.raises(BtfError, match="has 16 bytes, the variable 8"):
        map_specs(parse_btf(b.build()))

    b = good()
    b.datasec(".maps", 8, [(1, 0, 8)])
    with pytest.raises(BtfError, match="not a VAR"):
        map_specs(parse_btf(b.build()))

    b = good()
    b.datasec(".maps", 8, [(b.var("", 1), 0, 8)])
    with pytest.raises(BtfError, match="no name"):
        map_specs(parse_btf(b.build()))

    b = good()
    b.datasec(".maps", 8, [(b.var("x", 1, linkage=2), 0, 8)])
    with pytest.raises(BtfError, match="'x': extern linkage"):
        map_specs(parse_btf(b.build()))

    b = good()
    b.datasec(".maps", 0, [])
    b.datasec(".maps", 0, [])
    with pytest.raises(BtfError, match=r"2 DATASECs named '\.maps'"):
        map_specs(parse_btf(b.build()))


def test_map_extra_from_enum64_and_unnamed_members() -> None:
    b = good()
    value = (1 << 40) + 7
    extra = b.add(
        Kind.ENUM64,
        "",
        8,
        1,
        tail=struct.pack("<III", b.name("X"), value & 0xFFFF_FFFF, value >> 32),
    )
    definition = b.struct("", 16, [("type", b.number(BLOOM_FILTER), 0), ("map_extra", extra, 64)])
    b.datasec(".maps", 16, [(b.var("bloom", definition), 0, 16)])
    assert map_specs(parse_btf(b.build())) == [
        spec("bloom", 16, BLOOM_FILTER, 0, 0, 0, map_extra=value)
    ]

    b = good()
    definition = b.struct("", 8, [("", b.number(HASH), 0)])
    b.datasec(".maps", 8, [(b.var("m", definition), 0, 8)])
    with pytest.raises(BtfError, match="'m': member #0 has no name"):
        map_specs(parse_btf(b.build()))


# -- mutations of a real .BTF ------------------------------------------------------------


def attempt(step: Callable[[], object]) -> None:
    try:
        step()
    except BtfError as exc:
        message = str(exc)
        assert message and "\n" not in message and "\r" not in message, repr(message)


def survive(data: bytes) -> None:
    """Parse, size every type and read the maps: results or one-line BtfErrors only."""
    try:
        btf = parse_btf(data)
    except BtfError as exc:
        assert str(exc) and "\n" not in str(exc), repr(str(exc))
        return
    for type_id in range(len(btf.types)):
        attempt(lambda type_id=type_id: (btf.name_of(type_id), btf.size_of(type_id)))
    attempt(lambda: map_specs(btf))
    datasec = next((t for t in btf.types if t.kind == Kind.DATASEC and t.name == ".maps"), None)
    if datasec is not None:
        names = {btf.types[i.type].name: 64 * n for n, i in enumerate(datasec.secinfos)}
        attempt(lambda: map_specs(fixup_datasec(btf, ".maps", 1 << 16, names)))


@functools.cache
def real_btf() -> bytes:
    path = FIXTURES / "maps.o"
    if not path.exists():
        pytest.skip("no committed maps.o (tests/fixtures/libbpf/build.sh)")
    section = ELFFile(io.BytesIO(path.read_bytes())).get_section_by_name(".BTF")
    return bytes(section.data())


def test_truncations_of_a_real_btf() -> None:
    data = real_btf()
    for length in [*range(0, 64), *range(64, len(data), 11), len(data) - 1]:
        survive(data[:length])


@settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(flips=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(1, 255)), max_size=8))
def test_byte_flips_of_a_real_btf(flips: list[tuple[int, int]]) -> None:
    data = bytearray(real_btf())
    for position, mask in flips:
        data[position % len(data)] ^= mask
    survive(bytes(data))


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    header=st.lists(st.integers(0, 0xFFFF_FFFF), min_size=4, max_size=4),
    body=st.binary(max_size=256),
)
def test_random_sections_behind_a_valid_magic(header: list[int], body: bytes) -> None:
    offsets = [value % (len(body) + 8) if value & 1 else value for value in header]
    survive(struct.pack("<HBBI4I", 0xEB9F, 1, 0, 24, *offsets) + body)


def test_every_kind_of_the_fixtures_parses() -> None:
    kinds = {t.kind for t in parse_btf(real_btf()).types}
    assert {
        Kind.INT,
        Kind.PTR,
        Kind.ARRAY,
        Kind.STRUCT,
        Kind.ENUM,
        Kind.TYPEDEF,
        Kind.CONST,
        Kind.VOLATILE,
        Kind.FUNC,
        Kind.FUNC_PROTO,
        Kind.VAR,
        Kind.DATASEC,
    } <= kinds


def test_names_need_not_be_identifiers_and_messages_stay_one_line() -> None:
    b = good()
    definition = b.struct("", 8, [("max_entries", b.number(4), 0)])
    var = b.add(Kind.VAR, "", definition, tail=struct.pack("<I", 1))
    b.strings += b"odd\nname\xff\0"
    b.records[-16:-12] = struct.pack("<I", len(b.strings) - 10)
    b.datasec(".maps", 8, [(var, 0, 8)])
    btf = parse_btf(b.build())
    assert btf.name_of(var) == "odd\nname\\xff"
    with pytest.raises(BtfError, match="no map type") as exc:
        map_specs(btf)
    assert "'odd\\nname\\\\xff'" in one_line(exc)


def test_overlapping_names_are_bounded() -> None:
    """Distinct offsets into one long string: linear work, then a BtfError."""
    b = Builder()
    b.strings += b"a" * 100_000 + b"\0"
    for offset in range(1, 20_001):
        b.records += struct.pack("<III", offset, Kind.PTR << 24, 0)
    assert "overlap too much" in malformed(b.build())


def test_long_chains_cost_linear_time() -> None:
    b = good()
    chain = 1
    for _ in range(50_000):
        chain = b.add(Kind.TYPEDEF, "", chain)
    key = b.ptr(chain)
    definition = b.struct("", 16, [("type", b.number(HASH), 0), ("key", key, 64)])
    count = 2_000
    variables = [b.var(f"m{i}", definition) for i in range(count)]
    b.datasec(".maps", 16 * count, [(v, 16 * i, 16) for i, v in enumerate(variables)])
    specs = map_specs(parse_btf(b.build()))
    assert len(specs) == count and {s.key_size for s in specs} == {4}
