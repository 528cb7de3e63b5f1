"""Settings of `kvr relay` (env `KVR_<NAME>`, flags `--<name>`); the common settings come from the runtime."""

from __future__ import annotations

from schemas.discovery import Role
from services.runtime.config import REGISTRY, ServiceConfig, config, setting


@config
class RelayConfig(ServiceConfig):
    # engine side
    source: str = setting(
        "vllm",
        "what --zmq carries: vllm (vLLM/SGLang KV-event batches, one socket per dp rank) "
        "or dynamo (Dynamo's event plane: envelopes of RouterEvents)",
        choices=("vllm", "dynamo"),
    )
    zmq: tuple[str, ...] = setting(
        ("tcp://127.0.0.1:5557",),
        "engine KV-event PUB endpoint(s): one = base (rank r at port+r), or one per dp rank; "
        "dynamo: every publisher endpoint, all ranks",
    )
    replay: tuple[str, ...] = setting((), "engine replay ROUTER endpoint(s), same rule as --zmq (empty = no replay)")
    topic: str = setting("", "ZMQ topic to subscribe to (empty = all)")
    zmq_hwm: int = setting(100_000, "receive high-water mark of each SUB socket (messages)")
    replay_timeout_s: float = setting(2.0, "give up on a replay after this long without a reply (gap becomes a cleared)")
    clear_on_start: bool = setting(True, "publish cleared per rank when the relay starts (drops state from before)")
    salt_from_extra_keys: bool = setting(True, "take the cache salt from block 0's extra_keys (vLLM) when no cache_salt field")
    # conversion and publishing
    max_batch_blocks: int = setting(128, "max blocks per RouterEvent when merging consecutive compatible events")
    max_events_per_message: int = setting(1024, "max RouterEvents per JetStream message")
    max_blocks_per_message: int = setting(8192, "max blocks per JetStream message (keeps payloads under NATS max_payload)")
    buffer_messages: int = setting(10_000, "publish buffer bound (engine batches); full = drop oldest, one cleared per rank")
    buffer_bytes: int = setting(256 << 20, "publish buffer bound (encoded bytes of engine batches); full = drop oldest")
    publish_timeout_s: float = setting(2.0, "JetStream publish ack timeout (then retried)")
    publish_encoding: str = setting("msgpack", "payload encoding of KVR_KV messages", choices=("msgpack", "json"))
    hash_map_capacity: int = setting(262_144, "engine-hash → tokens_hash entries kept per rank (LRU) for token-less stores")
    relay_bucket: str = setting("KVR_RELAY", "KV bucket holding each rank's event-id high-water mark")
    id_reserve_step: int = setting(10_000, "ids reserved ahead per high-water mark write")
    # discovery record (KVR_WORKERS)
    discovery: bool = setting(True, "put and heartbeat the worker's KVR_WORKERS record")
    worker_id: int = setting(-1, "worker id (-1 = xxh3_64(pod name) & (2**53-1))")
    pod_name: str = setting("", "pod name (empty = $POD_NAME, else the host name)")
    address: str = setting("", "engine address (empty = $POD_IP)")
    port: int = setting(8000, "engine HTTP port")
    dp_start_rank: int = setting(0, "first dp rank served by this engine")
    dp_size: int = setting(1, "number of dp ranks")
    dp_ports: tuple[str, ...] = setting((), "per-rank HTTP ports, comma-separated (optional)")
    role: Role = setting("aggregated", "worker role")
    model: str = setting("", "model name in the discovery record")
    block_size: int = setting(16, "engine KV block size in tokens")
    total_kv_blocks: int = setting(0, "KV capacity in blocks (0 = unknown)")
    max_num_batched_tokens: int = setting(0, "engine max batched tokens (0 = unknown)")
    max_num_seqs: int = setting(0, "engine max sequences (0 = unknown)")
    taints: tuple[str, ...] = setting((), "worker taints, e.g. gpu=h100,zone=a")
    labels: tuple[str, ...] = setting((), "worker labels as key=value")
    heartbeat_ttl_s: float = setting(15.0, "discovery record TTL; re-put every ttl/3")


SETTINGS = REGISTRY.register("relay", RelayConfig.own_settings())
REGISTRY.command("relay", RelayConfig.settings())
