"""The studies and benchmarks behind normlab's published numbers. Each runs from the repository
root as a module, ``python -m experiments.<study>.run``, so that all of them share
:mod:`experiments.lib`."""
