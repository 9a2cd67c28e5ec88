"""Who may call the server: TLS credentials and bearer tokens, and the caller's tenant.

- `server_credentials(settings)`: TLS (`--tls-cert`, `--tls-key`), mutual TLS
  when `--tls-client-ca` is set; None for a plaintext port.
- `Authenticator`: the tokens of `--auth-tokens-file`, one per line, either
  `TOKEN` (tenant `default`) or `TENANT:TOKEN` (the tenant name cannot contain
  `:`, the token can). Blank lines and lines starting with `#` are skipped.
  A presented token is compared with every accepted one, each through a
  sha256 digest and `hmac.compare_digest`, so the time taken says nothing
  about how close a guess was, nor which token it resembled.
  A running server reads the file again on SIGHUP (`reload`) and when its
  inode, size or modification time changed (`reload_if_changed`, checked at
  most every `--auth-reload-interval` seconds, when a call arrives). A file
  that cannot be used is logged as an ERROR and the previous tokens stay in
  force; each reload swaps in a new immutable table, so a call sees either
  the old tokens or the new ones, never a mix.
- `AuthInterceptor`: `UNAUTHENTICATED` for a call without a valid
  `authorization: Bearer <token>` metadata entry; health checks and
  reflection stay open so probes and tools need no secret.

Tokens never leave this module: not in a message, a log line or a metric.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc

from bpfexec.server.metrics import Metrics
from bpfexec.server.settings import Settings

DEFAULT_TENANT = "default"
OPEN_SERVICES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
_SCHEME = "bearer "

log = logging.getLogger(__name__)

# (tenant, sha256 of the token) for every accepted token; replaced whole, never changed.
TokenTable = tuple[tuple[str, bytes], ...]
# What tells a changed file from the one already read: device, inode, size, mtime (ns).
FileSignature = tuple[int, int, int, int]


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials for the gRPC port as `settings` asks; None: plaintext."""
    if not settings.tls_cert:
        return None
    key = Path(settings.tls_key).read_bytes()
    chain = Path(settings.tls_cert).read_bytes()
    client_ca = Path(settings.tls_client_ca).read_bytes() if settings.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


class Authenticator:
    """The accepted tokens and their tenants; from a file, kept in step with it."""

    def __init__(self, entries: Sequence[tuple[str, str]]) -> None:
        self._table = _table(entries)
        self._path: Path | None = None  # the tokens file, if the tokens came from one
        self._signature: FileSignature | None = None  # of the file last read (or tried)
        self._reload_interval = 0.0
        self._next_check = 0.0  # time.monotonic() of the next look at the file
        self._reloading = threading.Lock()

    @classmethod
    def from_file(cls, path: str | Path, reload_interval: float = 0.0) -> Authenticator:
        """Tokens from a file (see the module docstring); ValueError names the file and line.

        `reload_interval` > 0: a call arriving at least that many seconds after the
        last look at the file checks whether it changed, and reloads it if so.
        """
        path = Path(path)
        entries, signature = read_tokens(path)
        authenticator = cls(entries)
        authenticator._path = path
        authenticator._signature = signature
        authenticator._reload_interval = reload_interval
        authenticator._next_check = time.monotonic() + reload_interval
        return authenticator

    def reload(self) -> bool:
        """Read the tokens file again (what SIGHUP does); True if its tokens are now in force.

        A file that cannot be read or parsed is logged (one ERROR line naming the
        file and the problem, never a token) and the previous tokens stay in force.
        """
        with self._reloading:
            return self._reload(force=True)

    def reload_if_changed(self) -> bool:
        """`reload` if the file's inode, size or modification time is not the one last read."""
        with self._reloading:
            return self._reload(force=False)

    def _reload(self, force: bool) -> bool:
        if self._path is None:
            return False
        try:
            current: FileSignature | None = _signature(os.stat(self._path))
        except OSError:
            current = None  # gone, or unreadable: reading it says why
        if not force and current == self._signature:
            return False
        # Remembered even if the file is broken: it is reported once, not at every check.
        self._signature = current
        try:
            entries, signature = read_tokens(self._path)
        except ValueError as exc:
            log.error(
                "auth tokens not reloaded: %s; the previous %d tokens stay in force",
                exc,
                len(self._table),
            )
            return False
        self._signature = signature
        self._table = _table(entries)
        tenants = len({tenant for tenant, _ in entries})
        log.info("reloaded %s: %d tokens of %d tenants", self._path, len(entries), tenants)
        return True

    def _check_file(self) -> None:
        """`reload_if_changed` if the reload interval has passed since the last look."""
        if not self._reload_interval or time.monotonic() < self._next_check:
            return
        if not self._reloading.acquire(blocking=False):
            return  # another thread is reloading: use the tokens in force meanwhile
        try:
            self._next_check = time.monotonic() + self._reload_interval
            self._reload(force=False)
        finally:
            self._reloading.release()

    def tenant(self, metadata: Sequence[tuple[str, Any]] | None) -> str | None:
        """The tenant of the call's bearer token; None if it has no valid one."""
        self._check_file()
        presented = bearer_token(metadata)
        if presented is None:
            return None
        digest = _digest(presented)
        found = None
        for tenant, accepted in self._table:  # every entry, match or not: constant time
            if hmac.compare_digest(digest, accepted) and found is None:
                found = tenant
        return found

    def tenant_of(self, context: grpc.aio.ServicerContext) -> str:
        """The caller's tenant, for the servicer (the interceptor has let only valid calls in)."""
        return self.tenant(context.invocation_metadata()) or ""

    def interceptor(self, metrics: Metrics) -> grpc.aio.ServerInterceptor:
        return AuthInterceptor(self, metrics)


