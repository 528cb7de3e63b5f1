"""Pure pieces of the NATS security: settings → nats-py options, redaction, failure causes, role table."""

from __future__ import annotations

import io
import json
import logging
import ssl
from pathlib import Path

import nats
import pytest
import structlog

from schemas.subjects import Names
from services.runtime import logs
from services.runtime.config import COMMON, NATS_CONNECTION, NamesConfig
from services.runtime.devpki import CertificateAuthority
from services.runtime.nats_config import helm_values, users_for
from services.runtime.natsauth import NatsAuth, NatsConfigError, inbox_prefix_for, redact_url
from services.runtime.natsio import ConnectionState, describe_failure
from services.runtime.permissions import ROLES, Raw, Scope, User, accounts_config, markdown_table, render_conf, role_permissions

pytestmark = pytest.mark.unit


def secret_file(tmp_path: Path, name: str, value: str) -> str:
    path = tmp_path / name
    path.write_text(value + "\n")
    return str(path)


# ---- settings → options ----------------------------------------------------------------------------


def test_every_connection_setting_is_common_to_all_services_and_read_by_natsauth():
    names = {s.name for s in NATS_CONNECTION}
    assert names <= {s.name for s in COMMON}
    assert {f"nats_{f}" for f in NatsAuth.__dataclass_fields__} | {"nats_url"} == names
    assert {s.env for s in NATS_CONNECTION} >= {
        "KVR_NATS_CREDS", "KVR_NATS_NKEY_SEED", "KVR_NATS_USER", "KVR_NATS_PASSWORD_FILE", "KVR_NATS_TOKEN_FILE",
        "KVR_NATS_TLS_CA", "KVR_NATS_TLS_CERT", "KVR_NATS_TLS_KEY", "KVR_NATS_TLS_HANDSHAKE_FIRST",
    }


def test_password_and_token_are_read_from_files_at_every_connect(tmp_path):
    pw = secret_file(tmp_path, "pw", "first-password")
    opts = NatsAuth(user="kvr-indexer", password_file=pw).options("kvr-indexer")
    assert opts["user"] == "kvr-indexer" and opts["password"]() == "first-password"
    Path(pw).write_text("rotated-password\n")  # a rotated Secret: the next (re)connect uses it
    assert opts["password"]() == "rotated-password"
    assert opts["inbox_prefix"] == "_INBOX.indexer"
    token = secret_file(tmp_path, "token", "tok-123456")
    assert NatsAuth(token_file=token).options()["token"]() == "tok-123456"


def test_seed_and_creds_files_are_passed_as_paths_and_their_secrets_registered(tmp_path):
    seed = secret_file(tmp_path, "seed.nk", "SUAKEXAMPLESEEDTHATISLONGENOUGHTOBEAUSERSEEDFORTHISTEST0123")
    assert NatsAuth(nkey_seed=seed).options()["nkeys_seed"] == seed
    creds = secret_file(
        tmp_path, "x.creds",
        "-----BEGIN NATS USER JWT-----\neyJhbGciOi.JWTPART.SIG\n------END NATS USER JWT------\n\n"
        "-----BEGIN USER NKEY SEED-----\nSUAMCREDSSEEDVALUETHATISLONGENOUGHFORTHECHECKINTHISTEST000\n------END USER NKEY SEED------\n",
    )
    assert NatsAuth(creds=creds).options()["user_credentials"] == creds
    assert "SUAMCREDSSEED" not in logs.redact("seed SUAMCREDSSEEDVALUETHATISLONGENOUGHFORTHECHECKINTHISTEST000")
    assert "SUAKEXAMPLE" not in logs.redact("SUAKEXAMPLESEEDTHATISLONGENOUGHTOBEAUSERSEEDFORTHISTEST0123")


