"""`RedisModuleStore`: the module store on Redis (or Valkey), shared by replicas.

`--store redis://HOST:PORT/DB` (`rediss://` for TLS; a password or an ACL
user and password in the URL as `redis://user:password@host`) keeps every
accepted module in Redis instead of a directory, so that any replica serves
any module without the client uploading it again: a replica that does not
have a module in its cache reads it from Redis (`ExecutionService.get`).
Modules are content-addressed, so replicas never disagree about what an id
is; what they share is who uploaded it (its tenants) and under which name.

Keys, under a prefix (`bpfexec:` by default):

- `module:<hex>`: a hash, `code` (the bytes, whose sha256 is `<hex>`) and
  `name` (the first name given, JSON);
- `module:<hex>:tenants`: a hash, tenant -> the name that tenant gave (JSON);
- `modules`: a sorted set of `<hex>` by first upload time (for `ids`).

Every change is one MULTI/EXEC transaction or one Lua script, so no reader,
on any replica, sees half of it. It is acknowledged once Redis has applied
it; how durable that is across a Redis crash is Redis's persistence setting
(`appendonly yes` with `appendfsync always` loses nothing acknowledged;
docs/deploy.md). Reads check the content hash as the directory store does.

When Redis cannot be reached (down, restarting, too slow: `socket_timeout`),
every operation raises `StoreUnavailable`, which the service answers with
UNAVAILABLE; requests that do not need the store (a module in the cache) go
on working. A command that fails on a broken connection is retried on a new
one a few times first, so a Redis restart costs requests only while it is down.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from collections.abc import Iterable, Iterator

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from bpfexec.server.executor import ServiceError
from bpfexec.server.metrics import Metrics
from bpfexec.server.store import StoredModule
from bpfexec.vm.program import content_id

log = logging.getLogger(__name__)

_ID = re.compile(r"sha256:([0-9a-f]{64})")
SOCKET_TIMEOUT = 5.0  # seconds a Redis command may take before the store is unavailable
CONNECT_TIMEOUT = 2.0
RETRIES = 3  # reconnections tried for one command (exponential backoff, at most 0.25 s apart)

# Forget one tenant's upload; the module goes with its last tenant.
_REMOVE_TENANT = """
redis.call('HDEL', KEYS[2], ARGV[1])
if redis.call('HLEN', KEYS[2]) == 0 then
  redis.call('DEL', KEYS[1], KEYS[2])
  redis.call('ZREM', KEYS[3], ARGV[2])
end
return 0
"""


class StoreUnavailable(ServiceError):
    """The module store cannot be reached: the request needs it (UNAVAILABLE)."""

    def __init__(self, what: str, error: Exception) -> None:
        super().__init__(f"the module store (Redis) is unavailable: {what} failed: {error}")


def redis_client(url: str) -> redis.Redis:
    """A client of the Redis at `url`, with the stores' timeouts and retries."""
    return redis.Redis.from_url(
        url,
        socket_timeout=SOCKET_TIMEOUT,
        socket_connect_timeout=CONNECT_TIMEOUT,
        retry=Retry(ExponentialBackoff(cap=0.25, base=0.05), RETRIES),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        health_check_interval=30,
    )


