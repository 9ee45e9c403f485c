"""Key statistics: the second moment C = E[k kᵀ] of MLP keys for all edit layers, in one pass, cached.

``KeyStatistics`` (``key_statistics.py``) is the torchmetrics ``Metric`` and its file format;
``collection.py`` holds the hooks (``track_keys``), the one-pass collection and the cache.

Example:
    >>> from lightning_kedit.statistics import KeyStatistics
    >>> KeyStatistics([4, 5], key_size=8).layers
    [4, 5]
"""

from lightning_kedit.statistics.collection import (
    KeyTracker,
    collect_key_statistics,
    load_or_collect_statistics,
    statistics_cache_path,
    track_keys,
)
from lightning_kedit.statistics.key_statistics import KeyStatistics, accumulate_outer

__all__ = [
    "KeyStatistics",
    "KeyTracker",
    "accumulate_outer",
    "collect_key_statistics",
    "load_or_collect_statistics",
    "statistics_cache_path",
    "track_keys",
]
