"""`ModuleStore`: every accepted module kept on disk, so a restarted server still has it.

The store is a directory (`--store DIR`):

- `<hex>`: the module's bytes; `<hex>` is their sha256, so the module id is
  `sha256:<hex>` (`bpfexec.vm.program.content_id`).
- `<hex>.json`: what the bytes do not say: the name given at upload, the
  tenants that uploaded the module (who may see it), and each tenant's own
  name for it (`names`), so that no tenant ever sees a name another gave.
- `.tmp-*`: a write in progress, or one a crash interrupted: never read.
- `<hex>.corrupt`: bytes that did not match their name, set aside for a
  person to inspect; never served.

Every write goes to a temporary file in the same directory, is fsynced, then
renamed over its final name (`os.replace`, atomic on POSIX), and the directory
is fsynced: a reader sees the old file or the new one, never half of one, and a
crash loses at most the write in progress. Every read checks the content hash.

This module stores and checks bytes; it never parses or verifies a module
(`ExecutionService` does, through the cache).
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from bpfexec.server.metrics import Metrics
from bpfexec.vm.program import content_id

log = logging.getLogger(__name__)

_ID = re.compile(r"sha256:([0-9a-f]{64})")
_FILE = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class StoredModule:
    """A module read back from the store, its bytes checked against its id."""

    id: str
    code: bytes
    name: str | None
    tenants: frozenset[str]
    names: Mapping[str, str | None] = field(default_factory=dict)  # tenant -> its name

    def name_for(self, tenant: str | None) -> str | None:
        """The name `tenant` gave (None: the first name stored, for shared modules)."""
        if tenant is None:
            return self.name
        return self.names.get(tenant, self.name)


class ModuleStorage(Protocol):
    """What the service needs of a module store: `ModuleStore` (a directory) or
    `bpfexec.server.store_redis.RedisModuleStore`."""

    def ids(self) -> list[str]: ...
    def has(self, module_id: str) -> bool: ...
    def read(self, module_id: str) -> StoredModule | None: ...
    def tenants(self, module_id: str) -> frozenset[str]: ...
    def save(
        self, module_id: str, code: bytes, name: str | None, tenants: Iterable[str]
    ) -> None: ...
    def add_tenant(self, module_id: str, code: bytes, name: str | None, tenant: str) -> None: ...
    def remove_tenant(self, module_id: str, tenant: str) -> None: ...
    def set_tenants(self, module_id: str, name: str | None, tenants: Iterable[str]) -> None: ...
    def delete(self, module_id: str) -> bool: ...


class ModuleStore:
    def __init__(self, directory: str | os.PathLike[str], metrics: Metrics) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._metrics = metrics
        self._lock = threading.Lock()  # one writer of a module's metadata at a time

    def ids(self) -> list[str]:
        """The ids of every stored module, oldest first (temporary and set-aside files excluded)."""
        found = [
            (entry.stat().st_mtime_ns, entry.name)
            for entry in os.scandir(self.directory)
            if entry.is_file() and _FILE.fullmatch(entry.name)
        ]
        return ["sha256:" + name for _, name in sorted(found)]

    def has(self, module_id: str) -> bool:
        path = self._path(module_id)
        return path is not None and path.is_file()

    def read(self, module_id: str) -> StoredModule | None:
        """The stored module, or None if absent or corrupt (a corrupt file is set aside)."""
        path = self._path(module_id)
        if path is None:
            return None
        try:
            code = path.read_bytes()
        except FileNotFoundError:
            return None
        if content_id(code) != module_id:
            self._set_aside(path)
            return None
        name, tenants, names = self._metadata(path)
        return StoredModule(module_id, code, name, tenants, names)

    def tenants(self, module_id: str) -> frozenset[str]:
        """The tenants that uploaded a stored module, from its metadata alone (bytes unread)."""
        path = self._path(module_id)
        if path is None or not path.with_name(f"{path.name}.json").is_file():
            return frozenset()
        return self._metadata(path)[1]

    def save(self, module_id: str, code: bytes, name: str | None, tenants: Iterable[str]) -> None:
        """Keep `code` (if not kept already) and its metadata, durably, before returning."""
        path = self._path(module_id)
        if path is None or content_id(code) != module_id:
            raise ValueError(f"module id {module_id} is not the sha256 of its {len(code)} bytes")
        with self._lock:
            # Metadata first: bytes without metadata would be a module nobody may see.
            self._write(f"{path.name}.json", _metadata_json(name, tenants))
            if not path.is_file():
                self._write(path.name, code)

    def add_tenant(self, module_id: str, code: bytes, name: str | None, tenant: str) -> None:
        """Record that `tenant` uploaded `code` (as `name`), durably, before returning.

        The bytes are written again even when already stored, so an upload takes
        the same time whether or not another tenant stored the same bytes first.
        """
        path = self._path(module_id)
        if path is None or content_id(code) != module_id:
            raise ValueError(f"module id {module_id} is not the sha256 of its {len(code)} bytes")
        with self._lock:
            first, tenants, names = self._metadata(path, missing_ok=True)
            names = {**names, tenant: name}
            meta = _metadata_json(first if tenants else name, {*tenants, tenant}, names)
            self._write(f"{path.name}.json", meta)
            self._write(path.name, code)

    def remove_tenant(self, module_id: str, tenant: str) -> None:
        """Forget `tenant`'s upload; the files go once no tenant remains."""
        path = self._path(module_id)
        if path is None:
            return
        with self._lock:
            first, tenants, names = self._metadata(path, missing_ok=True)
            remaining = tenants - {tenant}
            if remaining:
                names = {t: n for t, n in names.items() if t != tenant}
                self._write(f"{path.name}.json", _metadata_json(first, remaining, names))
                return
            _unlink(path)
            _unlink(path.with_name(f"{path.name}.json"))
            self._sync_directory()

    def set_tenants(self, module_id: str, name: str | None, tenants: Iterable[str]) -> None:
        path = self._path(module_id)
        if path is not None:
            with self._lock:
                self._write(f"{path.name}.json", _metadata_json(name, tenants))

    def delete(self, module_id: str) -> bool:
        """Forget a module; False if it was not stored."""
        path = self._path(module_id)
        if path is None:
            return False
        with self._lock:
            existed = _unlink(path)
            _unlink(path.with_name(f"{path.name}.json"))
            self._sync_directory()
        return existed

    def _path(self, module_id: str) -> Path | None:
        """The file of a module id; None for anything that is not one (never a path outside)."""
        match = _ID.fullmatch(module_id)
        return self.directory / match.group(1) if match else None

    def _metadata(
        self, path: Path, missing_ok: bool = False
    ) -> tuple[str | None, frozenset[str], dict[str, str | None]]:
        """(first name, tenants, each tenant's name) of a stored module."""
        try:
            data = json.loads(path.with_name(f"{path.name}.json").read_text())
            names = data.get("names") or {}
            return (
                data.get("name"),
                frozenset(str(t) for t in data.get("tenants", ())),
                {str(t): None if n is None else str(n) for t, n in names.items()},
            )
        except FileNotFoundError as exc:
            if not missing_ok:
                log.warning("module store: no usable metadata for %s (%s)", path.name, exc)
            return None, frozenset(), {}
        except (OSError, ValueError, AttributeError, TypeError) as exc:
            # Missing or unreadable metadata: the module exists but belongs to no tenant.
            log.warning("module store: no usable metadata for %s (%s)", path.name, exc)
            return None, frozenset(), {}

    def _set_aside(self, path: Path) -> None:
        self._metrics.store_corrupt.inc()
        aside = path.with_name(path.name + ".corrupt")
        log.error(
            "module store: %s does not match its sha256 (corrupt); moved to %s, not served",
            path.name,
            aside.name,
        )
        try:
            os.replace(path, aside)
        except OSError as exc:  # already moved by another reader, or read-only: still not served
            log.error("module store: could not set %s aside: %s", path.name, exc)

    def _write(self, name: str, data: bytes) -> None:
        write_atomically(self.directory, name, data)

    def _sync_directory(self) -> None:
        sync_directory(self.directory)


def write_atomically(directory: Path, name: str, data: bytes, durable: bool = True) -> None:
    """Atomically replace `directory/name` by `data`: temporary file, fsync, rename,
    fsync the directory (also what `bpfexec.server.state_files` writes with). Not
    `durable`: no fsync (the rename is still atomic for readers; a crash may lose it)."""
    fd, temporary = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            if durable:
                out.flush()
                os.fsync(out.fileno())
        os.replace(temporary, directory / name)
    except BaseException:
        _unlink(Path(temporary))
        raise
    if durable:
        sync_directory(directory)


def sync_directory(directory: Path) -> None:
    """Make renames and unlinks durable (where the platform lets a directory be fsynced)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _metadata_json(
    name: str | None, tenants: Iterable[str], names: Mapping[str, str | None] | None = None
) -> bytes:
    data: dict[str, object] = {"name": name, "tenants": sorted(set(tenants))}
    if names:
        data["names"] = dict(sorted(names.items()))
    return json.dumps(data).encode()


def _unlink(path: Path) -> bool:
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True