@pytest.mark.parametrize(
    ("auth", "message"),
    [
        (NatsAuth(user="u", token_file="t"), "choose one NATS authentication method"),
        (NatsAuth(user="u"), "needs KVR_NATS_PASSWORD_FILE"),
        (NatsAuth(password_file="p"), "needs KVR_NATS_USER"),
        (NatsAuth(tls_cert="c"), "both KVR_NATS_TLS_CERT and KVR_NATS_TLS_KEY"),
        (NatsAuth(token_file="/nonexistent/token"), "KVR_NATS_TOKEN_FILE: no readable file at /nonexistent/token"),
    ],
)
def test_impossible_settings_say_which_setting_is_wrong(auth, message):
    with pytest.raises(NatsConfigError, match=message.replace("(", r"\(")):
        auth.options()


def test_empty_secret_file_and_bad_tls_files_are_config_errors(tmp_path):
    with pytest.raises(NatsConfigError, match="is empty"):
        NatsAuth(token_file=secret_file(tmp_path, "empty", "")).options()
    with pytest.raises(NatsConfigError, match="not a PEM CA bundle"):
        NatsAuth(tls_ca=secret_file(tmp_path, "ca.pem", "not a certificate")).options()


def test_tls_context_verifies_the_server_and_carries_the_client_certificate(tmp_path):
    ca = CertificateAuthority(tmp_path)
    client = ca.issue("kvr-indexer", client=True)
    opts = NatsAuth(tls_ca=str(ca.cert_path), tls_cert=str(client.cert), tls_key=str(client.key), tls_handshake_first=True).options()
    ctx = opts["tls"]
    assert isinstance(ctx, ssl.SSLContext) and ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert opts["tls_handshake_first"] is True
    assert "tls" not in NatsAuth().options()


def test_inbox_prefix_per_role():
    assert inbox_prefix_for("kvr-epp-bridge") == "_INBOX.epp-bridge"
    assert inbox_prefix_for("") == "_INBOX"
    assert NatsAuth(inbox_prefix="_INBOX.custom").options("kvr-indexer")["inbox_prefix"] == "_INBOX.custom"


# ---- redaction -------------------------------------------------------------------------------------


def test_redact_url_masks_passwords_and_tokens_and_registers_them():
    assert redact_url("nats://alice:pa55word-x@host:4222") == "nats://alice:***@host:4222"
    assert redact_url("tls://s3cr3t-token@h1:4222, nats://h2:4222") == "tls://***@h1:4222,nats://h2:4222"
    assert redact_url("nats://127.0.0.1:4222") == "nats://127.0.0.1:4222"
    assert logs.redact("error connecting as alice:pa55word-x") == "error connecting as alice:***"
    assert "s3cr3t-token" not in logs.redact("token s3cr3t-token")


