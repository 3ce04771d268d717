"""``ojakv`` and ``ojakv-pf``: hybrid full-rank anchors + a low-rank body in per-head subspaces adapted by Oja's rule.

Per layer and KV head (and per sequence of the batch, so one prompt never shapes another's basis) there is one
orthonormal basis for keys and one for values. Token layout in cache order:

    anchors (first n_sink real tokens, full) | body (coefficients Uᵀx) | window (last n_recent, full)

With ``policy="residual"`` some body tokens also keep their exact keys and values: the ones whose low-rank error
would change attention scores most (|qᵀ(k − k̂)| over recent queries).

``ojakv+quant`` stores the body coefficients as packed 4-bit codes (``coef_bits``; storage.QuantizedRows).
With ``body_bits`` the body is transform coded instead (``ojakv.transform_coding``: bits allocated by variance in
the prompt's KL basis, the rank where they reach zero); that is what ``ojakv`` given a budget runs (``ojakv_tc``).
With ``init="calibration"`` (and ``eta_prefill=0``) the calibration's basis, bits and scales serve every prompt
alike: one fixed layout per token, which the vLLM plugin's pages need (``staticpca:body_bits=...``).

Bases start from the prompt's own PCA (the default: the subspace the paper's "comprehensive" prefill update moves
towards), or from an offline PCA (``ojakv calibrate``) followed by one Oja step on the prompt, the paper's recipe;
then a light Oja step every ``update_interval`` decoded tokens from running statistics (Σ x xᵀU, d×r per head: no
token buffer is kept). When a basis changes, stored coefficients are re-expressed
(c ← c·U_oldᵀU_new, the orthogonal projection of what they encoded onto the new subspace), so every coefficient
always belongs to the current basis.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .. import attention as latent_attention
from .. import hf
from ..cache import AttentionInputs, CacheLayer, SharedState, StepInputs, growable_segments
from ..errors import OjaKVError
from ..memory import nbytes
from ..hf import compute_queries
from ..landmarks import ChunkLandmarks
from ..rope import Rotation
from ..quantize import SUPPORTED_BITS
from ..storage import CodedRows, GrowableTensor, QuantizedRows, growth_slack
from ..subspace import change_of_basis, covariance, eigh_descending, oja_step, rank_for_energy
from ..transform_coding import (GAIN_BYTES, MAX_BITS, Int8Basis, TransformCodedRows, coder_for, fitted_allocation,
                                ordered_allocation)
from . import Method, Sizing, knob, largest_within, register

KEY_MODES = ("pre_rope", "post_rope")
POLICIES = ("positional", "residual")
INITS = ("calibration", "prompt", "weights")
ATTENTION_PATHS = ("latent", "reconstruct")


@dataclass
class OjaKVConfig:
    rank_ratio: float | None = knob(None, "rank r = round(ratio * head_dim) for keys and values (0.5 if no other)")
    rank: int | None = knob(None, "instead of rank_ratio: the rank r itself (1..head_dim)")
    energy: float | None = knob(None, "instead of rank_ratio: smallest rank holding this spectral energy (e.g. 0.99)")
    key_mode: str = knob("pre_rope", "compress keys before RoPE (pre_rope) or as cached (post_rope)")
    policy: str = knob("positional", "full-rank tokens: positional (sinks + window) or residual (+ top residual)")
    n_sink: int = knob(32, "first real tokens kept at full rank")
    n_recent: int = knob(32, "most recent tokens kept at full rank")
    n_residual: int = knob(32, "residual policy: body tokens per KV head kept exact")
    query_window: int = knob(32, "residual policy: recent prompt queries that weigh the residual")
    init: str = knob("prompt", "initial basis: prompt (PCA of the prompt), calibration (offline PCA + Oja step) "
                               "or weights (SVD of the K/V projections)")
    eta_prefill: float = knob(0.1, "init=calibration: Oja step on the prompt (relative to the top eigenvalue)")
    eta_decode: float = knob(0.05, "Oja step every update_interval decoded tokens (0 = no decode updates)")
    update_interval: int = knob(64, "decoded tokens between Oja updates (T)")
    prefill_attention: str = knob("compressed", "prefill attends to compressed K/V, or full (the -pf variant)")
    calibration_file: str | None = knob(None, "calibration .safetensors (default: the cached one for the model)")
    key_basis: str = knob("keys", "init=calibration: key basis from keys, or queries+keys (Eigen Attention style)")
    coef_bits: int = knob(0, "store body coefficients as packed 2-, 4- or 8-bit codes (0 = the model's dtype)")
    attention: str = knob("latent", "decode attention on the stored coefficients (latent) or on rebuilt K/V "
                                    "handed to the model's own kernel (reconstruct)")
    body_bits: float = knob(0.0, "transform-coded body: average bits per body coordinate (over head_dim), "
                                 "allocated to the KL coefficients by variance (the prompt's, or with "
                                 "init=calibration the calibration's), so the rank follows; 0 = the rank knobs, "
                                 "coefficients in the model's dtype (or coef_bits codes)")
    fit_bases: bool = knob(False, "with body_bits: those bits also pay for the bases (and their Oja statistics), "
                                  "spread over the body's tokens (what a budget sets: each layer's rank then "
                                  "follows its spectrum)")
    value_share: float = knob(0.5, "with body_bits: the share of the body's bits that code values (keys get "
                                   "the rest; 0.5 = as many bits for a key row as for a value row)")
    fit_new_tokens: int = knob(0, "with fit_bases: tokens still to come, whose body rows share the bases' cost "
                                  "with the prompt's (a budget sets its new_tokens)")
    select_tokens: int = knob(0, "single-token decode steps attend to about this many body tokens per KV head, "
                                 "the chunks whose landmarks score highest (0 = every body token, exact; "
                                 "selection is faster at long contexts and costs accuracy, docs/RESULTS.md)")
    select_chunk: int = knob(16, "with select_tokens: body tokens per landmark chunk")

    def __post_init__(self) -> None:
        if self.rank_ratio is None and self.energy is None and self.rank is None and not self.body_bits:
            self.rank_ratio = 0.5

    def validate(self) -> None:
        given = [name for name in ("rank_ratio", "rank", "energy") if getattr(self, name) is not None]
        if len(given) > 1:
            raise OjaKVError(f"give one of rank_ratio, rank or energy, not {' and '.join(given)}")
        if self.rank is not None and self.rank < 1:
            raise OjaKVError(f"rank must be at least 1, got {self.rank}: e.g. --rank 32 (or --rank-ratio 0.5)")
        if self.rank_ratio is not None and not 0.0 < self.rank_ratio <= 1.0:
            raise OjaKVError(f"rank_ratio must be in (0, 1], got {self.rank_ratio}: e.g. --rank-ratio 0.5")
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise OjaKVError(f"energy must be in (0, 1], got {self.energy}: e.g. --energy 0.99")
        _check_choice("key_mode", self.key_mode, KEY_MODES)
        _check_choice("policy", self.policy, POLICIES)
        _check_choice("init", self.init, INITS)
        _check_choice("prefill_attention", self.prefill_attention, ("compressed", "full"))
        _check_choice("attention", self.attention, ATTENTION_PATHS)
        if self.coef_bits not in (0, *SUPPORTED_BITS):
            raise OjaKVError(f"coef_bits must be 0 (no quantization) or one of {SUPPORTED_BITS}, got {self.coef_bits}")
        for name in ("n_sink", "n_recent", "n_residual"):
            if getattr(self, name) < 0:
                raise OjaKVError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.query_window < 1 or self.update_interval < 1:
            raise OjaKVError("query_window and update_interval must be >= 1")
        _check_choice("key_basis", self.key_basis, ("keys", "queries+keys"))
        if self.key_basis == "queries+keys" and (self.init != "calibration" or self.key_mode != "pre_rope"):
            raise OjaKVError("key_basis='queries+keys' needs init='calibration' and key_mode='pre_rope'")
        if self.init == "weights" and self.key_mode != "pre_rope":
            raise OjaKVError("init='weights' spans keys before RoPE: use key_mode='pre_rope'")
        for name in ("eta_prefill", "eta_decode"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise OjaKVError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        self._validate_transform_coding(given)
        self._validate_selection()

    def _validate_selection(self) -> None:
        if self.select_tokens < 0 or self.select_chunk < 1:
            raise OjaKVError(f"select_tokens must be >= 0 and select_chunk >= 1, got {self.select_tokens} and "
                             f"{self.select_chunk}: e.g. --select-tokens 256 --select-chunk 16")
        if not self.select_tokens:
            return
        if self.policy != "positional":
            raise OjaKVError("select_tokens picks body tokens by chunk and cannot keep the residual policy's exact "
                             "tokens: use policy='positional', or select_tokens=0")
        if self.attention != "latent":
            raise OjaKVError("select_tokens is a mode of the latent decode path: use attention='latent', or "
                             "select_tokens=0")

    @property
    def selected_chunks(self) -> int:
        """Body chunks a selective decode step attends to (besides the one filling up)."""
        return max(1, self.select_tokens // self.select_chunk)

    def _validate_transform_coding(self, rank_knobs: list[str]) -> None:
        if not 0.0 < self.value_share < 1.0:
            raise OjaKVError(f"value_share must be in (0, 1), got {self.value_share}: e.g. --value-share 0.5")
        if not 0.0 <= self.body_bits <= MAX_BITS:
            raise OjaKVError(f"body_bits must be in [0, {MAX_BITS}] bits per coordinate, got {self.body_bits}: "
                             "e.g. --body-bits 2")
        if self.fit_new_tokens < 0:
            raise OjaKVError(f"fit_new_tokens counts tokens still to come (>= 0), got {self.fit_new_tokens}")
        if self.fit_new_tokens and not self.fit_bases:
            raise OjaKVError("fit_new_tokens spreads the bases of fit_bases over more rows: give fit_bases too")
        if not self.body_bits:
            if self.fit_bases:
                raise OjaKVError("fit_bases sizes a transform-coded body: give body_bits too (e.g. --body-bits 2)")
            return
        if rank_knobs:
            raise OjaKVError(f"body_bits decides the rank (coefficients given no bits are dropped): drop "
                             f"{' and '.join(rank_knobs)}, or set body_bits=0 to use them")
        if self.init == "weights":
            raise OjaKVError("body_bits allocates bits from a spectrum of keys and values (the prompt's or the "
                             "calibration's): use init='prompt' or init='calibration'")
        if self.init == "calibration" and (self.eta_prefill or self.key_basis != "keys"):
            raise OjaKVError("body_bits with init='calibration' codes in the calibrated key and value bases as they "
                             "are, with bits and scales from their spectra: give eta_prefill=0 and key_basis='keys'")
        if self.coef_bits:
            raise OjaKVError("give body_bits (transform coding) or coef_bits (uniform codes), not both")

    def total_bits(self, head_dim: int, which: int) -> int:
        """Bits one token's transform-coded key (``which`` 0) or value (1) row gets: ``body_bits`` × head_dim on
        average over the two, split by ``value_share``."""
        share = self.value_share if which else 1.0 - self.value_share
        return round(2 * share * self.body_bits * head_dim)

    def coefficient_bytes(self, rank: int, dtype_bytes: int, head_dim: int, which: int | None = None) -> float:
        """Bytes one token's key (``which`` 0) or value (1) coefficients take in the body, or their mean (None).
        Transform-coded rows: their codes, at most 4 partly filled bytes (about 0.5 on average), a float16 gain."""
        if self.body_bits:
            if which is None:
                return sum(self.coefficient_bytes(rank, dtype_bytes, head_dim, w) for w in (0, 1)) / 2
            return self.total_bits(head_dim, which) / 8 + 0.5 + GAIN_BYTES
        return rank * dtype_bytes if not self.coef_bits else QuantizedRows.bytes_per_row(rank, self.coef_bits)

    def column_bytes(self, head_dim: int) -> int:
        """Bytes one kept coefficient costs apart from its codes: its basis column and, when the bases move while
        decoding, that column of the float32 Oja statistics Σ x xᵀU. A transform-coded body's bases never move
        unless eta_decode > 0, so they are held in int8 (``Int8Basis``); moving bases stay float32."""
        if self.body_bits and self.eta_decode == 0:
            return Int8Basis.column_bytes(head_dim)
        return head_dim * (4 + (4 if self.eta_decode > 0 else 0))

    def subspace_bytes(self, rank: int, head_dim: int) -> float:
        """Bytes one KV head's bases U_k, U_v and their Oja statistics take (none apart when ``fit_bases`` pays for
        them from the body's bits, at the rank the spectrum leaves)."""
        return 0 if self.fit_bases else 2 * rank * self.column_bytes(head_dim)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise OjaKVError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def ranks_for(config: OjaKVConfig, head_dim: int, eigvals_k=None, eigvals_v=None) -> tuple[int, int]:
    """(r_k, r_v) for one layer: the rank given, from the ratio, or from calibration eigenvalues and energy."""
    if config.rank is not None:
        if config.rank > head_dim:
            raise OjaKVError(f"rank {config.rank} exceeds this model's head_dim {head_dim}: use 1..{head_dim}")
        return config.rank, config.rank
    if config.rank_ratio is not None:
        r = max(1, min(head_dim, round(config.rank_ratio * head_dim)))
        return r, r
    if eigvals_k is None or config.energy is None:
        return None, None  # energy with init="prompt", or body_bits: decided at prefill from the spectrum
    return rank_for_energy(eigvals_k, config.energy), rank_for_energy(eigvals_v, config.energy)


