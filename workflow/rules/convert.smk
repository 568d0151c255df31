# convert{case}: the chosen CT series as int16 HU NRRD + its label map as uint8 NRRD (hnct.convert).


import hnct.convert  # noqa: E402  (params helper: the cohort's series_uid per case)


rule convert_series:
    input:
        dicom=get_case_dicom,
    output:
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
        volume="results/volumes/{case}.nrrd",
        label="results/labels/{case}.nrrd",
        labels=config["convert"]["labels"],
        mask_dir=config["convert"]["mask_dir"],
        structures=config["convert"]["structures"],
        required_structures=config["convert"]["required_structures"],
        gantry_tilt=config["convert"]["gantry_tilt"],
        max_tilt_deg=config["convert"]["max_tilt_deg"],
        max_spacing_spread=config["convert"]["max_spacing_spread"],
        max_slice_gap_mm=config["convert"]["max_slice_gap_mm"],
        slice_step_mm=config["convert"]["slice_step_mm"],
        code=code_version("convert", "dicomio", "seg"),
    shell:
        "python -m hnct.convert --case {wildcards.case:q} --dicom-dir {params.dicom_dir:q}"
        " --series-uid {params.series_uid:q} --upstream {params.upstream:q}"
        " --volume {params.volume:q} --label {params.label:q} --sidecar {output.sidecar:q}"
        " --labels {params.labels} --mask-dir {params.mask_dir:q}"
        " --structures {params.structures:q} --required-structures {params.required_structures:q}"
        " --gantry-tilt {params.gantry_tilt} --max-tilt-deg {params.max_tilt_deg}"
        " --max-spacing-spread {params.max_spacing_spread} --max-slice-gap-mm {params.max_slice_gap_mm}"
        " --slice-step-mm {params.slice_step_mm}"
        " --log {log:q}"
