"""bpfexec's virtual machine: load, verify and run eBPF programs without a network.

This package knows nothing of gRPC. Its public surface is re-exported here.
"""

from bpfexec.vm.errors import (
    LimitError,
    LinkError,
    LoadError,
    RequestError,
    Trap,
    TrapKind,
    VerifyError,
    VmError,
)
from bpfexec.vm.helpers import Helper, HelperChain, HelperContext, HelperRegistry, import_registry
from bpfexec.vm.limits import Limits
from bpfexec.vm.loader import load
from bpfexec.vm.machine import Interrupt, Result, execute
from bpfexec.vm.program import Function, HelperRef, Program

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
