"""Lightning callbacks for norm research: exact running statistics (``PreciseBN``) and
per-layer statistics monitoring (``NormStatistics``)."""

from normlab.callbacks.norm_stats import NormStatistics, statistic_gaps
from normlab.callbacks.precise_bn import PreciseBN, PreciseStatistics, recompute_norm_statistics

__all__ = [
    "NormStatistics",
    "PreciseBN",
    "PreciseStatistics",
    "recompute_norm_statistics",
    "statistic_gaps",
]