def read_tokens(path: Path) -> tuple[list[tuple[str, str]], FileSignature]:
    """The (tenant, token) entries of a tokens file and the signature of what was read.

    Every ValueError names the file, and the line if one is wrong, never a token.
    """
    try:
        with path.open("rb") as file:
            signature = _signature(os.fstat(file.fileno()))
            data = file.read()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the tokens file: {exc.strerror or exc}") from None
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise ValueError(f"{path}: the tokens file is not UTF-8 text") from None
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        tenant, colon, token = line.partition(":")
        if not colon:
            tenant, token = DEFAULT_TENANT, line
        if not tenant.strip() or not token.strip():
            raise ValueError(f"{path}:{number}: expected TOKEN or TENANT:TOKEN")
        entries.append((tenant.strip(), token.strip()))
    if not entries:
        raise ValueError(f"{path}: no tokens (one per line, TOKEN or TENANT:TOKEN)")
    return entries, signature


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without a valid bearer token, except to `OPEN_SERVICES`."""

    def __init__(self, authenticator: Authenticator, metrics: Metrics) -> None:
        self._authenticator = authenticator
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_SERVICES):
            return handler
        metadata = handler_call_details.invocation_metadata
        if self._authenticator.tenant(metadata) is not None:
            return handler
        self._metrics.auth_failures.inc()
        reason = (
            "missing `authorization: Bearer <token>` metadata"
            if bearer_token(metadata) is None
            else "the bearer token is not accepted by this server"
        )
        return _refusal(handler, reason)


def bearer_token(metadata: Sequence[tuple[str, Any]] | None) -> str | None:
    """The token of the `authorization: Bearer <token>` entry, if any."""
    for key, value in metadata or ():
        if key.lower() == "authorization":
            text = value.decode() if isinstance(value, bytes) else str(value)
            if text[: len(_SCHEME)].lower() == _SCHEME and text[len(_SCHEME) :].strip():
                return text[len(_SCHEME) :].strip()
    return None


def _table(entries: Sequence[tuple[str, str]]) -> TokenTable:
    if not entries:
        raise ValueError("no tokens given: authentication would refuse every call")
    return tuple((tenant, _digest(token)) for tenant, token in entries)


def _signature(stat: os.stat_result) -> FileSignature:
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


def _digest(token: str) -> bytes:
    # Equal-length digests: compare_digest then leaks not even the token's length.
    return hashlib.sha256(token.encode()).digest()


def _refusal(handler: grpc.RpcMethodHandler, reason: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that answers UNAUTHENTICATED."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"unauthenticated: {reason}")

    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(
        refuse,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
