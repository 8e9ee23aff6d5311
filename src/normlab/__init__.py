"""normlab: normalization layers across vision tasks."""

__version__ = "0.1.0"
