"""Settings of `kvr indexer` (env `KVR_<NAME>`); the common ones come from `services.runtime.config`."""

from __future__ import annotations

from services.runtime.config import REGISTRY, ServiceConfig, config, setting


@config
class IndexerConfig(ServiceConfig):
    block_size: int = setting(16, "block size used when no live worker reports one")
    snapshot_every_events: int = setting(100_000, "write a snapshot after this many applied events (0 = off)")
    snapshot_interval_s: float = setting(60.0, "write a snapshot at least this often when the index changed (0 = off)")
    snapshot_restore: bool = setting(True, "load the newest snapshot on start")
    serve_endpoints: bool = setting(True, "answer indexer.match / indexer.dump on NATS (off when embedded)")
    follower_batch: int = setting(1024, "messages fetched per pull from KVR_KV")
    follower_max_bytes: int = setting(4 << 20, "bytes fetched per pull from KVR_KV (raised to the server's max_payload if lower)")
    unknown_worker_buffer_bytes: int = setting(
        8 << 20, "per pool: bytes of KV messages of workers not (yet) in discovery held until their record appears"
    )
    unknown_workers_tracked: int = setting(16384, "per pool: unknown workers whose first unapplied message is remembered")
    worker_blocks_headroom: float = setting(1.25, "device blocks a worker may hold per dp rank: total_kv_blocks × this")
    worker_lower_tier_blocks_factor: float = setting(
        8.0, "blocks a worker may hold per dp rank in each lower tier: total_kv_blocks × this"
    )
    worker_default_max_blocks: int = setting(1 << 20, "blocks per dp rank and tier when the record has no total_kv_blocks")
    lag_interval_s: float = setting(1.0, "how often the stream position is polled for the lag metrics")


SETTINGS = REGISTRY.register("indexer", IndexerConfig.own_settings())
REGISTRY.command("indexer", IndexerConfig.settings())