@pytest.fixture
def own_logging():
    """setup_logging binds structlog and the root logger to this test's captured stderr: undo after."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    root.handlers = []
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
    root.handlers, root.level = handlers, level


def test_structlog_and_stdlib_lines_never_carry_a_registered_secret(capsys, own_logging):
    logs.register_secret("hunter2-very-secret")
    logs.setup_logging("json", "info", service="t")
    try:
        raise RuntimeError("auth failed with hunter2-very-secret")
    except RuntimeError:
        structlog.get_logger("x").exception("boom", url="nats://u:hunter2-very-secret@h", nested={"a": ["hunter2-very-secret"]})
    logging.getLogger("nats.aio.client").error("lib says %s", "hunter2-very-secret")
    err = capsys.readouterr().err
    assert "hunter2-very-secret" not in err and err.count("***") >= 4
    line = json.loads(err.splitlines()[0])
    assert line["url"] == "nats://u:***@h" and "auth failed with ***" in line["exception"]
    assert logs.redact_fields({"k": "x hunter2-very-secret"}) == {"k": "x ***"}


def test_asyncio_tls_noise_is_dropped():
    handler = logging.StreamHandler(io.StringIO())
    handler.addFilter(logs._StdlibRedactor())
    record = logging.LogRecord("asyncio", logging.WARNING, __file__, 1, "returning true from eof_received() has no effect when using ssl", None, None)
    assert handler.filter(record) is False


# ---- failure causes --------------------------------------------------------------------------------


AUTH = NatsAuth(user="kvr-indexer", password_file="/run/secrets/pw", tls_ca="/ca.pem")


@pytest.mark.parametrize(
    ("exc", "kind", "text"),
    [
        (nats.errors.Error("nats: 'Authorization Violation'"), "authorization", "rejected the credentials (user 'kvr-indexer'"),
        (ssl.SSLCertVerificationError(1, "certificate verify failed"), "tls", "not trusted"),
        (ssl.SSLError(1, "[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 alert certificate required"), "tls", "requires a client certificate"),
        (ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number"), "tls", "handshake_first"),
        (nats.errors.Error("nats: no ssl context provided"), "tls", "requires TLS"),
        (ConnectionRefusedError(111, "Connection refused"), "unreachable", "Connection refused"),
        (TimeoutError(), "timeout", "KVR_NATS_TLS_HANDSHAKE_FIRST"),
        (NatsConfigError("KVR_NATS_TLS_CA: no readable file at /x"), "config", "KVR_NATS_TLS_CA"),
    ],
)
def test_describe_failure_names_the_cause_and_the_setting(exc, kind, text):
    got_kind, reason = describe_failure(exc, AUTH)
    assert got_kind == kind and text in reason
    assert "password" not in reason or "/run/secrets/pw" in reason  # a path, never a value


def test_connection_state_reports_why_and_counts_each_denied_subject_once():
    state = ConnectionState(servers="tls://h:4222")
    state.attempts, state.error_kind, state.error = 3, "tls", "the NATS server certificate is not trusted"
    assert state.reason() == "NATS connecting: tls: the NATS server certificate is not trusted"
    assert state.snapshot()["attempts"] == 3
    assert state.note_denied('nats: permissions violation for publish to "kvr.a.bookings.x"') is True
    assert state.note_denied('nats: permissions violation for publish to "kvr.a.bookings.x"') is False
    assert state.note_denied('nats: permissions violation for subscription to "kvr.a.epp.query"') is True
    assert state.denied_total == 3 and state.snapshot()["permission_denied"]["subjects"]["publish"] == ["kvr.a.bookings.x"]
    state.state = "connected"
    assert state.reason() is None and "error" not in state.snapshot()


# ---- the role table --------------------------------------------------------------------------------


def test_every_role_subscribes_only_to_its_own_inboxes_and_roles_without_endpoints_cannot_reply():
    for role in ROLES:
        perms = role_permissions(role, Scope(pools=("p",)))
        inboxes = [s for s in perms.subjects("sub") if s.startswith("_INBOX")]
        assert inboxes and all(s.startswith(inbox_prefix_for(role) + ".") or role in ("gateway", "provisioner") for s in inboxes)
        assert "_INBOX.>" not in perms.subjects("sub") and ">" not in perms.subjects("pub")
    assert not role_permissions("relay", Scope(pools=("p",))).allow_responses
    assert not role_permissions("gateway").allow_responses


def test_relay_permissions_are_its_pools_and_optionally_its_worker():
    pool_wide = role_permissions("relay", Scope(pools=("llama",)))
    assert "kvr.llama.kv.*.*" in pool_wide.subjects("pub") and "$KV.KVR_WORKERS.llama.*" in pool_wide.subjects("pub")
    assert not [s for s in pool_wide.subjects("pub") if "bookings" in s or s.startswith("kvr.") and ".llama." not in s]
    bound = role_permissions("relay", Scope(pools=("llama",), relay_worker_id=42))
    assert {"kvr.llama.kv.42.*", "$KV.KVR_WORKERS.llama.42", "$KV.KVR_RELAY.llama.42.*"} <= set(bound.subjects("pub"))
    assert bound.user == "kvr-relay-llama-42"
    with pytest.raises(ValueError, match="exactly one pool"):
        role_permissions("relay", Scope(pools=("a", "b")))
    with pytest.raises(ValueError, match="unknown role"):
        role_permissions("root")


def test_readers_pin_their_pool_in_the_consumer_subject_unless_they_serve_several():
    one = role_permissions("indexer", Scope(pools=("a",))).subjects("pub")
    assert "$JS.API.CONSUMER.CREATE.KVR_KV.*.kvr.a.kv.>" in one and "$JS.API.CONSUMER.CREATE.KVR_KV.*" not in one
    two = role_permissions("indexer", Scope(pools=("a", "b"))).subjects("pub")
    assert "$JS.API.CONSUMER.CREATE.KVR_KV.*" in two


def test_only_the_provisioner_creates_streams_and_only_the_scheduler_publishes_bookings():
    for role in ROLES:
        scope = Scope(pools=("p",))
        pubs = role_permissions(role, scope).subjects("pub")
        creates = [s for s in pubs if ".STREAM.CREATE." in s or ".STREAM.UPDATE." in s or ".STREAM.DELETE." in s]
        assert bool(creates) == (role == "provisioner"), role
        books = [s for s in pubs if s.startswith("kvr.") and ".bookings." in s]
        assert bool(books) == (role == "scheduler"), role
    assert role_permissions("scheduler", Scope(router_id="r1")).subjects("pub").count("kvr.default.bookings.r1") == 1


def test_operator_is_read_only():
    pubs = role_permissions("operator").subjects("pub")
    assert not [s for s in pubs if not s.startswith(("$JS.API.", "$JS.FC.")) and not s.endswith(("indexer.dump", "indexer.match")) and "scheduler.state" not in s]
    assert not [s for s in pubs if any(w in s for w in ("PURGE", "DELETE", "UPDATE", "STREAM.CREATE"))]


def test_server_config_rendering():
    perms = role_permissions("gateway")
    text = render_conf(accounts_config([User(perms, password=Raw("$PW"))]))
    assert 'user: "kvr-gateway"' in text and "password: $PW" in text and "jetstream: enabled" in text
    assert '"kvr.default.epp.query"' in text


def test_nats_config_cli_outputs_share_the_table():
    cfg = NamesConfig.build(pool=["llama"])
    users = users_for(cfg)
    assert [u.permissions.user for u in users] == [
        "kvr-indexer", "kvr-scheduler", "kvr-epp-bridge", "kvr-gateway", "kvr-operator", "kvr-provisioner", "kvr-relay-llama"
    ]
    values = helm_values(users)
    entries = values["config"]["merge"]["accounts"]["KVR"]["users"]
    assert entries[0]["password"] == "<< $PASSWORD_KVR_INDEXER >>"
    assert values["container"]["env"]["PASSWORD_KVR_RELAY_LLAMA"]["valueFrom"]["secretKeyRef"] == {"name": "kvr-nats-relay-llama", "key": "password"}
    table = markdown_table(["llama"], Names())
    assert "**relay** (`kvr-relay-llama`)" in table and "`kvr.llama.kv.*.*`" in table


def test_nkey_users_replace_passwords_for_identities_with_public_keys(tmp_path):
    import os

    import nkeys

    keys = [nkeys.from_seed(bytearray(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER))).public_key.decode() for _ in range(2)]
    (tmp_path / "kvr-indexer.pub").write_text(f"# old and new during a rotation\n{keys[0]}\n{keys[1]}\n")
    cfg = NamesConfig.build(pool=["default"])
    users = users_for(cfg, nkeys_dir=tmp_path)
    indexer = [u for u in users if u.permissions.user == "kvr-indexer"]
    assert [u.nkey for u in indexer] == keys and all("password" not in u.entry() for u in indexer)
    assert "PASSWORD_KVR_INDEXER" not in helm_values(users)["container"]["env"]
    (tmp_path / "kvr-gateway.pub").write_text("not-a-key\n")
    with pytest.raises(ValueError, match="NKEY user public keys"):
        users_for(cfg, nkeys_dir=tmp_path)


def test_docs_security_holds_the_role_table_of_the_code():
    text = (Path(__file__).resolve().parents[2] / "docs" / "security.md").read_text()
    start, end = "<!-- role-table:start -->\n", "<!-- role-table:end -->"
    section = text.split(start, 1)[1].split(end, 1)[0]
    assert section == markdown_table(["default"], Names()), "regenerate: kvr nats-config --format table"
