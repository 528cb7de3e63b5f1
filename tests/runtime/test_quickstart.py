"""The README's quick-start block works as written against a running `kvr dev` (what `make run` starts).

One `kvr dev` stack (on free ports, its demo shortened) serves the whole block; each command runs
with bash after sourcing the env file `kvr dev` wrote, exactly as the README shows it, except that
the env file and the replays' `--out` folders point into the test's temporary directory. Every
command must succeed within two minutes, and the ones whose point is visible in their output are
checked for it (the chosen worker in the response headers, a cache hit on the repeated prompt, SSE).
Finally Ctrl-C (SIGINT) must stop the stack cleanly: exit 0, env file removed, no log line above info.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
START, END = "<!-- quickstart:start -->", "<!-- quickstart:end -->"
COMMAND_TIMEOUT_S = 120
pytestmark = pytest.mark.integration


def quickstart_commands() -> list[str]:
    """The block's commands: continuation lines joined, comments and blank lines dropped."""
    text = (REPO / "README.md").read_text()
    block = text.split(START, 1)[1].split(END, 1)[0]
    lines = [line for line in block.strip().splitlines() if not line.startswith("```")]
    commands: list[str] = []
    current = ""
    for line in lines:
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip("\\").rstrip() + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            commands.append(current.strip())
            current = ""
    return commands


def test_the_block_is_what_a_newcomer_needs() -> None:
    commands = quickstart_commands()
    assert commands[0].startswith(". .kvr/dev/env")
    joined = "\n".join(commands)
    for needed in ("curl", "/v1/chat/completions", "kvr epp query", "kvr epp extproc", "--offline", "--fleet external"):
        assert needed in joined, f"the quick start lost its {needed!r} command"
    # every replay in the block is a short slice
    assert all("--limit" in c for c in commands if "kvr replay" in c)


def split_http(out: str) -> tuple[dict[str, str], str]:
    head, _, body = out.replace("\r\n", "\n").partition("\n\n")
    headers = {}
    for line in head.splitlines()[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    assert head.startswith("HTTP/1.1 200"), out[:300]
    return headers, body


def test_quickstart_commands_run_against_kvr_dev(tmp_path: Path) -> None:
    env_file = tmp_path / "env"
    run_dir = tmp_path / "run"
    dev_out = open(tmp_path / "dev.out", "wb")  # noqa: SIM115 - the child writes it until the end
    dev = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "dev", "--nats-port", "0", "--gateway-port", "0", "--extproc-port", "0",
         "--env-file", str(env_file), "--run-dir", str(run_dir), "--limit", "100", "--online-limit", "30"],
        cwd=REPO, stdout=dev_out, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not env_file.exists():
            assert dev.poll() is None, "kvr dev exited early:\n" + (tmp_path / "dev.out").read_text()[-3000:]
            assert time.monotonic() < deadline, "kvr dev did not serve within 240 s:\n" + (tmp_path / "dev.out").read_text()[-3000:]
            time.sleep(0.5)
        printed = (tmp_path / "dev.out").read_text()
        assert "curl -si http://127.0.0.1:" in printed and "headline" in printed

        outputs: list[str] = []
        for command in quickstart_commands()[1:]:
            runnable = command.replace(".kvr/", f"{tmp_path}/")
            started = time.monotonic()
            proc = subprocess.run(
                ["bash", "-c", f". {env_file} && {runnable}"], cwd=REPO, capture_output=True, text=True,
                timeout=COMMAND_TIMEOUT_S, env={**os.environ, "COLUMNS": "120"},
            )
            took = time.monotonic() - started
            assert proc.returncode == 0, (
                f"{command}\nexit {proc.returncode} after {took:.1f} s\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
            )
            outputs.append(proc.stdout)

        ran = list(zip(quickstart_commands()[1:], outputs, strict=True))
        chats = [(c, o) for c, o in ran if c.startswith("curl -si")]
        headers, body = split_http(chats[0][1])
        assert headers["x-worker-instance-id"] and headers["x-gateway-destination-endpoint"].startswith("127.0.0.1:")
        assert json.loads(body)["usage"]["completion_tokens"] == 16
        (h1, _), (h2, b2) = split_http(chats[1][1]), split_http(chats[2][1])
        assert h2["x-worker-instance-id"] == h1["x-worker-instance-id"], "the repeated prompt went to another worker"
        assert json.loads(b2)["usage"]["prompt_tokens_details"]["cached_tokens"] >= 128
        streamed = next(o for c, o in ran if '"stream": true' in c)
        assert streamed.rstrip().endswith("data: [DONE]")
        query = next(o for c, o in ran if "kvr epp query" in c)
        assert json.loads(query)["status"] == "ok"
    finally:
        if dev.poll() is None:
            dev.send_signal(signal.SIGINT)  # what Ctrl-C in `make run` sends
        try:
            code = dev.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(dev.pid, signal.SIGKILL)
            raise
        dev_out.close()
    assert code == 0, (tmp_path / "dev.out").read_text()[-3000:]
    assert not env_file.exists(), "kvr dev left its env file behind"
    loud = [line for log in (run_dir / "logs").glob("*.log") if log.name != "nats-server.log"
            for line in log.read_text().splitlines() if re.search(r'"level": ?"(warning|error|critical)"', line)]
    assert not loud, "log lines above info:\n" + "\n".join(loud[:10])
