# convert{case}: the chosen CT series as int16 HU NRRD + its label map as uint8 NRRD (hnct.convert),
# both in the case's folder results/volumes/{case}/ (empty for an excluded case); the sidecar names them.


import shlex

import hnct.convert  # noqa: E402  (params helper: the cohort's series_uid per case)

# Only the label options of the configured label source reach the job (an unused param would
# rerun every conversion when it changes): the structures for RTSTRUCT or mask labels, the mask
# folder for mask labels, nothing without labels.
_LABELS = config["convert"]["labels"]
CONVERT_LABEL_ARGS = f"--labels {_LABELS}"
if _LABELS != "none":
    CONVERT_LABEL_ARGS += (
        f" --structures {shlex.join(config['convert']['structures'])}"
        f" --required-structures {shlex.join(config['convert']['required_structures'])}"
    )
if _LABELS == "nrrd":
    CONVERT_LABEL_ARGS += f" --mask-dir {shlex.quote(config['convert']['mask_dir'])}"


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
        " --label {output.data:q}/label.nrrd --sidecar {output.sidecar:q}"
        " {params.labels}"
        " --gantry-tilt {params.gantry_tilt} --max-tilt-deg {params.max_tilt_deg}"
        " --max-spacing-spread {params.max_spacing_spread} --max-slice-gap-mm {params.max_slice_gap_mm}"
        " --slice-step-mm {params.slice_step_mm}"
        " --log {log:q}"
