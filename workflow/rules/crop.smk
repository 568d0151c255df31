# crop{case}: the laryngeal box of each scan on a 1 mm isotropic grid (hnct.crop).


# The crop table that table-placed crops read (an input, so editing it reruns the crops); none for masks.
CROP_TABLE = config["crop"]["table"] if config["crop"]["method"] == "table" else []


rule crop_larynx:
    input:
        volume="results/volumes/{case}.json",
        table=CROP_TABLE,
    output:
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
        out_volume="results/crops/{case}.nrrd",
        out_label="results/crops/{case}_label.nrrd",
        method=config["crop"]["method"],
        table=config["crop"]["table"],
        table_format=config["crop"]["table_format"],
        structures=config["crop"]["structures"],
        margin_mm=config["crop"]["margin_mm"],
        spacing_mm=config["crop"]["spacing_mm"],
        interpolation=config["crop"]["interpolation"],
        pad_hu=config["crop"]["pad_hu"],
        code=code_version("crop", "cohort"),
    shell:
        "python -m hnct.crop --case {wildcards.case:q} --source-sidecar {input.volume:q}"
        " --out-volume {params.out_volume:q} --out-label {params.out_label:q}"
        " --sidecar {output.sidecar:q} --method {params.method} --table {params.table:q}"
        " --table-format {params.table_format} --structures {params.structures:q}"
        " --margin-mm {params.margin_mm} --spacing-mm {params.spacing_mm}"
        " --interpolation {params.interpolation} --pad-hu {params.pad_hu}"
        " --log {log:q}"
