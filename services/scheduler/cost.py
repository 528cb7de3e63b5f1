"""Our default cost rule and Dynamo's, side by side."""

from __future__ import annotations

from .selector import CostConfig

DYNAMO_COST = CostConfig(overlap_score_credit=1.0, prefill_load_scale=1.0, temperature=0.0)

VARIANTS: dict[str, CostConfig] = {
    "d0.25": CostConfig(decode_load_scale=0.25),
    "d0.1": CostConfig(decode_load_scale=0.1),
    "d0.02": CostConfig(decode_load_scale=0.02),
    "c4": CostConfig(overlap_score_credit=4.0),
}
