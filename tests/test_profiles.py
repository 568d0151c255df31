"""The Snakemake profiles: what they set, that `--profile slurm` finds the installed profile, and
that a dry run through the SLURM profile shows GPU training jobs and preprocessing groups.

No SLURM needed: dry runs never submit.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yte

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "tests" / "slurm" / "toy" / "Snakefile"
# A dry run with the profile's conda asks `conda info`; CI has no conda. env-modules is a no-op
# here (no rule has envmodules:) and --sdm has no "none".
NO_CONDA = ["--sdm", "env-modules"]
# The per-case chain (the demo's case folder, then convert, crop, slices); fetch_series has its own group.
PREPROCESS_RULES = {"demo_case", "convert_series", "crop_larynx", "export_slices"}


def load_profile(name: str) -> dict:
    # Snakemake reads profiles through yte (only when the file says __use_yte__: true).
    with open(REPO / "profiles" / name / "config.yaml") as stream:
        return yte.process_yaml(stream, require_use_yte=True)


def snakemake(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"snakemake {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def test_slurm_profile_settings(monkeypatch):
    monkeypatch.delenv("HNCT_SLURM_ACCOUNT", raising=False)
    monkeypatch.delenv("HNCT_SLURM_PARTITION", raising=False)
    profile = load_profile("slurm")
    assert profile["executor"] == "slurm"
    assert profile["software-deployment-method"] == "conda"
    for key in ("jobs", "latency-wait", "retries"):
        assert isinstance(profile[key], int) and profile[key] > 0, key
    for key in ("keep-going", "rerun-incomplete", "printshellcmds"):
        assert profile[key] is True, key
    defaults = profile["default-resources"]
    # cpus_per_task overrides every rule's threads: never a default.
    assert "cpus_per_task" not in defaults and "tasks" not in defaults
    assert defaults["mem_mb"] > 0 and defaults["runtime"] > 0
    # Unset account/partition: empty, i.e. SLURM's defaults (the plugin submits without -A/-p).
    assert defaults["slurm_account"] == "" and defaults["slurm_partition"] == ""
    train = profile["set-resources"]["train_fold"]
    # GPU count, memory and the attempt-scaled runtime come from the rule (config resources.train_*);
    # the profile adds CPUs per GPU and never both gres and gpu, nor tasks.
    assert train["cpus_per_gpu"] >= 1
    assert not {"gres", "tasks", "cpus_per_task"} & set(train)
    groups = profile["groups"]
    assert set(groups) == PREPROCESS_RULES | {"fetch_series"}
    assert {groups[rule] for rule in PREPROCESS_RULES} == {"preprocess"}
    assert profile["group-components"]["preprocess"] >= 10
    assert profile["group-components"][groups["fetch_series"]] >= 2
    # Downloads are capped cluster-wide; group jobs are sized by per-job cores and memory.
    assert profile["resources"]["tcia_downloads"] >= 1 and profile["resources"]["mem_mb"] > 0


def test_slurm_profile_reads_account_and_partition_from_environment(monkeypatch):
    monkeypatch.setenv("HNCT_SLURM_ACCOUNT", "lab42")
    monkeypatch.setenv("HNCT_SLURM_PARTITION", "gpu")
    defaults = load_profile("slurm")["default-resources"]
    assert defaults["slurm_account"] == "lab42" and defaults["slurm_partition"] == "gpu"


def test_local_profile_settings():
    with open(REPO / "profiles" / "local" / "config.yaml") as stream:
        profile = yte.process_yaml(stream, require_use_yte=False)
    assert "executor" not in profile and profile["cores"] >= 1
    assert profile["software-deployment-method"] == "conda"
    assert "groups" not in profile


def test_no_workflow_profile_that_would_apply_to_every_run():
    # Snakemake applies profiles/default beside the Snakefile to EVERY run (laptop demo included)
    # and its keys replace the user's profile keys whole: cluster settings stay in profiles/slurm.
    assert not (REPO / "profiles" / "default").exists()


def test_profile_slurm_by_name_after_the_documented_install(tmp_path):
    """docs/cluster.md: one command links the profile to ~/.config/snakemake/slurm."""
    config_home = tmp_path / "config"
    env = dict(os.environ, XDG_CONFIG_HOME=str(config_home), HOME=str(tmp_path))
    install = (REPO / "docs" / "cluster.md").read_text()
    command = re.search(r"^(mkdir -p ~/.config/snakemake && ln -sfn .*)$", install, re.M)
    assert command, "docs/cluster.md lost its one-line install command"
    subprocess.run(["bash", "-c", command.group(1).replace("~/.config", str(config_home))],
                   cwd=REPO, check=True)
    workdir = tmp_path / "run"
    workdir.mkdir()
    proc = snakemake("--snakefile", str(TOY), "--directory", str(workdir), "--profile", "slurm",
                     *NO_CONDA, "--dry-run", cwd=workdir, env=env)
    assert "Using profile slurm" in proc.stderr + proc.stdout
    out = proc.stdout + proc.stderr
    assert "Group job preprocess" in out
    assert re.search(r"rule train_fold:.*?resources: [^\n]*gpu=1", out, re.S)


# The demo config only: the LaryngealCT dry run (4175 jobs) takes minutes. Checked by hand
# (docs/cluster.md): 1029 cases → 103 fetch groups, 21 preprocess groups, 25 GPU training jobs.
@pytest.mark.parametrize("configfile", ["config/config.yaml"])
def test_dry_run_through_slurm_profile_shows_gpus_and_groups(tmp_path, configfile):
    proc = snakemake("--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path),
                     "--configfile", str(REPO / configfile), "--profile", str(REPO / "profiles" / "slurm"),
                     *NO_CONDA, "--dry-run", cwd=tmp_path)
    out = proc.stdout + proc.stderr
    train_blocks = re.findall(r"rule train_fold:\n(.*?)(?:\n\n|\Z)", out, re.S)
    assert train_blocks, "no train_fold jobs in the dry run"
    for block in train_blocks:
        assert re.search(r"resources: [^\n]*\bgpu=1\b", block), block
        assert re.search(r"resources: [^\n]*\bcpus_per_gpu=\d+", block), block
        assert re.search(r"resources: [^\n]*\bruntime=\d+", block), block
    stats = dict(re.findall(r"^(\w+)\s+(\d+)$", out.split("Job stats:")[1].split("\n\n")[0], re.M))
    per_case = sum(int(n) for rule, n in stats.items() if rule in PREPROCESS_RULES)
    groups = out.count("Group job preprocess")
    assert per_case > 0 and 0 < groups < per_case, (per_case, groups)
