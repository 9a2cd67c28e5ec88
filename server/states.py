"""`StateRegistry`: named states, the maps of a module kept between executions.

A named state is a `bpfexec.vm.maps.MapSet` for one module's maps, kept under
a key of (tenant, module id, name), as the kernel keeps a pinned map: every
execution that names the state runs on the same maps, concurrently if it
comes to that (updates and deletes are atomic per element, values are shared
memory a program changes in place, with atomics if it races, as in the
kernel). A tenant never sees another tenant's states: the tenant is part of
the key.

A state is created by the first execution that names it, or by the first
`update` of its entries (seeding). Limits (`Settings`): the map memory of
one state (`max_state_bytes`), of all states together (`max_states_bytes`)
and their number (`max_states`); beyond any of them, creating a state is
refused with `StateLimit` (RESOURCE_EXHAUSTED), and existing states go on.

With `StateFiles` (`--store DIR`), every acknowledged change is written
before it is acknowledged: `changed(state)` after an execution, and the
entry updates and deletes themselves. Concurrent writers of one state
coalesce: a writer that finds its change already written by a later snapshot
returns at once.

This module keeps and limits states; it never runs a program
(`bpfexec.server.executor.ExecutionService` does) nor knows about gRPC.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from bpfexec.server.metrics import Metrics
from bpfexec.server.state_files import MapSpec, StateFiles, StateKey, StoredState
from bpfexec.vm import LoadError, RequestError
from bpfexec.vm.maps import BpfMap, MapSet, map_bytes

log = logging.getLogger(__name__)

__all__ = [
    "InvalidEntry",
    "MapContents",
    "MapNotFound",
    "State",
    "StateError",
    "StateKey",
    "StateLimit",
    "StateNotFound",
    "StateNotSaved",
    "StateRegistry",
    "check_state_name",
    "fill_map",
    "map_contents",
    "new_map_set",
]


class StateError(Exception):
    """A state request refused for a reason of the state service (not a VM error)."""


class StateNotFound(StateError):
    def __init__(self, key: StateKey) -> None:
        self.key = key
        super().__init__(
            f"no state {_shown(key.name)} of module {_shown(key.module_id)}: it was never "
            "created (an execution naming it, or an update of its entries, creates it) or "
            "was deleted"
        )


class MapNotFound(StateError):
    def __init__(self, key: StateKey, name: str, available: Sequence[str]) -> None:
        self.key = key
        self.map = name
        names = ", ".join(available) or "none"
        super().__init__(
            f"state {_shown(key.name)} of module {_shown(key.module_id)} has no map "
            f"{_shown(name)} (its maps: {names})"
        )


class StateLimit(StateError):
    """A state that would exceed `max_state_bytes`, `max_states_bytes` or `max_states`."""


class StateNotSaved(StateError):
    """The change happened in memory but could not be written to the store."""


class InvalidEntry(RequestError):
    """A key or value of the wrong size for its map, or a bad state name."""


@dataclass(frozen=True)
class MapContents:
    """A map and its entries: what `--dump-maps` prints and `GetState` returns."""

    type: str
    key_size: int
    value_size: int
    max_entries: int
    entries: tuple[tuple[bytes, bytes], ...]


def map_contents(bpf_map: BpfMap) -> MapContents:
    spec = bpf_map.spec
    return MapContents(
        bpf_map.kind.name,
        spec.key_size,
        spec.value_size,
        spec.max_entries,
        tuple(bpf_map.entries()),
    )


def new_map_set(program: Any) -> MapSet:
    """Fresh maps of `program`, with the initial values its object declares (if any)."""
    return MapSet(program.maps, program.map_init)


def check_state_name(name: str) -> None:
    """InvalidEntry for a name no state can have (empty, or with control characters)."""
    if not name:
        raise InvalidEntry("the state name is empty")

    if not name.isprintable():
        raise InvalidEntry(f"state name {_shown(name)} has control characters")


class State:
    """The maps of one named state, and what it takes to write them consistently."""

    def __init__(self, key: StateKey, specs: tuple[MapSpec, ...], maps: MapSet) -> None:
        self.key = key
        self.specs = specs
        self.maps = maps
        self.map_bytes = map_bytes(list(specs))
        self._save_lock = threading.Lock()
        self._changes = 0  # increments after each change; what the file holds is `_saved`
        self._saved = 0
        self.deleted = False  # set (under the save lock) when the state is deleted

    @property
    def map_names(self) -> list[str]:
        return [spec.name for spec in self.specs]

    def map(self, name: str) -> BpfMap:
        for bpf_map in self.maps.maps:
            if bpf_map.spec.name == name:
                return bpf_map
        raise MapNotFound(self.key, name, self.map_names)

    def contents(self, name: str | None = None) -> dict[str, MapContents]:
        """Every map's contents by name, or the one named."""
        if name:
            return {name: map_contents(self.map(name))}
        return {m.spec.name: map_contents(m) for m in self.maps.maps}


