"""bpfexec: run eBPF programs outside the kernel, as a service.

- `bpfexec.vm` loads, checks and runs programs, and knows nothing of a network;
- `bpfexec.server` is the gRPC service built on it;
- `bpfexec.client` is the Python client and the `bpfexec` command line;
- `bpfexec._pb` holds the stubs generated from `proto/`, which the server and
  the client both import (the server never imports the client).

In the repository the code of `bpfexec.vm`, `bpfexec.server` and
`bpfexec.client` lives in the top-level folders `vm/`, `server/` and `client/`
(pyproject.toml's `package-dir`); always import it through `bpfexec`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__version__: str  # from the installed distribution
_UNKNOWN_VERSION = "0+unknown"  # a checkout imported without being installed


def include_dir() -> str:
    """The folder of `bpfexec_helper.h`, the header of native helpers (`-I` for cc)."""
    return str(Path(__file__).parent / "include")


def __getattr__(name: str) -> Any:
    # Looked up on first use: `import bpfexec.vm` must not pay for importlib.metadata.
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            value = version("bpfexec")
        except PackageNotFoundError:
            value = _UNKNOWN_VERSION
        globals()["__version__"] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
