"""`DirectoryStates`: named states shared by the worker processes of one server.

`bpfexec serve --workers N` runs N processes; without an external store they
keep one consistent state per name through a directory they all use (a
temporary one the parent makes and removes, or `DIR/states/workers/` with
`--store DIR`, written durably). It is the `bpfexec.server.states.SharedStates`
interface, as `RedisStates` is for replicas, so the model of docs/state.md
holds the same way. For each state, `<h>` the sha256 of its key
(`bpfexec.server.state_files.state_digest`):

- `<h>.lock`: the lease is an exclusive `flock` of it. The kernel releases it
  when its process dies, however it dies, so a worker killed mid-request
  leaves the state as its last commit left it, and the next request takes it
  at once. The file stays when its state is deleted (removing it could let
  two processes each lock a different file of the same name);
- `<h>.state`: one line of JSON (its key, its maps' definitions, its epoch,
  version and the byte length of each map's entries), then each map's entries
  (`bpfexec.server.state_files.pack_entries`). A commit writes `<h>.tmp` (the
  lease makes the name this request's alone) and renames it over `<h>.state`:
  the commit point, all or nothing, and what a reader without the lease reads
  is always one whole commit.

A process's own requests on a state are already one at a time (the
registry's lock per state), so one process never contends with itself here.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import threading
from collections.abc import Collection
from pathlib import Path
from typing import Any

from bpfexec.server.state_files import (
    MapSpec,
    StateKey,
    StoredState,
    specs_from_json,
    specs_json,
    state_digest,
    unpack_entries,
)
from bpfexec.server.states import (
    Lease,
    StateStoreUnavailable,
    StateSummary,
    Version,
    retry_until,
)
from bpfexec.server.store import sync_directory
from bpfexec.vm.machine import Interrupt

_FIRST_WAIT = 0.0002  # seconds between tries for a locked state: doubling up to _MOST_WAIT
_MOST_WAIT = 0.01


def _locked(fd: int) -> bool | None:
    """True once this process holds the exclusive flock of `fd`; None while another does."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return None
    return True


class DirectoryStates:
    """The `SharedStates` interface on a directory the processes of one server share."""

    def __init__(self, directory: str | os.PathLike[str], durable: bool = False) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.durable = durable  # fsync every commit (under --store DIR)
        self.location = str(self.directory)
        self._held: dict[str, int] = {}  # token -> the locked file's descriptor
        self._held_lock = threading.Lock()

    def acquire(self, key: StateKey, deadline: float, interrupt: Interrupt | None) -> Lease:
        digest = state_digest(key)
        try:
            fd = os.open(self.directory / f"{digest}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise self._unavailable(f"locking state {key.name!r}", exc) from None
        busy = (
            f"state {key.name!r} of module {key.module_id!r} stayed in use by requests on "
            "other worker processes until this one's deadline"
        )
        try:
            retry_until(lambda: _locked(fd), deadline, interrupt, busy, _FIRST_WAIT, _MOST_WAIT)
            meta = self._meta(digest)
        except BaseException:
            os.close(fd)  # closing releases the lock, if taken
            raise
        token = secrets.token_hex(8)
        with self._held_lock:
            self._held[token] = fd
        version = Version(meta["epoch"], meta["version"]) if meta else Version()
        return Lease(key, token, version)

    def release(self, lease: Lease) -> None:
        with self._held_lock:
            fd = self._held.pop(lease.token, None)
        if fd is not None:
            os.close(fd)  # and with it the lock

    def commit(
        self,
        lease: Lease,
        specs: tuple[MapSpec, ...],
        packed: list[bytes],
        changed: Collection[int],
    ) -> Version:
        key = lease.key
        digest = state_digest(key)
        try:
            if lease.token not in self._held:
                raise StateStoreUnavailable(f"state {key.name!r}: committed without its lease")
            # The lease's version is the state's: no other process commits while it is held.
            epoch = lease.version.epoch or secrets.token_hex(8)
            version = lease.version.number + 1
            meta = {
                "key": [key.tenant, key.module_id, key.name],
                "specs": specs_json(specs),
                "epoch": epoch,
                "version": version,
                "sizes": [len(data) for data in packed],
            }
            data = json.dumps(meta, separators=(",", ":")).encode() + b"\n" + b"".join(packed)
            temporary = self.directory / f"{digest}.tmp"
            with open(temporary, "wb") as out:
                out.write(data)
                if self.durable:
                    out.flush()
                    os.fsync(out.fileno())
            os.replace(temporary, self.directory / f"{digest}.state")  # the commit point
            if self.durable:
                sync_directory(self.directory)
        except OSError as exc:
            raise self._unavailable(f"committing state {key.name!r}", exc) from None
        finally:
            self.release(lease)
        return Version(epoch, version)

    def delete(self, lease: Lease) -> bool:
        try:
            (self.directory / f"{state_digest(lease.key)}.state").unlink()
            existed = True
            if self.durable:
                sync_directory(self.directory)
        except FileNotFoundError:
            existed = False
        except OSError as exc:
            raise self._unavailable(f"deleting state {lease.key.name!r}", exc) from None
        finally:
            self.release(lease)
        return existed

    def read(self, key: StateKey) -> tuple[StoredState, Version] | None:
        found = self._load(state_digest(key))
        if found is None:
            return None
        meta, data = found
        specs = specs_from_json(meta["specs"])
        entries = []
        offset = 0
        try:
            for spec, size in zip(specs, meta["sizes"], strict=True):
                entries.append(unpack_entries(spec, data[offset : offset + size]))
                offset += size
        except (ValueError, TypeError) as exc:
            raise self._unavailable(f"reading state {key.name!r}", exc) from None
        return StoredState(key, specs, tuple(entries)), Version(meta["epoch"], meta["version"])

    def summaries(self, tenant: str, module_id: str = "") -> list[StateSummary]:
        found = []
        for path in self.directory.glob("*.state"):
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                with open(path, "rb") as file:
                    meta = json.loads(file.readline())
                key = StateKey(*(str(part) for part in meta["key"]))
                if key.tenant == tenant and (not module_id or key.module_id == module_id):
                    found.append(StateSummary(key, specs_from_json(meta["specs"])))
        return found

    def close(self) -> None:
        with self._held_lock:
            held, self._held = list(self._held.values()), {}
        for fd in held:
            os.close(fd)

    def _meta(self, digest: str) -> dict[str, Any] | None:
        """The state's line of JSON, or None when there is no state."""
        found = self._load(digest, whole=False)
        return None if found is None else found[0]

    def _load(self, digest: str, whole: bool = True) -> tuple[dict[str, Any], bytes] | None:
        """The state's JSON line and (if `whole`) the entries after it; None: no state."""
        try:
            with open(self.directory / f"{digest}.state", "rb") as file:
                line = file.readline()
                data = file.read() if whole else b""
            meta = json.loads(line)
            meta["epoch"], meta["version"] = str(meta["epoch"]), int(meta["version"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise self._unavailable(f"reading state {digest[:12]}", exc) from None
        return meta, data

    def _unavailable(self, what: str, error: Exception) -> StateStoreUnavailable:
        return StateStoreUnavailable(
            f"the workers' state directory {self.location} is unavailable: {what} failed: {error}"
        )
