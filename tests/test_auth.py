"""Bearer-token authentication and tenancy against a real server on localhost.

The tokens file has a bare token (tenant `default`) and two named tenants.
Every Executor call needs a valid token; health and reflection stay open; a
tenant sees only the modules it uploaded unless the server shares them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from support import free_port

from client.aio import AsyncClient
from client.cli_remote import check_health
from client.client import Client
from client.errors import NotFound, Unauthenticated
from server.app import RunningServer, serve_in_thread
from server.auth import Authenticator
from server.settings import Settings

ADD_ONE = b"r0 = r1\nr0 += 1\nexit\n"
TIMEOUT = 10.0
TOKENS = {"alice": "alice-s3cret-token", "bob": "bob:with:colons", "default": "bare-token"}
TOKENS_FILE = "# accepted tokens\nalice:alice-s3cret-token\n\nbob:bob:with:colons\nbare-token\n"


def settings(tmp_path: Path, **changes: object) -> Settings:
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKENS_FILE)
    base = Settings(port=0, metrics_port=0, entry_point_helpers=False, auth_tokens_file=str(tokens))
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RunningServer]:
    with serve_in_thread(settings(tmp_path, metrics_port=free_port())) as running:
        yield running


def client(server: RunningServer, tenant: str | None) -> Client:
    return Client(server.address, timeout=TIMEOUT, token=TOKENS[tenant] if tenant else None)


@pytest.mark.parametrize(
    "token, why",
    [(None, "missing `authorization: Bearer <token>`"), ("wrong", "not accepted")],
)
def test_a_call_without_a_valid_token_is_unauthenticated(
    server: RunningServer, token: str | None, why: str
) -> None:
    with Client(server.address, timeout=TIMEOUT, token=token) as anonymous:
        with pytest.raises(Unauthenticated, match=why):
            anonymous.load(ADD_ONE)
        with pytest.raises(Unauthenticated):  # a stream is refused as well
            anonymous.execute("sha256:" + "0" * 64, helpers={"mul": lambda call, a, b: a * b})
    assert server.metrics.auth_failures._value.get() == 2


def test_health_stays_open(server: RunningServer) -> None:
    assert check_health(server.address, timeout=TIMEOUT) == "SERVING"


def test_each_tenant_sees_only_its_own_modules(server: RunningServer) -> None:
    with client(server, "alice") as alice, client(server, "bob") as bob:
        module = alice.load(ADD_ONE)
        assert alice.execute(module.id, args=[1]).return_value == 2
        assert [m.id for m in alice.list_modules()] == [module.id]
        assert bob.list_modules() == []
        for call in (bob.get_module, bob.execute, bob.delete_module):
            with pytest.raises(NotFound):
                call(module.id)
        # Bob uploads the same bytes: one copy, two owners; deleting is per tenant.
        assert bob.load(ADD_ONE).id == module.id
        bob.delete_module(module.id)
        assert alice.execute(module.id, args=[2]).return_value == 3
        with pytest.raises(NotFound):
            bob.get_module(module.id)
    assert len(server.service.cache) == 1


def test_shared_modules_are_visible_to_every_tenant(tmp_path: Path) -> None:
    with (
        serve_in_thread(settings(tmp_path, shared_modules=True)) as running,
        client(running, "alice") as alice,
        client(running, "default") as other,
    ):
        module = alice.load(ADD_ONE)
        assert other.execute(module.id, args=[4]).return_value == 5


def test_tenancy_survives_a_restart_with_a_store(tmp_path: Path) -> None:
    store = tmp_path / "store"
    with (
        serve_in_thread(settings(tmp_path, store=str(store))) as running,
        client(running, "alice") as alice,
    ):
        module_id = alice.load(ADD_ONE).id
    with (
        serve_in_thread(settings(tmp_path, store=str(store))) as running,
        client(running, "alice") as alice,
        client(running, "bob") as bob,
    ):
        assert alice.execute(module_id, args=[1]).return_value == 2
        with pytest.raises(NotFound):
            bob.execute(module_id)
    assert not any(token in path.read_text() for path in store.glob("*.json")
                   for token in TOKENS.values())  # fmt: skip


def test_the_async_client_sends_its_token(server: RunningServer) -> None:
    async def run() -> int:
        async with AsyncClient(server.address, timeout=TIMEOUT, token=TOKENS["bob"]) as bob:
            module = await bob.load(ADD_ONE)
            return (await bob.execute(module, args=[9])).return_value

    assert asyncio.run(run()) == 10


def test_no_token_appears_in_metrics_or_logs(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    with client(server, "alice") as alice:
        alice.execute(alice.load(ADD_ONE), args=[1])
    with (
        Client(server.address, timeout=TIMEOUT, token="alice-s3cret-tokeX") as guess,
        pytest.raises(Unauthenticated),
    ):
        guess.list_modules()
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=TIMEOUT) as reply:
        metrics = reply.read().decode()
    assert "bpfexec_auth_failures_total 1.0" in metrics
    for secret in [*TOKENS.values(), "alice-s3cret-tokeX"]:
        assert secret not in metrics
        assert secret not in caplog.text
    assert "tenant=alice" in caplog.text


def test_tokens_file_parsing() -> None:
    auth = Authenticator([("alice", "a"), ("default", "b")])
    assert auth.tenant([("authorization", "Bearer a")]) == "alice"
    assert auth.tenant([("authorization", "bearer b")]) == "default"
    assert auth.tenant([("authorization", "Basic a")]) is None
    assert auth.tenant([("authorization", "Bearer ab")]) is None
    assert auth.tenant(None) is None
    with pytest.raises(ValueError, match="no tokens"):
        Authenticator([])


def test_a_bad_tokens_file_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("ok\nalice:\n")
    with pytest.raises(ValueError, match=r"tokens:2: expected TOKEN or TENANT:TOKEN"):
        Authenticator.from_file(path)
    path.write_text("# only a comment\n")
    with pytest.raises(ValueError, match="no tokens"):
        Authenticator.from_file(path)


def test_status_code_is_unauthenticated(server: RunningServer) -> None:
    with grpc.insecure_channel(server.address) as channel:
        call = channel.unary_unary("/bpfexec.v1.Executor/ListModules")
        with pytest.raises(grpc.RpcError) as info:
            call(b"", timeout=TIMEOUT)
    assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED


def test_the_cli_takes_the_token_from_the_environment(
    server: RunningServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from client.cli import main

    program = tmp_path / "add.s"
    program.write_bytes(ADD_ONE)
    run = ["run", str(program), "--arg", "41", "--json", "--server", server.address]
    assert main(run) == 1  # no token
    assert "unauthenticated" in capsys.readouterr().err
    monkeypatch.setenv("BPFEXEC_TOKEN", TOKENS["alice"])
    assert main(run) == 0
    assert '"return_value": 42' in capsys.readouterr().out
    assert main([*run, "--token", TOKENS["bob"]]) == 0  # the flag wins
    assert main(["health", "--server", server.address]) == 0
