"""`RedisStates`: named states on Redis (or Valkey), shared by every worker and replica.

`--state-store redis://HOST:PORT/DB` (`rediss://` for TLS, a password or an
ACL user in the URL as for `--store`) keeps every named state in Redis, so
that any process of any replica runs on the same maps. It keeps the model of
docs/state.md: one request at a time per state, its changes committed
together at its end, as `bpfexec.server.states.StateRegistry.hold` drives it:

1. `acquire`: a lease on the state (`SET NX PX` of a random token), renewed
   every third of its time by a thread while the request runs, and the
   state's version (its epoch and commit count), in one script;
2. the registry reads the whole state (`read`) only when its copy is not at
   that version: another process changed it since;
3. `commit`: one script that checks the lease is still this request's (a
   request whose lease expired, its server frozen or cut off, is refused:
   fenced by the token), writes the maps that changed, counts a new version
   and releases the lease. Lua scripts run atomically and are replicated and
   written to the AOF as one transaction: no reader sees half a commit.

A process killed while holding a lease commits nothing; the lease expires
(`lease_seconds`) and the next request finds the state as the last commit
left it.

Keys, under the prefix (`bpfexec:`), `<h>` the sha256 of the state's key
(`bpfexec.server.state_files.state_digest`):

- `state:<h>`: a hash: `key` (JSON [tenant, module id, name]), `specs`
  (the maps' definitions, JSON), `epoch` (random, new each time the state is
  created), `version` (commits since), `map:<n>` (map n's entries,
  `bpfexec.server.state_files.pack_entries`);
- `state:<h>:lease`: the lease token, with its expiry;
- `states:<sha256 of the tenant>`: a set of the tenant's `<h>`, for listing.

Redis unreachable, restarting or slower than the stores' socket timeout
(`bpfexec.server.store_redis.SOCKET_TIMEOUT`): every
operation raises `StateStoreUnavailable` (UNAVAILABLE); requests without a
state do not use Redis at all.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import secrets
import threading
from collections.abc import Collection, Iterator
from typing import cast

import redis

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
from bpfexec.server.store_redis import redacted, redis_client
from bpfexec.vm.machine import Interrupt

log = logging.getLogger(__name__)

LEASE_SECONDS = 5.0  # a lease not renewed for this long expires (its holder is gone)
_FIRST_WAIT = 0.0005  # seconds between tries for a leased state: doubling up to _MOST_WAIT
_MOST_WAIT = 0.02

# KEYS: lease, state. ARGV: token, milliseconds. The state's epoch and version,
# or nil when another request holds the lease.
_ACQUIRE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return redis.call('HMGET', KEYS[2], 'epoch', 'version')
end
return nil
"""

# KEYS: lease, state, tenant's set. ARGV: token, epoch if new, key JSON,
# specs JSON, the state's digest, then field, value pairs.
_COMMIT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('LEASE_LOST')
end
local epoch = redis.call('HGET', KEYS[2], 'epoch')
if not epoch then
  epoch = ARGV[2]
  redis.call('HSET', KEYS[2], 'epoch', epoch, 'key', ARGV[3], 'specs', ARGV[4])
  redis.call('SADD', KEYS[3], ARGV[5])
end
for i = 6, #ARGV, 2 do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
end
local version = redis.call('HINCRBY', KEYS[2], 'version', 1)
redis.call('DEL', KEYS[1])
return {epoch, version}
"""

# KEYS: lease, state, tenant's set. ARGV: token, the state's digest. 1 if it existed.
_DELETE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('LEASE_LOST')
end
local existed = redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[3], ARGV[2])
redis.call('DEL', KEYS[1])
return existed
"""

# KEYS: lease. ARGV: token, milliseconds (0: release).
_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
if ARGV[2] == '0' then
  redis.call('DEL', KEYS[1])
