"""The `kvr` client commands against a NATS server that is not there, and `--help` of every command."""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from services.cli import COMMANDS
from services.runtime.embedded import free_port

REPO = Path(__file__).resolve().parents[2]
TRACE = REPO / "data" / "mooncake_synthetic_trace.jsonl.gz"
# Interpreter start-up and imports on a loaded two-core machine, on top of the command's own budget.
STARTUP_SLACK_S = 20.0


def kvr(*args: str, timeout: float = 60.0) -> tuple[int, str, str, float]:
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        capture_output=True, text=True, timeout=timeout, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    return proc.returncode, proc.stdout, proc.stderr, time.monotonic() - started


class SilentListener:
    """A loopback port that accepts connections and never says anything (a hung or wrong server)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)

    def close(self) -> None:
        for c in self.conns:
            c.close()
        self.sock.close()


@pytest.mark.integration
def test_epp_query_against_a_closed_port_fails_within_timeout_with_one_line():
    url = f"nats://127.0.0.1:{free_port()}"
    code, out, err, took = kvr("epp", "query", "--pool", "dev", "--token-ids", "1,2,3", "--nats-url", url, "--timeout", "2")
    assert code == 2 and out == ""
    assert err.count("\n") == 1, err
    assert err.startswith(f"kvr epp: cannot reach NATS at {url} within 2 s (")
    assert "refused" in err.lower() or "connect call failed" in err.lower()
    assert took < 2 + STARTUP_SLACK_S


@pytest.mark.integration
def test_epp_cleanup_against_a_silent_server_fails_within_timeout_with_one_line():
    silent = SilentListener()
    try:
        code, out, err, took = kvr(
            "epp", "cleanup", "--pool", "dev", "--request-id", "r-1", "--phase", "free",
            "--nats-url", f"nats://127.0.0.1:{silent.port}", "--timeout", "1.5",
        )
    finally:
        silent.close()
    assert code == 2 and out == ""
    assert err.splitlines() == [f"kvr epp: cannot reach NATS at nats://127.0.0.1:{silent.port} within 1.5 s (no answer in time)"]
    assert took < 1.5 + STARTUP_SLACK_S


@pytest.mark.integration
def test_epp_query_without_a_bridge_says_which_pool_has_no_responders(nats_url):
    code, out, err, _ = kvr("epp", "query", "--pool", "nosuch", "--token-ids", "1,2", "--nats-url", nats_url, "--timeout", "3")
    assert code == 2 and out == ""
    assert err.splitlines() == [
        "kvr epp: no EPP bridge serves pool 'nosuch' (kvr.nosuch.epp.query has no responders; check --pool and --subject-prefix)"
    ]


@pytest.mark.integration
def test_replay_online_against_a_closed_port_fails_within_its_connect_timeout_with_one_line(tmp_path):
    url = f"nats://127.0.0.1:{free_port()}"
    code, out, err, took = kvr(
        "replay", str(TRACE), "--limit", "5", "--nats-url", url, "--connect-timeout-s", "2", "--out", str(tmp_path)
    )
    assert code == 2
    assert err.count("\n") == 1 and err.startswith(f"kvr replay: cannot reach NATS at {url} within 2 s ("), err
    assert "Traceback" not in out + err
    assert took < 2 + STARTUP_SLACK_S


@pytest.mark.unit
def test_connect_error_message_drops_credentials_from_the_url():
    from services.runtime.natsio import _without_userinfo

    assert _without_userinfo("nats://alice:s3cret@10.0.0.1:4222") == "nats://10.0.0.1:4222"
    assert _without_userinfo("tls://token@nats:4222") == "tls://nats:4222"
    assert _without_userinfo("127.0.0.1:4222") == "127.0.0.1:4222"


# Flags whose absence is the default (one of the request's sources, optional body fields) or required.
NO_DEFAULT = {
    "--prompt", "--message", "--messages", "--token-ids", "--body-file", "--model", "--tools", "--nvext",
    "--pod", "--pod-json", "--phase", "--header", "--worker-id", "--prefill-worker-id", "--booking-id",
}


def help_blocks(text: str) -> dict[str, str]:
    """--flag → its help text (argparse's layout: the option line, then indented continuation lines)."""
    blocks: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"^  (-\w, )?(--[\w-]+)(.*)$", line)
        if m:
            current = m.group(2)
            blocks[current] = m.group(3)
        elif current and line.startswith("   "):
            blocks[current] += " " + line.strip()
        else:
            current = None
    return blocks


def command_help(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    from services.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(list(argv))
    assert exit_.value.code == 0
    return capsys.readouterr().out


@pytest.mark.unit
def test_help_of_every_command_shows_the_default_of_every_flag_that_takes_a_value(capsys):
    commands = [[name] for name in COMMANDS if name not in ("epp", "schemas", "config-table")]
    commands += [["epp", "query"], ["epp", "book"], ["epp", "cleanup"]]
    checked = 0
    for argv in commands:
        name, text = " ".join(argv), command_help(capsys, *argv, "--help")
        blocks = help_blocks(text)
        assert blocks, f"kvr {name} --help printed no options"
        for flag, help_text in blocks.items():
            if flag == "--help" or flag in NO_DEFAULT:
                continue
            takes_value = re.match(r"^ [A-Z{]", help_text)  # `--flag METAVAR help` vs `--switch      help`
            if not takes_value:
                continue
            assert "default" in help_text, f"kvr {name} --help: {flag} shows no default: {help_text!r}"
            checked += 1
    assert checked > 150


@pytest.mark.unit
def test_help_formatter_leaves_unset_and_switch_flags_alone():
    from services.runtime.config import HelpFormatter

    parser = argparse.ArgumentParser(prog="x", formatter_class=HelpFormatter)
    parser.add_argument("--n", type=int, default=3, help="count")
    parser.add_argument("--s", default="a", help="text")
    parser.add_argument("--own", default="b", help="mine (default: whatever b means)")
    parser.add_argument("--unset", default=None, help="optional")
    parser.add_argument("--flag", action="store_true", help="switch")
    blocks = help_blocks(parser.format_help())
    assert blocks["--n"].endswith("count (default: 3)")
    assert blocks["--s"].endswith("text (default: 'a')")
    assert blocks["--own"].endswith("mine (default: whatever b means)")
    assert blocks["--unset"].endswith("optional") and blocks["--flag"].endswith("switch")


@pytest.mark.unit
def test_each_command_parses_exactly_the_settings_and_defaults_the_configuration_table_shows(capsys):
    """The README table is built from REGISTRY.commands; the commands' own parsers must agree."""
    from services.config_table import load_all
    from services.runtime.config import REGISTRY

    load_all()
    assert set(REGISTRY.commands) == {
        "dev-gateway", "epp-bridge", "indexer", "mock-workers", "provision", "relay", "replay", "scheduler"
    }
    for command, settings in REGISTRY.commands.items():
        blocks = help_blocks(command_help(capsys, command, "--help"))
        flags = {flag for flag in blocks if flag != "--help"}
        assert flags == {s.flag for s in settings}, command
        for s in settings:
            assert f"[env {s.env}, default {s.default!r}]" in blocks[s.flag], (command, s.flag, blocks[s.flag])
    # the overrides the table has to show
    scheduler = {s.name: s.default for s in REGISTRY.commands["scheduler"]}
    assert scheduler["snapshot_every_events"] == 0 and scheduler["snapshot_interval_s"] == 0.0
    assert {s.name: s.default for s in REGISTRY.commands["replay"]}["speedup"] == 10.0
    assert {s.name: s.default for s in REGISTRY.commands["mock-workers"]}["block_size"] == 64
