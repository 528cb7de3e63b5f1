"""What the peer policies share: engine metrics as a gateway scrapes them, the weighted-scorer sum of
the GAIE framework and the max-score picker, and the registry of peer names."""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from ..candidates import Candidate
from ..load import Target
from ..selector import ChoicePlugin

TIE_EPS = 1e-9


class EngineMetrics(NamedTuple):
    """One engine's metrics as a gateway scrapes them (vLLM's Prometheus names in brackets)."""

    waiting: int  # requests queued, not yet running (`vllm:num_requests_waiting`)
    running: int  # requests running (`vllm:num_requests_running`)
    kv_usage: float  # blocks held by running requests / total blocks (`vllm:kv_cache_usage_perc`)


# The latest scrape of every target's metrics, as the gateway holds it at the decision's instant.
MetricsSource = Callable[[], Mapping[Target, EngineMetrics]]


@dataclass(frozen=True)
class PeerContext:
    """What a peer policy knows about the fleet when it is built."""

    block_size: int  # the engines' KV block size in tokens
    kv_blocks: int  # KV blocks per engine (what GAIE's autoTune reads from `cache_config_info`)
    metrics: MetricsSource
    clock: Callable[[], float]  # simulated ms (periodic upstream work, e.g. SGLang's tree eviction)


def weighted_sum(pool: Sequence[Candidate], scorers: Sequence[tuple[float, Mapping[Target, float]]]) -> dict[Target, float]:
    """The GAIE scheduling profile's total: Σ weight × score (each score in [0, 1]; missing = 0)."""
    return {c.target: sum(w * s.get(c.target, 0.0) for w, s in scorers) for c in pool}


def max_score_pick(pool: Sequence[Candidate], total: Mapping[Target, float], rng: random.Random) -> Candidate:
    """GAIE's `max-score-picker`: the highest total; endpoints are shuffled first, so ties go to a
    random one among them (here the selector's seeded RNG)."""
    best = max(total[c.target] for c in pool)
    ties = [c for c in pool if total[c.target] >= best - TIE_EPS]
    return ties[0] if len(ties) == 1 else ties[rng.randrange(len(ties))]


def queue_scores(pool: Sequence[Candidate], metrics: Mapping[Target, EngineMetrics]) -> dict[Target, float]:
    """GAIE `queue-scorer`: min-max normalised waiting queue, shorter is better; all equal → 1."""
    sizes = {c.target: (metrics[c.target].waiting if c.target in metrics else 0) for c in pool}
    lo, hi = min(sizes.values()), max(sizes.values())
    if hi == lo:
        return dict.fromkeys(sizes, 1.0)
    return {t: (hi - q) / (hi - lo) for t, q in sizes.items()}


def kv_utilization_scores(pool: Sequence[Candidate], metrics: Mapping[Target, EngineMetrics]) -> dict[Target, float]:
    """GAIE `kv-cache-utilization-scorer`: 1 − KV cache usage."""
    return {c.target: 1.0 - (metrics[c.target].kv_usage if c.target in metrics else 0.0) for c in pool}


def make_peer(name: str, ctx: PeerContext) -> ChoicePlugin:
    """A fresh instance of the peer policy `name` (one of `PEER_NAMES`)."""
    from .gaie import GaieDefault, LlmdPrecise
    from .sglang import SglangCacheAware

    factories: dict[str, Callable[[PeerContext], ChoicePlugin]] = {
        SglangCacheAware.name: SglangCacheAware,
        GaieDefault.name: GaieDefault,
        LlmdPrecise.name: LlmdPrecise,
    }
    try:
        return factories[name](ctx)
    except KeyError:
        raise ValueError(f"unknown peer policy {name!r}; choose from {', '.join(PEER_NAMES)}") from None


PEER_NAMES: tuple[str, ...] = ("sglang_cache_aware", "gaie_default", "llmd_precise")
