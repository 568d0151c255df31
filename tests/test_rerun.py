"""A change reruns exactly what it affects, proven on a real demo run.

The module runs the small demo (tests/slurm/demo_small.yaml) once, from a copy of the repository
(the code-change test edits a module of the copy, never the checkout), then reads `snakemake -n`:

- a slice window parameter            → export_slices of every case and everything after it
- a task's training hyperparameter      → every model of that task, and what depends on them
- one model's own hyperparameter       → that model's training and what depends on it only (two
                                          models per task in the fixture, so "only" can fail)
- one stage's module code (hnct.crop)  → that stage (every case) and everything after it
- one demo case's DICOM folder rewritten → that case's chain and the aggregates (the demo's
                                          DICOM are one declared directory() per case, rule
                                          demo_case; Snakemake does not look inside one, so the
                                          folder is the unit of change)

"Everything after" is computed independently of Snakemake's rerun logic: from the job DAG of a
`--forceall` dry run (each job's input and output files), the exact set of jobs downstream of the
jobs the change should rerun. The dry run must list exactly that set.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.workflow, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
SMALL_CONFIG = REPO / "tests" / "slurm" / "demo_small.yaml"
# Two models per task: a change to one model's own key must leave the other's jobs alone.
TWO_MODELS = "models:\n  classify: [cnn3d, resnet18]\n  segment: [unet, snet]\n"
JOB_HEADER = re.compile(r"^\s*(?:local)?(?:rule|checkpoint) (\w+):\s*$")


class Job(tuple):
    """(rule, outputs): one job, identified by its rule and its output files."""

    @property
    def rule(self) -> str:
        return self[0]


def parse_dry_run(text: str) -> dict[Job, dict]:
    """Jobs of a `snakemake -n` listing: Job -> {input: [...], output: [...], wildcards: str}."""
    jobs = {}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        header = JOB_HEADER.match(lines[i])
        i += 1
        if not header:
            continue
        fields = {}
        while i < len(lines) and re.match(r"^\s+\w[\w ]*: ", lines[i]):
            key, _, value = lines[i].strip().partition(": ")
            fields[key] = value
            i += 1
        split = lambda v: [f.strip() for f in v.split(",") if f.strip()] if v else []
        outputs = tuple(split(fields.get("output", "")))
        jobs[Job((header.group(1), outputs))] = {
            "input": split(fields.get("input", "")),
            "output": list(outputs),
            "wildcards": fields.get("wildcards", ""),
        }
    return jobs


def downstream(all_jobs: dict[Job, dict], seeds: set[Job]) -> set[Job]:
    """Seeds and every job that (transitively) reads a file one of them writes."""
    producer = {f: job for job, info in all_jobs.items() for f in info["output"]}
    consumers: dict[Job, set[Job]] = {job: set() for job in all_jobs}
    for job, info in all_jobs.items():
        for f in info["input"]:
            if f in producer:
                consumers[producer[f]].add(job)
    result, todo = set(), list(seeds)
    while todo:
        job = todo.pop()
        if job not in result:
            result.add(job)
            todo.extend(consumers[job])
    return result


class Demo:
    def __init__(self, root: Path):
        self.repo = root / "repo"
        self.workdir = root / "run"
        self.models_config = root / "two_models.yaml"
        self.models_config.write_text(TWO_MODELS)

    def cmd(self, *args: str, extra_config: Path | None = None) -> list[str]:
        configs = [str(self.repo / "config" / "config.yaml"), str(SMALL_CONFIG), str(self.models_config)]
        if extra_config:
            configs.append(str(extra_config))
        return [sys.executable, "-m", "snakemake", "--snakefile", str(self.repo / "Snakefile"),
                "--directory", str(self.workdir), "--configfile", *configs, *args]

    def snakemake(self, *args: str, extra_config: Path | None = None, timeout: int = 300) -> str:
        # Rules call `python -m hnct...`: this venv's python, not whatever `python` PATH finds first.
        env = dict(os.environ, PYTHONPATH=str(self.repo / "workflow"),
                   PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
        proc = subprocess.run(self.cmd(*args, extra_config=extra_config), cwd=self.workdir, env=env,
                              capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, (
            f"snakemake {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
        return proc.stdout + proc.stderr

    def dry_run(self, extra_config: Path | None = None) -> set[Job]:
        jobs = parse_dry_run(self.snakemake("--dry-run", extra_config=extra_config))
        return {job for job in jobs if job.rule != "all"}

    def all_jobs(self) -> dict[Job, dict]:
        jobs = parse_dry_run(self.snakemake("--dry-run", "--forceall"))
        return {job: info for job, info in jobs.items() if job.rule != "all"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    demo = Demo(tmp_path_factory.mktemp("rerun"))
    shutil.copytree(REPO, demo.repo, ignore=shutil.ignore_patterns(
        ".git", ".venv", ".snakemake", "results", "logs", "__pycache__", ".pytest_cache", "*.egg-info"))
    demo.workdir.mkdir()
    demo.snakemake("--cores", "2", timeout=900)
    assert demo.dry_run() == set(), "a finished run still has jobs to do"
    demo.jobs = demo.all_jobs()
    return demo


def jobs_of(demo: Demo, rule: str, **wildcards: str) -> set[Job]:
    found = set()
    for job, info in demo.jobs.items():
        values = dict(re.findall(r"(\w+)=([^,\s]+)", info["wildcards"]))
        if job.rule == rule and all(values.get(k) == v for k, v in wildcards.items()):
            found.add(job)
    return found


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "change.yaml"
    path.write_text(text)
    return path


def describe(jobs: set[Job]) -> list[str]:
    return sorted(f"{job.rule} {job[1][0] if job[1] else ''}" for job in jobs)


def assert_reruns(actual: set[Job], expected: set[Job]):
    assert actual == expected, (
        f"\nunexpected reruns: {describe(actual - expected)}\nmissing reruns: {describe(expected - actual)}")


def test_slice_window_reruns_slices_and_after_not_convert_or_crop(demo, tmp_path):
    seeds = jobs_of(demo, "export_slices")
    assert seeds
    expected = downstream(demo.jobs, seeds)
    actual = demo.dry_run(write_config(tmp_path, "slices:\n  window_level: 50\n"))
    assert_reruns(actual, expected)
    assert not {job.rule for job in actual} & {"demo_case", "convert_series", "crop_larynx"}


def test_task_training_hyperparameter_reruns_that_tasks_models_and_after(demo, tmp_path):
    seeds = jobs_of(demo, "train_fold", task="classify")
    assert {dict(re.findall(r"(\w+)=([^,\s]+)", demo.jobs[job]["wildcards"]))["model"] for job in seeds} == {
        "cnn3d", "resnet18"}
    expected = downstream(demo.jobs, seeds)
    actual = demo.dry_run(write_config(tmp_path, "train:\n  classify:\n    lr: 2.0e-4\n"))
    assert_reruns(actual, expected)
    assert not jobs_of(demo, "train_fold", task="segment") & actual
    assert {job.rule for job in actual} >= {"train_fold", "evaluate_fold"}


@pytest.mark.parametrize("task, model, other, change", [
    ("classify", "cnn3d", "resnet18", "train:\n  classify:\n    cnn3d_channels: [4, 8, 16]\n"),
    ("segment", "snet", "unet", "train:\n  segment:\n    snet_width: 4\n"),
])
def test_one_models_hyperparameter_reruns_only_that_model_and_the_report(demo, tmp_path, task, model, other,
                                                                          change):
    seeds = jobs_of(demo, "train_fold", task=task, model=model)
    assert seeds and jobs_of(demo, "train_fold", task=task, model=other)
    expected = downstream(demo.jobs, seeds)
    actual = demo.dry_run(write_config(tmp_path, change))
    assert_reruns(actual, expected)
    untouched = set().union(*(jobs_of(demo, rule, task=task, model=other)
                              for rule in ("train_fold", "evaluate_fold", "ensemble_test")))
    assert untouched and not untouched & actual
    assert {job.rule for job in actual} >= {"train_fold", "evaluate_fold", "aggregate_metrics", "plot_results"}


def test_figure_style_reruns_only_the_figure_rules(demo, tmp_path):
    """Issue 6: a figure's style (dpi, font size) reruns the figure rules and nothing else."""
    seeds = set().union(*(jobs_of(demo, rule) for rule in ("plot_results", "plot_cohort", "plot_crop_qa")))
    assert seeds
    expected = downstream(demo.jobs, seeds)
    actual = demo.dry_run(write_config(tmp_path, "report:\n  dpi: 90\n  font_size: 9\n"))
    assert_reruns(actual, expected)
    assert {job.rule for job in actual} <= {"plot_results", "plot_cohort", "plot_crop_qa", "all"}


