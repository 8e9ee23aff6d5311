"""What every study and benchmark script repeats: training runs timed and read back
(:mod:`~experiments.lib.study`) and candidates timed side by side
(:mod:`~experiments.lib.benchmark`)."""
