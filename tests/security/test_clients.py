"""Command-line clients against a secured NATS server: with its identity `kvr epp` gets through; with a
wrong credential it fails within `--timeout` with one line naming the cause, and no secret."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.runtime.natsauth import NatsAuth
from services.runtime.natsio import ConnectionState, NatsUnreachable, connect

from .secure_nats import SecureNats

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
STARTUP_SLACK_S = 20.0  # interpreter start-up and imports on a loaded two-core machine


@pytest.fixture(scope="module")
def secure(tmp_path_factory):
    sn = SecureNats(tmp_path_factory.mktemp("secure-clients")).start()
    yield sn
    sn.cleanup()


def epp_query(secure: SecureNats, env: dict[str, str], timeout: str = "2") -> tuple[int, str, str, float]:
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "services.cli", "epp", "query", "--pool", "default", "--token-ids", "1,2,3",
         "--nats-url", secure.url, "--timeout", timeout],
        capture_output=True, text=True, timeout=60, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), **env},
    )
    return proc.returncode, proc.stdout, proc.stderr, time.monotonic() - started


def test_epp_query_with_the_gateway_identity_reaches_nats(secure):
    # No bridge runs: the request itself is what fails, after a connect with TLS, mTLS and a password.
    code, out, err, _ = epp_query(secure, secure.get("gateway").env())
    assert code == 2 and out == ""
    assert err.splitlines() == [
        "kvr epp: no EPP bridge serves pool 'default' (kvr.default.epp.query has no responders; check --pool and --subject-prefix)"
    ]


def test_epp_query_with_a_wrong_password_fails_within_its_timeout_with_one_line(secure, tmp_path):
    wrong = tmp_path / "wrong.password"
    wrong.write_text("not-the-password\n")
    code, out, err, took = epp_query(secure, {**secure.get("gateway").env(), "KVR_NATS_PASSWORD_FILE": str(wrong)})
    assert code == 2 and out == ""
    assert err.count("\n") == 1, err  # nothing logged while trying: the one line below
    assert err.startswith(f"kvr epp: cannot connect to NATS at {secure.url}: the NATS server rejected the credentials"), err
    assert "not-the-password" not in err and all(secret not in err for secret in secure.secrets())
    assert took < 2 + STARTUP_SLACK_S


def test_epp_query_without_a_client_certificate_names_the_missing_setting(secure):
    env = secure.get("gateway").env(mtls=False)
    code, out, err, _ = epp_query(secure, env)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "KVR_NATS_TLS_CERT" in err, err


async def test_a_bounded_connect_keeps_the_cause_in_its_state_and_its_error(secure, tmp_path):
    ident = secure.get("operator")
    wrong = tmp_path / "wrong.password"
    wrong.write_text("nope\n")
    auth = NatsAuth(user=ident.user, password_file=str(wrong), tls_ca=str(ident.ca),
                    tls_cert=str(ident.cert.cert), tls_key=str(ident.cert.key))
    state = ConnectionState()
    started = time.monotonic()
    with pytest.raises(NatsUnreachable) as info:
        await connect(secure.url, "kvr-operator", auth=auth, state=state, max_wait_s=1.5)
    assert time.monotonic() - started < 1.5 + 3.0  # the deadline, plus one attempt's close on a loaded machine
    assert state.error_kind == "authorization" and state.attempts >= 1
    assert str(info.value) == f"cannot connect to NATS at {secure.url}: {state.error}"
    assert "\n" not in str(info.value)

