"""TLS and mutual TLS against a real server on localhost, with throwaway certificates.

A CA, a server certificate (for `localhost` and 127.0.0.1) and a client
certificate are made with the openssl command in tmp_path; without openssl
the tests are skipped.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from bpfexec.client.cli_remote import check_health
from bpfexec.client.client import Client
from bpfexec.client.errors import Unavailable
from bpfexec.server.app import serve_in_thread
from bpfexec.server.settings import Settings

ADD_ONE = b"r0 = r1\nr0 += 1\nexit\n"
TIMEOUT = 10.0
OPENSSL = shutil.which("openssl")

pytestmark = pytest.mark.skipif(OPENSSL is None, reason="the openssl command is not installed")


def openssl(command: str, cwd: Path) -> None:
    """Run `openssl COMMAND` (words split on spaces) in `cwd`."""
    run = [OPENSSL or "openssl", *command.split()]
    subprocess.run(run, cwd=cwd, check=True, capture_output=True, timeout=60)


NEW_KEY = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"


def certificate(directory: Path, name: str, extensions: str) -> None:
    """`name.key` and `name.pem`, signed by `ca` in `directory`."""
    (directory / f"{name}.ext").write_text(extensions)
    openssl(f"req -new {NEW_KEY} -keyout {name}.key -out {name}.csr -subj /CN={name}", directory)
    openssl(
        f"x509 -req -in {name}.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 "
        f"-out {name}.pem -extfile {name}.ext",
        directory,
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    openssl(f"req -x509 {NEW_KEY} -keyout ca.key -out ca.pem -days 1 -subj /CN=test-ca", directory)
    certificate(directory, "server", "subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    certificate(directory, "client", "extendedKeyUsage=clientAuth\n")
    return directory


def settings(pki: Path, mutual: bool = False) -> Settings:
    return Settings(
        port=0,
        metrics_port=0,
        entry_point_helpers=False,
        tls_cert=str(pki / "server.pem"),
        tls_key=str(pki / "server.key"),
        tls_client_ca=str(pki / "ca.pem") if mutual else "",
    )


def test_a_client_trusting_the_ca_connects_over_tls(pki: Path) -> None:
    with serve_in_thread(settings(pki)) as running:
        target = f"127.0.0.1:{running.port}"
        with Client(target, timeout=TIMEOUT, tls=pki / "ca.pem") as client:
            assert client.execute(client.load(ADD_ONE), args=[1]).return_value == 2
        # A plaintext client cannot talk to a TLS port.
        with Client(target, timeout=2) as plaintext, pytest.raises(Unavailable):
            plaintext.list_modules()


def test_mutual_tls_requires_a_client_certificate(pki: Path) -> None:
    with serve_in_thread(settings(pki, mutual=True)) as running:
        target = f"localhost:{running.port}"
        ca = pki / "ca.pem"
        with Client(
            target, timeout=TIMEOUT, tls=ca, tls_cert=pki / "client.pem", tls_key=pki / "client.key"
        ) as client:
            assert client.execute(client.load(ADD_ONE), args=[2]).return_value == 3
        with Client(target, timeout=2, tls=ca) as anonymous, pytest.raises(Unavailable):
            anonymous.list_modules()


def test_health_checks_over_tls(pki: Path) -> None:
    with serve_in_thread(settings(pki, mutual=True)) as running:
        target = f"127.0.0.1:{running.port}"
        status = check_health(
            target, timeout=TIMEOUT, tls=pki / "ca.pem", tls_cert=pki / "client.pem",
            tls_key=pki / "client.key",
        )  # fmt: skip
        assert status == "SERVING"
        assert check_health(target, timeout=2).startswith("unhealthy")


def test_settings_refuse_half_a_tls_configuration() -> None:
    with pytest.raises(ValueError, match="go together"):
        Settings(tls_cert="server.pem")
    with pytest.raises(ValueError, match="needs tls_cert"):
        Settings(tls_client_ca="ca.pem")


def test_the_cli_connects_over_mutual_tls(pki: Path, tmp_path: Path, capsys) -> None:
    from bpfexec.client.cli import main

    program = tmp_path / "add.s"
    program.write_bytes(ADD_ONE)
    tls = ["--tls-ca", str(pki / "ca.pem"), "--tls-cert", str(pki / "client.pem")]
    tls += ["--tls-key", str(pki / "client.key")]
    with serve_in_thread(settings(pki, mutual=True)) as running:
        target = f"localhost:{running.port}"
        assert main(["run", str(program), "--arg", "1", "--server", target, *tls]) == 0
        assert main(["health", "--server", target, *tls]) == 0
        assert main(["health", "--server", target, "--tls-ca", str(pki / "ca.pem")]) == 1
    out = capsys.readouterr().out
    assert "2" in out and "SERVING" in out