def test_module_code_change_reruns_that_stage_and_after(demo):
    module = demo.repo / "workflow" / "hnct" / "crop.py"
    original = module.read_text()
    try:
        module.write_text(original + "\n# a change to the crop stage's code\n")
        seeds = jobs_of(demo, "crop_larynx")
        assert seeds
        expected = downstream(demo.jobs, seeds)
        actual = demo.dry_run()
    finally:
        module.write_text(original)
    assert_reruns(actual, expected)
    assert not {job.rule for job in actual} & {"demo_case", "convert_series"}
    # Training depends on the fold tables, not on each crop sidecar: a changed crop still reaches it
    # (crop -> slices -> folds -> train), and the test-set ensemble and report after it.
    assert {"export_slices", "split_folds", "train_fold", "evaluate_fold", "ensemble_test",
            "aggregate_metrics"} <= {job.rule for job in actual}
    assert jobs_of(demo, "train_fold") <= actual
    assert demo.dry_run() == set(), "restoring the module's code did not restore the run"


def test_one_demo_case_folder_rewritten_reruns_that_case_and_aggregates(demo):
    # Last of the demo tests: the folder stays newer than its readers.
    case_job = sorted(jobs_of(demo, "demo_case"))[0]
    folder = next(f for f in demo.jobs[case_job]["output"] if f.startswith("results/demo/dicom/"))
    converts = [job for job in jobs_of(demo, "convert_series") if folder in demo.jobs[job]["input"]]
    assert len(converts) == 1, (folder, converts)  # convert reads the case's folder, nothing else of the demo
    case = dict(re.findall(r"(\w+)=([^,\s]+)", demo.jobs[converts[0]]["wildcards"]))["case"]
    # Written again (what a rerun of its demo_case job leaves): Snakemake keeps a directory()
    # output's time in the .snakemake_timestamp file it puts inside.
    os.utime(demo.workdir / folder / ".snakemake_timestamp")
    expected = downstream(demo.jobs, set(converts))
    actual = demo.dry_run()
    assert_reruns(actual, expected)
    per_case = {"convert_series", "crop_larynx", "export_slices"}
    other_cases = {job for job in actual if job.rule in per_case and
                   dict(re.findall(r"(\w+)=([^,\s]+)", demo.jobs[job]["wildcards"]))["case"] != case}
    assert not other_cases, describe(other_cases)
    assert per_case <= {job.rule for job in actual} and "demo_case" not in {job.rule for job in actual}
    # one case's new crop reaches every training job through the fold tables
    assert jobs_of(demo, "train_fold") <= actual and "split_folds" in {job.rule for job in actual}


