"""`StateFiles`: named states on disk, so a restarted server still has them.

With `--store DIR` (one process; the workers of `--workers N` share theirs
through `bpfexec.server.states_directory`) every named state is one file in
`DIR/states/`. The file name is the sha256 of the state's key, so any
tenant, module id and state name make a safe file name:

    <sha256 of JSON [tenant, module id, name]>.json

and the file is JSON (`FORMAT`), every byte string in hex:

    {"format": "bpfexec-state/1", "tenant": "", "module_id": "sha256:...",
     "name": "mystate",
     "maps": [{"name": "counts", "type": 1, "key_size": 4, "value_size": 8,
               "max_entries": 1024, "map_flags": 0,
               "entries": [["07000000", "0300000000000000"], ...]}, ...]}

`type` is the kernel's map type number; `entries` are what `BpfMap.entries`
lists (an array's non-zero elements, a hash map's every element in
insertion or LRU order), so loading them back in order rebuilds the maps.
Writes are atomic (`bpfexec.server.store.write_atomically`: temporary file,
fsync, rename, fsync of the directory). A file that cannot be read back is
renamed `<name>.corrupt` and logged, never served.

It also has what the shared stores use to name and pack a state: its digest
(`state_digest`), one map's entries as bytes (`pack_entries`) and the maps'
definitions as JSON (`specs_json`).

This module converts states to bytes and back; it never decides when a state
is written (`bpfexec.server.states.StateRegistry` does).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import astuple, dataclass
from pathlib import Path

from bpfexec.server.store import sync_directory, write_atomically

log = logging.getLogger(__name__)

FORMAT = "bpfexec-state/1"


@dataclass(frozen=True)
class StateKey:
    """Who a state belongs to and what it is called: tenant, module id, name."""

    tenant: str
    module_id: str
    name: str


@dataclass(frozen=True)
class MapSpec:
    """A map definition as a state keeps it (`bpfexec.vm.maps.MapDefinition`)."""

    name: str
    type: int
    key_size: int
    value_size: int
    max_entries: int
    map_flags: int = 0

    @classmethod
    def of(cls, definition: object) -> MapSpec:
        return cls(
            name=str(getattr(definition, "name", "")),
            type=int(getattr(definition, "type", 0)),
            key_size=int(getattr(definition, "key_size", 0)),
            value_size=int(getattr(definition, "value_size", 0)),
            max_entries=int(getattr(definition, "max_entries", 0)),
            map_flags=int(getattr(definition, "map_flags", 0)),
        )


Entries = list[tuple[bytes, bytes]]


@dataclass(frozen=True)
class StoredState:
    """A state as read back: its key, its maps' definitions and their entries."""

    key: StateKey
    specs: tuple[MapSpec, ...]
    entries: tuple[Entries, ...]  # one list per map, in the order of `specs`


class StateFiles:
    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def save(self, key: StateKey, specs: tuple[MapSpec, ...], entries: list[Entries]) -> None:
        """Write the state, durably, before returning."""
        write_atomically(self.directory, self._name(key), encode(key, specs, entries))

    def delete(self, key: StateKey) -> None:
        try:
            (self.directory / self._name(key)).unlink()
        except FileNotFoundError:
            return
        sync_directory(self.directory)

    def load(self) -> Iterator[StoredState]:
        """Every stored state (a corrupt file is set aside and skipped)."""
        for path in sorted(self.directory.glob("*.json")):
            try:
                stored = decode(path.read_bytes())
                if path.name != self._name(stored.key):
                    raise ValueError("the file name is not the hash of the state's key")
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.error("state store: %s is not a state (%s); moved aside, not served", path, exc)
                _set_aside(path)
                continue
            yield stored

    @staticmethod
    def _name(key: StateKey) -> str:
        return state_digest(key) + ".json"


def state_digest(key: StateKey) -> str:
    """The sha256 (hex) of a state's key: its name in a store, whatever the key holds."""
    text = json.dumps([key.tenant, key.module_id, key.name])
    return hashlib.sha256(text.encode()).hexdigest()


def pack_entries(spec: MapSpec, entries: Entries) -> bytes:
    """A map's entries as bytes: each key then its value, at the map's fixed sizes."""
    return b"".join(key + value for key, value in entries)


def unpack_entries(spec: MapSpec, data: bytes) -> Entries:
    """The entries `pack_entries` packed; ValueError if `data` does not fit `spec`."""
    size = spec.key_size + spec.value_size
    if size <= 0 or len(data) % size:
        raise ValueError(f"map {spec.name!r}: {len(data)} bytes are not whole entries")
    return [
        (data[n : n + spec.key_size], data[n + spec.key_size : n + size])
        for n in range(0, len(data), size)
    ]


@functools.lru_cache(maxsize=1024)
def specs_json(specs: tuple[MapSpec, ...]) -> str:
    """A state's map definitions as JSON (`specs_from_json` reads them back)."""
    return json.dumps([list(astuple(spec)) for spec in specs], separators=(",", ":"))


def specs_from_json(text: str | bytes) -> tuple[MapSpec, ...]:
    return tuple(MapSpec(str(s[0]), *(int(n) for n in s[1:])) for s in json.loads(text))


def encode(key: StateKey, specs: tuple[MapSpec, ...], entries: list[Entries]) -> bytes:
    maps = [
        {
            "name": spec.name,
            "type": spec.type,
            "key_size": spec.key_size,
            "value_size": spec.value_size,
            "max_entries": spec.max_entries,
            "map_flags": spec.map_flags,
            "entries": [[k.hex(), v.hex()] for k, v in map_entries],
        }
        for spec, map_entries in zip(specs, entries, strict=True)
    ]
    data = {
        "format": FORMAT,
        "tenant": key.tenant,
        "module_id": key.module_id,
        "name": key.name,
        "maps": maps,
    }
    return json.dumps(data, separators=(",", ":")).encode()


def decode(data: bytes) -> StoredState:
    """ValueError (or KeyError, TypeError) for anything that is not a state file."""
    found = json.loads(data)
    if found.get("format") != FORMAT:
        raise ValueError(f"format {found.get('format')!r}, expected {FORMAT!r}")
    key = StateKey(str(found["tenant"]), str(found["module_id"]), str(found["name"]))
    specs = []
    entries = []
    for item in found["maps"]:
        spec = MapSpec(
            str(item["name"]),
            int(item["type"]),
            int(item["key_size"]),
            int(item["value_size"]),
            int(item["max_entries"]),
            int(item.get("map_flags", 0)),
        )
        pairs = [(bytes.fromhex(k), bytes.fromhex(v)) for k, v in item["entries"]]
        for k, v in pairs:
            if len(k) != spec.key_size or len(v) != spec.value_size:
                raise ValueError(f"map {spec.name!r}: an entry of the wrong size")
        specs.append(spec)
        entries.append(pairs)
    return StoredState(key, tuple(specs), tuple(entries))


def _set_aside(path: Path) -> None:
    try:
        os.replace(path, path.with_name(path.name + ".corrupt"))
    except OSError as exc:
        log.error("state store: could not set %s aside: %s", path.name, exc)
