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
