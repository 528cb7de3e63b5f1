"""Pure parsing, tokenization, pods mapping and headers: no NATS."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.lib.tokenizer import build_tokenizer_dir
from schemas.api import EppPod, EppQueryRequest, SelectReply, Target
from schemas.codec import SchemaError, convert
from schemas.discovery import WorkerRecord
from schemas.hashing import local_block_hashes, salt_seed
from services.epp_bridge.decision import query_reply, routing_headers, select_request
from services.epp_bridge.pods import PodIndex
from services.epp_bridge.prompt import parse_body, prompt_tokens
from services.epp_bridge.tokenizer import PoolTokenizer, TokenizerError, parse_tokenizer_dirs
from services.runtime.responder import ServiceError


def tokens_of(body: dict, tok: PoolTokenizer | None, max_tokens: int = 10_000):
    return prompt_tokens(body, parse_body(body), tok, max_tokens)


def test_completions_string_adds_bos(pool_tokenizer):
    p = tokens_of({"prompt": "What is the capital of France?"}, pool_tokenizer)
    bos = pool_tokenizer.tokenizer.token_to_id("<s>")
    assert p.kind == "completions" and p.source == "tokenizer"
    assert p.token_ids[0] == bos and len(p.token_ids) > 3
    assert p.token_ids[1:] == pool_tokenizer.tokenizer.encode("What is the capital of France?", add_special_tokens=False).ids
    no_special = tokens_of({"prompt": "What is the capital of France?", "add_special_tokens": False}, pool_tokenizer)
    assert no_special.token_ids == p.token_ids[1:]


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=300), special=st.booleans())
def test_encoding_gives_the_ids_of_the_reference_encode(pool_tokenizer, text, special):
    """`encode_text` / `encode_batch` take tokenizers' offset-free path; the ids must not change."""
    reference = pool_tokenizer.tokenizer.encode(text, add_special_tokens=special).ids
    assert pool_tokenizer.encode_text(text, special) == reference
    assert pool_tokenizer.encode_batch([text, "the lazy dog"], special)[0] == reference


def test_encoding_lets_other_threads_run(pool_tokenizer):
    """`--epp-tokenize-threads` only helps if the encode releases the GIL (tokenizers' `encode` does not):
    while a worker thread encodes a long prompt, this thread must keep running."""
    import threading
    import time

    text = "the quick brown fox jumps over the lazy dog " * 8000  # ≈ 350 KB: tens of ms to encode
    took: list[float] = []
    started = threading.Event()
    began: list[float] = []

    def work() -> None:
        began.append(time.perf_counter())
        started.set()
        pool_tokenizer.encode_text(text, False)
        took.append(time.perf_counter() - began[0])

    worker = threading.Thread(target=work)
    worker.start()
    started.wait()  # returns only once this thread gets the GIL back
    last = began[0]
    longest_gap = 0.0
    while worker.is_alive():
        now = time.perf_counter()
        longest_gap = max(longest_gap, now - last)
        last = now
    worker.join()
    # Holding the GIL would stall this loop for the whole encode.
    assert took[0] > 0.01 and longest_gap < took[0] / 2, (took, longest_gap)


def test_completions_token_ids_and_batches(pool_tokenizer):
    assert tokens_of({"prompt": [5, 6, 7]}, None).token_ids == [5, 6, 7]
    batch = tokens_of({"prompt": [[5, 6, 7], [8, 9]]}, None)
    assert batch.token_ids == [5, 6, 7] and batch.isl_tokens == 5
    strings = tokens_of({"prompt": ["the quick brown fox", "the lazy dog"]}, pool_tokenizer)
    first = tokens_of({"prompt": "the quick brown fox"}, pool_tokenizer)
    second = tokens_of({"prompt": "the lazy dog"}, pool_tokenizer)
    assert strings.token_ids == first.token_ids
    assert strings.isl_tokens == len(first.token_ids) + len(second.token_ids)


def test_chat_template_renders_roles_parts_and_tools(pool_tokenizer):
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": [{"type": "text", "text": "What is"}, {"type": "image_url", "image_url": {"url": "x"}}, {"type": "text", "text": "the capital?"}]},
    ]
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    text = pool_tokenizer.render_chat(messages, tools, add_generation_prompt=True)
    assert text.startswith("<s><|tools|>")
    assert '"name": "weather"' in text
    assert "<|system|>You are a helpful assistant.<|end|>\n" in text
    assert "<|user|>What is\nthe capital?<|end|>\n" in text
    assert text.endswith("<|assistant|>")
    p = tokens_of({"messages": messages, "tools": tools}, pool_tokenizer)
    assert p.kind == "chat"
    assert p.token_ids == pool_tokenizer.tokenizer.encode(text, add_special_tokens=False).ids
    # The template writes BOS itself: it is not added twice.
    bos = pool_tokenizer.tokenizer.token_to_id("<s>")
    assert p.token_ids[0] == bos and p.token_ids[1] != bos
    no_gen = tokens_of({"messages": messages, "add_generation_prompt": False}, pool_tokenizer)
    assert not pool_tokenizer.tokenizer.decode(no_gen.token_ids, skip_special_tokens=False).endswith("<|assistant|>")


