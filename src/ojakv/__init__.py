"""ojakv: smaller KV caches for Hugging Face language models, with honest memory, quality and speed figures."""

from .api import compress, make_cache, methods
from .cache import CompressedCache
from .calibration import calibrate, load_calibration
from .errors import OjaKVError
from .memory import MemoryReport
from .models import load_model

__all__ = [
    "CompressedCache",
    "MemoryReport",
    "OjaKVError",
    "calibrate",
    "compress",
    "load_calibration",
    "load_model",
    "make_cache",
    "methods",
]
__version__ = "0.1.0"
