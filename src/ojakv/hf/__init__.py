"""The one boundary between ojakv and transformers' internals.

Everything that depends on how transformers models are built or called lives in this package: the cache
keyword and the supported version range (``compat``), the architecture adapter (``architecture``), the forward
hooks and their lifetime (``hooks``), the latent-attention registration (``attention``), the cache protocol
(``protocol``) and model loading (``loading``). The rest of ojakv imports transformers only through here.
"""

from .architecture import (
    SUPPORTED_MODEL_TYPES,
    ModelGeometry,
    attention_implementation,
    attention_modules,
    attention_scale,
    base_model,
    check_supported,
    compute_queries,
    decoder_layers,
    geometry,
    head_dim,
    is_model,
    kv_projection_weights,
    logit_softcap,
    rotary_embedding,
    sliding_windows,
)
from .attention import is_latent_enabled, post_body, take_posted_body
from .compat import INSTALLED, SUPPORTED_RANGE, cache_argument, cache_keyword, cache_kwargs, describe_installed
from .generation import stop_when
from .hooks import attach
from .protocol import AttentionInputs, Cache, CacheLayerMixin, HookedCache
