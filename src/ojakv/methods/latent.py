"""Static low-rank baselines whose basis is not fitted to the cached keys alone.

- ``eigen``: Eigen Attention style (Saxena et al., arXiv 2408.05646): the key basis is the PCA of pre-RoPE keys
  together with the queries of the head's GQA group on calibration text (queries and keys share the subspace
  attention scores live in); values from the values' PCA. Fixed basis (η = 0), OjaKV's anchors.
- ``mla-latent``: MLA / Palu style latent cache, training-free (Chang et al., arXiv 2407.21118; DeepSeek-V2): per
  KV head, the top singular vectors of the key and value projection weights span the cached latent (Palu's
  per-head decomposition without its whitening); keys are rebuilt before RoPE. Data-free; no anchors, every
  token is a latent, as in MLA.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import Method, knob, register
from .ojakv import LOW_RANK_SIZE, OjaKVConfig, budget_to_rank, build_low_rank, prefill_attends_in_full


@dataclass
class EigenConfig(OjaKVConfig):
    init: str = knob("calibration", "the offline PCA of calibration text")
    key_basis: str = knob("queries+keys", "key basis from pre-RoPE keys and their group's queries")
    eta_prefill: float = knob(0.0, "fixed basis")
    eta_decode: float = knob(0.0, "fixed basis")


@dataclass
class LatentConfig(OjaKVConfig):
    init: str = knob("weights", "the SVD of the K/V projection weights")
    eta_prefill: float = knob(0.0, "fixed basis")
    eta_decode: float = knob(0.0, "fixed basis")
    n_sink: int = knob(0, "first tokens kept at full precision (none: an MLA cache holds only latents)")
    n_recent: int = knob(0, "recent tokens kept at full precision (none)")


for name, config_class, summary, reference in (
    ("eigen", EigenConfig, "fixed key basis from calibration queries+keys, value basis from values",
     "Saxena et al., Eigen Attention, arXiv 2408.05646"),
    ("mla-latent", LatentConfig, "latent cache spanned by the SVD of the K/V projection weights (training-free)",
     "DeepSeek-V2 MLA, arXiv 2405.04434; Palu, arXiv 2407.21118"),
):
    register(Method(name=name, summary=summary, config_class=config_class, build=build_low_rank,
                    reference=reference, for_budget=budget_to_rank(config_class), size_knobs=LOW_RANK_SIZE,
                    full_prefill=prefill_attends_in_full))