class RedisModuleStore:
    """The `bpfexec.server.store.ModuleStore` interface on Redis."""

    def __init__(self, url: str, metrics: Metrics, prefix: str = "bpfexec:") -> None:
        self._client = redis_client(url)
        self._metrics = metrics
        self._prefix = prefix
        self._remove_tenant = self._client.register_script(_REMOVE_TENANT)
        self.location = redacted(url)

    def check(self) -> None:
        """Ping Redis, and warn when its persistence may lose acknowledged writes."""
        with self._available("PING"):
            self._client.ping()
        with contextlib.suppress(redis.RedisError):  # CONFIG may be disabled (managed Redis)
            config = self._client.config_get("append*")
            if config.get("appendonly") != "yes" or config.get("appendfsync") != "always":
                log.warning(
                    "module store %s: appendonly=%s appendfsync=%s: a Redis crash may lose "
                    "modules it acknowledged (docs/deploy.md)",
                    self.location, config.get("appendonly"), config.get("appendfsync"),
                )  # fmt: skip

    def ids(self) -> list[str]:
        """The ids of every stored module, oldest first."""
        with self._available("listing modules"):
            found = self._client.zrange(self._key("modules"), 0, -1)
        return ["sha256:" + _text(hexa) for hexa in found]

    def has(self, module_id: str) -> bool:
        hexa = _hex(module_id)
        if hexa is None:
            return False
        with self._available(f"looking up {module_id}"):
            return bool(self._client.exists(self._module(hexa)))

    def read(self, module_id: str) -> StoredModule | None:
        """The stored module, or None if absent or corrupt (a corrupt one is logged, kept)."""
        hexa = _hex(module_id)
        if hexa is None:
            return None
        with self._available(f"reading {module_id}"):
            pipe = self._client.pipeline(transaction=True)  # one consistent snapshot
            pipe.hmget(self._module(hexa), ["code", "name"])
            pipe.hgetall(self._tenants(hexa))
            (code, name), tenants = pipe.execute()
        if code is None:
            return None
        if content_id(code) != module_id:
            self._metrics.store_corrupt.inc()
            log.error("module store %s: %s does not match its sha256; not served",
                      self.location, module_id)  # fmt: skip
            return None
        names = {t.decode(): json.loads(n) for t, n in tenants.items()}
        return StoredModule(module_id, code, _name(name), frozenset(names), names)

    def tenants(self, module_id: str) -> frozenset[str]:
        hexa = _hex(module_id)
        if hexa is None:
            return frozenset()
        with self._available(f"reading the tenants of {module_id}"):
            return frozenset(_text(t) for t in self._client.hkeys(self._tenants(hexa)))

    def save(self, module_id: str, code: bytes, name: str | None, tenants: Iterable[str]) -> None:
        """Keep `code` (if not kept already) and its tenants, before returning."""
        hexa = self._checked(module_id, code)
        tenants = list(tenants)
        with self._available(f"storing {module_id}"):
            pipe = self._client.pipeline(transaction=True)
            pipe.hsetnx(self._module(hexa), "code", code)
            pipe.hset(self._module(hexa), "name", json.dumps(name))
            pipe.delete(self._tenants(hexa))
            if tenants:
                pipe.hset(self._tenants(hexa), mapping={t: json.dumps(name) for t in tenants})
            pipe.zadd(self._key("modules"), {hexa: time.time()}, nx=True)
            pipe.execute()

    def add_tenant(self, module_id: str, code: bytes, name: str | None, tenant: str) -> None:
        """Record that `tenant` uploaded `code` (as `name`), before returning."""
        hexa = self._checked(module_id, code)
        with self._available(f"storing {module_id}"):
            pipe = self._client.pipeline(transaction=True)
            pipe.hset(self._module(hexa), "code", code)
            pipe.hsetnx(self._module(hexa), "name", json.dumps(name))  # the first name stays
            pipe.hset(self._tenants(hexa), tenant, json.dumps(name))
            pipe.zadd(self._key("modules"), {hexa: time.time()}, nx=True)
            pipe.execute()

    def remove_tenant(self, module_id: str, tenant: str) -> None:
        """Forget `tenant`'s upload; the module goes once no tenant remains."""
        hexa = _hex(module_id)
        if hexa is None:
            return
        with self._available(f"deleting {module_id}"):
            keys = [self._module(hexa), self._tenants(hexa), self._key("modules")]
            self._remove_tenant(keys=keys, args=[tenant, hexa])

    def set_tenants(self, module_id: str, name: str | None, tenants: Iterable[str]) -> None:
        hexa = _hex(module_id)
        if hexa is None:
            return
        tenants = list(tenants)
        with self._available(f"storing {module_id}"):
            pipe = self._client.pipeline(transaction=True)
            pipe.hset(self._module(hexa), "name", json.dumps(name))
            pipe.delete(self._tenants(hexa))
            if tenants:
                pipe.hset(self._tenants(hexa), mapping={t: json.dumps(None) for t in tenants})
            pipe.execute()

    def delete(self, module_id: str) -> bool:
        """Forget a module; False if it was not stored."""
        hexa = _hex(module_id)
        if hexa is None:
            return False
        with self._available(f"deleting {module_id}"):
            pipe = self._client.pipeline(transaction=True)
            pipe.delete(self._module(hexa), self._tenants(hexa))
            pipe.zrem(self._key("modules"), hexa)
            deleted, _ = pipe.execute()
        return bool(deleted)

    def close(self) -> None:
        self._client.close()

    @contextlib.contextmanager
    def _available(self, what: str) -> Iterator[None]:
        try:
            yield
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError) as exc:
            raise StoreUnavailable(what, exc) from None

    def _checked(self, module_id: str, code: bytes) -> str:
        hexa = _hex(module_id)
        if hexa is None or content_id(code) != module_id:
            raise ValueError(f"module id {module_id} is not the sha256 of its {len(code)} bytes")
        return hexa

    def _key(self, name: str) -> str:
        return self._prefix + name

    def _module(self, hexa: str) -> str:
        return f"{self._prefix}module:{hexa}"

    def _tenants(self, hexa: str) -> str:
        return f"{self._prefix}module:{hexa}:tenants"


def _hex(module_id: str) -> str | None:
    match = _ID.fullmatch(module_id)
    return match.group(1) if match else None


def _text(value: object) -> str:
    """A key or member as Redis returns it (bytes: the client does not decode)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _name(stored: bytes | None) -> str | None:
    if stored is None:
        return None
    name = json.loads(stored)
    return None if name is None else str(name)


def redacted(url: str) -> str:
    """The URL without its password, for logs."""
    return re.sub(r"//([^:@/]*):[^@/]*@", r"//\1:***@", url)
