# demo: the synthetic DICOM cohort (hnct.demo), the workflow's default source (cohort.source: demo).
#
# One job per case writes the case's folder of the DICOM root in the NBIA Data Retriever layout
# (cohort column dicom_dir: <Collection>/<PatientID>, or the study folder of a patient with two
# scans), a declared directory() that convert reads; its file names carry parts of the case's UIDs,
# so the folder, not a file list, is the output. The case's plan row is a param (as JSON), so a
# changed plan rewrites that case.

import json
import re

if SOURCE == "demo":
    # The plan with each row as JSON, for lookup() in params; a case is found by its dicom_dir.
    DEMO_PLAN = COHORT.reset_index(drop=True).assign(
        plan_json=[
            json.dumps(row.to_dict(), sort_keys=True) for _, row in COHORT.iterrows()
        ]
    )

    rule demo_case:
        output:
            dicom=directory(f"{DICOM_ROOT}/{{case_dir}}"),
            manifest="results/demo/cases/{case_dir}.json",
        log:
            "logs/demo_case/{case_dir}.log",
        wildcard_constraints:
            case_dir="|".join(re.escape(folder) for folder in DEMO_PLAN["dicom_dir"]),
        conda:
            "../../envs/dicom.yaml"
        threads: 1
        resources:
            mem_mb=1000,
            runtime=5,
        params:
            case=lookup(
                query="dicom_dir == '{case_dir}'", cols="case", within=DEMO_PLAN
            ),
            out_root=hnct.demo.dicom_root_param,
            plan=lookup(
                query="dicom_dir == '{case_dir}'", cols="plan_json", within=DEMO_PLAN
            ),
            code=code_version("demo", "demo_oar", "cohort"),
        shell:
            "python -m hnct.demo case --case {params.case:q} --out-root {params.out_root:q}"
            " --manifest {output.manifest:q} --plan-json {params.plan:q} --log {log:q}"

    rule demo_cohort:
        input:
            dicom=expand(f"{DICOM_ROOT}/{{case_dir}}", case_dir=DEMO_PLAN["dicom_dir"]),
        output:
            metadata=f"{DICOM_ROOT}/metadata.csv",
            clinical="results/demo/clinical.tsv",
        log:
            "logs/demo_cohort/demo_cohort.log",
        localrule: True
        conda:
            "../../envs/dicom.yaml"
        threads: 1
        resources:
            mem_mb=1000,
            runtime=5,
        params:
            out_root=hnct.demo.dicom_root_param,
            n_patients=config["demo"]["n_patients"],
            seed=config["demo"]["seed"],
            t4_fraction=config["demo"]["t4_fraction"],
            broken_cases=config["demo"]["broken_cases"],
            two_scan_patients=config["demo"]["two_scan_patients"],
            code=code_version("demo", "cohort"),
        shell:
            "python -m hnct.demo cohort --out-root {params.out_root:q}"
            " --metadata-csv {output.metadata:q} --clinical-tsv {output.clinical:q}"
            " --n-patients {params.n_patients} --seed {params.seed}"
            " --t4-fraction {params.t4_fraction} --broken-cases {params.broken_cases}"
            " --two-scan-patients {params.two_scan_patients} --log {log:q}"