def test_token_data_wins_over_text(pool_tokenizer):
    p = tokens_of({"messages": [{"role": "user", "content": "hi"}], "nvext": {"token_data": [1, 2, 3]}}, pool_tokenizer)
    assert p.token_ids == [1, 2, 3] and p.source == "token_data"


@pytest.mark.parametrize(
    "body, code_or_path",
    [
        ({}, "$.body"),
        ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "$.body"),
        ({"prompt": [1, "a"]}, "$.body"),
        ({"prompt": []}, "$.body"),
        ({"messages": []}, "$.body.messages"),
        ({"messages": [{"role": "user", "content": 5}]}, "$.body.messages[0].content"),
        ({"prompt": "x", "nvext": {"token_data": [-1]}}, "$.body.nvext.token_data[0]"),
        ({"prompt": "x", "nvext": {"backend_instance_id": -3}}, "$.body.nvext.backend_instance_id"),
        ({"prompt": "x", "nvext": {"routing_constraints": {"required_taints": [""]}}}, "$.body.nvext.routing_constraints.required_taints[0]"),
        ({"prompt": "x", "nvext": {"agent_hints": {"priority": 1 << 40}}}, "$.body.nvext.agent_hints.priority"),
    ],
)
def test_bad_bodies_name_the_field(body, code_or_path):
    with pytest.raises(SchemaError) as err:
        parse_body(body)
    assert err.value.path == code_or_path


def test_limits_and_template_errors(pool_tokenizer):
    with pytest.raises(ServiceError) as err:
        tokens_of({"prompt": "the quick brown fox jumps over the lazy dog"}, pool_tokenizer, max_tokens=4)
    assert err.value.code == "invalid_request" and "limit of 4" in err.value.message
    with pytest.raises(ServiceError) as err:
        tokens_of({"prompt": [1] * 5}, None, max_tokens=4)
    assert err.value.path == "$.body.prompt"
    with pytest.raises(ServiceError) as err:
        tokens_of({"prompt": "", "add_special_tokens": False}, pool_tokenizer)
    assert "empty" in err.value.message
    with pytest.raises(ServiceError) as err:
        tokens_of({"messages": [{"role": "wizard", "content": "x"}]}, pool_tokenizer)
    assert err.value.code == "invalid_request" and "unknown role wizard" in err.value.message
    with pytest.raises(ServiceError) as err:
        tokens_of({"prompt": "hello"}, None)
    assert "no tokenizer" in err.value.message


