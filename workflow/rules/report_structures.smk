# report_structures{task}: for each task of report_kind "structures" (registry; oar), the
# per-structure table, box plots, case x structure Dice heat map and QA overlays
# (hnct.report_structures) from every model x fold's per-case metrics and validation predictions.


rule report_structures:
    input:
        per_case=get_structures_per_case,
        predictions=get_structures_predictions,
    output:
        table=report(
            "results/report/structures/{task}/table.csv",
            category="Structures",
            caption="../report/structures_table.rst",
        ),
        markdown="results/report/structures/{task}/table.md",
        boxplots=report(
            "results/report/structures/{task}/boxplots.png",
            category="Structures",
            caption="../report/structures_figures.rst",
        ),
        heatmap=report(
            "results/report/structures/{task}/dice_heatmap.png",
            category="Structures",
            caption="../report/structures_figures.rst",
        ),
        overlays=report(
            "results/report/structures/{task}/overlays.png",
            category="Structures",
            caption="../report/structures_figures.rst",
        ),
    log:
        "logs/report_structures/{task}.log",
    wildcard_constraints:
        task="|".join(tasks_of_kind("structures")) or "NO_TASKS",
    localrule: True
    conda:
        "../../envs/report.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=20,
    params:
        out_dir="results/report/structures/{task}",
        dpi=config["report"]["dpi"],
        font_size=config["report"]["font_size"],
        code=code_version("report_structures", "preprocess"),
    shell:
        "python -m hnct.report_structures --per-case {input.per_case:q}"
        " --predictions {input.predictions:q} --out-dir {params.out_dir:q}"
        " --dpi {params.dpi} --font-size {params.font_size} --log {log:q}"
