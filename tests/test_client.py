"""The Python client and `bpfexec run --server` against a real server: the seed's C
programs with the seed's helpers served in-process, argument conversion, re-upload."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bpfexec import vm
from bpfexec.client.cli_remote import run_remote
from bpfexec.client.client import Client
from bpfexec.client.errors import BpfexecError, InvalidArgument, NotFound, Unavailable
from bpfexec.client.types import Result
from bpfexec.server.app import RunningServer, serve_in_thread
from bpfexec.server.settings import Settings
from bpfexec.vm.loader import load

MASK64 = (1 << 64) - 1


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    config = Settings(
        port=0, metrics_port=0, entry_point_helpers=False, helpers=("seed_helpers:registry",)
    )
    with serve_in_thread(config) as running:
        yield running


@pytest.fixture
def client(server: RunningServer) -> Iterator[Client]:
    with Client(server.address, timeout=10) as c:
        yield c


@pytest.mark.parametrize("name", ["helper_pointers", "helper_prototypes"])
@pytest.mark.parametrize(("args", "expected"), [((7, 3), 7), ((7, 9), 9), ((2, 3), 106)])
def test_seed_helper_programs(client: Client, compile_c, name, args, expected) -> None:
    module = client.load(compile_c(name).read_bytes(), f"{name}.o")
    assert all(helper.in_process for helper in module.helpers)
    result = client.execute(module, "foo", args)
    assert (result.return_value, result.trap) == (expected, None)


def test_seed_infinite_loop_is_an_out_of_fuel_result(client: Client, compile_c) -> None:
    module = client.load(compile_c("infinite_loop").read_bytes())
    result = client.execute(module, "infinite_loop", [3], fuel=10_000)
    assert result.trap is not None and result.trap.kind == "OUT_OF_FUEL"
    assert result.fuel_used <= 10_000


def test_remote_run_prints_what_a_local_run_prints(server: RunningServer, compile_c) -> None:
    code = compile_c("helper_prototypes").read_bytes()
    remote = run_remote(code, "helper_prototypes.o", server.address, "foo", [2, 3], None)
    from seed_helpers import registry

    local = vm.execute(load(code), "foo", [2, 3], helpers=registry).to_dict()
    assert remote.keys() == local.keys()
    assert {**remote, "duration_ns": 0} == {**local, "duration_ns": 0}


def test_trap_dict_matches_a_local_run(server: RunningServer) -> None:
    code = b"r0 = *(u64 *)(r1 + 0)\nexit\n"
    remote = run_remote(code, "fault.s", server.address, None, [0], None)
    local = vm.execute(load(code, "fault.s"), None, [0]).to_dict()
    assert remote["trap"] == local["trap"]


@pytest.mark.parametrize(
    ("arg", "register"),
    [(5, 5), (-1, MASK64), (-(1 << 63), 1 << 63), (MASK64, MASK64)],
)
def test_int_arguments_are_registers(client: Client, arg: int, register: int) -> None:
    assert client.execute(client.load(b"r0 = r1\nexit\n"), args=[arg]).return_value == register


@pytest.mark.parametrize("arg", [1 << 64, -(1 << 63) - 1, 1.5, "text", None])
def test_bad_arguments_are_refused_before_sending(client: Client, arg) -> None:
    with pytest.raises(InvalidArgument, match="argument 1"):
        client.execute("sha256:unused", args=[arg])


def test_buffer_arguments_come_back_modified(client: Client) -> None:
    store_byte = b"*(u8 *)(r1 + 0) = 0x41\nr0 = 0\nexit\n"
    result = client.execute(client.load(store_byte), args=[bytearray(b"xyz")])
    assert result == Result(0, result.fuel_used, None, (), (b"Ayz",), result.duration_ns)


def test_module_is_uploaded_again_after_eviction(client: Client) -> None:
    module = client.load(b"r0 = 11\nexit\n")
    client.delete_module(module)
    assert client.execute(module).return_value == 11
    with pytest.raises(NotFound, match="upload it again"):
        client.delete_module(module.id + "0")
    # An id alone cannot be re-uploaded: the caller sees NOT_FOUND.
    client.delete_module(module)
    with pytest.raises(NotFound):
        client.execute(module.id)


def test_list_helpers(client: Client) -> None:
    helpers = {str(helper): helper for helper in client.list_helpers()}
    assert helpers["bpf_trace_printk (#6)"].description.startswith("Format up to three")
    assert {"max (#1)", "mul (#42)"} <= set(helpers)


def test_errors_share_one_base_and_carry_the_code() -> None:
    with Client("127.0.0.1:1", timeout=1) as c, pytest.raises(Unavailable) as caught:
        c.list_modules()
    assert isinstance(caught.value, BpfexecError)
    assert caught.value.code.name == "UNAVAILABLE"
