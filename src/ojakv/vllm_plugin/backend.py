"""The CUSTOM attention backend: keys and values stored in a fixed-size compressed slot of vLLM's paged pool.

- ``customize_spec`` gives each token's slot the format's size (``formats.slot_bytes``), so vLLM's allocator fits
  dense / slot times more tokens into the same KV memory.
- ``do_kv_cache_update`` (vLLM calls it before attention) encodes the step's new keys and values into their slots
  (``slot_mapping``).
- ``forward`` reads each request's keys and values from its pages (block table, ``seq_lens``) and attends with
  PyTorch's SDPA, causally, in float32, in the format's own frame where it has one (``Format.attention_operands``:
  TurboQuant's rotated coordinates, low-rank coefficients; the query is mapped in and the output back). Decode
  steps, earlier chunks of a chunked prefill and prefix-cache hits are read from the pages, so those tokens are
  attended exactly as they are stored, as the library's reconstruct path does. A prompt chunk attends to its own
  keys and values as computed (``prefill_attention="full"``, the default, as the library's quantizers and
  budgeted ``ojakv``), or to their slots too (``"compressed"``).

Plain PyTorch, correctness first: one SDPA call per request that has a prompt chunk, one batched call for all
single-token decodes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch
import torch.nn.functional as F

from vllm.config import get_current_vllm_config_or_none
from vllm.logger import init_logger
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionMetadata,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheLayout

from . import settings as plugin_settings
from .formats import (Format, LowRankFormat, QuantFormat, TransformCodedFormat, TurboQuantFormat, resolve,
                      slot_bytes)

logger = init_logger("vllm.plugins.ojakv")  # under vLLM's logger, so its handlers print it

_PROCESS_SETTINGS: plugin_settings.Settings | None = None  # set when a layer is built, for customize_spec


def _dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def settings_of(vllm_config) -> plugin_settings.Settings:
    """The run's settings (unresolved), or a one-line refusal when it selected CUSTOM without them."""
    found = plugin_settings.from_additional_config(getattr(vllm_config, "additional_config", None))
    if found is None:
        raise plugin_settings.refuse(
            "attention_backend CUSTOM is ojakv's backend and needs additional_config={'ojakv': {'method': ...}}")
    return found


def _current_settings() -> plugin_settings.Settings:
    config = get_current_vllm_config_or_none()
    if config is not None and config.additional_config:
        return settings_of(config)
    if _PROCESS_SETTINGS is not None:
        return _PROCESS_SETTINGS
    raise plugin_settings.refuse("no vLLM config is current, so the plugin's settings are unknown")


def describe_for_config(vllm_config) -> str | None:
    """Checks made when the config is built (front end): a one-line refusal for settings that cannot be served,
    else a line describing the format, or None when the run does not use the plugin."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from . import BACKEND_PATH

    found = plugin_settings.from_additional_config(vllm_config.additional_config)
    attention_config = getattr(vllm_config, "attention_config", None)
    selected = getattr(attention_config, "backend", None)
    uses_custom = selected == AttentionBackendEnum.CUSTOM
    ours = uses_custom and _registered_path() == BACKEND_PATH
    if found is not None and not uses_custom:
        raise plugin_settings.refuse("additional_config has an 'ojakv' section but the attention backend is "
                                     f"{getattr(selected, 'name', selected)!s}; select attention_backend='CUSTOM'")
    if not ours:
        return None
    found = settings_of(vllm_config)
    model_config = vllm_config.model_config
    if model_config is None:
        return None
    if vllm_config.cache_config.cache_dtype not in ("auto", None):
        raise plugin_settings.refuse(f"kv_cache_dtype {vllm_config.cache_config.cache_dtype!r} cannot be combined "
                                     "with ojakv's formats (leave it 'auto')")
    head_dim = model_config.get_head_size()
    dtype_bytes = _dtype_bytes(model_config.dtype)
    resolved = resolve(found, head_dim, dtype_bytes)
    if resolved.method == "ojakv":
        from .calibration import check_available

        check_available(resolved, model_config)
    slot = slot_bytes(resolved, head_dim, dtype_bytes)
    dense = 2 * head_dim * dtype_bytes
    return (f"ojakv: {resolved.describe()}: {slot} bytes per token and KV head (dense {dense}, "
            f"{slot / dense:.3f} of it; the pool holds {dense / slot:.2f}x the tokens)")


def _registered_path() -> str | None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    try:
        return AttentionBackendEnum.CUSTOM.get_path()
    except ValueError:
        return None


class OjaKVAttentionBackend(AttentionBackend):
    """ojakv's compressed-slot backend (selected as CUSTOM)."""

    accept_output_buffer: bool = True
    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list] = ["auto"]

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type["OjaKVAttentionImpl"]:
        return OjaKVAttentionImpl

    @staticmethod
    def get_builder_cls() -> type["OjaKVMetadataBuilder"]:
        return OjaKVMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list:
        return [MultipleOf(16)]

    @classmethod
    def supported_kv_cache_layouts(cls):
        return (KVCacheLayout.LBHNC,)  # pages read head-major: [block, head, token, slot]

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        if spec.head_size_v != spec.head_size:
            raise plugin_settings.refuse(f"keys and values of different sizes ({spec.head_size} and "
                                         f"{spec.head_size_v}) are not served")
        resolved = resolve(_current_settings(), spec.head_size, _dtype_bytes(spec.dtype))
        return replace(spec, state_content_bytes=slot_bytes(resolved, spec.head_size, _dtype_bytes(spec.dtype)))


