"""A real 3-member etcd cluster on loopback with TLS client certificates, for the sync tests
and bench/sync.py.

Rules:
- Loopback only: every member listens on 127.0.0.1; nothing else is ever bound or dialled.
- Debian's `etcd-server` + `etcd-client` are installed with apt when `etcd` is missing.
- Certificates are made with `cryptography` in a temp dir: one CA, one member cert (SAN
  IP:127.0.0.1, serverAuth + clientAuth) shared by the members, one client cert for brokers.
- Members are killed with SIGKILL (SIGTERM to a cluster takes ~8.5 s, FACTS.md); every health
  poll is bounded.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

HOST = "127.0.0.1"


def ensure_etcd() -> str:
    """The path of the etcd binary, installing Debian's packages when it is missing."""
    found = shutil.which("etcd")
    if found and shutil.which("etcdctl"):
        return found
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "etcd-server", "etcd-client"]
    if subprocess.run(install, env=env, capture_output=True, timeout=300).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=300)
        subprocess.run(install, env=env, capture_output=True, timeout=300, check=True)
    # the package's postinst may start a default member on 2379; ours use other ports, but a
    # stray system member must not linger where a host has no policy-rc.d
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(["systemctl", "stop", "etcd"], capture_output=True, timeout=30, check=False)
    found = shutil.which("etcd")
    assert found, "etcd-server was installed but no etcd binary is on PATH"
    return found


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind((HOST, 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_certs(directory: Path) -> dict[str, Path]:
    """ca.pem, member.pem/member-key.pem (server+client) and client.pem/client-key.pem."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "apm test etcd CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    out = {"ca": directory / "ca.pem"}
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for name in ("member", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"apm-{name}")]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(HOST))]),
                critical=False,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        out[name] = directory / f"{name}.pem"
        out[name].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        out[f"{name}-key"] = directory / f"{name}-key.pem"
        out[f"{name}-key"].write_bytes(_key_pem(key))
        out[f"{name}-key"].chmod(0o600)
    return out


@dataclass
class Member:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"https://{HOST}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"https://{HOST}:{self.peer_port}"


@dataclass
class EtcdCluster:
    root: Path
    members: list[Member] = field(default_factory=list)
    certs: dict[str, Path] = field(default_factory=dict)

    @classmethod
    def start(cls, size: int = 3, attempts: int = 3) -> EtcdCluster:
        """A healthy cluster; a member that exits at start (a port another test process took
        between our probe and etcd's bind) means a fresh try on other ports."""
        for attempt in range(attempts):
            try:
                return cls._start(size)
            except RuntimeError:
                if attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    @classmethod
    def _start(cls, size: int) -> EtcdCluster:
        binary = ensure_etcd()
        root = Path(tempfile.mkdtemp(prefix="apm-etcd-"))
        cluster = cls(root=root, certs=make_certs(root))
        ports = _free_ports(2 * size)
        for i in range(size):
            cluster.members.append(
                Member(f"m{i}", ports[2 * i], ports[2 * i + 1], root / f"m{i}.etcd")
            )
        cluster._binary = binary
        for m in cluster.members:
            cluster._spawn(m, "new")
        try:
            cluster.wait_healthy()
        except BaseException:
            cluster.stop()
            raise
        return cluster

    _binary: str = "etcd"

    @property
    def endpoints(self) -> list[str]:
        return [m.url for m in self.members]

    def _spawn(self, m: Member, state: str) -> None:
        initial = ",".join(f"{x.name}={x.peer_url}" for x in self.members)
        c = self.certs
        args = [
            self._binary,
            f"--name={m.name}",
            f"--data-dir={m.data_dir}",
            f"--listen-client-urls={m.url}",
            f"--advertise-client-urls={m.url}",
            f"--listen-peer-urls={m.peer_url}",
            f"--initial-advertise-peer-urls={m.peer_url}",
            f"--initial-cluster={initial}",
            f"--initial-cluster-state={state}",
            "--initial-cluster-token=apm-test",
            "--client-cert-auth",
            "--peer-client-cert-auth",
            f"--trusted-ca-file={c['ca']}",
            f"--cert-file={c['member']}",
            f"--key-file={c['member-key']}",
            f"--peer-trusted-ca-file={c['ca']}",
            f"--peer-cert-file={c['member']}",
            f"--peer-key-file={c['member-key']}",
            "--log-level=error",
            "--logger=zap",
        ]
        log = (self.root / f"{m.name}.log").open("ab")
        m.proc = subprocess.Popen(
            args,
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "ETCD_UNSUPPORTED_ARCH": ""},
        )
        log.close()

    def _ssl(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.certs["ca"]))
        ctx.load_cert_chain(str(self.certs["client"]), str(self.certs["client-key"]))
        return ctx

    def member_healthy(self, m: Member) -> bool:
        try:
            with urllib.request.urlopen(  # noqa: S310 - https on loopback, our own member
                f"{m.url}/health", timeout=1.0, context=self._ssl()
            ) as resp:
                return b'"true"' in resp.read()
        except OSError:
            return False

    def wait_healthy(self, timeout: float = 30.0, members: list[Member] | None = None) -> None:
        deadline = time.monotonic() + timeout
        want = members if members is not None else [m for m in self.members if m.proc]
        while time.monotonic() < deadline:
            if all(self.member_healthy(m) for m in want):
                return
            for m in want:
                if m.proc is not None and m.proc.poll() is not None:
                    log = (self.root / f"{m.name}.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"etcd member {m.name} exited: {log}")
            time.sleep(0.1)
        raise TimeoutError(f"etcd members not healthy within {timeout} s")

    def kill(self, i: int) -> None:
        m = self.members[i]
        if m.proc is not None:
            m.proc.send_signal(signal.SIGKILL)
            m.proc.wait(timeout=10)
            m.proc = None

    def restart(self, i: int) -> None:
        m = self.members[i]
        assert m.proc is None, "member still running"
        self._spawn(m, "existing")

    def stop(self) -> None:
        for i in range(len(self.members)):
            self.kill(i)
        shutil.rmtree(self.root, ignore_errors=True)

    def client_tls(self) -> dict[str, str]:
        return {
            "cacert": str(self.certs["ca"]),
            "cert": str(self.certs["client"]),
            "key": str(self.certs["client-key"]),
        }
