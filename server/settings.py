"""`Settings`: every knob of the server, in one frozen value.

The fields of `Settings` (and of `bpfexec.vm.Limits`, flattened into the same
namespace) are the single source of truth: `add_arguments` derives one
command-line flag per field (`--max-concurrent-executions`, `--max-fuel`) and
`Settings.from_args` reads each value from the flag, else from the environment
variable of the same name (`BPFEXEC_MAX_CONCURRENT_EXECUTIONS`,
`BPFEXEC_MAX_FUEL`), else the field's default. The CLI, the server and the tests
all build their settings here; no other module parses a flag or a variable.
A local `bpfexec run` takes the `Limits` part alone (`add_limit_arguments`,
`limits_from_args`): the same flags and variables as `serve`.

List-valued knobs (`helpers`) take the flag once per value, or a comma-separated
environment variable. Boolean knobs take `--x/--no-x` and `1/0`, `true/false`,
`yes/no`, `on/off` in the environment.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from bpfexec.vm import Limits
from bpfexec.vm.machine import available_engines

ENV_PREFIX = "BPFEXEC_"
_TIER_KNOBS = (
    "jit_quick_max_function_instructions",
    "jit_quick_max_instructions",
    "jit_optimized_max_function_instructions",
    "jit_optimized_max_instructions",
)
ENGINES = available_engines()
LOG_FORMATS = ("text", "json")


def is_redis_url(location: str) -> bool:
    """Whether a `--store` or `--state-store` location names a Redis."""
    return location.startswith(("redis://", "rediss://", "unix://"))


def _knob(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Settings:
    host: str = _knob("127.0.0.1", "address to listen on for gRPC and metrics (0.0.0.0: all)")
    port: int = _knob(50051, "gRPC port (0: pick a free one)")
    metrics_port: int = _knob(9090, "Prometheus metrics HTTP port (0: no metrics server)")
    helpers: tuple[str, ...] = _knob(
        (),
        "in-process helpers to add, as MODULE:ATTR naming a bpfexec.vm.HelperRegistry (repeatable)",
    )
    native_helpers: tuple[str, ...] = _knob(
        (),
        "native helpers to load, as LIBRARY:SYMBOL[=NUMBER] (repeatable): C functions "
        "of a shared library, the operator's trusted code (docs/native-helpers.md)",
    )
    entry_point_helpers: bool = _knob(
        True, "load the helper registries of the 'bpfexec.helpers' entry-point group"
    )
    engine: str = _knob(
        ENGINES[-1],
        "execution engine: jit (native code, compiled in the background after an upload; "
        "the interpreter serves until it is ready) or interpreter",
    )
    max_concurrent_executions: int = _knob(
        16, "executions running at once; beyond, Execute answers RESOURCE_EXHAUSTED"
    )
    max_concurrent_requests: int = _knob(
        1000,
        "Executor calls in progress at once, per process (uploads, executions, streams, "
        "whether running or waiting); beyond, a call is refused with RESOURCE_EXHAUSTED",
    )
    cache_max_modules: int = _knob(1024, "modules kept in the cache (least recently used go)")
    cache_max_bytes: int = _knob(
        256 << 20,
        "estimated memory of the modules kept in the cache, in bytes (decoded code, names, "
        "native code); a module estimated larger is refused",
    )
    max_name_bytes: int = _knob(
        256,
        "longest name a request may carry, in UTF-8 bytes (module name, module id, function, "
        "helper names); longer: INVALID_ARGUMENT",
    )
    max_offered_helpers: int = _knob(
        1024, "helpers one ExecuteStream may offer (numbers and names together)"
    )
    remote_helper_timeout: float = _knob(
        10.0, "seconds a client gets to answer one remote helper call (then HELPER_ERROR)"
    )
    max_memory_read_bytes: int = _knob(
        1 << 20,
        "largest MemoryRead a remote helper may ask for, in bytes (with until_nul, the longest "
        "string); beyond, the read is answered with an error",
    )
    max_stream_outbox_bytes: int = _knob(
        2 << 20,
        "bytes of answers an ExecuteStream queues for a client that does not read them; when "
        "full, the server stops reading that client's requests until it does",
    )
    grace_period: float = _knob(10.0, "seconds in-flight requests get to finish on SIGTERM/SIGINT")
    jit_compile_workers: int = _knob(
        2,
        "JIT compile worker processes (quick tiers first, smaller modules first; 0: compile "
        "in the server process, one module at a time)",
    )
    jit_compile_timeout: float = _knob(
        60.0, "seconds one JIT compile may take in a worker; then the module keeps its tier"
    )
    jit_quick_max_function_instructions: int = _knob(
        65536, "eBPF instructions in one function beyond which a module runs on the interpreter"
    )
    jit_quick_max_instructions: int = _knob(
        131072, "eBPF instructions in a module beyond which it runs on the interpreter"
    )
    jit_optimized_max_function_instructions: int = _knob(
        4096, "eBPF instructions in one function beyond which a module keeps the quick tier"
    )
    jit_optimized_max_instructions: int = _knob(
        16384, "eBPF instructions in a module beyond which it keeps the quick tier"
    )
    jit_compile_memory_bytes: int = _knob(
        2 << 30, "address space of each JIT compile worker process (RLIMIT_AS; 0: no limit)"
    )
    workers: int = _knob(
        1, "server processes sharing the port (SO_REUSEPORT); metrics are summed across them"
    )
    max_message_bytes: int = _knob(64 << 20, "largest gRPC message accepted or sent, in bytes")
    store: str = _knob(
        "",
        "directory keeping every accepted module and named state on disk, or a Redis URL "
        "(redis://[user:password@]HOST:PORT/DB, rediss:// with TLS) keeping the modules, "
        "shared by every replica (empty: memory only)",
    )
    state_store: str = _knob(
        "",
        "Redis URL (redis://[user:password@]HOST:PORT/DB, rediss:// with TLS) keeping every "
        "named state, shared by every worker and replica, one request at a time per state "
        "(empty: states kept by the server itself, docs/state.md)",
    )
    state_lease_seconds: float = _knob(
        5.0,
        "with --state-store: how long a state stays leased to a server that stopped renewing "
        "it (killed, frozen or cut off) before another may take it",
    )
    max_state_bytes: int = _knob(
        64 << 20,
        "map memory of one named state, in bytes (the values of its module's maps); a state "
        "that would take more is not created (RESOURCE_EXHAUSTED)",
    )
    max_states_bytes: int = _knob(
        512 << 20,
        "map memory of all named states together, per server process, in bytes; beyond, "
        "creating a state is refused (RESOURCE_EXHAUSTED)",
    )
    max_states: int = _knob(
        4096, "named states kept at once, per server process; beyond, creating one is refused"
    )
    auth_tokens_file: str = _knob(
        "", "file of accepted bearer tokens, one per line, optionally TENANT:TOKEN (empty: no auth)"
    )
    auth_reload_interval: float = _knob(
        5.0,
        "seconds between checks, as calls arrive, for a changed --auth-tokens-file "
        "(inode, size, mtime); 0: reload on SIGHUP only",
    )
    shared_modules: bool = _knob(
        False, "with auth: every tenant sees every module (default: only the uploader's tenant)"
    )
    tls_cert: str = _knob("", "PEM certificate chain of the server (with --tls-key: TLS)")
    tls_key: str = _knob("", "PEM private key of the server")
    tls_client_ca: str = _knob("", "PEM CA certificates; clients must present one it signed (mTLS)")
    log_format: str = _knob("text", "log format: text or json (one line per request either way)")
    limits: Limits = field(default_factory=Limits, metadata={"help": "VM limits"})

    def __post_init__(self) -> None:
        for name in ("port", "metrics_port"):
            if not 0 <= getattr(self, name) < 1 << 16:
                raise ValueError(f"{name} {getattr(self, name)} is not a TCP port (0..65535)")
        for name in (
            "max_concurrent_executions",
            "max_concurrent_requests",
            "cache_max_modules",
            "cache_max_bytes",
            "max_name_bytes",
            "max_memory_read_bytes",
            "max_stream_outbox_bytes",
            "max_state_bytes",
            "max_states_bytes",
            "max_states",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.remote_helper_timeout <= 0:
            raise ValueError(
                f"remote_helper_timeout must be positive, got {self.remote_helper_timeout}"
            )
        for name in ("jit_compile_workers", "jit_compile_memory_bytes", *_TIER_KNOBS):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.jit_compile_timeout <= 0:
            timeout = self.jit_compile_timeout
            raise ValueError(f"jit_compile_timeout must be positive, got {timeout}")
        if self.workers < 1:
            raise ValueError(f"workers must be at least 1, got {self.workers}")
        if self.state_store and not is_redis_url(self.state_store):
            raise ValueError(
                f"state_store {self.state_store!r} is not a Redis URL (redis://HOST:PORT/DB)"
            )
        if self.state_lease_seconds < 0.1:
            raise ValueError(
                f"state_lease_seconds must be at least 0.1, got {self.state_lease_seconds}"
            )
        for name in ("grace_period", "auth_reload_interval"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.engine not in ENGINES:
            raise ValueError(f"unknown engine {self.engine!r} (available: {', '.join(ENGINES)})")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together: give both or neither")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        if self.log_format not in LOG_FORMATS:
            raise ValueError(
                f"unknown log_format {self.log_format!r} (available: {', '.join(LOG_FORMATS)})"
            )

    @classmethod
    def from_args(
        cls, namespace: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None
    ) -> Settings:
        """Settings from parsed flags, then `BPFEXEC_*` variables, then defaults."""
        given = vars(namespace) if namespace is not None else {}
        environ = environ if environ is not None else {}
        return cls(**_values(cls, given, environ), limits=limits_from_args(namespace, environ))


def limits_from_args(
    namespace: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None
) -> Limits:
    """`Limits` from parsed flags (`add_limit_arguments`), then `BPFEXEC_*` variables."""
    given = vars(namespace) if namespace is not None else {}
    return Limits(**_values(Limits, given, environ if environ is not None else {}))


def _values(target: type, given: Mapping[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for knob, kind in _knobs(target):
        if given.get(knob.name) is not None:
            value = given[knob.name]
            found[knob.name] = tuple(value) if kind is tuple else value
        elif _env_name(knob.name) in environ:
            found[knob.name] = _parse(knob.name, kind, environ[_env_name(knob.name)])
    return found


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per knob of `Settings` and `bpfexec.vm.Limits` to `parser`.

    Every flag defaults to None so `Settings.from_args` can tell "not given"
    from "given the default" and fall back to the environment.
    """
    defaults = Settings()
    _add_knobs(parser, Settings, defaults)
    _add_knobs(parser, Limits, defaults.limits)


