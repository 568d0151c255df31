# demo: the synthetic DICOM cohort (hnct.demo), the workflow's default source (cohort.source: demo).
#
# Each case's DICOM file names carry parts of its UIDs (NBIA Data Retriever layout), so the
# declared outputs differ per case and cannot be one wildcard pattern: one rule per case,
# demo_case_<case>, each with the explicit file list of hnct.demo.case_files (what convert reads).
# The case's plan row is a param (as JSON), so a changed plan rewrites that case.

import json

if SOURCE == "demo":

    for _case in CASES:

        rule:
            name:
                f"demo_case_{_case.replace('-', '_').replace('.', '_')}"
            output:
                files=[
                    f"{DICOM_ROOT}/{name}"
                    for name in hnct.demo.case_files(COHORT.loc[_case])
                ],
                manifest=f"results/demo/cases/{_case}.json",
            log:
                f"logs/demo_case/{_case}.log",
            # On a cluster each case's demo → convert → crop → slices chain is one component
            # of the profile's preprocess group (the per-case rule names can't be listed there).
            group:
                "preprocess"
            conda:
                "../../envs/dicom.yaml"
            threads: 1
            resources:
                mem_mb=1000,
                runtime=5,
            params:
                case=_case,
                out_root=hnct.demo.dicom_root_param,
                plan=json.dumps(COHORT.loc[_case].to_dict(), sort_keys=True),
                code=code_version("demo", "cohort"),
            shell:
                "python -m hnct.demo case --case {params.case:q} --out-root {params.out_root:q}"
                " --manifest {output.manifest:q} --plan-json {params.plan:q} --log {log:q}"

    rule demo_cohort:
        input:
            manifests=expand("results/demo/cases/{case}.json", case=CASES),
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