else
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 1
"""


class RedisStates:
    """The `bpfexec.server.states.SharedStates` interface on Redis."""

    def __init__(
        self, url: str, prefix: str = "bpfexec:", lease_seconds: float = LEASE_SECONDS
    ) -> None:
        self._client = redis_client(url)
        self._prefix = prefix
        self.lease_ms = max(int(lease_seconds * 1000), 100)
        self.location = redacted(url)
        self._acquire = self._client.register_script(_ACQUIRE)
        self._commit = self._client.register_script(_COMMIT)
        self._delete = self._client.register_script(_DELETE)
        self._renew = self._client.register_script(_RENEW)
        self._held: dict[str, str] = {}  # token -> lease key, renewed until released
        self._held_lock = threading.Lock()
        self._closed = threading.Event()
        self._renewer: threading.Thread | None = None

    def check(self) -> None:
        with self._available("PING"):
            self._client.ping()

    def acquire(self, key: StateKey, deadline: float, interrupt: Interrupt | None) -> Lease:
        digest = state_digest(key)
        keys = [self._lease_key(digest), self._state_key(digest)]
        token = secrets.token_hex(16)

        def attempt() -> list[bytes | None] | None:
            with self._available(f"leasing state {key.name!r}"):
                return self._acquire(keys=keys, args=[token, self.lease_ms])  # type: ignore[no-any-return]

        busy = (
            f"state {key.name!r} of module {key.module_id!r} stayed in use by other requests "
            "(on this or other servers) until this one's deadline"
        )
        found = retry_until(attempt, deadline, interrupt, busy, _FIRST_WAIT, _MOST_WAIT)
        epoch, number = found
        self._hold(token, keys[0])
        return Lease(key, token, Version(_text(epoch), int(number or 0)))

    def release(self, lease: Lease) -> None:
        lease_key = self._unhold(lease)
        with self._available(f"releasing state {lease.key.name!r}"):
            self._renew(keys=[lease_key], args=[lease.token, 0])

    def commit(
        self,
        lease: Lease,
        specs: tuple[MapSpec, ...],
        packed: list[bytes],
        changed: Collection[int],
    ) -> Version:
        key = lease.key
        digest = state_digest(key)
        lease_key = self._unhold(lease)
        fields: list[bytes | str] = []
        for n in sorted(changed):
            fields += [f"map:{n}", packed[n]]
        args = [
            lease.token,
            secrets.token_hex(8),
            json.dumps([key.tenant, key.module_id, key.name]),
            specs_json(specs),
            digest,
            *fields,
        ]
        keys = [lease_key, self._state_key(digest), self._tenant_key(key.tenant)]
        with self._available(f"committing state {key.name!r}"), self._fenced(key):
            epoch, number = self._commit(keys=keys, args=args)
        return Version(_text(epoch), int(number))

    def delete(self, lease: Lease) -> bool:
        key = lease.key
        digest = state_digest(key)
        lease_key = self._unhold(lease)
        keys = [lease_key, self._state_key(digest), self._tenant_key(key.tenant)]
        with self._available(f"deleting state {key.name!r}"), self._fenced(key):
            return bool(self._delete(keys=keys, args=[lease.token, digest]))

    def read(self, key: StateKey) -> tuple[StoredState, Version] | None:
        with self._available(f"reading state {key.name!r}"):
            stored = self._client.hgetall(self._state_key(state_digest(key)))
        found = cast(dict[bytes, bytes], stored)
        if not found or b"epoch" not in found:
            return None
        try:
            specs = specs_from_json(found[b"specs"])
            entries = tuple(
                unpack_entries(spec, found.get(f"map:{n}".encode(), b""))
                for n, spec in enumerate(specs)
            )
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise StateStoreUnavailable(
                f"state {key.name!r} in {self.location} cannot be read: {exc}"
            ) from None
        version = Version(_text(found[b"epoch"]), int(found.get(b"version", 0)))
        return StoredState(key, specs, entries), version

    def summaries(self, tenant: str, module_id: str = "") -> list[StateSummary]:
        with self._available("listing states"):
            digests = sorted(self._client.smembers(self._tenant_key(tenant)))
            pipe = self._client.pipeline(transaction=False)
            for digest in digests:
                pipe.hmget(self._state_key(_text(digest) or ""), ["key", "specs"])
            rows = pipe.execute() if digests else []
        found = []
        for stored_key, specs in rows:
            if stored_key is None or specs is None:
                continue  # deleted meanwhile
            key = StateKey(*(str(part) for part in json.loads(stored_key)))
            if key.tenant == tenant and (not module_id or key.module_id == module_id):
                found.append(StateSummary(key, specs_from_json(specs)))
        return found

    def close(self) -> None:
        self._closed.set()
        self._client.close()

    def _hold(self, token: str, lease_key: str) -> None:
        with self._held_lock:
            self._held[token] = lease_key
            if self._renewer is None:
                self._renewer = threading.Thread(
                    target=self._renew_leases, name="state-leases", daemon=True
                )
                self._renewer.start()

    def _unhold(self, lease: Lease) -> str:
        with self._held_lock:
            self._held.pop(lease.token, None)
        return self._lease_key(state_digest(lease.key))

    def _renew_leases(self) -> None:
        """Keep every held lease alive: every third of its time, for as long as held."""
        while not self._closed.wait(self.lease_ms / 3000):
            with self._held_lock:
                held = list(self._held.items())
            for token, lease_key in held:
                try:
                    kept = self._renew(keys=[lease_key], args=[token, self.lease_ms])
                except redis.RedisError as exc:
                    log.warning("state store %s: renewing a lease failed: %s", self.location, exc)
                    continue
                if not kept:  # expired: the commit will be refused
                    with self._held_lock:
                        self._held.pop(token, None)

    @contextlib.contextmanager
    def _available(self, what: str) -> Iterator[None]:
        try:
            yield
        except redis.ResponseError as exc:
            if "LEASE_LOST" in str(exc):
                raise  # for `_fenced`
            raise StateStoreUnavailable(f"the state store (Redis) refused {what}: {exc}") from None
        except redis.RedisError as exc:  # down, restarting, too slow, out of memory...
            raise StateStoreUnavailable(
                f"the state store (Redis) is unavailable: {what} failed: {exc}"
            ) from None

    @contextlib.contextmanager
    def _fenced(self, key: StateKey) -> Iterator[None]:
        try:
            yield
        except redis.ResponseError as exc:
            if "LEASE_LOST" not in str(exc):
                raise
            raise StateStoreUnavailable(
                f"state {key.name!r}: this request's lease on it expired before its end (its "
                "server was too slow, frozen or cut off from the state store); nothing of it "
                "was committed"
            ) from None

    def _state_key(self, digest: str) -> str:
        return f"{self._prefix}state:{digest}"

    def _lease_key(self, digest: str) -> str:
        return f"{self._prefix}state:{digest}:lease"

    def _tenant_key(self, tenant: str) -> str:
        return f"{self._prefix}states:{hashlib.sha256(tenant.encode()).hexdigest()}"


def _text(value: object) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)
