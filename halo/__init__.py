"""Halo Weave: a fixed-budget KV cache where tokens live by the attention they earn.

Distribution name `halo-weave` (the PyPI name `halo` is a terminal-spinner library); import name `halo`.
"""

from .cache import HaloCache
from .config import HaloConfig, SourcePolicy, default_sources
from .head_cache import HeadHaloCache
from .journal import Journal, JournalEntry
from .layered_cache import LayeredHaloCache
from .models import ModelNotFoundError, load_model
from .mean_income import MeanIncomePolicy
from .policy import CullPolicy, HaloPolicy
from .session import MemorySnapshot, Session

__version__ = "0.1.0"

__all__ = [
    "CullPolicy", "HaloCache", "HaloConfig", "HaloPolicy", "HeadHaloCache", "Journal", "JournalEntry",
    "LayeredHaloCache",
    "MeanIncomePolicy", "MemorySnapshot",
    "ModelNotFoundError", "Session", "SourcePolicy", "default_sources", "load_model",
]
