"""The cluster path on a real single-node SLURM (Debian's slurm-wlm), through `--profile profiles/slurm`.

tests/slurm/install.sh installs SLURM (CI runs it first; the fixture runs it again, a no-op then),
tests/slurm/start.sh starts munged/slurmctld/slurmd recording their PIDs, tests/slurm/stop.sh stops
exactly those. Runs are wrapped in `timeout`: the executor plugin waits forever if it cannot read
job states. Job states come from squeue (no slurmdbd; see docs/cluster.md).
"""

from __future__ import annotations

import datetime
import filecmp
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
SLURM_DIR = REPO / "tests" / "slurm"
STATE_DIR = Path(os.environ.get("HNCT_SLURM_DIR", "/tmp/hnct-slurm"))
SMALL_CONFIG = SLURM_DIR / "demo_small.yaml"
PREPROCESS_RULES = {"demo_case", "convert_series", "crop_larynx", "export_slices"}
# What CI cannot do: reach conda channels (no `none` for --sdm: env-modules is a no-op here, no rule
# has envmodules:), and wait 40 s before the first status check.
SLURM_TEST_ARGS = [
    "--profile", str(REPO / "profiles" / "slurm"),
    "--sdm", "env-modules",
    "--slurm-status-command", "squeue",
    "--slurm-init-seconds-before-status-checks", "3",
    # squeue on a one-node test cluster is cheap: look every 2 s, not every 10 s (the default), so a
    # chain of small jobs does not wait 10 s between each finishing and the next being submitted.
    "--seconds-between-status-checks", "2",
    "--retries", "0",
]


@pytest.fixture(scope="module")
def slurm():
    """A running single-node SLURM; stopped afterwards if this fixture started it."""
    if os.geteuid() != 0:
        # A laptop may skip; CI runs as root, so there a skip would hide a broken set-up.
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but not root: the single-node SLURM needs root")
        pytest.skip("the single-node SLURM needs root (CI runs as root)")
    subprocess.run(["bash", str(SLURM_DIR / "install.sh")], check=True, timeout=600)
    already_running = (STATE_DIR / "pids").exists()
    started = subprocess.run(["bash", str(SLURM_DIR / "start.sh")], capture_output=True, text=True,
                             timeout=120)
    if started.returncode != 0:
        subprocess.run(["bash", str(SLURM_DIR / "stop.sh")], timeout=60)
        pytest.fail(f"tests/slurm/start.sh failed:\n{started.stdout}\n{started.stderr}")
    yield
    if not already_running:
        subprocess.run(["bash", str(SLURM_DIR / "stop.sh")], check=True, timeout=60)


