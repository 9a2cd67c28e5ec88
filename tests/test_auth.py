"""Bearer-token authentication and tenancy against a real server on localhost.

The tokens file has a bare token (tenant `default`) and two named tenants.
Every Executor call needs a valid token; health and reflection stay open; a
tenant sees only the modules it uploaded unless the server shares them. A
running server follows its tokens file: when it changes (checked as calls
arrive) and on SIGHUP, to itself or to the parent of `--workers`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from support import free_port, wait_until

from bpfexec.client.aio import AsyncClient
from bpfexec.client.cli_remote import check_health
from bpfexec.client.client import Client
from bpfexec.client.errors import NotFound, Unauthenticated
from bpfexec.server.app import RunningServer, serve_in_thread
from bpfexec.server.auth import Authenticator
from bpfexec.server.settings import Settings

ADD_ONE = b"r0 = r1\nr0 += 1\nexit\n"
TIMEOUT = 10.0
TOKENS = {"alice": "alice-s3cret-token", "bob": "bob:with:colons", "default": "bare-token"}
TOKENS_FILE = "# accepted tokens\nalice:alice-s3cret-token\n\nbob:bob:with:colons\nbare-token\n"
ROOT = Path(__file__).resolve().parent.parent
NEW_TOKEN = "carol-fresh-t0ken"
ORPHAN = "orphan-t0ken-without-tenant"
BROKEN_FILE = f"carol:{NEW_TOKEN}\n:{ORPHAN}\n"  # line 2 has an empty tenant
SECRETS = (*TOKENS.values(), NEW_TOKEN, ORPHAN)
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]  # a new TCP connection per client


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
    from bpfexec.client.cli import main

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


# Reloading the tokens file


def accepted(address: str, token: str) -> bool:
    """Whether the server takes `token`, asked on a connection of its own."""
    with Client(address, timeout=TIMEOUT, token=token, options=OWN_CONNECTION) as caller:
        try:
            caller.list_modules()
        except Unauthenticated:
            return False
    return True


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def replace_file(path: Path, text: str) -> None:
    """Write `text` as configuration tools do: a new file renamed over the old one."""
    temporary = path.with_name(path.name + ".new")
    temporary.write_text(text)
    os.replace(temporary, path)


def error_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_reload_replaces_the_tokens_or_keeps_them(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="bpfexec.server.auth")
    path = tmp_path / "tokens"
    path.write_text("alice:a\n")
    auth = Authenticator.from_file(path)
    assert not auth.reload_if_changed()  # the file did not change
    path.unlink()
    assert not auth.reload_if_changed()
    assert not auth.reload_if_changed()  # a file still missing is reported once
    path.write_bytes(b"alice:\xff\n")
    assert not auth.reload_if_changed()
    assert auth.tenant(bearer("a")) == "alice"  # meanwhile, the tokens last read
    path.write_text("bob:b\n")
    assert auth.reload_if_changed()
    assert auth.tenant(bearer("b")) == "bob" and auth.tenant(bearer("a")) is None
    assert auth.reload()  # SIGHUP reads the file even if it looks unchanged
    assert error_lines(caplog) == [
        f"auth tokens not reloaded: {path}: cannot read the tokens file: No such file or "
        "directory; the previous 1 tokens stay in force",
        f"auth tokens not reloaded: {path}: the tokens file is not UTF-8 text; the previous 1 "
        "tokens stay in force",
    ]
    assert not Authenticator([("alice", "a")]).reload()  # no file to read


def test_a_changed_tokens_file_applies_to_new_calls(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    interval = 0.1
    with serve_in_thread(settings(tmp_path, auth_reload_interval=interval)) as running:
        address, tokens = running.address, Path(running.settings.auth_tokens_file)
        assert not accepted(address, NEW_TOKEN)
        tokens.write_text(TOKENS_FILE + f"carol:{NEW_TOKEN}\n")  # in place: same inode
        wait_until(lambda: accepted(address, NEW_TOKEN))
        assert accepted(address, TOKENS["alice"])
        replace_file(tokens, f"carol:{NEW_TOKEN}\n")  # alice, bob and the bare token revoked
        wait_until(lambda: not accepted(address, TOKENS["alice"]))
        assert not accepted(address, TOKENS["bob"]) and accepted(address, NEW_TOKEN)
        replace_file(tokens, BROKEN_FILE)
        wait_until(lambda: accepted(address, NEW_TOKEN) and error_lines(caplog))
        time.sleep(3 * interval)  # checks keep coming: the same broken file is not reported again
        assert accepted(address, NEW_TOKEN) and not accepted(address, TOKENS["alice"])
    assert error_lines(caplog) == [
        f"auth tokens not reloaded: {tokens}:2: expected TOKEN or TENANT:TOKEN; "
        "the previous 1 tokens stay in force"
    ]
    assert not any(secret in caplog.text for secret in SECRETS)


@contextmanager
def serve_process(tmp_path: Path, *flags: str) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """`bpfexec serve FLAGS...` as a process on a free port, output in `tmp_path/serve.log`."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BPFEXEC_")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    command = [
        sys.executable, "-m", "bpfexec.client.cli", "serve",
        "--host", "127.0.0.1", "--port", str(port),
        "--metrics-port", "0", "--no-entry-point-helpers", "--engine", "interpreter", *flags,
    ]  # fmt: skip
    with (tmp_path / "serve.log").open("w") as sink:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=sink, stderr=sink)
    try:
        address = f"127.0.0.1:{port}"
        wait_until(lambda: check_health(address, timeout=0.5) == "SERVING", timeout=60)
        yield process, address
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_sighup_reloads_the_tokens_file(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKENS_FILE)
    log = tmp_path / "serve.log"
    flags = ("--auth-tokens-file", str(tokens), "--auth-reload-interval", "0")
    with serve_process(tmp_path, *flags) as (server, address):
        tokens.write_text(TOKENS_FILE + f"carol:{NEW_TOKEN}\n")
        assert not accepted(address, NEW_TOKEN)  # no checks with an interval of 0: only SIGHUP
        server.send_signal(signal.SIGHUP)
        wait_until(lambda: accepted(address, NEW_TOKEN))
        tokens.write_text(f"carol:{NEW_TOKEN}\n")
        server.send_signal(signal.SIGHUP)
        wait_until(lambda: not accepted(address, TOKENS["bob"]))
        tokens.write_text(BROKEN_FILE)
        server.send_signal(signal.SIGHUP)
        wait_until(lambda: " ERROR " in log.read_text())
        assert accepted(address, NEW_TOKEN) and not accepted(address, TOKENS["alice"])
    text = log.read_text()
    errors = [line for line in text.splitlines() if " ERROR " in line]
    assert len(errors) == 1, text
    assert f"{tokens}:2: expected TOKEN or TENANT:TOKEN" in errors[0]
    assert not any(secret in text for secret in SECRETS)


@pytest.mark.skipif(sys.platform != "linux", reason="--workers needs SO_REUSEPORT balancing")
def test_sighup_to_the_parent_reloads_every_worker(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKENS_FILE)
    log = tmp_path / "serve.log"
    flags = ("--workers", "2", "--auth-tokens-file", str(tokens), "--auth-reload-interval", "0")

    def workers_that_said(message: str) -> set[str]:
        """The pids of the workers that logged `message` (their lines carry `[pid]:`)."""
        return set(re.findall(rf"\[(\d+)\]: {re.escape(message)}", log.read_text()))

    with serve_process(tmp_path, *flags) as (parent, address):
        wait_until(lambda: len(workers_that_said("serving ")) == 2, timeout=60)
        replace_file(tokens, f"carol:{NEW_TOKEN}\n")
        parent.send_signal(signal.SIGHUP)
        reloaded = f"reloaded {tokens}: 1 tokens of 1 tenants"
        wait_until(lambda: workers_that_said(reloaded) == workers_that_said("serving "))
        for _ in range(16):  # each on a connection of its own: both workers answer
            assert accepted(address, NEW_TOKEN) and not accepted(address, TOKENS["alice"])
    assert not any(secret in log.read_text() for secret in SECRETS)
