# fetch{case}: download the case's series from TCIA's NBIA API (hnct.fetch), verified and resumable,
# into the NBIA Data Retriever layout under cohort.dicom_root (source tcia or manifest only).
#
# Every fetch job holds one unit of the resource tcia_downloads. Snakemake does not limit a
# resource nobody declares, so cap parallel downloads for the whole run (all SLURM jobs too; custom
# resources are global) with `--resources tcia_downloads=4` (or `resources: {tcia_downloads: 4}`
# in a profile); see config/README.md, tcia.

import re

# The cohort table for lookup() in params; a column the table lacks reads "".
FETCH_TABLE = COHORT.reset_index(drop=True)
if "series_uid_suffix" not in FETCH_TABLE.columns:
    FETCH_TABLE = FETCH_TABLE.assign(series_uid_suffix="")

# Label series (RTSTRUCT/SEG) are fetched unless convert takes labels from elsewhere or none.
FETCH_LABELS = (
    "--no-labels" if config["convert"]["labels"] in ("nrrd", "none") else "--labels"
)


if SOURCE in ("tcia", "manifest"):

    rule fetch_series:
        input:
            # The .tcia file the job reads (source manifest): an input, not a path in params,
            # so an edited manifest reruns fetch.
            manifest=config["tcia"]["manifest"] if SOURCE == "manifest" else [],
        output:
            sidecar="results/fetch/{case}.json",
        log:
            "logs/fetch_series/{case}.log",
        retries: 1
        conda:
            "../../envs/fetch.yaml"
        threads: 1
        resources:
            tcia_downloads=1,
            mem_mb=1000,
            runtime=120,
        params:
            collection=lookup(
                query="case == '{case}'", cols="collection", within=FETCH_TABLE
            ),
            patient=lookup(query="case == '{case}'", cols="patient", within=FETCH_TABLE),
            series_uid=lookup(
                query="case == '{case}'", cols="series_uid", within=FETCH_TABLE
            ),
            series_uid_suffix=lookup(
                query="case == '{case}'", cols="series_uid_suffix", within=FETCH_TABLE
            ),
            dicom_root=DICOM_ROOT,
            api_url=config["tcia"]["api_url"],
            timeout_s=config["tcia"]["timeout_s"],
            retries=config["tcia"]["retries"],
            backoff_s=config["tcia"]["backoff_s"],
            attempts=config["tcia"]["attempts"],
            token_file=config["tcia"]["token_file"],
            token_env=config["tcia"]["token_env"],
            modalities=" ".join(config["tcia"]["modalities"]),
            labels=FETCH_LABELS,
            code=code_version("fetch", "tcia", "manifest", "cohort"),
        shell:
            "python -m hnct.fetch case --case {wildcards.case:q} --collection {params.collection:q}"
            " --patient {params.patient:q} --series-uid={params.series_uid:q}"
            " --series-uid-suffix={params.series_uid_suffix:q} --dicom-root {params.dicom_root:q}"
            " --sidecar {output.sidecar:q} --api-url {params.api_url:q} --timeout-s {params.timeout_s}"
            " --retries {params.retries} --backoff-s {params.backoff_s} --attempts {params.attempts}"
            " --token-file={params.token_file:q} --token-env={params.token_env:q}"
            " --modalities {params.modalities} --manifest={input.manifest:q} {params.labels}"
            " --log {log:q}"


# LaryngealCT's annotation files (crop table bbox3d.txt ...) at the pinned commit, SHA-256 checked
# (hnct.laryngealct); only files named in config laryngealct.annotations, under annotations_dir.
# A file's own commit (laryngealct.annotations.<name>.commit) overrides laryngealct.commit.
ANNOTATIONS = {
    Path(spec["path"]).name: {
        **spec,
        "commit": spec.get("commit") or config["laryngealct"]["commit"],
    }
    for spec in config["laryngealct"]["annotations"].values()
}
ANNOTATION_FILE = str(Path(config["laryngealct"]["annotations_dir"], "{filename}"))


if ANNOTATIONS:

    rule download_annotation:
        output:
            ANNOTATION_FILE,
        log:
            "logs/download_annotation/{filename}.log",
        wildcard_constraints:
            filename="|".join(re.escape(name) for name in ANNOTATIONS),
        retries: 2
        conda:
            "../../envs/fetch.yaml"
        threads: 1
        resources:
            mem_mb=500,
            runtime=10,
        params:
            base_url=config["laryngealct"]["base_url"],
            commit=lookup(dpath="{filename}/commit", within=ANNOTATIONS),
            path=lookup(dpath="{filename}/path", within=ANNOTATIONS),
            sha256=lookup(dpath="{filename}/sha256", within=ANNOTATIONS),
            code=code_version("laryngealct"),
        shell:
            "python -m hnct.laryngealct download-file --base-url {params.base_url:q}"
            " --commit {params.commit:q} --path {params.path:q} --sha256 {params.sha256:q}"
            " --out {output:q} --log {log:q}"
