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

Every request that uses a state holds it alone (`hold`), from its start to
its end, and its changes are committed at its end (docs/state.md: the
model). Within one process a lock per state does it. With `StateFiles`
(`--store DIR`) the commit writes the state before the request is answered.
With `SharedStates` (`--state-store redis://`, `bpfexec.server.states_redis`)
the state lives in the shared store: holding it takes the store's lease,
brings this process's copy of its maps up to the store's version if another
process changed it, and the commit writes the maps that changed, fenced by
the lease, in one transaction.

This module keeps and limits states; it never runs a program
(`bpfexec.server.executor.ExecutionService` does) nor knows about gRPC.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from bpfexec.server.metrics import Metrics
from bpfexec.server.state_files import (
    MapSpec,
    StateFiles,
    StateKey,
    StoredState,
    pack_entries,
)
from bpfexec.vm import LoadError, RequestError
from bpfexec.vm.machine import Interrupt
from bpfexec.vm.maps import MAP_TYPES, BpfMap, MapSet, map_bytes

log = logging.getLogger(__name__)
T = TypeVar("T")

__all__ = [
    "InvalidEntry",
    "Lease",
    "MapContents",
    "MapNotFound",
    "SharedStates",
    "State",
    "StateBusy",
    "StateError",
    "StateKey",
    "StateLimit",
    "StateNotFound",
    "StateNotSaved",
    "StateRegistry",
    "StateStoreUnavailable",
    "StateSummary",
    "Version",
    "check_state_name",
    "fill_map",
    "map_contents",
    "new_map_set",
    "retry_until",
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


class StateStoreUnavailable(StateError):
    """The shared state store cannot be reached, or no longer holds this request's lease:
    nothing of the request was committed (UNAVAILABLE)."""


class StateBusy(StateError):
    """The state stayed held by other requests until this one's deadline."""


# How long a request without a deadline waits for a state others hold.
STATE_WAIT = 60.0
_POLL = 0.05  # seconds between looks at a request's interrupt while it waits


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


@dataclass(frozen=True)
class Version:
    """Which commit of a state a copy holds: `epoch`, drawn anew each time the state is
    created in the shared store (None: it is not there), and the commits since."""

    epoch: str | None = None
    number: int = 0


@dataclass(frozen=True)
class Lease:
    """A request's hold of a state in the shared store: `token` fences its commit;
    `version` is the state's version when the lease was taken."""

    key: StateKey
    token: str
    version: Version


@dataclass(frozen=True)
class StateSummary:
    """What ListStates says of a state: its key and its maps' definitions."""

    key: StateKey
    specs: tuple[MapSpec, ...]

    @property
    def map_bytes(self) -> int:
        return map_bytes(list(self.specs))

    @property
    def map_names(self) -> list[str]:
        return [spec.name for spec in self.specs]


class SharedStates(Protocol):
    """States shared by processes (`bpfexec.server.states_redis.RedisStates`).

    Errors: StateStoreUnavailable when the store cannot be reached, StateBusy when
    the state stays leased by others until `deadline`.
    """

    location: str

    def acquire(self, key: StateKey, deadline: float, interrupt: Interrupt | None) -> Lease:
        """Lease `key` alone (waiting, while others hold it, until `deadline`, a
        `time.monotonic()` time, or `interrupt`); kept alive until released."""
        ...

    def release(self, lease: Lease) -> None:
        """Give the lease back, committing nothing."""
        ...

    def commit(
        self,
        lease: Lease,
        specs: tuple[MapSpec, ...],
        packed: list[bytes],
        changed: Collection[int],
    ) -> Version:
        """Write the maps (each one's `pack_entries`; those in `changed` differ from the
        last commit), creating the state if new, and release the lease, all at once;
        the new version. StateStoreUnavailable, committing nothing, if the lease was
        lost."""
        ...

    def delete(self, lease: Lease) -> bool:
        """Delete the leased state and release the lease; whether it existed."""
        ...

    def read(self, key: StateKey) -> tuple[StoredState, Version] | None:
        """The state as last committed, or None if there is none."""
        ...

    def summaries(self, tenant: str, module_id: str = "") -> list[StateSummary]:
        """`tenant`'s states (of `module_id`, if given), in no particular order."""
        ...

    def close(self) -> None: ...


class State:
    """The maps of one named state, and what it takes to write them consistently."""

    def __init__(
        self,
        key: StateKey,
        specs: tuple[MapSpec, ...],
        maps: MapSet,
        definitions: Sequence[Any] = (),
        init: Iterable[tuple[int, int, int]] = (),
    ) -> None:
        self.key = key
        self.specs = specs
        self.maps = maps
        self.definitions = list(definitions)  # to build fresh maps (a state new in a store)
        self.init = tuple(init)
        self.map_bytes = map_bytes(list(specs))
        self.lock = threading.Lock()  # held by the request using the state (`hold`)
        self._save_lock = threading.Lock()
        self._changes = 0  # increments after each change; what the file holds is `_saved`
        self._saved = 0
        self.deleted = False  # set (under `lock`) when the state is deleted
        # With a shared store: the version the maps hold, and a digest of each map's
        # packed entries as committed (None: unknown, read the state again).
        self.version = Version()
        self.digests: list[bytes] | None = None

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
        shared: SharedStates | None = None,
    ) -> None:
        self.metrics = metrics
        self.max_state_bytes = max_state_bytes
        self.max_states_bytes = max_states_bytes
        self.max_states = max_states
        self.files = files
        self.shared = shared
        self._states: dict[StateKey, State] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._states)

    @property
    def total_bytes(self) -> int:
        return self._bytes

    def kept_here(self, key: StateKey) -> bool:
        """Whether this process keeps the state of `key` itself (no shared store)."""
        return self.shared is None and key in self._states

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
            state = State(key, specs, new_map_set(program), program.maps, program.map_init)
            self._add(state)
        return state, True

    @contextlib.contextmanager
    def hold(
        self,
        key: StateKey,
        program: Any | None,
        *,
        wait: float | None = None,
        interrupt: Interrupt | None = None,
        create: bool = True,
        commit: bool = True,
    ) -> Iterator[State]:
        """Hold the state of `key` alone for the `with` block and commit its changes at
        the end, however the block ends (docs/state.md; not `commit`: the block only
        reads). Waits for other holders at most `wait` seconds (StateBusy). `program`
        creates the state if it is new (with `create`; else StateNotFound); None:
        only an existing one is held."""
        deadline = time.monotonic() + (STATE_WAIT if wait is None else max(wait, 0.0))
        state = self._take(key, program, deadline, interrupt, create)
        try:
            lease = self._lease(state, deadline, interrupt, create)
            try:
                yield state
            except BaseException:
                self._end(state, lease, commit, quiet=True)
                raise
            self._end(state, lease, commit)
        finally:
            state.lock.release()

    def _take(
        self,
        key: StateKey,
        program: Any | None,
        deadline: float,
        interrupt: Interrupt | None,
        create: bool,
    ) -> State:
        """The state of `key`, its lock taken (StateBusy at `deadline`)."""
        while True:
            if program is None or (self.shared is None and not create):
                state = self.get(key)
            else:
                state = self.open(key, program)[0]
            _acquire(state.lock, deadline, interrupt, key)
            if not state.deleted:
                return state
            state.lock.release()  # deleted while we waited: a new one

    def _lease(
        self, state: State, deadline: float, interrupt: Interrupt | None, create: bool
    ) -> Lease | None:
        """With a shared store: its lease, and the maps brought up to its version."""
        if self.shared is None:
            return None
        lease = self.shared.acquire(state.key, deadline, interrupt)
        try:
            if lease.version.epoch is None and not create:
                raise StateNotFound(state.key)
            self._sync(state, lease.version)
        except BaseException:
            with contextlib.suppress(StateError):
                self.shared.release(lease)
            if lease.version.epoch is None and not create:
                self._forget(state)
            raise
        return lease

    def _sync(self, state: State, version: Version) -> None:
        """Make `state`'s maps those of `version` in the shared store."""
        assert self.shared is not None
        if state.version == version and state.digests is not None:
            return
        state.digests = None
        if version.epoch is None:  # not in the store (never committed, or deleted)
            maps = MapSet(state.definitions, state.init)
        else:
            found = self.shared.read(state.key)
            if found is None or found[1] != version:
                raise StateStoreUnavailable(
                    f"state {_shown(state.key.name)} changed in the store while leased"
                )
            stored = found[0]
            if stored.specs != state.specs:
                raise StateNotSaved(
                    f"state {_shown(state.key.name)} in {self.shared.location} has maps that "
                    "are not those of its module"
                )
            maps = MapSet(state.definitions)  # no initial values: the entries hold them
            for bpf_map, entries in zip(maps.maps, stored.entries, strict=True):
                fill_map(bpf_map, entries)
        state.maps = maps
        state.digests = [_digest(packed) for packed in _packed(state)]
        state.version = version

    def _end(self, state: State, lease: Lease | None, commit: bool, quiet: bool = False) -> None:
        if commit:
            self._commit(state, lease, quiet)
        elif lease is not None:
            assert self.shared is not None
            with contextlib.suppress(StateError):
                self.shared.release(lease)

    def _commit(self, state: State, lease: Lease | None, quiet: bool = False) -> None:
        """The end of a hold: the state's changes committed (StateNotSaved or
        StateStoreUnavailable if they cannot be; logged instead when `quiet`)."""
        try:
            if lease is None:
                self.changed(state)
                return
            assert self.shared is not None
            packed = _packed(state)
            digests = [_digest(p) for p in packed]
            if lease.version.epoch is not None and digests == state.digests:
                self.shared.release(lease)  # nothing changed: no new version
                return
            known = state.digests if lease.version.epoch is not None else None
            changed = [n for n, d in enumerate(digests) if known is None or d != known[n]]
            start = time.perf_counter()
            try:
                state.version = self.shared.commit(lease, state.specs, packed, changed)
            except BaseException:
                state.digests = None  # the maps hold what was not committed: read again
                state.version = Version()
                raise
            state.digests = digests
            self.metrics.state_save_seconds.observe(time.perf_counter() - start)
        except StateError as exc:
            if not quiet:
                raise
            log.error("state %r: %s", state.key.name, exc)

    def _forget(self, state: State) -> None:
        """Drop this process's copy of a state the shared store does not have."""
        with self._lock:
            if self._states.get(state.key) is state:
                del self._states[state.key]
                self._bytes -= state.map_bytes
                self._count()
        state.deleted = True

    def states(self, tenant: str, module_id: str = "") -> list[State]:
        """`tenant`'s states (of `module_id`, if given), by module id then name."""
        found = [
            state
            for key, state in list(self._states.items())
            if key.tenant == tenant and (not module_id or key.module_id == module_id)
        ]
        return sorted(found, key=lambda state: (state.key.module_id, state.key.name))

    def summaries(self, tenant: str, module_id: str = "") -> list[StateSummary]:
        """`tenant`'s states (of `module_id`, if given), by module id then name: this
        process's, or with a shared store every process's."""
        if self.shared is not None:
            found = self.shared.summaries(tenant, module_id)
        else:
            found = [StateSummary(s.key, s.specs) for s in self.states(tenant, module_id)]
        return sorted(found, key=lambda summary: (summary.key.module_id, summary.key.name))

    def delete(self, key: StateKey, wait: float | None = None) -> None:
        """Delete a state, once the request holding it (if any) has ended."""
        deadline = time.monotonic() + (STATE_WAIT if wait is None else max(wait, 0.0))
        state = self._states.get(key)
        if state is not None:
            _acquire(state.lock, deadline, None, key)
        try:
            existed = state is not None and not state.deleted
            if self.shared is not None:
                lease = self.shared.acquire(key, deadline, None)
                existed = self.shared.delete(lease)
            if state is not None:
                self._forget(state)
            if not existed:
                raise StateNotFound(key)
            if self.files is not None:
                with state._save_lock if state is not None else contextlib.nullcontext():
                    self.files.delete(key)
        finally:
            if state is not None:
                state.lock.release()

    def delete_module(self, module_id: str, tenant: str) -> int:
        """Delete `tenant`'s states of a module (its module was deleted); how many."""
        keys = [s.key for s in self.summaries(tenant, module_id)]
        for key in keys:
            with contextlib.suppress(StateNotFound):  # deleted meanwhile
                self.delete(key)
        return len(keys)

    def update(
        self,
        key: StateKey,
        program: Any | None,
        map_name: str,
        entries: Sequence[tuple[bytes, bytes]],
        flags: int,
        wait: float | None = None,
    ) -> tuple[list[int], bool]:
        """Set entries as `bpf_map_update_elem(map, key, value, flags)`, creating the state
        for `program` if it is new (None: only an existing one); (each one's result, 0 or
        a negative errno; whether created). A key or value of the wrong size changes
        nothing."""
        created = self.shared is None and key not in self._states
        with self.hold(key, program, wait=wait) as state:
            created = created or (state.version.epoch is None and self.shared is not None)
            bpf_map = state.map(map_name)
            spec = bpf_map.spec
            for n, (k, value) in enumerate(entries):
                sizes = (("key", k, spec.key_size), ("value", value, spec.value_size))
                for what, data, size in sizes:
                    if len(data) != size:
                        raise InvalidEntry(
                            f"entry {n}: {what} of {len(data)} bytes, but map {_shown(map_name)} "
                            f"of state {_shown(key.name)} takes {size}-byte {what}s"
                        )
            results = [bpf_map.update(k, value, flags) for k, value in entries]
            self.metrics.map_operations.labels("update").inc(len(entries))
        return results, created

    def delete_entries(
        self,
        key: StateKey,
        program: Any | None,
        map_name: str,
        keys: Sequence[bytes],
        wait: float | None = None,
    ) -> list[int]:
        """Delete keys as `bpf_map_delete_elem`; each one's result (0 or a negative errno).
        `program` is the state's module's (None if unknown: only a state kept here)."""
        with self.hold(key, program, wait=wait, create=False) as state:
            bpf_map = state.map(map_name)
            size = bpf_map.spec.key_size
            for n, k in enumerate(keys):
                if len(k) != size:
                    raise InvalidEntry(
                        f"key {n}: {len(k)} bytes, but map {_shown(map_name)} of state "
                        f"{_shown(key.name)} takes {size}-byte keys"
                    )
            results = [bpf_map.delete(k) for k in keys]
            self.metrics.map_operations.labels("delete").inc(len(keys))
        return results

    def read(
        self, key: StateKey, map_name: str | None = None, wait: float | None = None
    ) -> tuple[StateSummary, dict[str, MapContents]]:
        """A state as last committed, and its maps' contents (every map, or the one
        named): from the shared store if there is one, else once no request holds it."""
        if self.shared is not None:
            found = self.shared.read(key)
            if found is None:
                raise StateNotFound(key)
            stored = found[0]
            summary = StateSummary(key, stored.specs)
            contents = {
                spec.name: _stored_contents(spec, entries)
                for spec, entries in zip(stored.specs, stored.entries, strict=True)
                if not map_name or spec.name == map_name
            }
            if map_name and not contents:
                raise MapNotFound(key, map_name, summary.map_names)
        else:
            with self.hold(key, None, wait=wait, commit=False) as state:
                summary = StateSummary(key, state.specs)
                contents = state.contents(map_name)
        self._count_read(contents)
        return summary, contents

    def _count_read(self, contents: dict[str, MapContents]) -> None:
        self.metrics.map_operations.labels("read").inc(
            sum(len(c.entries) for c in contents.values())
        )

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
            self._add(State(stored.key, specs, maps, definitions))

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


