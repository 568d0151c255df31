# convert{case}: the chosen CT series (or the case's CT volume file, the cohort's ct_file) as int16
# HU NRRD + its structures (one channel each) and label map as uint8 NRRDs (hnct.convert), in the
# case's folder results/volumes/{case}/ (empty for an excluded case); the sidecar names them. Its
# inputs are every file it reads for the case (common.smk: get_convert_inputs).


import json
import shlex

# Only the label options of the configured label source reach the job (an unused param would
# rerun every conversion when it changes): the structures and their names whenever there are
# labels, the mask folder's options for mask labels or a mask folder beside the RTSTRUCT/SEG,
# nothing without labels.
_CONVERT = config["convert"]
_LABELS = _CONVERT["labels"]
CONVERT_LABEL_ARGS = f"--labels {_LABELS}"
if _LABELS != "none":
    CONVERT_LABEL_ARGS += (
        f" --structures {shlex.join(_CONVERT['structures'])}"
        f" --required-structures {shlex.join(_CONVERT['required_structures'])}"
        f" --structure-names {shlex.quote(json.dumps(_CONVERT['structure_names'], sort_keys=True))}"
    )
if CONVERT_READS_MASKS:
    CONVERT_LABEL_ARGS += (
        f" --mask-dir {shlex.quote(_CONVERT['mask_dir'])}"
        f" --mask-pattern {shlex.quote(_CONVERT['mask_pattern'])}"
        f" --annotation-table {shlex.quote(_CONVERT['annotation_table'])}"
    )


rule convert_series:
    input:
        unpack(get_convert_inputs),
    output:
        data=directory("results/volumes/{case}"),
        sidecar="results/volumes/{case}.json",
    log:
        "logs/convert_series/{case}.log",
    conda:
        "../../envs/dicom.yaml"
    threads: 1
    resources:
        mem_mb=config["resources"]["preprocess_mem_mb"],
        runtime=20,
    params:
        dicom_dir=get_case_dicom_dir,
        upstream=get_upstream_fetch,
        ct=get_convert_ct_args,
        # A function: Snakemake would read the braces of a string (JSON, {dicom_dir}) as wildcards.
        labels=lambda wildcards: CONVERT_LABEL_ARGS,
        code=code_version(
            "convert", "nrrdio", "dicomio", "seg", "structures", "volume_ct"
        ),
    shell:
        "python -m hnct.convert --case {wildcards.case:q} --dicom-dir {params.dicom_dir:q}"
        " --upstream {params.upstream:q}"
        " --out-dir {output.data:q} --volume {output.data:q}/volume.nrrd"
        " --label {output.data:q}/label.nrrd --structures-file {output.data:q}/structures.nrrd"
        " --sidecar {output.sidecar:q}"
        " {params.ct} {params.labels}"
        " --log {log:q}"


# The ROI names no case could match to a structure (hnct.roi_table): one names x cases table in the
# report, so that nothing the label objects held is dropped silently.
rule tabulate_unmatched_rois:
    input:
        sidecars=expand("results/volumes/{case}.json", case=CASES),
    output:
        tsv=report(
            "results/report/unmatched_rois.tsv",
            category="Cohort",
            caption="../report/unmatched_rois.rst",
        ),
    log:
        "logs/tabulate_unmatched_rois/all.log",
    localrule: True
    conda:
        "../../envs/train.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        code=code_version("roi_table"),
    shell:
        "python -m hnct.roi_table --sidecars {input.sidecars:q} --out {output.tsv:q} --log {log:q}"
