"""Load an eBPF relocatable object (what `clang -target bpf -c` writes) into a `Program`.

The object is read in two phases:

1. *Reading*: pyelftools parses the file; everything we need (sections,
   symbols, relocations, DWARF line rows) is copied into plain values. This is
   the only phase that touches pyelftools, so it is the only place where a
   hostile file can make a third-party parser fail: any such failure becomes
   a `LoadError`.
2. *Linking*: all executable sections are laid out one after another in a
   single code space, the read-only and writable data images are built, and
   relocations are applied (addresses of data on `lddw`, local calls, helper
   calls by name, pointers inside data). Map definitions (`.maps`, read from
   the object's BTF by `bpfexec.vm.btf`, or the legacy `maps` section) become
   `Program.maps`, and an `lddw` of a map symbol loads the map's handle
   (`bpfexec.vm.maps`).

What it must not do: parse ELF structures by hand (pyelftools does), verify
instructions (`bpfexec.vm.verifier` does, called by `bpfexec.vm.loader`), or know anything
about how a program runs.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import PureWindowsPath

from elftools.dwarf.constants import DW_LNE
from elftools.elf.constants import SH_FLAGS
from elftools.elf.elffile import ELFFile
from elftools.elf.enums import ENUM_E_MACHINE, ENUM_RELOC_TYPE_BPF
from elftools.elf.relocation import RelocationHandler, RelocationSection
from elftools.elf.sections import Section, SymbolTableSection

from bpfexec.vm import isa
from bpfexec.vm.btf import (
    BtfError,
    MapSpec,
    first_core_relocation,
    fixup_datasec,
    legacy_map_specs,
    map_specs,
    parse_btf,
)
from bpfexec.vm.callbacks import (
    BPF_TAIL_CALL,
    MAX_CALLBACKS,
    PROG_ARRAY,
    function_handle,
    link_callback_helpers,
    program_id,
)
from bpfexec.vm.errors import LimitError, LoadError
from bpfexec.vm.limits import Limits
from bpfexec.vm.loader import ELF_MAGIC
from bpfexec.vm.maps import check_definitions, map_handle
from bpfexec.vm.memory import DATA_BASE, RODATA_BASE
from bpfexec.vm.program import Function, HelperRef, Program

EM_BPF = ENUM_E_MACHINE["EM_BPF"]

R_BPF_NONE = ENUM_RELOC_TYPE_BPF["R_BPF_NONE"]
R_BPF_64_64 = ENUM_RELOC_TYPE_BPF["R_BPF_64_64"]
R_BPF_64_ABS64 = ENUM_RELOC_TYPE_BPF["R_BPF_64_ABS64"]
R_BPF_64_ABS32 = ENUM_RELOC_TYPE_BPF["R_BPF_64_ABS32"]
R_BPF_64_32 = ENUM_RELOC_TYPE_BPF["R_BPF_64_32"]
_RELOCATION_NAMES = {number: name for name, number in ENUM_RELOC_TYPE_BPF.items()}

# Section kinds, decided by flags and name.
CODE = "code"
RODATA = "rodata"
DATA = "data"
BSS = "bss"
MAPS = "maps"
OTHER = "other"  # debug info, BTF, license strings...: ignored unless referenced

_IMAGE_BASE = {RODATA: RODATA_BASE, DATA: DATA_BASE, BSS: DATA_BASE}


@dataclass(frozen=True)
class _Section:
    index: int
    name: str
    kind: str
    data: bytes  # the contents; empty for a NOBITS section
    size: int
    align: int


@dataclass(frozen=True)
class _Symbol:
    name: str  # for a section symbol: the section's name
    value: int
    section: int | None  # index of the defining section; None when undefined
    special: str  # "" or the pseudo-section it lives in (SHN_ABS, SHN_COMMON...)
    is_function: bool
    is_global: bool
    size: int = 0


@dataclass(frozen=True)
class _Relocation:
    table: str  # the relocation section, for messages
    offset: int
    type: int
    symbol: _Symbol


@dataclass(frozen=True)
class _LineRange:
    section: int
    start: int  # byte offsets in the section, end exclusive
    end: int
    location: str  # "file.c:12"


@dataclass(frozen=True)
class _Row:
    """A row of a DWARF line table, as far as we use it."""

    address: int
    line: int
    file: int


@dataclass(frozen=True)
class _Object:
    sections: dict[int, _Section]
    symbols: tuple[_Symbol, ...]  # of the object's symbol table(s)
    relocations: dict[int, list[_Relocation]]  # target section index -> relocations
    lines: tuple[_LineRange, ...]
    section_names: dict[int, str]  # every section, for messages
    btf: bytes | None = None  # the .BTF section: types, for the map definitions of .maps
    btf_ext: bytes | None = None  # the .BTF.ext section: checked for CO-RE relocations


def is_elf(data: bytes) -> bool:
    return data[:4] == ELF_MAGIC


def load_elf(data: bytes, name: str = "<module>", limits: Limits | None = None) -> Program:
    """Parse and link an eBPF object. The result is not verified yet (the loader does that)."""
    limits = limits or Limits()
    if not is_elf(data):
        raise LoadError(f"{name}: not an ELF file (no \\x7fELF magic)")
    obj = _read_object(data, name)
    return _Linker(obj, name, limits).link()


# -- reading: the only code that touches pyelftools ---------------------------------


class _Progress:
    """What the reader is reading: where a corrupt file stopped making sense."""

    def __init__(self) -> None:
        self.what = "the ELF header"


def _read_object(data: bytes, name: str) -> _Object:
    progress = _Progress()
    try:
        elf = ELFFile(io.BytesIO(data))
        _check_header(elf, name)
        sections, symbols, relocations = _read_sections(elf, name, progress)
        section_names = {}
        for index in range(elf.num_sections()):
            progress.what = f"the name of section #{index}"
            section_names[index] = elf.get_section(index).name
        progress.what = "the .BTF section"
        btf_section = elf.get_section_by_name(".BTF")
        btf = None if btf_section is None else btf_section.data()
        progress.what = "the .BTF.ext section"
        btf_ext_section = elf.get_section_by_name(".BTF.ext")
        btf_ext = None if btf_ext_section is None else btf_ext_section.data()
    except LoadError:
        raise
    # The parser is fed untrusted bytes and fails in many ways (its own errors,
    # struct.error, IndexError, ValueError, ZeroDivisionError on a zero entry
    # size...). Whatever it raises, the file is corrupt.
    except Exception as exc:
        raise LoadError(
            f"{name}: corrupt or truncated ELF file: cannot read {progress.what} ({_one_line(exc)})"
        ) from None
    code = {s.index for s in sections.values() if s.kind == CODE}
    return _Object(
        sections, symbols, relocations, _read_lines(elf, code), section_names, btf, btf_ext
    )


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200]


def _check_header(elf: ELFFile, name: str) -> None:
    if elf.elfclass != 64:
        raise LoadError(f"{name}: {elf.elfclass}-bit ELF file; eBPF objects are 64-bit")
    if not elf.little_endian:
        raise LoadError(
            f"{name}: big-endian ELF file (compiled with -target bpfeb?); "
            "only little-endian eBPF is supported (-target bpf or bpfel)"
        )
    machine = elf["e_machine"]
    if machine != "EM_BPF":
        number = machine if isinstance(machine, int) else ENUM_E_MACHINE.get(machine, "?")
        raise LoadError(
            f"{name}: wrong machine {machine} ({number}); expected EM_BPF ({EM_BPF}), "
            "compile with clang -target bpf"
        )
    if elf["e_type"] != "ET_REL":
        raise LoadError(
            f"{name}: ELF type {elf['e_type']} is not supported; "
            "load the relocatable object (clang -c) instead"
        )


def _section_kind(name: str, flags: int) -> str:
    if flags & SH_FLAGS.SHF_EXECINSTR:
        return CODE
    if name in ("maps", ".maps") or name.startswith("maps/"):
        return MAPS
    for prefix, kind in ((".rodata", RODATA), (".data", DATA), (".bss", BSS)):
        if name == prefix or name.startswith(prefix + "."):
            return kind
    return OTHER


def _read_sections(
    elf: ELFFile, name: str, progress: _Progress
) -> tuple[dict[int, _Section], tuple[_Symbol, ...], dict[int, list[_Relocation]]]:
    sections: dict[int, _Section] = {}
    raw: list[Section] = []
    progress.what = "the section header table"
    for index in range(elf.num_sections()):
        progress.what = f"section header #{index} and its name"
        section = elf.get_section(index)
        raw.append(section)
        kind = _section_kind(section.name, section["sh_flags"])
        progress.what = f"section #{index} {section.name!r}"
        if kind == OTHER:
            continue
        size = section["sh_size"]
        nobits = section["sh_type"] == "SHT_NOBITS"
        if kind == CODE and nobits:
            raise LoadError(f"{name}: executable section {section.name!r} has no contents")
        contents = b"" if nobits else section.data()
        if len(contents) != (0 if nobits else size):
            raise LoadError(
                f"{name}: section {section.name!r} is truncated "
                f"({len(contents)} of {size} bytes in the file)"
            )
        sections[index] = _Section(
            index, section.name, kind, contents, size, max(section["sh_addralign"], 1)
        )

    symbol_tables: dict[int, list[_Symbol]] = {}
    for index, section in enumerate(raw):
        if isinstance(section, SymbolTableSection):
            progress.what = f"symbol table {section.name!r}"
            symbol_tables[index] = _read_symbols(section, raw)

    relocations: dict[int, list[_Relocation]] = {}
    for section in raw:
        if not isinstance(section, RelocationSection) or section["sh_info"] not in sections:
            continue  # debug and BTF relocations: pyelftools applies what line info needs
        target = sections[section["sh_info"]]
        if section.is_RELA():
            raise LoadError(
                f"{name}: RELA relocations in {section.name!r} are not supported "
                "(eBPF objects use REL)"
            )
        symbols = symbol_tables.get(section["sh_link"])
        if symbols is None:
            raise LoadError(f"{name}: {section.name!r} does not link to a symbol table")
        progress.what = f"relocation section {section.name!r}"
        for reloc in section.iter_relocations():
            index = reloc["r_info_sym"]
            if index >= len(symbols):
                raise LoadError(
                    f"{name}: relocation at offset {reloc['r_offset']:#x} of {target.name!r} "
                    f"names symbol #{index}, but the symbol table has {len(symbols)}"
                )
            relocations.setdefault(target.index, []).append(
                _Relocation(section.name, reloc["r_offset"], reloc["r_info_type"], symbols[index])
            )
    all_symbols = tuple(symbol for table in symbol_tables.values() for symbol in table)
    return sections, all_symbols, relocations


def _read_symbols(table: SymbolTableSection, raw: list[Section]) -> list[_Symbol]:
    symbols = []
    for symbol in table.iter_symbols():
        shndx = symbol["st_shndx"]
        section = shndx if isinstance(shndx, int) else None
        special = "" if isinstance(shndx, int) or shndx == "SHN_UNDEF" else str(shndx)
        kind = symbol["st_info"]["type"]
        name = symbol.name
        if kind == "STT_SECTION" and section is not None and section < len(raw):
            name = raw[section].name
        symbols.append(
            _Symbol(
                name=name,
                value=symbol["st_value"],
                section=section,
                special=special,
                is_function=kind == "STT_FUNC",
                is_global=symbol["st_info"]["bind"] in ("STB_GLOBAL", "STB_WEAK"),
                size=symbol["st_size"],
            )
        )
    return symbols


def _read_lines(elf: ELFFile, code: set[int]) -> tuple[_LineRange, ...]:
    """Line rows of the DWARF line programs, as byte ranges of executable sections.

    Line info is a convenience for messages: an object whose DWARF we cannot
    read still loads, only without `file:line`.
    """
    try:
        return tuple(_line_ranges(elf, code)) if code else ()
    except Exception:  # corrupt or unusual DWARF: see the docstring
        return ()


def _line_ranges(elf: ELFFile, code: set[int]) -> Iterable[_LineRange]:
    # Every sequence starts with DW_LNE_set_address, relocated against a symbol
    # of the section it describes. pyelftools applies the relocation, but in an
    # object every section starts at 0, so the address alone does not say
    # which section the sequence is in. The relocations of .debug_line that
    # point into code are in the same order as the set_address operands: the
    # k-th one names the section of the k-th sequence.
    debug_line = elf.get_section_by_name(".debug_line")
    if debug_line is None:
        return
    relocs = RelocationHandler(elf).find_relocations_for_section(debug_line)
    sequence_sections: list[int] = []
    if relocs is not None:
        symtab = elf.get_section(relocs["sh_link"])
        if not isinstance(symtab, SymbolTableSection):
            return
        pairs = []
        for reloc in relocs.iter_relocations():
            if reloc["r_info_type"] != R_BPF_64_ABS64:
                continue
            shndx = symtab.get_symbol(reloc["r_info_sym"])["st_shndx"]
            if shndx in code:
                pairs.append((reloc["r_offset"], shndx))
        sequence_sections = [shndx for _, shndx in sorted(pairs)]
    only_section = next(iter(code)) if len(code) == 1 else None

    dwarf = elf.get_dwarf_info(relocate_dwarf_sections=True)
    found = [dwarf.line_program_for_CU(cu) for cu in dwarf.iter_CUs()]
    programs = sorted(
        (lp for lp in found if lp is not None), key=lambda lp: lp.program_start_offset
    )
    sequence = 0
    for program in programs:
        files = program["file_entry"]
        first_file = 0 if program["version"] >= 5 else 1
        section = only_section
        previous = None
        for entry in program.get_entries():
            if entry.is_extended and entry.command == DW_LNE.set_address:
                if sequence < len(sequence_sections):
                    section = sequence_sections[sequence]
                else:
                    section = only_section
                sequence += 1
            state = entry.state
            if state is None:
                continue
            if previous is not None and section is not None and previous.line > 0:
                index = previous.file - first_file
                if 0 <= index < len(files):
                    filename = PureWindowsPath(files[index].name.decode("utf-8", "replace")).name
                    location = f"{filename}:{previous.line}"
                    yield _LineRange(section, previous.address, state.address, location)
            previous = None if state.end_sequence else _Row(state.address, state.line, state.file)


# -- linking: plain Python on the values read above ---------------------------------


class _Linker:
    def __init__(self, obj: _Object, name: str, limits: Limits) -> None:
        self.obj = obj
        self.name = name
        self.limits = limits
        self.code_sections = [
            s
            for s in sorted(obj.sections.values(), key=lambda s: s.index)
            if s.kind == CODE and s.size > 0
        ]
        if not self.code_sections:
            raise LoadError(f"{name}: no code (the object has no executable section)")
        self.base_pc: dict[int, int] = {}
        self.instructions: list[isa.Instruction] = []
        for section in self.code_sections:
            if section.size % isa.INSTRUCTION_SIZE:
                raise LoadError(
                    f"{name}: code section {section.name!r} has {section.size} bytes, "
                    f"not a multiple of {isa.INSTRUCTION_SIZE}"
                )
            self.base_pc[section.index] = len(self.instructions)
            self.instructions.extend(isa.decode(section.data))
        self.image_offset: dict[int, int] = {}
        self.rodata = self._layout((RODATA,))
        self.data = self._layout((DATA, BSS))
        self.helper_calls: dict[int, HelperRef] = {}
        self.maps, self.map_index = self._maps()
        # A libbpf-style object (maps, a license) calls helpers by the kernel's numbers.
        self.kernel_helpers = bool(self.maps) or "license" in obj.section_names.values()
        self.callbacks: list[int] = []  # entry pcs of the functions whose address is taken
        self.map_init: list[tuple[int, int, int]] = []  # (map, index, id): `values = {...}`

    def link(self) -> Program:
        self._refuse_core_relocations()
        for section in self.code_sections:
            for reloc in self.obj.relocations.get(section.index, ()):
                self._relocate_code(section, reloc)
        for section in self.obj.sections.values():
            if section.kind in (RODATA, DATA, BSS):
                for reloc in self.obj.relocations.get(section.index, ()):
                    self._relocate_data(section, reloc)
            elif section.kind == MAPS:
                for reloc in self.obj.relocations.get(section.index, ()):
                    self._relocate_map_values(section, reloc)
        functions = list(self._functions())
        if self.kernel_helpers:
            key_room = max((-(-spec.key_size // 8) * 8 for spec in self.maps), default=0)
            link_callback_helpers(
                self.instructions, functions, self.helper_calls, self.callbacks, key_room,
                self.name,
            )  # fmt: skip
        for pc, insn in enumerate(self.instructions):
            if isa.is_helper_call(insn):
                self.helper_calls.setdefault(pc, HelperRef(number=insn.imm & isa.MASK32))
        if self.kernel_helpers:
            self._check_tail_calls(functions)
        return Program(
            instructions=tuple(self.instructions),
            functions=tuple(functions),
            rodata=bytes(self.rodata),
            data=bytes(self.data),
            helper_calls=dict(sorted(self.helper_calls.items())),
            lines=self._lines(),
            maps=tuple(self.maps),
            map_init=tuple(self.map_init),
            kernel_helpers=self.kernel_helpers,
            name=self.name,
        )

    def _refuse_core_relocations(self) -> None:
        """CO-RE relocations adjust field offsets to a running kernel's types, which a
        VM without a kernel does not have: an object that needs them is refused."""
        if self.obj.btf_ext is None or self.obj.btf is None:
            return
        try:
            found = first_core_relocation(self.obj.btf_ext, self.obj.btf)
        except BtfError as exc:
            raise LoadError(f"{self.name}: .BTF.ext: {exc}") from None
        if found is None:
            return
        section = next((s for s in self.code_sections if s.name == found.section), None)
        where = f"offset {found.offset:#x} of {found.section!r}"
        if section is not None and found.offset % isa.INSTRUCTION_SIZE == 0:
            where = f"pc {self.base_pc[section.index] + found.offset // isa.INSTRUCTION_SIZE}"
            where += f" in {found.section!r}"
        raise LoadError(
            f"{self.name}: CO-RE relocation at {where} ({found.kind} of {found.type}, "
            f"access {found.access}) is not supported: there are no kernel types to "
            "relocate against"
        )

    def _check_tail_calls(self, functions: list[Function]) -> None:
        """A tail call restarts the run at its target (`bpfexec.vm.callbacks`), which
        is the kernel's behaviour only where no function called the caller."""
        called = {
            pc + 1 + insn.imm: pc
            for pc, insn in enumerate(self.instructions)
            if insn.opcode == isa.OP_CALL and insn.src == isa.CALL_LOCAL
        }
        for pc, ref in self.helper_calls.items():
            if ref.number != BPF_TAIL_CALL:
                continue
            fn = next(f for f in functions if f.pc <= pc < f.pc + f.size)
            if fn.pc in called:
                raise LoadError(
                    f"{self.name}: bpf_tail_call at pc {pc} in {fn.name!r}, which is called at "
                    f"pc {called[fn.pc]}: tail calls from called functions are not supported"
                )

    # -- maps -----------------------------------------------------------------------

    def _maps(self) -> tuple[list[MapSpec], dict[tuple[int, int], int]]:
        """The map definitions, in handle order, and (section, offset) -> handle index."""
        specs: list[MapSpec] = []
        index: dict[tuple[int, int], int] = {}
        for section in sorted(self.obj.sections.values(), key=lambda s: s.index):
            if section.kind != MAPS:
                continue
            try:
                if section.name == ".maps":
                    if self.obj.btf is None:
                        raise LoadError(
                            f"{self.name}: section '.maps' needs the object's BTF to read its "
                            "map definitions (compile with -g)"
                        )
                    symbols = {s.name: s.value for s in self.obj.symbols
                               if s.section == section.index}  # fmt: skip
                    btf = fixup_datasec(parse_btf(self.obj.btf), ".maps", section.size, symbols)
                    found = map_specs(btf, ".maps")
                else:  # the legacy `maps` section: struct bpf_map_def records
                    records = [(s.name, s.value, s.size) for s in self.obj.symbols
                               if s.section == section.index and not s.is_function]  # fmt: skip
                    found = legacy_map_specs(section.data, records)
            except BtfError as exc:
                raise LoadError(f"{self.name}: {section.name}: {exc}") from None
            for spec in found:
                index[(section.index, spec.offset)] = len(specs)
                specs.append(spec)
        check_definitions(specs, self.name, self.limits.max_map_bytes)
        return specs, index

    # -- layout ---------------------------------------------------------------------

    def _layout(self, kinds: tuple[str, ...]) -> bytearray:
        """One image of the sections of these kinds, in that order, each at its alignment."""
        chosen = [
            s
            for kind in kinds
            for s in sorted(self.obj.sections.values(), key=lambda s: s.index)
            if s.kind == kind
        ]
        end = 0
        for section in chosen:
            end = -(-end // section.align) * section.align
            self.image_offset[section.index] = end
            end += section.size
        # .bss costs nothing in the file, so its size is the one thing a small
        # hostile object can make huge: bound the image before allocating it.
        if end > self.limits.max_module_bytes:
            raise LimitError(
                f"{self.name}: {'/'.join(kinds)} image of {end} bytes exceeds the limit of "
                f"{self.limits.max_module_bytes}"
            )
        image = bytearray(end)
        for section in chosen:
            offset = self.image_offset[section.index]
            image[offset : offset + len(section.data)] = section.data
        return image

    def _address(self, symbol: _Symbol, addend: int, site: str) -> int:
        """The VM address of a data symbol (+ addend); names the problem otherwise."""
        if symbol.section is None:
            where = symbol.special or "undefined (extern variables are not supported)"
            raise LoadError(f"{self.name}: {site} refers to symbol {symbol.name!r}, {where}")
        section = self.obj.sections.get(symbol.section)
        if section is not None and section.kind == MAPS:
            found = self.map_index.get((section.index, symbol.value))
            if found is None or addend:
                target = f"{symbol.name!r}" + (f" + {addend}" if addend else "")
                raise LoadError(
                    f"{self.name}: {site} refers to {target} in {section.name!r}, "
                    "which is not a map definition"
                )
            return map_handle(found)
        if section is not None and section.kind == CODE:
            return self._callback(section, symbol, addend, site)
        if section is None or section.kind not in _IMAGE_BASE:
            raise LoadError(
                f"{self.name}: {site} refers to {symbol.name!r} in unsupported section "
                f"{self._section_name(symbol.section)!r} "
                "(only .rodata*, .data* and .bss* are addressable)"
            )
        base = _IMAGE_BASE[section.kind] + self.image_offset[section.index]
        return (base + symbol.value + addend) & isa.MASK64

    def _callback(self, section: _Section, symbol: _Symbol, addend: int, site: str) -> int:
        """The handle of a function whose address is taken: a callback of bpf_loop or
        bpf_for_each_map_elem, in a libbpf-style object (`bpfexec.vm.callbacks`)."""
        offset = symbol.value + addend
        if not self.kernel_helpers:
            raise LoadError(
                f"{self.name}: {site} takes the address of {symbol.name!r} in "
                f"{section.name!r} (function pointers are callbacks of the kernel's helpers, "
                "in objects with maps or a license)"
            )
        if offset % isa.INSTRUCTION_SIZE or not 0 <= offset < section.size:
            raise LoadError(
                f"{self.name}: {site} takes the address {symbol.name!r} + {addend}, which is "
                f"not an instruction of {section.name!r}"
            )
        pc = self.base_pc[section.index] + offset // isa.INSTRUCTION_SIZE
        if pc not in self.callbacks:
            if len(self.callbacks) >= MAX_CALLBACKS:
                raise LoadError(f"{self.name}: {site}: more than {MAX_CALLBACKS} callbacks")
            self.callbacks.append(pc)
        return function_handle(self.callbacks.index(pc))

    def _relocate_map_values(self, section: _Section, reloc: _Relocation) -> None:
        """`values = { [i] = &x }` of a program array (x a function) or a map of maps
        (x a map): element i holds x's id."""
        where = f"relocation at offset {reloc.offset:#x} of {section.name!r}"
        if reloc.type != R_BPF_64_ABS64:
            raise self._unknown(reloc, section)
        for n, spec in enumerate(self.maps):
            start = spec.offset + (spec.values_offset or 0)
            if (
                spec.values_offset is None
                or not spec.offset <= reloc.offset < spec.offset + spec.size
            ):
                continue
            index, misaligned = divmod(reloc.offset - start, 8)
            if misaligned or index < 0 or index >= spec.max_entries:
                raise LoadError(f"{self.name}: {where} is not an element of {spec.name!r}'s values")
            target = reloc.symbol
            target_section = self.obj.sections.get(target.section or -1)
            if (
                spec.type == PROG_ARRAY
                and target_section is not None
                and target_section.kind == CODE
            ):
                assert target_section is not None
                pc = self.base_pc[target_section.index] + target.value // isa.INSTRUCTION_SIZE
                self.map_init.append((n, index, program_id(pc)))
            elif spec.type != PROG_ARRAY and target_section is section:
                inner = self.map_index.get((section.index, target.value))
                if inner is None:
                    raise LoadError(f"{self.name}: {where}: {target.name!r} is not a map")
                self.map_init.append((n, index, inner + 1))
            else:
                what = "a program" if spec.type == PROG_ARRAY else "a map"
                raise LoadError(f"{self.name}: {where}: {target.name!r} is not {what}")
            return
        raise LoadError(f"{self.name}: {where} is not in the values of a map definition")

    def _section_name(self, index: int) -> str:
        """Name of a section, including the ones reading skipped (debug, license...)."""
        section = self.obj.sections.get(index)
        name = section.name if section is not None else self.obj.section_names.get(index)
        return name or f"#{index}"

    def _check_name(self, name: str, what: str) -> None:
        """Helper and function names end up in messages, listings and responses."""
        if not name or not name.isprintable():
            raise LoadError(f"{self.name}: {what} has an empty or unprintable name {name!r}")

    # -- relocations ----------------------------------------------------------------

    def _unknown(self, reloc: _Relocation, section: _Section) -> LoadError:
        name = _RELOCATION_NAMES.get(reloc.type)
        what = f"relocation type {name} ({reloc.type})" if name else "unknown relocation type"
        if not name:
            what += f" {reloc.type}"
        return LoadError(
            f"{self.name}: {what} in {reloc.table!r} at offset {reloc.offset:#x} "
            f"of {section.name!r} is not supported"
        )

    def _relocate_code(self, section: _Section, reloc: _Relocation) -> None:
        if reloc.type == R_BPF_NONE:
            return
        if reloc.type not in (R_BPF_64_64, R_BPF_64_32):
            raise self._unknown(reloc, section)
        if reloc.offset % isa.INSTRUCTION_SIZE or reloc.offset >= section.size:
            raise LoadError(
                f"{self.name}: relocation in {reloc.table!r} at offset {reloc.offset:#x} "
                f"is not on an instruction of {section.name!r}"
            )
        pc = self.base_pc[section.index] + reloc.offset // isa.INSTRUCTION_SIZE
        if reloc.type == R_BPF_64_64:
            self._relocate_lddw(section, pc, reloc.symbol)
        else:
            self._relocate_call(pc, reloc.symbol)

    def _relocate_lddw(self, section: _Section, pc: int, symbol: _Symbol) -> None:
        insn = self.instructions[pc]
        last = self.base_pc[section.index] + section.size // isa.INSTRUCTION_SIZE - 1
        if insn.opcode != isa.LDDW or pc >= last:
            raise LoadError(
                f"{self.name}: R_BPF_64_64 relocation at pc {pc} (symbol {symbol.name!r}) "
                "is not on a complete lddw instruction"
            )
        # REL, not RELA: the addend is the constant the compiler left in the lddw.
        addend = isa.lddw_value(insn, self.instructions[pc + 1])
        address = self._address(symbol, addend, f"lddw at pc {pc}")
        self.instructions[pc : pc + 2] = isa.lddw_pair(insn.dst, address, insn.src)

    def _relocate_call(self, pc: int, symbol: _Symbol) -> None:
        insn = self.instructions[pc]
        if insn.opcode != isa.OP_CALL:
            raise LoadError(
                f"{self.name}: R_BPF_64_32 relocation at pc {pc} (symbol {symbol.name!r}) "
                "is not on a call instruction"
            )
        if symbol.section is None and not symbol.special:
            # A prototype without a body: a helper the runtime resolves by name.
            self._check_name(symbol.name, f"the helper called at pc {pc}")
            self.helper_calls[pc] = HelperRef(name=symbol.name)
            self.instructions[pc] = replace(insn, src=isa.CALL_HELPER)
            return
        if symbol.section not in self.base_pc:
            where = symbol.special or repr(self._section_name(symbol.section or 0))
            raise LoadError(
                f"{self.name}: call at pc {pc} to {symbol.name!r} in {where}, "
                "which is not a function of an executable section"
            )
        target_section = self.obj.sections[symbol.section]
        # LLVM encodes the callee as symbol + (imm + 1) instructions: for a named
        # function imm is -1, for a section symbol imm carries the function's
        # offset inside that section.
        if symbol.value % isa.INSTRUCTION_SIZE:
            raise LoadError(
                f"{self.name}: call at pc {pc} to {symbol.name!r} at offset "
                f"{symbol.value:#x}, which is not on an instruction boundary"
            )
        slot = symbol.value // isa.INSTRUCTION_SIZE + insn.imm + 1
        if not 0 <= slot < target_section.size // isa.INSTRUCTION_SIZE:
            raise LoadError(
                f"{self.name}: call at pc {pc} to {symbol.name!r} with addend {insn.imm + 1} "
                f"lands outside section {target_section.name!r}"
            )
        target = self.base_pc[target_section.index] + slot
        self.instructions[pc] = replace(insn, src=isa.CALL_LOCAL, imm=target - pc - 1)

    def _relocate_data(self, section: _Section, reloc: _Relocation) -> None:
        if reloc.type == R_BPF_NONE:
            return
        if reloc.type == R_BPF_64_ABS32:
            raise LoadError(
                f"{self.name}: R_BPF_64_ABS32 relocation at offset {reloc.offset:#x} of "
                f"{section.name!r} (symbol {reloc.symbol.name!r}): a 32-bit field cannot "
                "hold a 64-bit VM address; use a 64-bit pointer"
            )
        if reloc.type != R_BPF_64_ABS64:
            raise self._unknown(reloc, section)
        if section.kind == BSS or reloc.offset + 8 > section.size:
            raise LoadError(
                f"{self.name}: relocation at offset {reloc.offset:#x} is outside the "
                f"contents of {section.name!r}"
            )
        image = self.rodata if section.kind == RODATA else self.data
        at = self.image_offset[section.index] + reloc.offset
        addend = int.from_bytes(image[at : at + 8], "little")
        site = f"pointer at offset {reloc.offset:#x} of {section.name!r}"
        image[at : at + 8] = self._address(reloc.symbol, addend, site).to_bytes(8, "little")

    # -- functions and lines --------------------------------------------------------

    def _functions(self) -> tuple[Function, ...]:
        functions: list[Function] = []
        for section in self.code_sections:
            count = section.size // isa.INSTRUCTION_SIZE
            starts: dict[int, tuple[str, bool]] = {}
            for symbol in self.obj.symbols:
                if not symbol.is_function or symbol.section != section.index:
                    continue
                if symbol.value % isa.INSTRUCTION_SIZE or symbol.value >= section.size:
                    raise LoadError(
                        f"{self.name}: function {symbol.name!r} at offset {symbol.value:#x} "
                        f"is not on an instruction of {section.name!r}"
                    )
                self._check_name(symbol.name, f"the function at offset {symbol.value:#x}")
                slot = symbol.value // isa.INSTRUCTION_SIZE
                if slot not in starts or (symbol.is_global and not starts[slot][1]):
                    starts[slot] = (symbol.name, symbol.is_global)
            # Code before the first symbol still has to belong to a function.
            if 0 not in starts:
                self._check_name(section.name, f"code section #{section.index}")
                starts[0] = (section.name, False)
            ordered = sorted(starts)
            base = self.base_pc[section.index]
            for start, end in zip(ordered, [*ordered[1:], count], strict=True):
                fn_name, exported = starts[start]
                functions.append(
                    Function(fn_name, base + start, end - start, exported, section.name)
                )
        return tuple(functions)

    def _lines(self) -> dict[int, str]:
        lines: dict[int, str] = {}
        for row in self.obj.lines:
            section = self.obj.sections.get(row.section)
            if row.section not in self.base_pc or section is None:
                continue
            base = self.base_pc[row.section]
            first = row.start // isa.INSTRUCTION_SIZE
            last = min(-(-row.end // isa.INSTRUCTION_SIZE), section.size // isa.INSTRUCTION_SIZE)
            for slot in range(first, last):
                lines.setdefault(base + slot, row.location)
        return dict(sorted(lines.items()))