@dataclass
class OjaKVMetadata(AttentionMetadata):
    num_actual_tokens: int
    query_start_loc: list[int]  # host copies: requests are walked in Python
    seq_lens: list[int]
    block_table: torch.Tensor  # [requests, blocks]
    slot_mapping: torch.Tensor  # [tokens]
    positions: torch.Tensor  # [tokens]: each new token's position in its sequence


class OjaKVMetadataBuilder(AttentionMetadataBuilder[OjaKVMetadata]):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> OjaKVMetadata:
        m = common_attn_metadata
        if isinstance(m.causal, torch.Tensor) or not m.causal:
            raise plugin_settings.refuse("non-causal attention is not served")
        reqs = m.num_reqs
        qsl = m.query_start_loc_cpu[: reqs + 1].tolist()
        seq_lens = m.seq_lens[:reqs].cpu().tolist()
        tokens = m.num_actual_tokens
        if m.positions is not None:
            positions = m.positions[:tokens].to(torch.long).cpu()
        else:
            starts = torch.tensor([s - (qsl[i + 1] - qsl[i]) for i, s in enumerate(seq_lens)], dtype=torch.long)
            lengths = torch.tensor([qsl[i + 1] - qsl[i] for i in range(reqs)], dtype=torch.long)
            offsets = torch.arange(qsl[-1], dtype=torch.long) - torch.repeat_interleave(
                torch.tensor(qsl[:-1], dtype=torch.long), lengths)
            positions = torch.repeat_interleave(starts, lengths) + offsets
            if positions.shape[0] < tokens:
                positions = torch.cat([positions, positions.new_zeros(tokens - positions.shape[0])])
        return OjaKVMetadata(num_actual_tokens=tokens, query_start_loc=qsl, seq_lens=seq_lens,
                             block_table=m.block_table_tensor[:reqs], slot_mapping=m.slot_mapping[:tokens],
                             positions=positions[:tokens])


