"""Settings of `kvr relay` (env `KVR_<NAME>`, flags `--<name>`); COMMON settings come from the runtime."""

from __future__ import annotations

from services.runtime.config import COMMON, REGISTRY, Setting

SETTINGS = REGISTRY.register(
    "relay",
    [
        # engine side
        Setting(
            "source", "vllm",
            "what --zmq carries: vllm (vLLM/SGLang KV-event batches, one socket per dp rank) "
            "or dynamo (Dynamo's event plane: envelopes of RouterEvents)",
            choices=("vllm", "dynamo"),
        ),  # fmt: skip
        Setting(
            "zmq", ["tcp://127.0.0.1:5557"],
            "engine KV-event PUB endpoint(s): one = base (rank r at port+r), or one per dp rank; "
            "dynamo: every publisher endpoint, all ranks",
            is_list=True,
        ),  # fmt: skip
        Setting("replay", [], "engine replay ROUTER endpoint(s), same rule as --zmq (empty = no replay)", is_list=True),
        Setting("topic", "", "ZMQ topic to subscribe to (empty = all)"),
        Setting("zmq_hwm", 100_000, "receive high-water mark of each SUB socket (messages)", int),
        Setting("replay_timeout_s", 2.0, "give up on a replay after this long without a reply (gap becomes a cleared)", float),
        Setting("clear_on_start", True, "publish cleared per rank when the relay starts (drops state from before)", bool),
        Setting("salt_from_extra_keys", True, "take the cache salt from block 0's extra_keys (vLLM) when no cache_salt field", bool),
        # conversion and publishing
        Setting("max_batch_blocks", 128, "max blocks per RouterEvent when merging consecutive compatible events", int),
        Setting("max_events_per_message", 1024, "max RouterEvents per JetStream message", int),
        Setting("max_blocks_per_message", 8192, "max blocks per JetStream message (keeps payloads under NATS max_payload)", int),
        Setting("buffer_messages", 10_000, "publish buffer bound (engine batches); full = drop oldest, one cleared per rank", int),
        Setting("buffer_bytes", 256 << 20, "publish buffer bound (encoded bytes of engine batches); full = drop oldest", int),
        Setting("publish_timeout_s", 2.0, "JetStream publish ack timeout (then retried)", float),
        Setting("publish_encoding", "msgpack", "payload encoding of KVR_KV messages", choices=("msgpack", "json")),
        Setting("hash_map_capacity", 262_144, "engine-hash → tokens_hash entries kept per rank (LRU) for token-less stores", int),
        Setting("relay_bucket", "KVR_RELAY", "KV bucket holding each rank's event-id high-water mark"),
        Setting("id_reserve_step", 10_000, "ids reserved ahead per high-water mark write", int),
        # discovery record (KVR_WORKERS)
        Setting("discovery", True, "put and heartbeat the worker's KVR_WORKERS record", bool),
        Setting("worker_id", -1, "worker id (-1 = xxh3_64(pod name) & (2**53-1))", int),
        Setting("pod_name", "", "pod name (empty = $POD_NAME, else the host name)"),
        Setting("address", "", "engine address (empty = $POD_IP)"),
        Setting("port", 8000, "engine HTTP port", int),
        Setting("dp_start_rank", 0, "first dp rank served by this engine", int),
        Setting("dp_size", 1, "number of dp ranks", int),
        Setting("dp_ports", [], "per-rank HTTP ports, comma-separated (optional)", is_list=True),
        Setting("role", "aggregated", "worker role", choices=("aggregated", "prefill", "decode")),
        Setting("model", "", "model name in the discovery record"),
        Setting("block_size", 16, "engine KV block size in tokens", int),
        Setting("total_kv_blocks", 0, "KV capacity in blocks (0 = unknown)", int),
        Setting("max_num_batched_tokens", 0, "engine max batched tokens (0 = unknown)", int),
        Setting("max_num_seqs", 0, "engine max sequences (0 = unknown)", int),
        Setting("taints", [], "worker taints, e.g. gpu=h100,zone=a", is_list=True),
        Setting("labels", [], "worker labels as key=value", is_list=True),
        Setting("heartbeat_ttl_s", 15.0, "discovery record TTL; re-put every ttl/3", float),
    ],
)

COMMAND_SETTINGS = SETTINGS
REGISTRY.command("relay", (*COMMON, *COMMAND_SETTINGS))