def test_dry_run_parser_and_downstream_on_the_toy_workflow(tmp_path):
    """The machinery above on a 3-job workflow (no hnct pipeline needed): a touched input reruns
    exactly its consumers."""
    toy = REPO / "tests" / "slurm" / "toy" / "Snakefile"

    def snakemake(*args: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(toy),
                               "--directory", str(tmp_path), *args],
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        return proc.stdout + proc.stderr

    snakemake("--cores", "1")
    all_jobs = {job: info for job, info in parse_dry_run(snakemake("-n", "--forceall")).items()
                if job.rule != "all"}
    assert sorted(all_jobs) == [("convert_series", ("cases/a.txt",)), ("convert_series", ("cases/b.txt",)),
                                ("train_fold", ("train.txt",))]
    assert all_jobs[("train_fold", ("train.txt",))]["input"] == ["cases/a.txt", "cases/b.txt"]
    assert all_jobs[("convert_series", ("cases/a.txt",))]["wildcards"] == "case=a"
    assert {job for job in parse_dry_run(snakemake("-n")) if job.rule != "all"} == set()
    # Snakemake 9 compares checksums of small inputs: a bare touch reruns nothing...
    os.utime(tmp_path / "cases" / "a.txt")
    assert {job for job in parse_dry_run(snakemake("-n")) if job.rule != "all"} == set()
    # ...changed content reruns the consumers.
    (tmp_path / "cases" / "a.txt").write_text("a changed\n")
    train = {("train_fold", ("train.txt",))}
    assert downstream(all_jobs, train) == train
    assert {job for job in parse_dry_run(snakemake("-n")) if job.rule != "all"} == train
    assert downstream(all_jobs, {("convert_series", ("cases/a.txt",))}) == {
        ("convert_series", ("cases/a.txt",)), ("train_fold", ("train.txt",))}
