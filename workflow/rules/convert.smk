# convert{case}: the chosen CT series as int16 HU NRRD + its structures (one channel each) and label
# map as uint8 NRRDs (hnct.convert), in the case's folder results/volumes/{case}/ (empty for an
# excluded case); the sidecar names them.


import json
import shlex

import hnct.convert  # noqa: E402  (params helper: the cohort's series_uid per case)

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
if _LABELS == "nrrd" or (_LABELS != "none" and _CONVERT["mask_dir"]):
    CONVERT_LABEL_ARGS += (
        f" --mask-dir {shlex.quote(_CONVERT['mask_dir'])}"
        f" --mask-pattern {shlex.quote(_CONVERT['mask_pattern'])}"
        f" --annotation-table {shlex.quote(_CONVERT['annotation_table'])}"
    )


rule convert_series:
    input:
        dicom=get_case_dicom,
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
        series_uid=hnct.convert.series_uid_param(COHORT),
        upstream=get_upstream_fetch,
        labels=CONVERT_LABEL_ARGS,
        gantry_tilt=config["convert"]["gantry_tilt"],
        max_tilt_deg=config["convert"]["max_tilt_deg"],
        max_spacing_spread=config["convert"]["max_spacing_spread"],
        max_slice_gap_mm=config["convert"]["max_slice_gap_mm"],
        slice_step_mm=config["convert"]["slice_step_mm"],
        code=code_version("convert", "dicomio", "seg"),
    shell:
        "python -m hnct.convert --case {wildcards.case:q} --dicom-dir {params.dicom_dir:q}"
        " --series-uid {params.series_uid:q} --upstream {params.upstream:q}"
        " --out-dir {output.data:q} --volume {output.data:q}/volume.nrrd"
        " --label {output.data:q}/label.nrrd --structures-file {output.data:q}/structures.nrrd"
        " --sidecar {output.sidecar:q}"
        " {params.labels}"
        " --gantry-tilt {params.gantry_tilt} --max-tilt-deg {params.max_tilt_deg}"
        " --max-spacing-spread {params.max_spacing_spread} --max-slice-gap-mm {params.max_slice_gap_mm}"
        " --slice-step-mm {params.slice_step_mm}"
        " --log {log:q}"