def add_limit_arguments(parser: argparse._ActionsContainer) -> None:
    """Add one flag per knob of `bpfexec.vm.Limits` to `parser` (a local `bpfexec run`),
    an ArgumentParser or one of its argument groups (their common base is private)."""
    _add_knobs(parser, Limits, Limits())


def _add_knobs(parser: argparse._ActionsContainer, target: type, instance: Any) -> None:
    for knob, kind in _knobs(target):
        default = getattr(instance, knob.name)
        text = knob.metadata["help"]
        text = f"{text} (env {_env_name(knob.name)}, default {default!r})"
        flag = "--" + knob.name.replace("_", "-")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=text)
        elif kind is tuple:
            parser.add_argument(flag, action="append", metavar="SPEC", help=text)
        else:
            parser.add_argument(flag, type=kind, help=text)


def _knobs(target: type) -> list[tuple[dataclasses.Field[Any], type]]:
    """The scalar fields of a settings dataclass with their runtime types."""
    hints = typing.get_type_hints(target)
    found = []
    for knob in dataclasses.fields(target):
        kind = typing.get_origin(hints[knob.name]) or hints[knob.name]
        if kind in (str, int, float, bool, tuple):
            found.append((knob, kind))
    return found


def _env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _parse(name: str, kind: type, text: str) -> Any:
    """Convert an environment value; a bad one names the variable."""
    try:
        if kind is bool:
            if text.strip().lower() in _TRUE | _FALSE:
                return text.strip().lower() in _TRUE
            raise ValueError(f"expected one of {sorted(_TRUE | _FALSE)}")
        if kind is tuple:
            return tuple(part.strip() for part in text.split(",") if part.strip())
        return kind(text)
    except ValueError as exc:
        raise ValueError(f"{_env_name(name)}={text!r}: {exc}") from None


def knob_table() -> str:
    """Every knob as a Markdown table (flag, environment variable, default, meaning).

    docs/hardening.md embeds this table; a test keeps the copy current.
    """
    defaults = Settings()
    rows = ["| flag | environment | default | meaning |", "|---|---|---|---|"]
    for target, instance in ((Settings, defaults), (Limits, defaults.limits)):
        for knob, _ in _knobs(target):
            flag = "--" + knob.name.replace("_", "-")
            default = _shown(knob.name, getattr(instance, knob.name))
            meaning = knob.metadata["help"].replace("|", "\\|")
            rows.append(f"| `{flag}` | `{_env_name(knob.name)}` | {default} | {meaning} |")
    return "\n".join(rows) + "\n"


def _shown(name: str, value: Any) -> str:
    """A default as the table shows it: sizes in bytes also in KiB/MiB/GiB."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 10_000:
        return f"`{value!r}`"
    if name.endswith("_bytes"):
        for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
            if value % (1 << shift) == 0:
                return f"`{value}` ({value >> shift} {unit})"
    return f"`{value:_}`"