def run(cmd: list[str], cwd: Path, timeout_s: int) -> subprocess.CompletedProcess:
    # Rules call `python -m hnct...`: with --sdm conda that is the env's python; here it must be
    # this venv's, in the SLURM jobs too (sbatch --export=ALL passes PATH on).
    env = dict(os.environ, PYTHONPATH=str(REPO / "workflow"),
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    env.pop("HNCT_SLURM_ACCOUNT", None)
    env.pop("HNCT_SLURM_PARTITION", None)
    proc = subprocess.run(["timeout", "--kill-after=10", str(timeout_s), *cmd], cwd=cwd, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        logs = "".join(f"\n--- {p}\n{p.read_text()[-2000:]}" for p in sorted(
            cwd.glob(".snakemake/slurm_logs/**/*.log"))[-3:])
        raise AssertionError(f"{' '.join(cmd[:6])} ... failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}{logs}")
    return proc


def slurm_jobs(workdir: Path, since: datetime.datetime) -> list[dict]:
    """SLURM's records (`scontrol show job -d`) of the jobs submitted in ``workdir`` from ``since`` on.

    slurmctld keeps finished jobs for MinJobAge (an hour) across restarts: an earlier test session
    on the same machine may have left records with the same pytest directory.
    """
    out = subprocess.run(["scontrol", "-o", "-d", "show", "job"], capture_output=True, text=True,
                         check=True).stdout
    jobs = []
    for line in out.splitlines():
        record = dict(re.findall(r"(\S+?)=(\S*)", line))
        if record.get("WorkDir") != str(workdir):
            continue
        try:
            submitted = datetime.datetime.fromisoformat(record.get("SubmitTime", ""))
        except ValueError:  # no usable time: keep the record rather than hide a job
            submitted = since
        if submitted >= since:
            jobs.append(record)
    return jobs


def check_job_records(workdir: Path, since: datetime.datetime) -> tuple[list[dict], list[dict]]:
    """All jobs completed; training jobs asked for a GPU; returns (training, preprocessing group) jobs."""
    jobs = slurm_jobs(workdir, since)
    assert jobs, f"no SLURM job records for {workdir}"
    failed = [(j["JobId"], j["Comment"], j["JobState"]) for j in jobs if j["JobState"] != "COMPLETED"]
    assert not failed, failed
    train = [j for j in jobs if j["Comment"].startswith("rule_train_fold")]
    groups = [j for j in jobs if j["Comment"].startswith("rule_preprocess")]
    assert train and groups, [j["Comment"] for j in jobs]
    for job in train:
        # sbatch --gpus=1 is recorded as a per-job GPU TRES and as the job's GRES.
        assert job.get("TresPerJob") == "gres:gpu:1", job
        assert job.get("JOB_GRES") == "gpu:1", job
        assert job.get("CpusPerTres", "").startswith("gres:gpu:"), job
    return train, groups


def test_toy_workflow_runs_on_slurm_with_groups_and_gpu(slurm, tmp_path):
    """The SLURM machinery alone: 2 grouped per-case jobs in one SLURM job, 1 GPU job."""
    workdir = tmp_path / "toy"
    workdir.mkdir()
    submitted_from = datetime.datetime.now().replace(microsecond=0)
    started = time.monotonic()
    run([sys.executable, "-m", "snakemake", "--snakefile", str(SLURM_DIR / "toy" / "Snakefile"),
         "--directory", str(workdir), *SLURM_TEST_ARGS], cwd=workdir, timeout_s=180)
    print(f"toy workflow on SLURM: {time.monotonic() - started:.1f} s")
    train, groups = check_job_records(workdir, submitted_from)
    assert len(train) == 1 and len(groups) == 1
    # Both cases ran inside the one group job, and training saw the GPU SLURM gave it.
    group_id = groups[0]["JobId"]
    cases = [p.read_text().split() for p in sorted((workdir / "cases").glob("*.txt"))]
    assert cases == [["a", group_id], ["b", group_id]]
    assert "gpu=0" in (workdir / "train.txt").read_text()


def demo_cmd(workdir: Path, *args: str) -> list[str]:
    # Classification only: the SLURM path (groups, GPU jobs, identical results) is the same for both
    # tasks, segmentation runs end to end in test_workflow and test_rerun, and a SLURM job of the
    # one-GPU test node runs one training at a time (the CI time limit).
    return [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
            "--directory", str(workdir),
            "--configfile", str(REPO / "config" / "config.yaml"), str(SMALL_CONFIG),
            "--config", "tasks=[classify]", *args]


def test_demo_workflow_on_slurm_equals_local_run(slurm, tmp_path):
    local, cluster = tmp_path / "local", tmp_path / "slurm"
    local.mkdir()
    cluster.mkdir()
    started = time.monotonic()
    run(demo_cmd(local, "--cores", "2"), cwd=local, timeout_s=300)
    local_s = time.monotonic() - started
    submitted_from = datetime.datetime.now().replace(microsecond=0)
    started = time.monotonic()
    proc = run(demo_cmd(cluster, *SLURM_TEST_ARGS), cwd=cluster, timeout_s=600)
    print(f"demo (small): local {local_s:.0f} s, SLURM {time.monotonic() - started:.0f} s")

    train, groups = check_job_records(cluster, submitted_from)
    out = proc.stdout + proc.stderr
    stats = dict(re.findall(r"^(\w+)\s+(\d+)$", out.split("Job stats:")[1].split("\n\n")[0], re.M))
    per_case_jobs = sum(int(stats.get(rule, 0)) for rule in PREPROCESS_RULES)
    assert int(stats["train_fold"]) == len(train)
    # Preprocessing ran as group jobs: far fewer SLURM jobs than per-case jobs.
    assert per_case_jobs >= 4 * len(groups), (per_case_jobs, len(groups))

    # The same results as the local run.
    for name in ["results/exclusions.tsv", *sorted(
            str(p.relative_to(local)) for p in local.glob("results/folds/*/folds.tsv"))]:
        assert filecmp.cmp(local / name, cluster / name, shallow=False), name
    # Each case's crop lies in its declared folder results/crops/{case}/ (volume.nrrd, label.nrrd).
    crops = sorted(p.relative_to(local) for p in local.glob("results/crops/*/*.nrrd"))
    assert crops
    for name in crops:
        assert filecmp.cmp(local / name, cluster / name, shallow=False), name
    predictions = sorted(p.relative_to(local) for p in local.glob("results/train/*/*/fold*/val_predictions.csv"))
    assert len(predictions) == len(train)
    for name in predictions:
        pd.testing.assert_frame_equal(pd.read_csv(local / name), pd.read_csv(cluster / name))
    shutil.rmtree(tmp_path, ignore_errors=True)
