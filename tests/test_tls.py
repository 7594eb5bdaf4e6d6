"""The server's own TLS: a client trusts it through --cacert, and refuses it without."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import pytest
from conftest import Cli
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from server_fixture import Server

pytestmark = pytest.mark.timeout(180)


def self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


def test_https_with_a_private_ca(cli: Cli, tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    server = Server(tmp_path / "srv", serve_args=["--tls-cert", str(cert), "--tls-key", str(key)])
    server.start()
    try:
        assert server.url.startswith("https://")
        code = server.add_user("alice")
        cli.init()
        untrusted = cli.run("remote", "add", "home", server.url, "--user", "alice", "--enrol-code", code)
        assert untrusted.returncode != 0 and b"--cacert" in untrusted.stderr
        cli.ok("remote", "add", "home", server.url, "--user", "alice", "--enrol-code", code, "--cacert", cert)
        src = cli.tmp / "src"
        src.mkdir()
        (src / "f").write_text("over TLS")
        done = cli.ok("backup", src)
        assert b"synced to home" in done.stderr
    finally:
        server.stop()