class OjaKVLayer(CacheLayer):
    """One decoder layer's hybrid low-rank storage (see the module docstring for the layout)."""

    uses_shared_positions = True  # pre-RoPE keys read their positions from the cache-wide store

    def __init__(self, layer_idx: int, shared: SharedState, config: OjaKVConfig, ranks, init_bases=None,
                 init_variances=None):
        super().__init__(layer_idx, shared)
        self.config = config
        self.rank_k, self.rank_v = ranks
        self.init_bases = init_bases  # (U_k [h, d, d'], U_v [h, d, d']) from calibration, or None
        self.init_variances = init_variances  # per-token variances along those columns ([h, d'] each), or None
        self.latent = config.attention == "latent"  # read by CompressedCache to route attention through ojakv
        self.k_sink = self.v_sink = self.k_win = self.v_win = None
        self.sink_target = 0
        self.k_coef, self.v_coef = self._coefficient_store(), self._coefficient_store()
        self.u_k = self.u_v = None  # [b, h, d, r] float32 (``Int8Basis``: a transform-coded body's fixed bases)
        self.stat_k = self.stat_v = None  # Σ x xᵀ U since the last update, [b, h, d, r] float32
        self.pending = 0
        self.update_seconds = 0.0  # time spent in decode-time subspace updates (read by `ojakv bench`)
        # residual policy: exact rows for selected body tokens, their body index and score
        self.k_exact = self.v_exact = self.exact_idx = self.exact_score = None
        self.landmarks: ChunkLandmarks | None = None  # select_tokens: chunk means of the body's exact keys

    def _coefficient_store(self) -> GrowableTensor | CodedRows:
        return QuantizedRows(self.config.coef_bits) if self.config.coef_bits else GrowableTensor()

    def _coding_spectrum(self, features, weight, which: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token variances [b, h, d] (descending) and their directions [b, h, d, d]: the prompt's own, or the
        calibration's (one fixed basis, allocation and scale for every prompt: a fixed size and layout per token,
        what a paged serving format needs)."""
        if self.init_variances is None:
            cov, count = covariance(features, weight)
            values, vectors = eigh_descending(cov)
            return values / count.clamp_min(1.0).unsqueeze(-1), vectors
        b = features.shape[0]
        values = self.init_variances[which].to(features.device).float()
        vectors = self.init_bases[which].to(features.device).float()
        return values.expand(b, -1, -1), vectors.expand(b, -1, -1, -1)

    # --- update ---------------------------------------------------------------------------------------------
    def update(self, key_states, value_states, *args, **kwargs):
        attention, step = self.begin_update(key_states, value_states)
        q = key_states.shape[2]
        if self.seen == 0:
            out = self._prefill(key_states, value_states, step, attention)
        else:
            self._append(key_states, value_states, step, attention)
            out = self._latent(attention, q) if self._takes_latent_path(attention, q) else self._materialize()
        self.seen += q
        return out

    def _key_features(self, keys: torch.Tensor, rotation) -> torch.Tensor:
        """Keys in the space the key basis lives in (float32): pre-RoPE (RoPE undone with ``rotation()``, called
        only then) or as cached."""
        if self.config.key_mode == "post_rope":
            return keys.float()
        return rotation().undo(keys.float())

    def _new_token_angles(self, keys: torch.Tensor, step: StepInputs, attention: AttentionInputs):
        """A callable giving the rotation of this call's tokens: by the angles the attention layer used, when it
        passed them (the same for every layer of the call, so prepared once)."""
        if attention.cos.shape[1] == keys.shape[2]:
            return lambda: self.shared.step_memo(("new_angles", id(attention.cos)),
                                                 lambda: Rotation(attention.cos.float(), attention.sin.float()))
        return lambda: Rotation(*self.shared.rope_angles(step.positions))

    def _prefill(self, keys, values, step: StepInputs, attention: AttentionInputs):
        n = keys.shape[2]
        padding = int((~step.valid).sum(-1).max())
        sink = min(n, self.config.n_sink + padding)
        window = min(n - sink, self.config.n_recent)
        body = n - sink - window
        self.sink_target = sink
        features_k = self._key_features(keys, self._new_token_angles(keys, step, attention))
        features_v = values.float()
        weight = step.valid.clone()
        weight[:, :sink] = False  # sinks and padding carry outlier activations: keep them out of the bases
        weight = weight.unsqueeze(1).expand(-1, keys.shape[1], -1)
        self.u_k = self._initial_basis(features_k, weight, self.rank_k, 0)
        self.u_v = self._initial_basis(features_v, weight, self.rank_v, 1)
        self.rank_k, self.rank_v = self.u_k.shape[-1], self.u_v.shape[-1]
        self.init_bases = self.init_variances = None  # views of the calibration tensors: drop them, not held
        if self.config.eta_decode > 0:  # the statistics only feed decode-time updates: without them, hold none
            self.stat_k = torch.zeros_like(self.u_k)
            self.stat_v = torch.zeros_like(self.u_v)
        self.k_sink, self.v_sink = keys[:, :, :sink].clone(), values[:, :, :sink].clone()
        self.k_win, self.v_win = keys[:, :, n - window :].clone(), values[:, :, n - window :].clone()
        if self.config.select_tokens:
            self.landmarks = ChunkLandmarks(self.config.select_chunk, self.dtype)
        if body:
            span = slice(sink, sink + body)
            if self.landmarks is not None:
                self.landmarks.append(keys[:, :, span])
            self.k_coef.append((features_k[:, :, span] @ self.u_k.float()).to(self.dtype))
            self.v_coef.append((features_v[:, :, span] @ self.u_v.float()).to(self.dtype))
            if self.config.policy == "residual":
                self._select_exact(keys[:, :, span], values[:, :, span], 0, attention, step)
        if self.config.prefill_attention == "full":
            return keys, values
        return self._materialize()

    def _initial_basis(self, features, weight, rank: int | None, which: int) -> torch.Tensor:
        if self.config.body_bits:
            return self._coded_basis(features, weight, which)
        cov, _ = covariance(features, weight)
        if self.config.init == "prompt":
            vals, vecs = eigh_descending(cov)
            if rank is None:  # energy threshold on this prompt's spectrum, the largest over heads and sequences
                rank = rank_for_energy(vals.flatten(0, -2), self.config.energy)
            return vecs[..., :rank].contiguous()
        start = self.init_bases[which][..., :rank].to(features.device).float()
        basis = start.unsqueeze(0).expand(features.shape[0], -1, -1, -1).contiguous()
        if self.config.eta_prefill > 0:
            basis = oja_step(basis, cov @ basis, self.config.eta_prefill)
        return basis

    def _coded_basis(self, features, weight, which: int) -> torch.Tensor:
        """Transform coding (``ojakv.transform_coding``): the prompt's KL basis (or the calibrated one), cut where
        the bit allocation leaves coefficients nothing, and a body store that codes rows with that allocation."""
        values, vectors = self._coding_spectrum(features, weight, which)
        d, n = values.shape[-1], features.shape[2]
        body = n - self.sink_target - min(n - self.sink_target, self.config.n_recent)
        if self.config.fit_bases and body:
            rows = body + self.config.fit_new_tokens  # every body row the bases will serve, not only the prompt's
            bits = fitted_allocation(values, self.config.coefficient_bytes(0, 0, d, which), rows,
                                     self.config.column_bytes(d))
        else:
            bits = ordered_allocation(values, self.config.total_bits(d, which))
        index, store = coder_for(values, bits)
        if which == 0:
            self.k_coef = store
        else:
            self.v_coef = store
        basis = vectors.index_select(-1, index)
        return Int8Basis(basis) if self.config.eta_decode == 0 else basis.contiguous()

    def _append(self, keys, values, step: StepInputs, attention: AttentionInputs) -> None:
        """New tokens (decode, or a later prefill chunk): statistics, sink top-up, window, overflow into body."""
        if self.stat_k is not None:  # (without decode-time updates, no statistics and no pre-RoPE keys needed)
            features_k = self._key_features(keys, self._new_token_angles(keys, step, attention))
            features_v = values.float()
            if not self.shared.step_memo("no_padding", lambda: bool(step.valid.all())):
                weight = step.valid.unsqueeze(1).unsqueeze(-1).float()
                features_k, features_v = features_k * weight, features_v * weight
            self.stat_k += features_k.transpose(-1, -2) @ (features_k @ self.u_k)
            self.stat_v += features_v.transpose(-1, -2) @ (features_v @ self.u_v)
        room = self.sink_target - self.k_sink.shape[2]
        if room > 0:
            take = min(room, keys.shape[2])
            self.k_sink = torch.cat([self.k_sink, keys[:, :, :take]], dim=2)
            self.v_sink = torch.cat([self.v_sink, values[:, :, :take]], dim=2)
            keys, values = keys[:, :, take:], values[:, :, take:]
        self.k_win = torch.cat([self.k_win, keys], dim=2)
        self.v_win = torch.cat([self.v_win, values], dim=2)
        overflow = self.k_win.shape[2] - self.config.n_recent
        if overflow > 0:
            self._move_to_body(overflow, attention)
        self.pending += step.valid.shape[1]
        if self.pending >= self.config.update_interval:
            self._oja_update()

    def _move_to_body(self, count: int, attention: AttentionInputs) -> None:
        keys, values = self.k_win[:, :, :count], self.v_win[:, :, :count]
        start = self.k_sink.shape[2] + self.k_coef.length
        # The same span leaves every layer's window this step, so its angles are shared (see _body_angles).
        features_k = self._key_features(keys, lambda: self._body_angles(start, count))
        body_start = self.k_coef.length
        self.k_coef.append((features_k @ self.u_k.float()).to(self.dtype))
        self.v_coef.append((values.float() @ self.u_v.float()).to(self.dtype))
        if self.landmarks is not None:
            self.landmarks.append(keys)
        if self.config.policy == "residual":
            self._select_exact(keys, values, body_start, attention, None)
        self.k_win, self.v_win = self.k_win[:, :, count:].clone(), self.v_win[:, :, count:].clone()

    def _body_angles(self, start: int, count: int) -> Rotation:
        """RoPE of the stored tokens [start, start + count) (pre-RoPE keys), shared by all layers of the step."""
        stored = self.shared.positions
        if stored is None or stored.length < start + count:
            raise OjaKVError("pre_rope keys need token positions: build the cache with ojakv.make_cache(model, ...)")
        return self.shared.span_rotation(start, count)

    def _oja_update(self) -> None:
        """Light periodic update from the running statistics, then re-express stored coefficients."""
        started = time.perf_counter()  # host time; on CUDA the bench synchronises around whole steps instead
        eta = self.config.eta_decode
        if eta > 0:
            self.u_k = self._rebase(self.k_coef, self.u_k, oja_step(self.u_k, self.stat_k, eta))
            self.u_v = self._rebase(self.v_coef, self.u_v, oja_step(self.u_v, self.stat_v, eta))
            self.stat_k.zero_()
            self.stat_v.zero_()
        self.pending = 0
        self.update_seconds += time.perf_counter() - started

    def _rebase(self, coef: GrowableTensor | CodedRows, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        change = change_of_basis(old, new)
        coef.apply_(lambda c: (c.float() @ change).to(c.dtype))
        return new

    # --- residual policy ------------------------------------------------------------------------------------
    def _select_exact(self, keys, values, body_start: int, attention, step) -> None:
        """Keep exact K/V for the body tokens with the largest query-weighted key residual |qᵀ(k − k̂)|."""
        count = keys.shape[2]
        reconstructed = self._reconstruct_keys(self.k_coef.view[:, :, body_start : body_start + count],
                                               self.k_sink.shape[2] + body_start)
        residual = keys.float() - reconstructed.float()
        scores = _residual_scores(self._recent_queries(attention, step), residual)
        idx = torch.arange(body_start, body_start + count, device=keys.device).expand_as(scores)
        if self.k_exact is not None:
            keys = torch.cat([self.k_exact, keys], dim=2)
            values = torch.cat([self.v_exact, values], dim=2)
            scores = torch.cat([self.exact_score, scores], dim=2)
            idx = torch.cat([self.exact_idx, idx], dim=2)
        keep = min(self.config.n_residual, scores.shape[2])
        top = scores.topk(keep, dim=2).indices
        rows = top.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1])
        self.k_exact, self.v_exact = keys.gather(2, rows), values.gather(2, rows)
        self.exact_score, self.exact_idx = scores.gather(2, top), idx.gather(2, top)

    def _recent_queries(self, attention: AttentionInputs, step) -> torch.Tensor:
        """Post-RoPE queries of the last ``query_window`` real tokens of this call, [b, H, w, d]."""
        w = min(self.config.query_window, attention.hidden_states.shape[1])
        queries = compute_queries(
            attention.module, attention.hidden_states[:, -w:], attention.cos[:, -w:], attention.sin[:, -w:]
        ).float()
        if step is not None:
            queries = queries * step.valid[:, None, -w:, None].float()
        return queries

    # --- reconstruction ---------------------------------------------------------------------------------------
    def _reconstruct_keys(self, coef: torch.Tensor, start: int) -> torch.Tensor:
        """Keys of the stored tokens [start, start + n) (cache order) from their coefficients, RoPE re-applied."""
        keys = coef.float() @ self.u_k.float().transpose(-1, -2)
        if self.config.key_mode == "pre_rope":
            keys = self._body_angles(start, coef.shape[2]).apply_(keys)
        return keys.to(self.dtype)

    def _takes_latent_path(self, attention: AttentionInputs, q: int) -> bool:
        return (self.latent and q <= latent_attention.MAX_LATENT_QUERIES
                and self.k_coef.length > 0 and hf.is_latent_enabled(attention.module))

    def _latent(self, attention: AttentionInputs, q: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Hand the body to the attention call as coefficients; return only the full-precision tokens."""
        start, body = self.k_sink.shape[2], self.k_coef.length
        angles = None
        if self.config.key_mode == "pre_rope":
            angles = self._body_angles(start, body)
        hf.post_body(attention.module, latent_attention.LowRankBody(
            start=start, key_coef=self.k_coef, value_coef=self.v_coef, key_basis=self.u_k.float(),
            value_basis=self.u_v.float(), key_angles=angles, exact_index=self.exact_idx, exact_keys=self.k_exact,
            exact_values=self.v_exact, selection=self._selection(q)))
        return torch.cat([self.k_sink, self.k_win], dim=2), torch.cat([self.v_sink, self.v_win], dim=2)

    def _selection(self, q: int) -> latent_attention.ChunkSelection | None:
        """Which chunks a selective step reads; None for the exact path: when it would read them all anyway, and
        in a call of several positions (a question, a next turn's chunk), whose rows need different chunks (one
        choice for all of them loses the one the last row needs) and share the call's cost."""
        landmarks, keep = self.landmarks, self.config.selected_chunks
        if landmarks is None or q > 1 or landmarks.means.length <= keep:
            return None
        return latent_attention.ChunkSelection(landmarks.means.view, landmarks.chunk, keep)

    def _materialize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-size K/V of this layer for standard attention; a temporary freed once the layer has attended."""
        body = self.k_coef.length
        keys, values = [self.k_sink], [self.v_sink]
        if body:
            body_keys = self._reconstruct_keys(self.k_coef.view, self.k_sink.shape[2])
            body_values = (self.v_coef.view.float() @ self.u_v.float().transpose(-1, -2)).to(self.dtype)
            if self.k_exact is not None:
                rows = self.exact_idx.unsqueeze(-1).expand(-1, -1, -1, body_keys.shape[-1])
                body_keys.scatter_(2, rows, self.k_exact)
                body_values.scatter_(2, rows, self.v_exact)
            keys.append(body_keys)
            values.append(body_values)
        keys.append(self.k_win)
        values.append(self.v_win)
        return torch.cat(keys, dim=2), torch.cat(values, dim=2)

    # --- accounting -------------------------------------------------------------------------------------------
    def segments(self) -> dict[str, int]:
        landmarks = self.landmarks
        segments = {
            "anchors": nbytes(self.k_sink, self.v_sink),
            "window": nbytes(self.k_win, self.v_win),
            **growable_segments(body=(self.k_coef, self.v_coef),
                                landmarks=(landmarks.means,) if landmarks is not None else ()),
            "residual_tokens": nbytes(self.k_exact, self.v_exact, self.exact_idx, self.exact_score),
            "bases": nbytes(*_basis_tensors(self.u_k), *_basis_tensors(self.u_v)),
            "oja_state": nbytes(self.stat_k, self.stat_v),
        }
        if landmarks is not None:
            segments["landmarks"] += nbytes(landmarks.tail)
        return segments


    # --- description ----------------------------------------------------------------------------------------
    def layout(self) -> dict:
        """Body coding, its bits per coordinate (a row's bits over head_dim, keys and values averaged) and rank,
        anchors, whether the bases move and how the prompt attends: with a budget or an energy, the rank and
        bits follow the prompt's spectrum, so they are known once the prompt is in."""
        config = self.config
        terms = {"body": _body_coding(config)}
        if self.u_k is not None:
            d = self.shared.geometry.head_dim
            terms["bits per coordinate"] = (self._row_bits(self.k_coef, self.rank_k)
                                            + self._row_bits(self.v_coef, self.rank_v)) / (2 * d)
        if self.rank_k is not None:
            terms["rank"] = (self.rank_k + self.rank_v) / 2
        else:
            terms["rank"] = "resolved at prefill"
        terms["anchors"] = f"{config.n_sink} + {config.n_recent}"
        terms["bases"] = _basis_motion(config)
        terms["prefill"] = config.prefill_attention
        return terms

    def _row_bits(self, store, rank: int) -> int:
        """Bits one body row holds: its codes, without the per-row gain or scales."""
        if isinstance(store, TransformCodedRows):
            return sum(store.bits)
        return rank * (self.config.coef_bits or torch.finfo(self.dtype).bits)


def _body_coding(config: OjaKVConfig) -> str:
    if config.body_bits:
        return "transform-coded"
    return f"low-rank ({config.coef_bits}-bit codes)" if config.coef_bits else "low-rank (model dtype)"


def _basis_motion(config: OjaKVConfig) -> str:
    """Whether the bases move while decoding (and in what precision they are held)."""
    if config.eta_decode > 0:
        return f"move (Oja every {config.update_interval} tokens)"
    return "fixed (int8)" if config.body_bits else "fixed"


def _basis_tensors(basis) -> tuple:
    return basis.buffers if isinstance(basis, Int8Basis) else (basis,)


def _residual_scores(queries: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """Mean |qᵀr| over the queries of each KV head's group: [b, h, n]. GQA-aware (no repeated KV heads)."""
    b, heads, w, d = queries.shape
    kv_heads = residual.shape[1]
    grouped = queries.reshape(b, kv_heads, heads // kv_heads * w, d)
    return (grouped @ residual.transpose(-1, -2)).abs().mean(2)


def build_low_rank(model, config: OjaKVConfig, layer_class: type[OjaKVLayer] = None):
    """(factory, track_positions): per layer, ranks and starting bases (calibration or weights) for
    ``layer_class`` (OjaKVLayer or a subclass taking the same arguments)."""
    from ..calibration import load_calibration, weight_spectra
    head_dim = hf.geometry(model).head_dim
    calibration = None
    if config.init == "calibration":
        calibration = load_calibration(model, config.calibration_file)
    elif config.init == "weights":
        calibration = weight_spectra(model)
    key_name = "k_pre" if config.key_mode == "pre_rope" else "k_post"
    if config.key_basis == "queries+keys":
        key_name = "qk_pre"

    layer_class = layer_class or OjaKVLayer

    def factory(layer_idx: int, shared: SharedState) -> OjaKVLayer:
        if calibration is None:
            return layer_class(layer_idx, shared, config, ranks_for(config, head_dim))
        vals_k, vecs_k = calibration.layer(key_name, layer_idx)
        vals_v, vecs_v = calibration.layer("v", layer_idx)
        ranks = ranks_for(config, head_dim, vals_k, vals_v)
        if config.body_bits:  # the calibrated spectrum sets the bits and scales
            rows = calibration.rows()
            return layer_class(layer_idx, shared, config, ranks, (vecs_k, vecs_v), (vals_k / rows, vals_v / rows))
        return layer_class(layer_idx, shared, config, ranks, (vecs_k, vecs_v))

    return factory, config.key_mode == "pre_rope" and layer_class.uses_shared_positions


def held_bytes_per_head(config: OjaKVConfig, geometry, prompt_tokens: int, new_tokens: int, rank: int,
                        dtype_bytes: int, position_bytes: float) -> float:
    """Predicted bytes one layer and KV head holds once ``prompt_tokens`` and then ``new_tokens`` are cached at
    ``rank`` (the README's formula): anchors and window full, the body as coefficients (with the spare capacity
    its growth leaves), bases and (when the bases move while decoding) Oja statistics in float32, residual tokens,
    and ``position_bytes`` per token for pre-RoPE positions."""
    d, s = geometry.head_dim, dtype_bytes
    n_tokens = prompt_tokens + new_tokens
    anchors = min(n_tokens, config.n_sink + config.n_recent)
    exact = min(config.n_residual, n_tokens - anchors) if config.policy == "residual" else 0
    first_body = max(0, prompt_tokens - anchors)
    body_slots = n_tokens - anchors + (growth_slack(first_body, n_tokens - anchors - first_body) if first_body else 0)
    body = 2 * body_slots * config.coefficient_bytes(rank, s, d)
    positions = position_bytes * n_tokens if config.key_mode == "pre_rope" else 0
    subspace = config.subspace_bytes(rank, d)
    landmarks = landmark_bytes(config, first_body, n_tokens - anchors, d, s)
    return 2 * anchors * d * s + body + subspace + exact * (2 * d * s + 12) + positions + landmarks


def landmark_bytes(config: OjaKVConfig, prompt_body: int, body: int, head_dim: int, dtype_bytes: int) -> int:
    """Bytes of one head's chunk landmarks once the body holds ``body`` tokens, ``prompt_body`` of them from the
    prompt: a mean key per complete chunk (with its growth slack) and the float32 sum of the chunk filling up."""
    if not config.select_tokens or body <= 0:
        return 0
    chunk = config.select_chunk
    first, total = prompt_body // chunk, body // chunk
    if total and not first:  # the first chunk completes while decoding, and the buffer grows from it
        first = 1
    slots = total + (growth_slack(first, total - first) if total else 0)
    return slots * head_dim * dtype_bytes + 4 * head_dim


LOW_RANK_SIZE = ("rank", "rank_ratio", "energy")
CODED_SIZE = ("body_bits", "fit_bases", "fit_new_tokens")  # what a budget sets for a transform-coded body


def prefill_attends_in_full(config: OjaKVConfig) -> bool:
    return config.prefill_attention == "full"


def budget_to_rank(config_class: type):
    """A ``for_budget`` for low-rank methods: the largest rank whose predicted held bytes (``held_bytes_per_head``
    with this config class's anchors and policy) stay within the budget."""

    def for_budget(knobs, geometry, prompt_tokens, new_tokens, dtype_bytes, budget) -> Sizing:
        config = config_class(**{**knobs, "rank_ratio": 0.5, "rank": None, "energy": None})
        full = 2 * (prompt_tokens + new_tokens) * geometry.head_dim * dtype_bytes
        shared_positions = 4 / (geometry.num_layers * geometry.num_kv_heads)  # int32 per token, once per cache

        def ratio(r: int) -> float:
            return held_bytes_per_head(config, geometry, prompt_tokens, new_tokens, r, dtype_bytes,
                                       shared_positions) / full

        best = largest_within(range(1, geometry.head_dim + 1), ratio, budget)
        return Sizing({"rank": best, "rank_ratio": None, "energy": None}, ratio(best), ratio(1),
                      "rank 1, plus the full-precision anchors and window, bases and Oja statistics",
                      ratio(geometry.head_dim), f"the full rank {geometry.head_dim}")

    return for_budget


@dataclass
class OjaKVPFConfig(OjaKVConfig):
    prefill_attention: str = knob("full", "prefill attends to full K/V; compression applies from decoding on")


@dataclass
class OjaKVQuantConfig(OjaKVConfig):
    coef_bits: int = knob(4, "body coefficients as packed codes of this many bits (2, 4 or 8)")


def _ojakv_budget(*args) -> Sizing:
    from .ojakv_tc import ojakv_budget  # the transform-coded sizing builds on this module

    return ojakv_budget(*args)


for name, config_class, summary, for_budget in (
    ("ojakv", OjaKVConfig, "hybrid anchors + low-rank body in per-head subspaces adapted online by Oja's rule",
     _ojakv_budget),
    ("ojakv-pf", OjaKVPFConfig, "OjaKV with full-precision prefill attention (compression from decoding on)",
     budget_to_rank(OjaKVPFConfig)),
    ("ojakv+quant", OjaKVQuantConfig, "OjaKV whose body coefficients are stored as packed 4-bit codes",
     budget_to_rank(OjaKVQuantConfig)),
):
    register(Method(name=name, summary=summary, config_class=config_class, build=build_low_rank,
                    reference="Zhu et al., OjaKV, arXiv 2509.21623", for_budget=for_budget,
                    size_knobs=(*LOW_RANK_SIZE, *CODED_SIZE), full_prefill=prefill_attends_in_full))
