"""Rotation without a restart: a running client reconnects with the password and TLS files as they are
now (a rotated Secret), not as they were at start."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from services.runtime.devpki import CertificateAuthority
from services.runtime.embedded import NatsServer, free_port
from services.runtime.natsauth import NatsAuth
from services.runtime.natsio import ConnectionState, connect
from services.runtime.permissions import render_conf

pytestmark = pytest.mark.integration


def server_conf(path: Path, ca: CertificateAuthority, password: str) -> str:
    cert = ca.issue("nats-server", server=True, hosts=("127.0.0.1",))
    tls = {"cert_file": str(cert.cert), "key_file": str(cert.key), "ca_file": str(ca.cert_path), "verify": True, "timeout": 2}
    users = {"users": [{"user": "kvr-operator", "password": password}]}
    path.write_text(f"tls: {render_conf(tls)}\nauthorization: {render_conf(users)}\n")
    return str(path)


async def wait_state(state: ConnectionState, connected: bool, timeout: float = 15) -> None:
    for _ in range(int(timeout / 0.05)):
        if state.connected == connected:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"still {state.snapshot()}")


async def test_a_reconnect_uses_the_rotated_password_ca_and_client_certificate(tmp_path):
    old_ca, new_ca = CertificateAuthority(tmp_path / "old", "old-ca"), CertificateAuthority(tmp_path / "new", "new-ca")
    live = tmp_path / "live"  # what the Secret mounts: overwritten in place on rotation
    live.mkdir()
    old_client = old_ca.issue("kvr-operator", client=True)
    files = {"ca": live / "ca.crt", "cert": live / "tls.crt", "key": live / "tls.key", "pw": live / "password"}
    files["ca"].write_bytes(old_ca.cert_path.read_bytes())
    files["cert"].write_bytes(old_client.cert.read_bytes())
    files["key"].write_bytes(old_client.key.read_bytes())
    files["pw"].write_text("old-password-1234\n")
    auth = NatsAuth(user="kvr-operator", password_file=str(files["pw"]), tls_ca=str(files["ca"]),
                    tls_cert=str(files["cert"]), tls_key=str(files["key"]))
    port, store = free_port(), str(tmp_path / "store")
    server = NatsServer(port=port, store_dir=store, config_file=server_conf(tmp_path / "old.conf", old_ca, "old-password-1234")).start()
    state = ConnectionState()
    nc = await connect(server.tls_url, "kvr-operator", auth=auth, state=state, max_wait_s=10)
    try:
        # Rotate everything: the server now has a certificate of a new CA, trusts only client
        # certificates of that CA and wants a new password; the client's files change under it.
        server.stop()
        await wait_state(state, connected=False)
        new_client = new_ca.issue("kvr-operator", client=True)
        files["ca"].write_bytes(new_ca.cert_path.read_bytes())
        files["cert"].write_bytes(new_client.cert.read_bytes())
        files["key"].write_bytes(new_client.key.read_bytes())
        files["pw"].write_text("new-password-5678\n")
        server = NatsServer(port=port, store_dir=store, config_file=server_conf(tmp_path / "new.conf", new_ca, "new-password-5678")).start()
        await wait_state(state, connected=True)
        await nc.publish("_INBOX.operator.check", b"x")
        await nc.flush(timeout=5)
    finally:
        await asyncio.wait_for(nc.close(), 10)
        server.cleanup()