class OjaKVAttentionImpl(AttentionImpl[OjaKVMetadata]):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int | None = None,
                 alibi_slopes=None, sliding_window: int | None = None, kv_cache_dtype: str = "auto",
                 logits_soft_cap: float | None = None, attn_type: str = AttentionType.DECODER,
                 kv_sharing_target_layer_name: str | None = None, sinks=None, **kwargs) -> None:
        global _PROCESS_SETTINGS
        unsupported = [name for name, bad in (
            ("ALiBi", alibi_slopes is not None), ("sliding windows", sliding_window is not None),
            ("logit soft-capping", bool(logits_soft_cap)), ("attention sinks", sinks is not None),
            ("cross-layer KV sharing", kv_sharing_target_layer_name is not None),
            (f"kv_cache_dtype {kv_cache_dtype!r}", kv_cache_dtype not in ("auto", None)),
            (f"{attn_type} attention", attn_type != AttentionType.DECODER)) if bad]
        if unsupported:
            raise plugin_settings.refuse(f"this layer uses {', '.join(unsupported)}, which the backend does not serve")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.groups = self.num_heads // self.num_kv_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = None
        self.sliding_window = None
        config = get_current_vllm_config_or_none()
        if config is None:
            raise plugin_settings.refuse("the backend was built outside a vLLM config")
        self.vllm_config = config
        self.settings = settings_of(config)
        _PROCESS_SETTINGS = self.settings
        self.dtype = config.model_config.dtype
        self.resolved = resolve(self.settings, head_size, _dtype_bytes(self.dtype))
        self.format: Format | None = None

    # --- the layer's codec, made on first use (it needs the layer's index) --------------------------------

    def _format_for(self, layer) -> Format:
        if self.format is None:
            from vllm.model_executor.models.utils import extract_layer_index

            layer_idx = extract_layer_index(layer.layer_name)
            offset, total = _head_shard(self.vllm_config, self.num_kv_heads)
            s = self.resolved
            if s.method == "quant":
                self.format = QuantFormat(s, self.num_kv_heads, self.head_size, self.dtype)
            elif s.method == "turboquant":
                self.format = TurboQuantFormat(s, self.num_kv_heads, self.head_size, self.dtype, layer_idx,
                                               head_offset=offset, total_heads=total)
            else:
                from .calibration import layer_bases, layer_spectra, rope_inverse_frequencies

                model_config = self.vllm_config.model_config
                inv_freq = rope_inverse_frequencies(model_config, self.head_size) if s.key_mode == "pre_rope" \
                    else None
                if s.body_bits is not None:
                    self.format = TransformCodedFormat(s, self.num_kv_heads, self.head_size, self.dtype,
                                                       layer_spectra(s, model_config, layer_idx), inv_freq,
                                                       head_offset=offset)
                else:
                    key_basis, value_basis = layer_bases(s, model_config, layer_idx)
                    self.format = LowRankFormat(s, self.num_kv_heads, self.head_size, self.dtype,
                                                key_basis[offset : offset + self.num_kv_heads],
                                                value_basis[offset : offset + self.num_kv_heads], inv_freq)
            logger.info_once("ojakv backend: %s, %d bytes per token and KV head", s.describe(), self.format.slot)
        return self.format

    # --- cache write ----------------------------------------------------------------------------------------

    def do_kv_cache_update(self, layer, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                           slot_mapping: torch.Tensor) -> None:
        n = slot_mapping.shape[0]
        if n == 0 or kv_cache.numel() == 0:
            return
        fmt = self._format_for(layer)
        positions = _positions_for(layer, n) if fmt.needs_positions else None
        slots = fmt.encode(key[:n].view(n, self.num_kv_heads, self.head_size),
                           value[:n].view(n, self.num_kv_heads, self.head_size), positions)
        pages = kv_cache.view(torch.uint8)  # [blocks, heads, block_size, slot]
        block_size = pages.shape[2]
        mapping = slot_mapping.to(torch.long)
        real = mapping >= 0  # padded tokens have slot -1
        if not bool(real.all()):
            mapping, slots = mapping[real], slots[real]
        pages[mapping // block_size, :, mapping % block_size] = slots

    # --- attention ------------------------------------------------------------------------------------------

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: OjaKVMetadata | None, output: torch.Tensor | None = None,
                output_scale: torch.Tensor | None = None, output_block_scale: torch.Tensor | None = None):
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported by ojakv's backend")
        if output is None:
            output = torch.zeros(query.shape[0], self.num_heads, self.head_size, dtype=query.dtype,
                                 device=query.device)
        if attn_metadata is None:  # profiling run: no pages yet
            return output
        fmt = self._format_for(layer)
        pages = kv_cache.view(torch.uint8)
        out = output.view(-1, self.num_heads, self.head_size)
        qsl, seq_lens = attn_metadata.query_start_loc, attn_metadata.seq_lens
        decodes = [i for i in range(len(seq_lens)) if qsl[i + 1] - qsl[i] == 1]
        if decodes:
            self._decode(query, out, pages, fmt, attn_metadata, decodes)
        for i in range(len(seq_lens)):
            q_len = qsl[i + 1] - qsl[i]
            if q_len > 1:
                self._prefill(query, key, value, out, pages, fmt, attn_metadata, i)
        return output

    def _slots(self, pages: torch.Tensor, block_row: torch.Tensor, length: int) -> torch.Tensor:
        """One request's first ``length`` slots [kv_heads, length, slot] from its pages."""
        block_size = pages.shape[2]
        blocks = block_row[: -(-length // block_size)].to(torch.long)
        return pages[blocks].permute(1, 0, 2, 3).reshape(pages.shape[1], -1, pages.shape[3])[:, :length]

    def _gather(self, pages: torch.Tensor, fmt: Format, block_row: torch.Tensor, length: int):
        """One request's keys and values [kv_heads, length, ·] float32, in the format's attention frame."""
        positions = torch.arange(length) if fmt.needs_positions else None
        return fmt.attention_operands(self._slots(pages, block_row, length), positions)

    def _prefill_operands(self, key, value, pages, fmt, block_row, length: int, start, end):
        """Keys and values [kv_heads, length, d] float32 in channel space for a prefill chunk that attends in full:
        the chunk's own as computed, earlier tokens rebuilt from their slots."""
        q_len = end - start
        shape = (q_len, self.num_kv_heads, self.head_size)
        k = key[start:end].reshape(shape).transpose(0, 1).float()
        v = value[start:end].reshape(shape).transpose(0, 1).float()
        earlier = length - q_len
        if earlier:
            positions = torch.arange(earlier) if fmt.needs_positions else None
            k_old, v_old = fmt.decode(self._slots(pages, block_row, earlier), positions)
            k, v = torch.cat([k_old, k], dim=1), torch.cat([v_old, v], dim=1)
        return k, v

    def _prefill(self, query, key, value, out, pages, fmt, meta: OjaKVMetadata, i: int) -> None:
        start, end = meta.query_start_loc[i], meta.query_start_loc[i + 1]
        length, q_len = meta.seq_lens[i], end - start
        q = query[start:end].transpose(0, 1).float()  # [heads, q_len, d]
        in_full = self.resolved.prefill_attention == "full"
        if in_full and key is None:  # vLLM passes none for layers that reuse another layer's cache (refused)
            raise NotImplementedError("ojakv's backend got no keys for a prefill chunk, which "
                                      "prefill_attention='full' attends to; use prefill_attention='compressed'")
        if in_full:  # channel space: the chunk's exact keys have no coordinates in a low-rank frame
            k, v = self._prefill_operands(key, value, pages, fmt, meta.block_table[i], length, start, end)
        else:
            k, v = self._gather(pages, fmt, meta.block_table[i], length)
            q = fmt.map_query(q)
        if q_len == length:
            mask, causal = None, True
        else:  # a later chunk, or a prefix-cache hit: query j sits at position length - q_len + j
            rows = torch.arange(q_len)[:, None] + (length - q_len)
            mask, causal = torch.arange(length)[None, :] <= rows, False
        # 4-D (a batch of one): PyTorch's CPU flash kernel; 3-D inputs with grouped heads fall back to the math
        # kernel, several times slower on long prompts
        result = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, is_causal=causal,
                                                scale=self.scale, enable_gqa=self.groups > 1)[0]
        out[start:end] = (result if in_full else fmt.map_output(result)).transpose(0, 1).to(out.dtype)

    def _decode(self, query, out, pages, fmt, meta: OjaKVMetadata, requests: list[int]) -> None:
        """All single-token queries in one SDPA call, shorter contexts masked."""
        longest = max(meta.seq_lens[i] for i in requests)
        keys = values = mask = None
        for row, i in enumerate(requests):
            length = meta.seq_lens[i]
            k, v = self._gather(pages, fmt, meta.block_table[i], length)
            if keys is None:
                keys = k.new_zeros(len(requests), k.shape[0], longest, k.shape[-1])
                values = v.new_zeros(len(requests), v.shape[0], longest, v.shape[-1])
                mask = torch.zeros(len(requests), 1, 1, longest, dtype=torch.bool)
            keys[row, :, :length], values[row, :, :length] = k, v
            mask[row, ..., :length] = True
        tokens = torch.tensor([meta.query_start_loc[i] for i in requests], dtype=torch.long)
        q = fmt.map_query(query[tokens].unsqueeze(2).float())  # [requests, heads, 1, ·]
        if len(requests) == 1:
            mask = None  # one request: nothing to mask
        # one query position each: a KV head's group of query heads attends as that many query rows
        grouped = q.reshape(len(requests), self.num_kv_heads, self.groups, q.shape[-1])
        result = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask, scale=self.scale)
        result = result.reshape(len(requests), self.num_heads, 1, result.shape[-1])
        out[tokens] = fmt.map_output(result).squeeze(2).to(out.dtype)


def _positions_for(layer, n: int) -> torch.Tensor:
    """Positions of the step's new tokens, from this layer's metadata in the forward context."""
    from vllm.forward_context import get_forward_context

    metadata = get_forward_context().attn_metadata
    if isinstance(metadata, list):
        metadata = metadata[0]
    if isinstance(metadata, dict):
        metadata = metadata[layer.layer_name]
    return metadata.positions[:n]


def _head_shard(vllm_config, local_heads: int) -> tuple[int, int]:
    """(first global KV head on this rank, KV heads in the model): tensor parallelism splits heads across ranks
    (and replicates them when there are fewer heads than ranks)."""
    total = vllm_config.model_config.get_total_num_kv_heads()
    try:
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

        rank, world = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
    except Exception:  # no model-parallel group (single process)
        return 0, total
    if world <= 1:
        return 0, total
    if total >= world:
        return rank * local_heads, total
    return (rank * total // world), total  # replicated heads: each rank holds one
