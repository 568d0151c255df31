"""The task and model registries: names checked against the schema and configs, a plugin task and
model planned by the workflow with no other file changed, each model's own config keys."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hnct import models as hmodels
from hnct import tasks as htasks

REPO = Path(__file__).resolve().parents[1]
JOB_HEADER = re.compile(r"^\s*(?:local)?rule (\w+):\s*$")


def test_schema_and_configs_name_registered_tasks_and_models():
    schema = yaml.safe_load((REPO / "config" / "schema.yaml").read_text())["properties"]
    default_tasks = schema["tasks"]["default"]
    default_models = {task: spec["default"] for task, spec in schema["models"]["properties"].items()}
    assert sorted(default_tasks) == htasks.task_names() == sorted(default_models)
    for task, names in default_models.items():
        # every built-in model of a task is in the schema's default list, and nothing else
        assert sorted(names) == hmodels.model_names(task), task
        for name in names:  # each owned key has the schema's one default in train.<task>
            for key in hmodels.get_model(name, task).config_keys:
                assert "default" in schema["train"]["properties"][task]["properties"][key], (name, key)
    for config in ("config.yaml", "laryngealct.yaml"):
        values = yaml.safe_load((REPO / "config" / config).read_text())
        for task in values.get("tasks", []):
            htasks.get_task(task)
            for name in values["models"][task]:
                hmodels.get_model(name, task)


def test_unknown_names_are_refused_naming_the_registered_ones():
    with pytest.raises(ValueError, match="unknown task 'detect'; registered: classify, oar, segment"):
        htasks.get_task("detect")
    with pytest.raises(ValueError, match=r"unknown segment model 'cnn3d'; registered: snet, unet"):
        hmodels.build_model("segment", "cnn3d", {})
    with pytest.raises(ValueError, match="needs train.classify.cnn3d_channels"):
        hmodels.build_model("classify", "cnn3d", {})


def test_a_model_gets_its_own_keys_and_not_the_other_models():
    assert hmodels.other_models_keys("classify", "resnet18") == {"cnn3d_channels"}
    assert hmodels.other_models_keys("classify", "cnn3d") == set()
    assert hmodels.other_models_keys("segment", "snet") == {"unet_features"}
    assert hmodels.other_models_keys("segment", "unet") == {"snet_width"}


def test_a_new_model_module_changes_the_training_code_hash(tmp_path, monkeypatch):
    """The train rule's code_version and the checkpoint fingerprint are one hash over the trainer,
    the registries, the task's and the model's modules: an edit of the model file changes it, an
    edit of another model's file does not."""
    import hnct.models.cnn3d as cnn3d

    before = htasks.code_hash(htasks.training_modules("classify", "cnn3d"))
    other = htasks.code_hash(htasks.training_modules("classify", "resnet18"))
    source = Path(cnn3d.__file__)
    original = source.read_bytes()
    try:
        source.write_bytes(original + b"\n# edited\n")
        assert htasks.code_hash(htasks.training_modules("classify", "cnn3d")) != before
        assert htasks.code_hash(htasks.training_modules("classify", "resnet18")) == other
    finally:
        source.write_bytes(original)
    assert htasks.code_hash(htasks.training_modules("classify", "cnn3d")) == before
    import hnct.train

    assert hnct.train.trainer_code_hash("classify", "cnn3d") == before


def dry_run(tmp_path: Path, overlay: str) -> subprocess.CompletedProcess:
    config = tmp_path / "overlay.yaml"
    config.write_text(overlay)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "workflow"), str(REPO / "tests")]))
    return subprocess.run(
        [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory",
         str(tmp_path), "--configfile", str(REPO / "config" / "config.yaml"), str(config), "-n", "-p"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


TOY = """plugins: [toy_registry.toy]
tasks: [toy]
models:
  toy: [toy_mlp]
train:
  toy:
    epochs: 2
folds:
  n_folds: 2
"""


def test_a_plugin_task_and_model_are_planned_with_no_other_file_changed(tmp_path):
    proc = dry_run(tmp_path, TOY)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    jobs = [m.group(1) for m in map(JOB_HEADER.match, out.splitlines()) if m]
    for rule in ("split_folds", "train_fold", "evaluate_fold", "ensemble_test", "aggregate_metrics",
                 "plot_results"):
        assert rule in jobs, rule
    assert jobs.count("train_fold") == 2 and jobs.count("evaluate_fold") == 2
    assert "results/train/toy/toy_mlp/fold1/best.pt" in out
    assert "results/evaluate/toy/toy_mlp/test_ensemble/metrics.json" in out
    # the toy task reads crops only: no slice export, no slice lists
    assert "export_slices" not in jobs and "list_fold_slices" not in jobs
    # the plugin's config reached the job with its schema's defaults, and the plugin list too
    train_command = next(line for line in out.splitlines() if "python -m hnct.train" in line)
    assert '"toy_hidden": 4' in train_command and '"epochs": 2' in train_command
    assert "--plugins toy_registry.toy" in train_command and "--crops-dir results/crops" in train_command


def test_an_unregistered_model_stops_the_workflow_naming_the_registered_ones(tmp_path):
    proc = dry_run(tmp_path, "models:\n  classify: [vgg]\n")
    assert proc.returncode != 0
    assert "unknown classify model 'vgg'; registered: cnn3d" in proc.stdout + proc.stderr


def test_a_plugin_task_config_is_checked_against_its_schema(tmp_path):
    proc = dry_run(tmp_path, TOY.replace("    epochs: 2\n", "    epochs: 2\n    toy_hidden: 0\n"))
    assert proc.returncode != 0
    assert "config train.toy: 0 is less than the minimum of 1" in proc.stdout + proc.stderr
