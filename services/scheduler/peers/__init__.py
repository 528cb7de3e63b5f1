"""Peer routers' policies, reproduced to compare `kv` against what an operator could deploy instead.

Each module reimplements one upstream policy from its source (files and default parameters named in
the module's docstring) as a `ChoicePlugin` of the `Selector`: the offline simulator runs it through
the same `Decider`, filters, booking and simulated engines as our own policies. Only the choice of
the target differs. Upstream code is not copied; the behaviour and defaults are.

- `sglang.SglangCacheAware` — SGLang router `cache_aware` (approximate radix tree of routed prompts);
- `gaie.GaieDefault` — the GAIE / llm-d default scheduling profile (approximate prefix-cache scorer,
  queue-depth and KV-cache-utilization scorers, max-score picker);
- `gaie.LlmdPrecise` — llm-d's precise prefix-cache scorer (from KV events: our index) with the
  same load scorers.
"""

from .base import PEER_NAMES, EngineMetrics, MetricsSource, PeerContext, make_peer

__all__ = ["PEER_NAMES", "EngineMetrics", "MetricsSource", "PeerContext", "make_peer"]
