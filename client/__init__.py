"""bpfexec Python client library and the `bpfexec` command line.

    from bpfexec.client import Client

    with Client("localhost:50051") as bpf:
        module = bpf.load(open("prog.o", "rb").read())
        result = bpf.execute(module, "foo", [7, 3])

Names are imported on first use, so the command line's local subcommands
start without loading gRPC.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Client": "bpfexec.client.client",
    "BpfexecError": "bpfexec.client.errors",
    "Function": "bpfexec.client.types",
    "Helper": "bpfexec.client.types",
    "Module": "bpfexec.client.types",
    "PacketResult": "bpfexec.client.types",
    "Result": "bpfexec.client.types",
    "Trap": "bpfexec.client.types",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