def _acquire(
    lock: threading.Lock, deadline: float, interrupt: Interrupt | None, key: StateKey
) -> None:
    """Take `lock`, waiting until `deadline` (StateBusy) or `interrupt`."""
    while True:
        left = deadline - time.monotonic()
        if interrupt is not None and interrupt.reason is not None:
            raise StateBusy(
                f"state {_shown(key.name)}: the request ended ({interrupt.reason.value}) while "
                "waiting for the state"
            )
        if lock.acquire(timeout=max(0.0, min(left, _POLL))):
            return
        if left <= 0:
            raise StateBusy(
                f"state {_shown(key.name)} of module {_shown(key.module_id)} stayed in use by "
                "other requests until this one's deadline"
            )


def retry_until(
    attempt: Callable[[], T | None],
    deadline: float,
    interrupt: Interrupt | None,
    busy: str,
    first_wait: float,
    most_wait: float,
) -> T:
    """What `attempt()` gives once it gives something other than None, tried again after
    waits doubling from `first_wait` to `most_wait`; StateBusy(`busy`) once `deadline`
    (a `time.monotonic()` time) has passed or `interrupt` was requested. How the shared
    stores wait for a lease another process holds."""
    wait = first_wait
    while True:
        found = attempt()
        if found is not None:
            return found
        left = deadline - time.monotonic()
        if left <= 0 or (interrupt is not None and interrupt.reason is not None):
            raise StateBusy(busy)
        time.sleep(min(wait, left))
        wait = min(wait * 2, most_wait)


def _packed(state: State) -> list[bytes]:
    pairs = zip(state.specs, state.maps.maps, strict=True)
    return [pack_entries(spec, bpf_map.entries()) for spec, bpf_map in pairs]


def _digest(packed: bytes) -> bytes:
    return hashlib.blake2b(packed, digest_size=16).digest()


def _stored_contents(spec: MapSpec, entries: list[tuple[bytes, bytes]]) -> MapContents:
    kind = MAP_TYPES.get(spec.type)
    name = kind.name if kind is not None else str(spec.type)
    return MapContents(name, spec.key_size, spec.value_size, spec.max_entries, tuple(entries))


def _shown(text: str) -> str:
    """`text` quoted on one line, whatever it holds."""
    return "'" + text.encode("unicode_escape").decode("ascii") + "'"
