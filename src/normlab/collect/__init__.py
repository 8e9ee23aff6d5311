"""``python -m normlab.collect``: any set of finished runs as a table of n, mean ± std and, against
a baseline, the difference with its 95 % confidence interval (:mod:`.comparison`)."""
