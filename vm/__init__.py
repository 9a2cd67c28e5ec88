"""bpfexec's virtual machine: load, verify and run eBPF programs without a network.

This package knows nothing of gRPC. Its public surface is re-exported here.
"""

from vm.errors import (
    LimitError,
    LinkError,
    LoadError,
    RequestError,
    Trap,
    TrapKind,
    VerifyError,
    VmError,
)
from vm.helpers import Helper, HelperChain, HelperContext, HelperRegistry, import_registry
from vm.limits import Limits
from vm.loader import load
from vm.machine import Interrupt, Result, execute
from vm.program import Function, HelperRef, Program

__all__ = [
    "Function",
    "Helper",
    "HelperChain",
    "HelperContext",
    "HelperRef",
    "HelperRegistry",
    "Interrupt",
    "LimitError",
    "Limits",
    "LinkError",
    "LoadError",
    "Program",
    "RequestError",
    "Result",
    "Trap",
    "TrapKind",
    "VerifyError",
    "VmError",
    "execute",
    "import_registry",
    "load",
]
