# slices{case}: windowed axial slices of each crop (or volume) as .npz + .jpg, with an index TSV, in the
# case's folder results/slices/{case}/ (empty for an excluded case); the sidecar names the index (hnct.slices).


# The sidecar of what slices are cut from: the crop (default) or the whole volume.
SLICES_SOURCE = (
    "results/volumes/{case}.json"
    if config["slices"]["source"] == "volume"
    else "results/crops/{case}.json"
)


rule export_slices:
    input:
        source=SLICES_SOURCE,
    output:
        data=directory("results/slices/{case}"),
        sidecar="results/slices/{case}.json",
    log:
        "logs/export_slices/{case}.log",
    priority: SLICES_PRIORITY
    conda:
        "../../envs/dicom.yaml"
    threads: 1
    resources:
        mem_mb=config["resources"]["preprocess_mem_mb"],
        runtime=20,
    params:
        source=config["slices"]["source"],
        window_level=config["slices"]["window_level"],
        window_width=config["slices"]["window_width"],
        structure=get_slice_structure(),
        jpg="--jpg" if config["slices"]["jpg"] else "--no-jpg",
        overlay="--overlay" if config["slices"]["overlay"] else "--no-overlay",
        compress="--compress" if config["slices"]["compress"] else "--no-compress",
        code=code_version("slices"),
    shell:
        "python -m hnct.slices --case {wildcards.case:q} --source-sidecar {input.source:q}"
        " --source {params.source} --sidecar {output.sidecar:q} --index {output.data:q}/index.tsv"
        " --out-dir {output.data:q} --window-level {params.window_level}"
        " --window-width {params.window_width} --structure {params.structure:q}"
        " {params.jpg} {params.overlay} {params.compress} --log {log:q}"
