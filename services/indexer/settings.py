"""Settings of `kvr indexer` (env `KVR_<NAME>`); the common ones come from `services.runtime.config`."""

from __future__ import annotations

from services.runtime.config import COMMON, REGISTRY, Setting

SETTINGS = REGISTRY.register(
    "indexer",
    [
        Setting("block_size", 16, "block size used when no live worker reports one", int),
        Setting("snapshot_every_events", 100_000, "write a snapshot after this many applied events (0 = off)", int),
        Setting("snapshot_interval_s", 60.0, "write a snapshot at least this often when the index changed (0 = off)", float),
        Setting("snapshot_restore", True, "load the newest snapshot on start", bool),
        Setting("serve_endpoints", True, "answer indexer.match / indexer.dump on NATS (off when embedded)", bool),
        Setting("follower_batch", 1024, "messages fetched per pull from KVR_KV", int),
        Setting("follower_max_bytes", 4 << 20, "bytes fetched per pull from KVR_KV (raised to the server's max_payload if lower)", int),
        Setting(
            "unknown_worker_buffer_bytes",
            8 << 20,
            "per pool: bytes of KV messages of workers not (yet) in discovery held until their record appears",
            int,
        ),
        Setting("unknown_workers_tracked", 16384, "per pool: unknown workers whose first unapplied message is remembered", int),
        Setting("worker_blocks_headroom", 1.25, "device blocks a worker may hold per dp rank: total_kv_blocks × this", float),
        Setting("worker_lower_tier_blocks_factor", 8.0, "blocks a worker may hold per dp rank in each lower tier: total_kv_blocks × this", float),
        Setting("worker_default_max_blocks", 1 << 20, "blocks per dp rank and tier when the record has no total_kv_blocks", int),
        Setting("lag_interval_s", 1.0, "how often the stream position is polled for the lag metrics", float),
    ],
)

COMMAND_SETTINGS = SETTINGS
REGISTRY.command("indexer", (*COMMON, *COMMAND_SETTINGS))

DEFAULTS = {s.name: s.default for s in SETTINGS}


def setting(cfg: object, name: str):  # noqa: ANN201 - value type depends on the setting
    """A setting from a resolved config, falling back to the default when an embedding service's
    namespace does not carry it."""
    return getattr(cfg, name, DEFAULTS[name])
