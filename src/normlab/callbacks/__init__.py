"""Lightning callbacks for norm research: exact running statistics (``PreciseBN``), per-layer
statistics monitoring (``NormStatistics``), gradient-norm curves (``GradientNorm``) and a weight
EMA evaluated beside the trained weights (``WeightEMA``)."""

from normlab.callbacks.gradient_norm import GradientNorm
from normlab.callbacks.norm_stats import NormStatistics, statistic_gaps
from normlab.callbacks.precise_bn import PreciseBN, PreciseStatistics, recompute_norm_statistics
from normlab.callbacks.resume import ExactResume, ResumeRecord
from normlab.callbacks.weight_ema import WeightEMA

__all__ = [
    "ExactResume",
    "GradientNorm",
    "NormStatistics",
    "PreciseBN",
    "PreciseStatistics",
    "ResumeRecord",
    "WeightEMA",
    "recompute_norm_statistics",
    "statistic_gaps",
]
