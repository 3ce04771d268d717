"""vLLM's CPU platform, honouring ``attention_backend="CUSTOM"`` and checking ojakv's settings at start."""

from __future__ import annotations

from vllm.logger import init_logger
from vllm.platforms.cpu import CpuPlatform
from vllm.utils.import_utils import resolve_obj_by_qualname
from vllm.v1.attention.backends.registry import AttentionBackendEnum

from . import settings as plugin_settings

logger = init_logger("vllm.plugins.ojakv")  # under vLLM's logger, so its handlers print it


class OjaKVCpuPlatform(CpuPlatform):
    """Everything as ``CpuPlatform``, except the two methods below."""

    @classmethod
    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None) -> str:
        if selected_backend != AttentionBackendEnum.CUSTOM:
            return super().get_attn_backend_cls(selected_backend, attn_selector_config, num_heads)
        path = AttentionBackendEnum.CUSTOM.get_path()  # raises when nothing registered CUSTOM
        backend = resolve_obj_by_qualname(path)
        c = attn_selector_config
        reasons = backend.validate_configuration(
            head_size=c.head_size, dtype=c.dtype, kv_cache_dtype=c.kv_cache_dtype, block_size=c.block_size,
            use_mla=c.use_mla, has_sink=c.has_sink, use_sparse=c.use_sparse, use_mm_prefix=c.use_mm_prefix,
            use_per_head_quant_scales=c.use_per_head_quant_scales, device_capability=None,
            attn_type=c.attn_type, has_sliding_window=c.has_sliding_window, use_non_causal=c.use_non_causal,
            use_batch_invariant=c.use_batch_invariant, use_kv_connector=c.use_kv_connector, use_pcp=c.use_pcp,
            use_adaptive_verification=c.use_adaptive_verification, use_dcp=c.use_dcp, use_rswa=c.use_rswa)
        if reasons:
            raise plugin_settings.refuse(f"the CUSTOM backend cannot run this model's attention ({'; '.join(reasons)})")
        logger.info_once("Using CUSTOM attention backend %s on CPU.", path)
        return path

    @classmethod
    def check_and_update_config(cls, vllm_config) -> None:
        super().check_and_update_config(vllm_config)
        from .backend import describe_for_config

        line = describe_for_config(vllm_config)  # raises a one-line refusal when the settings cannot be served
        if line:
            logger.info(line)
