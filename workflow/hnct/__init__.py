"""hnct: head-and-neck CT from TCIA to reproducible deep-learning benchmarks.

Each stage is a module with plain functions (paths and parameters in, files out) and a
command-line entry (``python -m hnct.<stage> --help``), so a Snakemake rule is one call
and a person can run any stage by hand.
"""

__version__ = "0.1.0"
