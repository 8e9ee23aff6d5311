"""What every study and benchmark script repeats: training jobs run and resumed
(:mod:`~experiments.lib.jobs`), their runs recorded in runs.csv and judged
(:mod:`~experiments.lib.results`, with :mod:`normlab.collect.comparison`'s rule), drawn
(:mod:`~experiments.lib.plots`), the recipes (:mod:`~experiments.lib.recipes`), the study command
line (:mod:`~experiments.lib.command_line`), and candidates timed side by side
(:mod:`~experiments.lib.benchmark`)."""