class StateRegistry:
    """Every named state of one server process."""

    def __init__(
        self,
        *,
        metrics: Metrics,
        max_state_bytes: int = 64 << 20,
        max_states_bytes: int = 512 << 20,
        max_states: int = 4096,
        files: StateFiles | None = None,
    ) -> None:
        self.metrics = metrics
        self.max_state_bytes = max_state_bytes
        self.max_states_bytes = max_states_bytes
        self.max_states = max_states
        self.files = files
        self._states: dict[StateKey, State] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._states)

    @property
    def total_bytes(self) -> int:
        return self._bytes

    def get(self, key: StateKey) -> State:
        state = self._states.get(key)
        if state is None:
            raise StateNotFound(key)
        return state

    def open(self, key: StateKey, program: Any) -> tuple[State, bool]:
        """The state of `key`, created with `program`'s fresh maps if there is none;
        (state, whether it was created now). StateLimit if it cannot be created."""
        check_state_name(key.name)
        state = self._states.get(key)
        if state is not None:
            return state, False
        specs = tuple(MapSpec.of(definition) for definition in program.maps)
        with self._lock:
            state = self._states.get(key)
            if state is not None:
                return state, False
            self._admit(key, map_bytes(list(specs)))
            state = State(key, specs, new_map_set(program))
            self._add(state)
        return state, True

    def states(self, tenant: str, module_id: str = "") -> list[State]:
        """`tenant`'s states (of `module_id`, if given), by module id then name."""
        found = [
            state
            for key, state in list(self._states.items())
            if key.tenant == tenant and (not module_id or key.module_id == module_id)
        ]
        return sorted(found, key=lambda state: (state.key.module_id, state.key.name))

    def delete(self, key: StateKey) -> None:
        with self._lock:
            state = self._states.pop(key, None)
            if state is None:
                raise StateNotFound(key)
            self._bytes -= state.map_bytes
            self._count()
        with state._save_lock:  # no write of a run still going on brings it back
            state.deleted = True
            if self.files is not None:
                self.files.delete(key)

    def delete_module(self, module_id: str, tenant: str) -> int:
        """Delete `tenant`'s states of a module (its module was deleted); how many."""
        keys = [s.key for s in self.states(tenant, module_id)]
        for key in keys:
            with contextlib.suppress(StateNotFound):  # deleted meanwhile
                self.delete(key)
        return len(keys)

    def update(
        self, state: State, map_name: str, entries: Sequence[tuple[bytes, bytes]], flags: int
    ) -> list[int]:
        """Set entries as `bpf_map_update_elem(map, key, value, flags)`; each one's result
        (0 or a negative errno). A key or value of the wrong size changes nothing."""
        bpf_map = state.map(map_name)
        spec = bpf_map.spec
        for n, (key, value) in enumerate(entries):
            sizes = (("key", key, spec.key_size), ("value", value, spec.value_size))
            for what, data, size in sizes:
                if len(data) != size:
                    raise InvalidEntry(
                        f"entry {n}: {what} of {len(data)} bytes, but map {_shown(map_name)} of "
                        f"state {_shown(state.key.name)} takes {size}-byte {what}s"
                    )
        results = [bpf_map.update(key, value, flags) for key, value in entries]
        self.metrics.map_operations.labels("update").inc(len(entries))
        self.changed(state)
        return results

    def delete_entries(self, state: State, map_name: str, keys: Sequence[bytes]) -> list[int]:
        """Delete keys as `bpf_map_delete_elem`; each one's result (0 or a negative errno)."""
        bpf_map = state.map(map_name)
        size = bpf_map.spec.key_size
        for n, key in enumerate(keys):
            if len(key) != size:
                raise InvalidEntry(
                    f"key {n}: {len(key)} bytes, but map {_shown(map_name)} of state "
                    f"{_shown(state.key.name)} takes {size}-byte keys"
                )
        results = [bpf_map.delete(key) for key in keys]
        self.metrics.map_operations.labels("delete").inc(len(keys))
        self.changed(state)
        return results

    def read(self, state: State, map_name: str | None = None) -> dict[str, MapContents]:
        contents = state.contents(map_name)
        self.metrics.map_operations.labels("read").inc(
            sum(len(c.entries) for c in contents.values())
        )
        return contents

    def changed(self, state: State) -> None:
        """Record a change of `state` and, with a store, write it before returning.
        StateNotSaved if the write fails (the change stays in memory)."""
        with state._save_lock:
            state._changes += 1
            target = state._changes
        if self.files is None:
            return
        with state._save_lock:
            if state.deleted or state._saved >= target:
                return  # deleted, or a later snapshot already holds this change
            current = state._changes
            start = time.perf_counter()
            entries = [m.entries() for m in state.maps.maps]
            try:
                self.files.save(state.key, state.specs, entries)
            except OSError as exc:
                raise StateNotSaved(
                    f"state {_shown(state.key.name)} changed but could not be written to the "
                    f"store: {exc.strerror or exc}"
                ) from None
            state._saved = current
            self.metrics.state_save_seconds.observe(time.perf_counter() - start)

    def restore(self, definitions: Callable[[StateKey], Sequence[Any] | None]) -> int:
        """Load the stored states; how many loaded. `definitions(key)` gives the map
        definitions of the state's module, or None when the module is gone: that
        state's file is deleted. A state over a limit, or whose maps no longer match
        its module's, stays on disk unserved, and is logged."""
        if self.files is None:
            return 0
        loaded = 0
        for stored in self.files.load():
            found = definitions(stored.key)
            if found is None:
                log.warning(
                    "state store: state %r of %s: its module is no longer stored; deleted",
                    stored.key.name,
                    stored.key.module_id,
                )
                self.files.delete(stored.key)
                continue
            try:
                self._load(stored, found)
            except (StateLimit, ValueError, LoadError) as exc:
                log.error("state store: state %r not restored: %s", stored.key.name, exc)
                continue
            loaded += 1
        return loaded

    def _load(self, stored: StoredState, definitions: Sequence[Any]) -> None:
        specs = tuple(MapSpec.of(definition) for definition in definitions)
        if specs != stored.specs:
            raise ValueError("its maps are not those of its module")
        maps = MapSet(list(definitions))  # no initial values: the stored entries hold them
        for bpf_map, entries in zip(maps.maps, stored.entries, strict=True):
            fill_map(bpf_map, entries)
        with self._lock:
            if stored.key in self._states:
                return
            self._admit(stored.key, map_bytes(list(specs)))
            self._add(State(stored.key, specs, maps))

    def _admit(self, key: StateKey, size: int) -> None:
        """StateLimit unless a state of `size` bytes fits (called under the lock)."""
        where = f"state {_shown(key.name)} of module {_shown(key.module_id)}"
        problem = None
        if size > self.max_state_bytes:
            problem = (
                f"{where}: its maps take {size} bytes, more than the limit of "
                f"{self.max_state_bytes} per state (max_state_bytes)"
            )
        elif len(self._states) >= self.max_states:
            problem = (
                f"{where}: the server already keeps its maximum of {self.max_states} states "
                "(max_states): delete states no longer needed (DeleteState)"
            )
        elif self._bytes + size > self.max_states_bytes:
            problem = (
                f"{where}: its maps take {size} bytes and the states already take {self._bytes} "
                f"of the {self.max_states_bytes} allowed (max_states_bytes): delete states no "
                "longer needed (DeleteState)"
            )
        if problem is not None:
            self.metrics.state_refused.inc()
            raise StateLimit(problem)

    def _add(self, state: State) -> None:
        self._states[state.key] = state
        self._bytes += state.map_bytes
        self._count()

    def _count(self) -> None:
        self.metrics.states.set(len(self._states))
        self.metrics.state_map_bytes.set(self._bytes)


def fill_map(bpf_map: BpfMap, entries: Iterable[tuple[bytes, bytes]]) -> None:
    """Put back the entries `bpf_map.entries()` listed (a state read from the store)."""
    if bpf_map.kind.name == "stack":  # listed in pop order: the last pushed first
        entries = reversed(list(entries))
    for key, value in entries:
        result = bpf_map.update(key, value, 0)
        if result:
            raise ValueError(f"map {bpf_map.spec.name!r}: entry {key.hex()} failed ({result})")


def _shown(text: str) -> str:
    """`text` quoted on one line, whatever it holds."""
    return "'" + text.encode("unicode_escape").decode("ascii") + "'"
