"""`kvr epp query|book|cleanup|extproc|health` — talk to the EPP bridge as a gateway would.

`query` / `book` / `cleanup` send real epp.query / epp.book / epp.cleanup requests over NATS; `extproc` drives one HTTP
request through an endpoint picker's ext_proc gRPC port the way Envoy does (request headers and
body, then a response and the end of stream, so a booking is freed), and `health` asks its gRPC
health service. Both work against any endpoint picker that implements GAIE's protocol.

Exit status: 0 = ok reply / routed / SERVING, 1 = error reply / ImmediateResponse / not serving,
2 = usage error or no answer.

    kvr epp query --pool llama --prompt "Hello"                      # completions prompt
    kvr epp query --pool llama --message user:"Hi" --pod vllm-0      # chat, restricted to one pod
    kvr epp query --pool llama --token-ids 1,2,3 --no-book --return-token-ids
    kvr epp query --pool llama --body-file request.json              # a full OpenAI body ('-' = stdin)
    kvr epp query --pool llama --prompt "Hi" --header x-worker-instance-id:7   # pinned, as Dynamo's header
    kvr epp book  --pool llama --prompt "Hello" --request-id r-1 --worker-id 7 --dp-rank 1   # split API
    kvr epp cleanup --pool llama --request-id r-1 --phase free
    kvr epp extproc --target 127.0.0.1:9002 --prompt "Hello" --chunks 3          # through ext_proc
    kvr epp extproc --target epp:9002 --tls-ca ca.pem --subset 10.0.0.7:8000 --body-file req.json
    kvr epp health  --target epp:9002 --tls-ca ca.pem --tls-cert gw.pem --tls-key gw.key
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec

from schemas import codec
from schemas.api import POLICY_NAMES
from schemas.subjects import Names
from services.runtime.config import NATS_CONNECTION, HelpFormatter, NatsConnectionConfig, add_settings, resolve
from services.runtime.logs import redact, setup_logging


def _json_arg(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None


def _token_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError("token ids must be comma-separated integers") from None


def _message(text: str) -> dict[str, str]:
    role, sep, content = text.partition(":")
    if not sep or not role:
        raise argparse.ArgumentTypeError("a message is ROLE:TEXT, e.g. user:Hello")
    return {"role": role, "content": content}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvr epp", description=__doc__, formatter_class=HelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    add_settings(common, NATS_CONNECTION)  # --nats-url, credentials and TLS files (env KVR_NATS_*)
    common.add_argument("--pool", default="default", help="pool to ask")
    common.add_argument("--subject-prefix", default="kvr", help="subject prefix")
    common.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the reply, connecting included")
    common.add_argument("--request-id", default=None, help="request id (default for query: a fresh uuid)")
    sub = parser.add_subparsers(dest="action", required=True)

    body_args = argparse.ArgumentParser(add_help=False)
    src = body_args.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="completions prompt text")
    src.add_argument("--message", action="append", type=_message, help="chat message ROLE:TEXT (repeatable, in order)")
    src.add_argument("--messages", type=_json_arg, help="chat messages as a JSON array")
    src.add_argument("--token-ids", type=_token_ids, help="pre-tokenized prompt, sent as nvext.token_data")
    src.add_argument("--body-file", help="file with a full OpenAI request body (JSON); '-' reads stdin")
    body_args.add_argument("--model", default=None, help="model field of the body")
    body_args.add_argument("--tools", type=_json_arg, default=None, help="chat tools as a JSON array")
    body_args.add_argument("--nvext", type=_json_arg, default=None, help="nvext object (JSON) merged into the body")
    body_args.add_argument("--pod", action="append", default=[], help="candidate pod name (repeatable)")
    body_args.add_argument("--pod-json", action="append", type=_json_arg, default=[], help="candidate pod as JSON (repeatable)")
    body_args.add_argument("--header", action="append", default=[],
                           help="gateway request header NAME:VALUE (repeatable), e.g. x-worker-instance-id:7")
    body_args.add_argument("--return-token-ids", action="store_true", help="include the prompt's token ids in the reply")
    body_args.add_argument("--msgpack", action="store_true", help="send and receive msgpack instead of JSON")

    q = sub.add_parser("query", parents=[common, body_args], help="ask where to send a request", formatter_class=HelpFormatter)
    q.add_argument("--mode", choices=["auto", "aggregated", "disaggregated"], default="auto", help="routing mode")
    q.add_argument("--policy", choices=POLICY_NAMES, default=None,
                   help="routing policy (default: the scheduler's)")
    q.add_argument("--no-book", action="store_true", help="do not book the request (dry run)")

    b = sub.add_parser("book", parents=[common, body_args], help="book a target chosen elsewhere (epp.book, the split API)",
                       formatter_class=HelpFormatter)
    b.add_argument("--worker-id", type=int, required=True, help="the decode (or aggregated) worker")
    b.add_argument("--dp-rank", type=int, default=0, help="its dp rank (default 0)")
    b.add_argument("--prefill-worker-id", type=int, default=None, help="the prefill worker (a disaggregated booking)")
    b.add_argument("--prefill-dp-rank", type=int, default=0, help="its dp rank (default 0)")
    b.add_argument("--booking-id", default=None, help="name of this booking (default: generated)")

    grpc_common = argparse.ArgumentParser(add_help=False)
    grpc_common.add_argument("--target", default="127.0.0.1:9002", help="host:port of the endpoint picker's ext_proc server")
    grpc_common.add_argument("--tls", action="store_true", help="TLS with the system's CAs (implied by --tls-ca)")
    grpc_common.add_argument("--tls-ca", default=None, help="PEM CA bundle that signed the server certificate")
    grpc_common.add_argument("--tls-cert", default=None, help="client certificate (mTLS)")
    grpc_common.add_argument("--tls-key", default=None, help="client key (mTLS)")
    grpc_common.add_argument("--server-name", default=None, help="TLS server name to verify, when not the target's host")
    grpc_common.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for each answer")

    x = sub.add_parser(
        "extproc", parents=[grpc_common], help="route one request through ext_proc as Envoy does", formatter_class=HelpFormatter
    )
    xsrc = x.add_mutually_exclusive_group(required=True)
    xsrc.add_argument("--prompt", help="completions prompt text")
    xsrc.add_argument("--message", action="append", type=_message, help="chat message ROLE:TEXT (repeatable, in order)")
    xsrc.add_argument("--messages", type=_json_arg, help="chat messages as a JSON array")
    xsrc.add_argument("--token-ids", type=_token_ids, help="pre-tokenized prompt, sent as nvext.token_data")
    xsrc.add_argument("--body-file", help="file with a full OpenAI request body (JSON); '-' reads stdin")
    xsrc.add_argument("--no-body", action="store_true", help="a request without a body (GET)")
    x.add_argument("--model", default=None, help="model field of the body")
    x.add_argument("--tools", type=_json_arg, default=None, help="chat tools as a JSON array")
    x.add_argument("--nvext", type=_json_arg, default=None, help="nvext object (JSON) merged into the body")
    x.add_argument("--chunks", type=int, default=1, help="send the body in this many chunks")
    x.add_argument("--subset", action="append", default=None, help="subset hint endpoint ip:port (repeatable; '' = an empty subset)")
    x.add_argument("--request-mode", choices=["full_duplex_streamed", "streamed", "buffered"], default="full_duplex_streamed")
    x.add_argument("--response-mode", choices=["full_duplex_streamed", "streamed", "buffered", "none"], default="full_duplex_streamed")
    x.add_argument("--served", default=None, help="report this endpoint as the one that served the request (a fallback)")
    x.add_argument("--header", action="append", default=[], help="extra request header NAME:VALUE (repeatable)")

    h = sub.add_parser(
        "health", parents=[grpc_common], help="gRPC health of an endpoint picker (the protocol's four service names)",
        formatter_class=HelpFormatter,
    )
    h.add_argument("--service", action="append", default=None, help="service name to check (default: the four of the protocol)")

    c = sub.add_parser(
        "cleanup", parents=[common], help="report prefill completion or free a booked request", formatter_class=HelpFormatter
    )
    c.add_argument("--phase", choices=["prefill_complete", "free"], required=True, help="what happened to the request")
    c.add_argument("--msgpack", action="store_true", help="send and receive msgpack instead of JSON")
    return parser


def query_body(args: argparse.Namespace) -> dict[str, Any]:
    if args.body_file:
        text = sys.stdin.read() if args.body_file == "-" else Path(args.body_file).read_text(encoding="utf-8")
        body = json.loads(text)
    elif args.prompt is not None:
        body = {"prompt": args.prompt}
    elif args.token_ids is not None:
        body = {"prompt": "", "nvext": {"token_data": args.token_ids}}
    else:
        body = {"messages": args.messages if args.messages is not None else args.message}
    if args.model:
        body["model"] = args.model
    if args.tools is not None:
        body["tools"] = args.tools
    if args.nvext:
        body["nvext"] = {**(body.get("nvext") or {}), **args.nvext}
    return body


def _headers(items: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            raise argparse.ArgumentTypeError(f"a header is NAME:VALUE, got {item!r}")
        out[name.strip().lower()] = value.strip()
    return out


def query_payload(args: argparse.Namespace) -> dict[str, Any]:
    body = query_body(args)
    pods = [{"name": name} for name in args.pod] + list(args.pod_json)
    payload: dict[str, Any] = {
        "request_id": args.request_id or f"epp-cli-{uuid.uuid4().hex[:12]}",
        "body": body,
        "return_token_ids": args.return_token_ids,
    }
    if args.action == "book":
        payload["decode"] = {"worker_id": args.worker_id, "dp_rank": args.dp_rank}
        if args.prefill_worker_id is not None:
            payload["prefill"] = {"worker_id": args.prefill_worker_id, "dp_rank": args.prefill_dp_rank}
        if args.booking_id:
            payload["booking_id"] = args.booking_id
    else:
        payload.update(mode=args.mode, book=not args.no_book)
        if args.policy:
            payload["policy"] = args.policy
    if pods:
        payload["pods"] = pods
    headers = _headers(args.header)
    if headers:
        payload["headers"] = headers
    return payload


async def send(conn: Any, subject: str, payload: Any, timeout: float, msgpack: bool = False) -> Any:
    """One request and its decoded reply; connecting and waiting share the `timeout` budget.

    `conn`: the resolved NATS_CONNECTION settings (URL, credentials, TLS)."""
    from services.runtime.natsauth import NatsAuth
    from services.runtime.natsio import connect

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    nc = await connect(conn.nats_url, "kvr-epp", auth=NatsAuth.from_cfg(conn), connect_timeout=timeout, max_wait_s=timeout)
    try:
        ctype = codec.MSGPACK if msgpack else None
        headers = {codec.CONTENT_TYPE_HEADER: codec.MSGPACK} if msgpack else None
        wait = max(deadline - loop.time(), 0.05)
        msg = await nc.request(subject, codec.encode(payload, ctype), timeout=wait, headers=headers)
        if codec.is_msgpack(codec.content_type_of(msg.headers)):
            return msgspec.msgpack.decode(msg.data)
        return msgspec.json.decode(msg.data)
    finally:
        await nc.close()


def no_answer(exc: BaseException, subject: str, pool: str, timeout: float) -> str:
    """The one line `kvr epp` prints when there is no reply."""
    from nats.errors import NoRespondersError

    from services.runtime.natsio import NatsUnreachable

    if isinstance(exc, NatsUnreachable):
        return f"kvr epp: {exc}"
    if isinstance(exc, NoRespondersError):
        return f"kvr epp: no EPP bridge serves pool {pool!r} ({subject} has no responders; check --pool and --subject-prefix)"
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return f"kvr epp: no reply on {subject} within {timeout:g} s"
    return f"kvr epp: no answer on {subject}: {type(exc).__name__}: {redact(str(exc))}"


def _grpc_client(args: argparse.Namespace) -> Any:
    from .extproc_client import ExtProcClient

    return ExtProcClient(args.target, tls=args.tls, ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key, server_name=args.server_name)


async def run_extproc(args: argparse.Namespace, body: bytes | None) -> dict[str, Any]:
    from . import extproc_protocol as xp

    headers = dict(h.split(":", 1) for h in args.header)
    subset = None if args.subset is None else [s for s in args.subset if s]
    async with _grpc_client(args) as client:
        d = await client.lifecycle(
            body, chunks=args.chunks, subset=subset, headers=headers, served=args.served, timeout=args.timeout,
            request_mode=xp.MODE_NAMES[args.request_mode], response_mode=xp.MODE_NAMES[args.response_mode],
        )
    out: dict[str, Any] = {"routed": d.routed, "responses": d.responses}
    if d.routed:
        out.update(destination=d.destination, metadata=d.metadata, headers=d.headers, body_unchanged=d.body == (body or b""))
    else:
        out.update(status=d.status, error=d.error)
    return out


async def run_health(args: argparse.Namespace) -> dict[str, str]:
    names = args.service or ["", "liveness", "readiness", "envoy.service.ext_proc.v3.ExternalProcessor"]
    async with _grpc_client(args) as client:
        return {name: await client.health(name, timeout=args.timeout) for name in names}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging("console", "warning")  # the reply alone on stdout; trouble as one line on stderr
    if args.action in ("extproc", "health"):
        try:
            if args.action == "health":
                result: dict[str, Any] = asyncio.run(run_health(args))
                ok = all(v == "SERVING" for v in result.values())
            else:
                body = None if args.no_body else json.dumps(query_body(args)).encode()
                result = asyncio.run(run_extproc(args, body))
                ok = result["routed"]
        except (OSError, json.JSONDecodeError) as exc:
            print(f"kvr epp: cannot read the body: {exc}", file=sys.stderr)
            return 2
        except Exception as exc:  # noqa: BLE001 - unreachable server, TLS failure, timeout, protocol violation
            print(f"kvr epp: no answer from {args.target}: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 2
        print(json.dumps(result, indent=2, sort_keys=True))
        return 0 if ok else 1
    conn = resolve(args, NatsConnectionConfig)
    names = Names(prefix=args.subject_prefix)
    if args.action in ("query", "book"):
        if args.action == "book" and not args.request_id:
            parser.error("book needs --request-id")
        try:
            payload = query_payload(args)
        except (OSError, json.JSONDecodeError) as exc:
            print(f"kvr epp: cannot read the body: {exc}", file=sys.stderr)
            return 2
        except argparse.ArgumentTypeError as exc:
            parser.error(str(exc))
        subject = names.epp_query(args.pool) if args.action == "query" else names.epp_book(args.pool)
    else:
        if not args.request_id:
            parser.error("cleanup needs --request-id")
        payload = {"request_id": args.request_id, "phase": args.phase}
        subject = names.epp_cleanup(args.pool)
    try:
        reply = asyncio.run(send(conn, subject, payload, args.timeout, args.msgpack))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - connection refused, no responders, timeout
        print(no_answer(exc, subject, args.pool, args.timeout), file=sys.stderr)
        return 2
    print(json.dumps(reply, indent=2, sort_keys=True))
    return 0 if isinstance(reply, dict) and reply.get("status") == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
