"""``staticpca`` and ``staticpca-h``: OjaKV's paper baselines, a fixed offline PCA basis (η = 0).

Same calibration, ranks, key mode and storage as ``ojakv``, with the basis never updated: ``staticpca`` projects
every token (no full-rank anchors), ``staticpca-h`` keeps OjaKV's hybrid anchors (first 32 + last 32 tokens).
Comparing ``staticpca-h`` with ``ojakv:init=calibration`` isolates the online Oja updates.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import Method, knob, register
from .ojakv import LOW_RANK_SIZE, OjaKVConfig, budget_to_rank, build_low_rank, prefill_attends_in_full


@dataclass
class StaticPCAHConfig(OjaKVConfig):
    init: str = knob("calibration", "initial basis: calibration (offline PCA) or prompt (PCA of the prompt)")
    eta_prefill: float = knob(0.0, "fixed basis: no Oja step on the prompt")
    eta_decode: float = knob(0.0, "fixed basis: no Oja steps while decoding")


@dataclass
class StaticPCAConfig(StaticPCAHConfig):
    n_sink: int = knob(0, "first real tokens kept at full rank (none: every token is projected)")
    n_recent: int = knob(0, "most recent tokens kept at full rank (none)")


for name, config_class, summary in (
    ("staticpca", StaticPCAConfig, "every token projected on a fixed offline PCA basis"),
    ("staticpca-h", StaticPCAHConfig, "fixed offline PCA basis with OjaKV's full-rank anchors"),
):
    register(Method(name=name, summary=summary, config_class=config_class, build=build_low_rank,
                    reference="OjaKV paper baselines (Zhu et al., arXiv 2509.21623)",
                    for_budget=budget_to_rank(config_class), size_knobs=LOW_RANK_SIZE,
                    full_prefill=prefill_attends_in_full))
