# crop{case}: the laryngeal box of each scan on a 1 mm isotropic grid (hnct.crop), CT and label map
# in the case's folder results/crops/{case}/ (empty for an excluded case); the sidecar names them.


import shlex

# The crop table that table-placed crops read (an input, so editing it reruns the crops); none for masks.
CROP_TABLE = config["crop"]["table"] if config["crop"]["method"] == "table" else []

# Only the options of the configured method reach the job (a param it does not use would rerun
# every crop when it changes): the table and its format, or the structures and margin of a mask box.
if config["crop"]["method"] == "table":
    CROP_BOX_ARGS = (
        f"--table {shlex.quote(config['crop']['table'])}"
        f" --table-format {config['crop']['table_format']}"
    )
else:
    CROP_BOX_ARGS = (
        f"--structures {shlex.join(config['crop']['structures'])}"
        f" --margin-mm {config['crop']['margin_mm']}"
    )


rule crop_larynx:
    input:
        volume="results/volumes/{case}.json",
        table=CROP_TABLE,
    output:
        data=directory("results/crops/{case}"),
        sidecar="results/crops/{case}.json",
    log:
        "logs/crop_larynx/{case}.log",
    conda:
        "../../envs/dicom.yaml"
    threads: 1
    resources:
        mem_mb=config["resources"]["preprocess_mem_mb"],
        runtime=10,
    params:
        method=config["crop"]["method"],
        box=CROP_BOX_ARGS,
        spacing_mm=config["crop"]["spacing_mm"],
        interpolation=config["crop"]["interpolation"],
        pad_hu=config["crop"]["pad_hu"],
        code=code_version("crop", "cohort", "laryngealct"),
    shell:
        "python -m hnct.crop --case {wildcards.case:q} --source-sidecar {input.volume:q}"
        " --out-dir {output.data:q} --out-volume {output.data:q}/volume.nrrd"
        " --out-label {output.data:q}/label.nrrd"
        " --sidecar {output.sidecar:q} --method {params.method} {params.box}"
        " --spacing-mm {params.spacing_mm}"
        " --interpolation {params.interpolation} --pad-hu {params.pad_hu}"
        " --log {log:q}"
