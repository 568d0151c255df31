# hnct: head-and-neck CT from TCIA to reproducible deep-learning benchmarks.
# Default: the synthetic demo cohort (config/config.yaml), `snakemake --cores 2`.
# The cluster: `snakemake --profile profiles/slurm --configfile config/laryngealct.yaml`.

from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/demo.smk"
include: "workflow/rules/fetch.smk"
include: "workflow/rules/convert.smk"
include: "workflow/rules/crop.smk"
include: "workflow/rules/slices.smk"
include: "workflow/rules/folds.smk"
include: "workflow/rules/preprocess.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/exclusions.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/report_structures.smk"


# On a cluster (profiles/slurm) the cheap whole-cohort rules (the cohort table, folds, fold slice
# lists, exclusions, the test ensemble, report tables and figures, the demo's metadata) and `all`
# run in the Snakemake process itself (`localrule: True`): a SLURM job each would only wait in
# the queue. Per-case preprocessing, training and evaluation go to SLURM.
rule all:
    default_target: True
    input:
        get_final_output(),
    localrule: True