def test_tokenizer_dir_errors_and_mapping(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        PoolTokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{nope")
    with pytest.raises(TokenizerError, match="cannot load"):
        PoolTokenizer.load(tmp_path)
    no_template = PoolTokenizer.load(build_tokenizer_dir(tmp_path / "plain", with_template=False))
    with pytest.raises(ServiceError, match="no chat template"):
        tokens_of({"messages": [{"role": "user", "content": "x"}]}, no_template)
    assert parse_tokenizer_dirs(["/a", "p2=/b"], ["p1", "p2"]) == {"p2": "/b", "p1": "/a"}
    assert parse_tokenizer_dirs(["p1=/x"], ["p1", "p2"]) == {"p1": "/x"}


def _rec(wid: int, **kw) -> WorkerRecord:
    return WorkerRecord(worker_id=wid, pool="p", **kw)


def test_pod_index_knows_the_block_size_only_when_the_workers_agree():
    def rec(wid: int, bs: int) -> WorkerRecord:
        return WorkerRecord(worker_id=wid, pool="p", heartbeat_ms=0, pod_name=f"vllm-{wid}", block_size=bs)

    assert PodIndex([rec(1, 16), rec(2, 16)]).block_size == 16
    assert PodIndex([rec(1, 16), rec(2, 32)]).block_size is None  # the scheduler hashes with its own choice
    assert PodIndex([]).block_size is None


def test_pods_map_by_name_endpoint_rank_and_dynamo_shapes():
    index = PodIndex(
        [
            _rec(1, pod_name="vllm-0", address="10.0.0.1", port=8000),
            _rec(2, pod_name="vllm-1", address="10.0.0.2", port=8000),
            _rec(3, address="10.0.0.3", dp_size=2, dp_ports=[9000, 9001]),
        ]
    )
    pods = lambda *items: [convert(p, EppPod) for p in items]  # noqa: E731
    assert index.allowed(None) is None and index.allowed([]) is None
    assert index.allowed(pods({"name": "vllm-1"})) == [2]
    assert index.allowed(pods({"podName": "vllm-0"}, {"pod": {"podName": "vllm-1"}})) == [1, 2]
    assert index.allowed(pods({"address": "10.0.0.3", "port": 9001})) == [3]
    # GAIE's virtual pod of the N-th rank; vllm-0 has one rank, so "-rank-1" names nothing (it used
    # to mean the whole worker, whose rank 0 the gateway had not offered).
    assert index.allowed(pods({"name": "vllm-0-rank-0"})) == [1]
    assert index.allowed(pods({"name": "vllm-0-rank-1"})) == []
    assert index.allowed(pods({"name": "unknown", "address": "10.0.0.2", "port": 8000})) == [2]
    assert index.allowed(pods({"name": "ghost"}, {"address": "1.2.3.4", "port": 1})) == []


def test_required_taints_check():
    index = PodIndex([_rec(1, taints=["zone=a", "gpu=h100"]), _rec(2, taints=["zone=b"])])
    assert index.required_taints_met([1, 2], ["zone=a"])
    assert not index.required_taints_met([2], ["zone=a"])
    assert not index.required_taints_met([1, 2], ["zone=a", "zone=b"])


def test_select_request_and_headers(pool_tokenizer):
    body = {
        "prompt": [1, 2, 3],
        "cache_salt": "top",
        "nvext": {
            "backend_instance_id": 7,
            "dp_rank": 1,
            "lora_name": "ad",
            "routing_constraints": {"required_taints": ["zone=a"], "preferred_taints": {"gpu=h100": 0.5}},
            "agent_hints": {"priority": 3, "osl": 99},
        },
    }
    req = convert({"request_id": "r-1", "body": body, "mode": "disaggregated", "book": False, "policy": "kv"}, EppQueryRequest)
    parsed = parse_body(body)
    prompt = prompt_tokens(body, parsed, None, 100)
    s = select_request(req, parsed, prompt, [7, 9])
    assert (s.request_id, s.token_ids, s.isl_tokens, s.allowed_worker_ids) == ("r-1", [1, 2, 3], 3, [7, 9])
    assert (s.pinned_worker_id, s.pinned_dp_rank, s.lora_name, s.cache_salt) == (7, 1, "ad", "top")
    assert s.routing_constraints.required_taints == ["zone=a"]
    assert (s.priority, s.expected_output_tokens, s.mode, s.book, s.policy) == (3, 99, "disaggregated", False, "kv")
    # With the pool's block size, the prompt travels as local block hashes seeded by LoRA and salt.
    hashed = select_request(req, parsed, prompt, [7, 9], block_size=2)
    assert hashed.token_ids is None and hashed.isl_tokens == 3
    assert hashed.block_hashes == local_block_hashes([1, 2, 3], 2, salt_seed("ad", "top")) and len(hashed.block_hashes) == 1

    agg = SelectReply(decode=Target(7, 0, "vllm-7", None), prefill=None, overlap_blocks=2, isl_tokens=3, block_size=16, cost=1.0)
    pods = [convert({"name": "vllm-7", "address": "10.0.0.7", "port": 8000}, EppPod)]
    assert routing_headers(agg, pods) == {
        "x-gateway-destination-endpoint": "10.0.0.7:8000",
        "x-worker-instance-id": "7",
        "x-dp-rank": "0",
        "x-dynamo-routing-mode": "aggregated",
    }
    dis = SelectReply(
        decode=Target(7, 1, "vllm-7", "10.0.0.7:8001"), prefill=Target(3, 0, "p-3", "10.0.0.3:8000"),
        overlap_blocks=0, isl_tokens=3, block_size=16, cost=1.0, mode="disaggregated",
    )
    out = query_reply(convert({"request_id": "r-1", "body": body, "return_token_ids": True}, EppQueryRequest), dis, prompt)
    assert out.headers == {
        "x-gateway-destination-endpoint": "10.0.0.7:8001",
        "x-worker-instance-id": "7",
        "x-dp-rank": "1",
        "x-prefill-instance-id": "3",
        "x-prefill-dp-rank": "0",
        "x-prefiller-host-port": "10.0.0.3:8000",
        "x-dynamo-routing-mode": "disaggregated",
    }
    assert out.token_ids == [1, 2, 3] and out.mode == "disaggregated" and out.prefill.worker_id == 3


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
body_like = st.fixed_dictionaries(
    {},
    optional={
        "prompt": json_values | st.text(max_size=40) | st.lists(st.integers(-5, 2**33), max_size=5),
        "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "x", ""]), "content": json_values}), max_size=3) | json_values,
        "tools": json_values,
        "nvext": st.fixed_dictionaries({}, optional={"token_data": json_values | st.lists(st.integers(-2, 2**33), max_size=5), "agent_hints": json_values}) | json_values,
        "add_generation_prompt": json_values,
    },
)


@settings(max_examples=150, deadline=None)
@given(body=body_like)
def test_arbitrary_bodies_give_tokens_or_a_client_error(body, pool_tokenizer):
    try:
        p = tokens_of(body, pool_tokenizer, max_tokens=512)
    except (SchemaError, ServiceError) as exc:
        assert getattr(exc, "code", "invalid_request") == "invalid_request"
        return
    assert p.token_ids and all(0 <= t < 2**32 for t in p.token_ids) and p.isl_tokens <= 512
