"""The cost rule of the `kv` policy: Dynamo's, exactly, and ours, which is the default.

For one target and the prefill (or aggregated) leg, in blocks of the pool's block size:

    prefill = (active prefill tokens booked on the target + the request's tokens) / block_size
    credit  = overlap_score_credit × device overlap (+ host and disk tiers), × the credit scale,
              + overlap_score_credit × in-flight overlap × (the credit scale − 1)   (ours only)
    decode  = active blocks on the target + the request's blocks not active there

    Dynamo:  cost = prefill_load_scale × max(prefill − credit, 0) + decode
    ours:    cost = prefill_load_scale × (prefill − credit) + decode_load_scale × decode

Dynamo's rule is `DYNAMO_COST` (`clip_prefill` on, `decode_load_scale` 1, `credit_load_gain` 0,
`inflight_overlap` off; docs/protocol.md §7), selectable with the same settings. Ours differs in
four ways, each a field of `CostConfig` so that each can be measured alone (`VARIANTS`,
bench/peers.py):

- `decode_load_scale` (ours 0.02): a worker's active decode blocks slow each of its engine passes a
  little (a decode batch costs milliseconds where a prefill chunk costs a hundred), so as a
  predictor of time to first token they weigh far less than queued prefill; at weight 1 they
  outweigh the whole cache credit of a long prompt as soon as one more request runs on the worker,
  and conversations move away from their cache.
- `clip_prefill` off: the prefill term may go below zero, so a larger credit keeps ordering the
  workers instead of flattening every cached worker to 0 (why a credit of 1,000 routed on decode
  load alone before).
- `credit_load_gain` (ours 4): the credit grows with the fleet's queued prefill, ×(1 + gain ×
  mean active prefill tokens per target / max_num_batched_tokens). A miss is recomputed by a fleet
  that is busy anyway, which delays every request queued behind it; when no worker has prefill
  queued the credit is Dynamo's.
- `inflight_overlap` (ours on): the request's leading blocks that requests booked on the target
  hold (the load tracker's active blocks) beyond what the caches hold are credited too, by the
  load-adaptive part of the scale only, ×(scale − 1): a conversation's next turn arriving while
  the previous turn is still queued stays behind it on its worker once the fleet is busy. Under
  load, queues last longer than the gap between turns: without it the index has none of the
  previous turn yet, turns scatter, and the hit rate falls as the load rises; at an idle fleet
  (scale 1) waiting for a prefix still being computed does not pay, and the rule is unchanged
  (docs/benchmarks.md, "routing against the peers"). The booking still assumes only the cached
  overlap (its prefill estimate is the prompt minus what the index holds), so identical prompts
  arriving together each add their whole prefill to the target's queue and stop piling onto it
  once the queue outweighs the credit (booked at the in-flight overlap, ~0 tokens each, they herd).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol

from schemas.api import Overrides

if TYPE_CHECKING:
    from .candidates import Candidate
    from .load import LoadView, Target

DEFAULT_BATCH_TOKENS = 8192  # when a worker does not report max_num_batched_tokens (vLLM's default)


class _Loads(Protocol):
    def view(self, target: Target) -> LoadView: ...


@dataclass(frozen=True)
class CostConfig:
    overlap_score_credit: float = 1.0
    prefill_load_scale: float = 1.0
    host_cache_hit_weight: float = 0.75
    disk_cache_hit_weight: float = 0.25
    temperature: float = 0.0
    decode_load_scale: float = 0.02
    clip_prefill: bool = False
    credit_load_gain: float = 4.0
    inflight_overlap: bool = True

    def with_overrides(self, o: Overrides | None) -> CostConfig:
        if o is None:
            return self
        changes = {k: getattr(o, k) for k in (
            "overlap_score_credit", "prefill_load_scale", "temperature", "host_cache_hit_weight", "disk_cache_hit_weight"
        ) if getattr(o, k) is not None}
        return replace(self, **changes) if changes else self


DYNAMO_COST = CostConfig(decode_load_scale=1.0, clip_prefill=True, credit_load_gain=0.0, inflight_overlap=False)


def leg_cost(cfg: CostConfig, prefill_blocks: float, credit_blocks: float, decode_blocks: float) -> float:
    rest = prefill_blocks - credit_blocks
    if cfg.clip_prefill and rest < 0.0:
        rest = 0.0
    return cfg.prefill_load_scale * rest + cfg.decode_load_scale * decode_blocks


def effective_credit(cfg: CostConfig, pool: Sequence[Candidate], load: _Loads) -> float:
    """The credit scale of one decision: 1 + gain × mean queued prefill tokens / batch budget."""
    if cfg.credit_load_gain <= 0.0 or not pool:
        return 1.0
    queued = 0.0
    for c in pool:
        queued += load.view(c.target).active_prefill_tokens / (c.max_num_batched_tokens or DEFAULT_BATCH_TOKENS)
    return 1.0 + cfg.credit_load_gain * queued / len(pool)


def _variants() -> dict[str, CostConfig]:
    """Dynamo's rule with one of our changes at a time (all of them = our default), and our rule
    without its latest change."""
    d = DYNAMO_COST
    ours = CostConfig()
    return {
        "dynamo+decode": replace(d, decode_load_scale=ours.decode_load_scale),
        "dynamo+adaptive": replace(d, clip_prefill=False, credit_load_gain=ours.credit_load_gain),
        # the in-flight overlap is credited by the adaptive part of the scale, so it comes with it
        "dynamo+adaptive+inflight": replace(d, clip_prefill=False, credit_load_gain=ours.credit_load_gain, inflight_overlap=True),
        # our previous default (all of the above but the in-flight overlap), kept in the report to
        # show that change's effect on the whole rule
        "kv-inflight": replace(ours, inflight_overlap=False),
    }


VARIANTS: dict[str, CostConfig] = _variants()
