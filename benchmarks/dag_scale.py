"""DAG scale: ``snakemake -n`` on a RADCURE-sized cohort, and the SLURM submissions it would make.

Writes (in a temporary directory) a cohort table of 3,346 cases (``source: local``, one
patient per case; ``dicom_root`` an empty folder: convert's input function globs each case
folder, finds nothing and the dry run goes on) and a config with 5 folds, 5 classification
models and 2 segmentation models (the repo's config/config.yaml with those keys changed), then

1. times ``snakemake -n --quiet`` (DAG building + job stats) and polls its peak memory;
2. runs the dry run again with ``--profile profiles/slurm`` (the SLURM executor, its groups and
   group-components; a dry run prints one ``Group job`` block per job group that would be one
   submission) and counts the submissions of the per-case preprocessing rules: group jobs plus
   per-case jobs of rules in no group. When the dry run prints no group blocks, the count is
   computed from the profile's ``groups`` / ``group-components`` and the per-rule job counts,
   and the result says so (``submissions_source``).

    .venv/bin/python benchmarks/dag_scale.py                  # 3,346 cases
    .venv/bin/python benchmarks/dag_scale.py --cases 200      # quicker
"""

from __future__ import annotations

import argparse
import math
import re
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchutil  # noqa: E402

REPO = benchutil.REPO
RADCURE_CASES = 3346
CLASSIFY_MODELS = ["cnn3d", "resnet18", "resnet50", "resnet101", "densenet121"]
SEGMENT_MODELS = ["snet", "unet"]
DAG_TARGET_S = 60.0
SUBMISSIONS_PER_CASES = 25  # target: preprocessing submissions <= cases / 25

JOB_STATS_LINE = re.compile(r"^(?P<rule>[A-Za-z_][A-Za-z0-9_]*)\s+(?P<count>\d+)\s*$")
GROUP_LINE = re.compile(r"^\[[^\]]*\]\s+Group job (?P<group>\S+)")
TOP_RULE_LINE = re.compile(r"^(?P<local>local)?rule (?P<rule>[A-Za-z_][A-Za-z0-9_]*):")
INNER_RULE_LINE = re.compile(r"^\s+(?:local)?rule (?P<rule>[A-Za-z_][A-Za-z0-9_]*):")


def missing_rule_files() -> list[str]:
    """Rule files the Snakefile includes that do not exist yet (the Snakefile then cannot parse)."""
    snakefile = (REPO / "Snakefile").read_text()
    included = re.findall(r'^include:\s*"([^"]+)"', snakefile, flags=re.M)
    return [path for path in included if not (REPO / path).exists()]


def write_cohort(path: Path, n_cases: int, seed: int) -> None:
    """A RADCURE-shaped cohort table: one scan per patient, ~25 % T4 (seeded)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    t_stages = rng.choice(["T1", "T2", "T3", "T4a"], size=n_cases, p=[0.25, 0.3, 0.2, 0.25])
    lines = ["case\tpatient\tcollection\tdicom_dir\tt_stage\tlabel_t4\tnode_positive"]
    for n in range(n_cases):
        case = f"RADCURE-{n + 1:04d}"
        t4 = 1 if t_stages[n].startswith("T4") else 0
        lines.append(f"{case}\t{case}\tRADCURE\t{case}\t{t_stages[n]}\t{t4}\t{int(rng.random() < 0.6)}")
    path.write_text("\n".join(lines) + "\n")


def write_config(path: Path, cohort: Path, dicom_root: Path, n_folds: int) -> dict[str, Any]:
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["cohort"].update(source="local", table=str(cohort), dicom_root=str(dicom_root))
    config["folds"]["n_folds"] = n_folds
    config["tasks"] = ["classify", "segment"]
    config["models"] = {"classify": list(CLASSIFY_MODELS), "segment": list(SEGMENT_MODELS)}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return config


def snakemake_cmd(workdir: Path, configfile: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
            "--directory", str(workdir), "--configfile", str(configfile), "-n", *extra]


def parse_job_stats(text: str) -> dict[str, int]:
    """The ``Job stats`` table of a dry run: rule -> number of jobs (the last table printed)."""
    stats: dict[str, int] = {}
    blocks = text.split("Job stats:")
    if len(blocks) < 2:
        return stats
    for line in blocks[-1].splitlines()[3:]:
        match = JOB_STATS_LINE.match(line)
        if not match:
            break
        stats[match["rule"]] = int(match["count"])
    return stats


def parse_submissions(text: str) -> dict[str, Any]:
    """Submissions a dry run shows: one per ``Group job`` block, one per ungrouped top-level job.

    Returns the group blocks (group name -> list of Counter of member rules) and the ungrouped
    jobs per rule (local rules counted apart: they run on the submit host).
    """
    groups: list[dict[str, Any]] = []
    ungrouped: Counter = Counter()
    local: Counter = Counter()
    current = None
    for line in text.splitlines():
        group = GROUP_LINE.match(line)
        if group:
            current = {"group": group["group"], "rules": Counter()}
            groups.append(current)
            continue
        top = TOP_RULE_LINE.match(line)
        if top:
            current = None
            (local if top["local"] else ungrouped)[top["rule"]] += 1
            continue
        inner = INNER_RULE_LINE.match(line)
        if inner and current is not None:
            current["rules"][inner["rule"]] += 1
    return {"groups": groups, "ungrouped": ungrouped, "local": local}


def profile_settings(profile: Path) -> dict[str, Any]:
    config = yaml.safe_load((profile / "config.yaml").read_text()) or {}

    def as_mapping(value) -> dict[str, Any]:
        if isinstance(value, dict):
            return {str(k): v for k, v in value.items()}
        if isinstance(value, (list, tuple)):  # ["rule=group", ...]
            return dict(str(item).split("=", 1) for item in value)
        return {}

    return {"groups": as_mapping(config.get("groups")),
            "group_components": {k: int(v) for k, v in as_mapping(config.get("group-components")).items()},
            "executor": config.get("executor"), "jobs": config.get("jobs"),
            "software_deployment_method": config.get("software-deployment-method") or config.get("sdm")}


def submissions_from_profile(settings: dict[str, Any], per_case_rules: dict[str, int], n_cases: int) -> dict[str, Any]:
    """What the profile's groups make of the per-case rules: per group, ceil(cases / components)."""
    by_group: dict[str, list[str]] = {}
    ungrouped = 0
    for rule, count in per_case_rules.items():
        group = settings["groups"].get(rule)
        if group is None:
            ungrouped += count
        else:
            by_group.setdefault(group, []).append(rule)
    # The per-case rules of one group chain within a case, so a case is one connected component.
    grouped = sum(math.ceil(n_cases / max(1, settings["group_components"].get(g, 1))) for g in by_group)
    return {"submissions": grouped + ungrouped, "grouped_submissions": grouped, "ungrouped_jobs": ungrouped,
            "groups": {g: {"rules": rules, "components": settings["group_components"].get(g, 1)}
                       for g, rules in by_group.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=RADCURE_CASES)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=3346)
    parser.add_argument("--profile", default=str(REPO / "profiles" / "slurm"))
    parser.add_argument("--jobs", type=int, default=500, help="--jobs for the profile dry run if the profile sets none")
    parser.add_argument("--workdir", default=None, help="default: a temp dir, removed afterwards")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--no-profile-run", action="store_true", help="skip the SLURM-profile dry run")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/dag_scale.json)")
    args = parser.parse_args(argv)

    missing = missing_rule_files()
    if missing:
        print(f"the Snakefile cannot parse yet: missing {', '.join(missing)}", file=sys.stderr)
        return 2
    info = benchutil.machine_info()
    temp = args.workdir is None
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="hnct-bench-dag-")).resolve()
    try:
        run_dir = workdir / "run"
        dicom_root = workdir / "dicom"  # empty: nothing is read in a dry run
        run_dir.mkdir(parents=True, exist_ok=True)
        dicom_root.mkdir(exist_ok=True)
        # Users run the workflow from the clone's root; rules that name repo files relative to the
        # working directory (workflow/report/...) then find them. Reproduce that in the temp dir.
        if not (run_dir / "workflow").exists():
            (run_dir / "workflow").symlink_to(REPO / "workflow", target_is_directory=True)
        cohort = workdir / "cohort.tsv"
        configfile = workdir / "config.yaml"
        write_cohort(cohort, args.cases, args.seed)
        write_config(configfile, cohort, dicom_root, args.folds)
        env = benchutil.worker_env()

        print(f"{args.cases} cases x {args.folds} folds x {len(CLASSIFY_MODELS)} classify + "
              f"{len(SEGMENT_MODELS)} segment models: snakemake -n ...", flush=True)
        dry = benchutil.run_measured(snakemake_cmd(run_dir, configfile, "--quiet", "rules"), timeout=args.timeout,
                                     env=env, cwd=run_dir)
        (workdir / "dryrun.log").write_text(dry["stdout"] + dry["stderr"])
        stats = parse_job_stats(dry["stdout"] + dry["stderr"])
        if dry["returncode"] != 0 or not stats:
            print(dry["stdout"][-3000:], dry["stderr"][-5000:], sep="\n", file=sys.stderr)
            print("snakemake -n failed", file=sys.stderr)
            return 1
        per_case_rules = {rule: count for rule, count in stats.items() if count == args.cases}
        result: dict[str, Any] = {
            "benchmark": "dag_scale",
            "machine": info,
            "settings": {"cases": args.cases, "folds": args.folds, "classify_models": CLASSIFY_MODELS,
                         "segment_models": SEGMENT_MODELS, "source": "local (empty dicom_root)",
                         "run_dir": "temp dir with a symlink workflow -> the repo's workflow/ (as when run "
                                    "from the clone's root)"},
            "dryrun": {"command": "snakemake -n --quiet rules", "wall_s": round(dry["wall_s"], 2),
                       "cpu_s": round(dry["user_s"] + dry["sys_s"], 2),
                       "peak_rss_mb": round(dry["peak_rss_mb"], 1), "job_stats": stats,
                       "total_jobs": stats.get("total", sum(v for k, v in stats.items() if k != "total"))},
            "per_case_rules": per_case_rules,
        }

        profile = Path(args.profile)
        submissions: dict[str, Any] = {}
        if profile.joinpath("config.yaml").exists():
            settings = profile_settings(profile)
            submissions["profile"] = str(profile.relative_to(REPO) if profile.is_relative_to(REPO) else profile)
            submissions["profile_settings"] = settings
            submissions["computed_from_profile"] = submissions_from_profile(settings, per_case_rules, args.cases)
            if not args.no_profile_run:
                extra = ["--profile", str(profile)]
                if not settings.get("jobs"):
                    extra += ["--jobs", str(args.jobs)]
                sdm = str(settings.get("software_deployment_method") or "")
                if "conda" in sdm and shutil.which("conda") is None:
                    # Even a dry run asks `conda info` under --sdm conda; --sdm has no "none", and
                    # env-modules is a no-op for rules without envmodules: (as tests/test_profiles.py does).
                    extra += ["--sdm", "env-modules"]
                    submissions["sdm_override"] = "--sdm env-modules (no conda on this machine)"
                slurm = benchutil.run_measured(snakemake_cmd(run_dir, configfile, *extra), timeout=args.timeout,
                                               env=env, cwd=run_dir)
                log_text = slurm["stdout"] + slurm["stderr"]
                (workdir / "dryrun_slurm.log").write_text(log_text)
                parsed = parse_submissions(log_text)
                pre_groups = [g for g in parsed["groups"] if set(g["rules"]) & set(per_case_rules)]
                pre_ungrouped = sum(n for rule, n in parsed["ungrouped"].items() if rule in per_case_rules)
                submissions["profile_dryrun"] = {
                    "returncode": slurm["returncode"], "wall_s": round(slurm["wall_s"], 2),
                    "peak_rss_mb": round(slurm["peak_rss_mb"], 1),
                    "group_jobs_printed": len(parsed["groups"]),
                    "preprocessing_group_jobs": len(pre_groups),
                    "preprocessing_ungrouped_jobs": pre_ungrouped,
                    "jobs_per_group_job": sorted(Counter(sum(g["rules"].values()) for g in pre_groups).items()),
                    "other_submissions": {r: n for r, n in parsed["ungrouped"].items() if r not in per_case_rules},
                    "local_jobs": dict(parsed["local"]),
                }
                if slurm["returncode"] != 0:
                    submissions["profile_dryrun"]["error"] = log_text[-3000:]
            dryrun_info = submissions.get("profile_dryrun", {})
            if dryrun_info.get("returncode") == 0 and dryrun_info.get("group_jobs_printed", 0) > 0:
                count = dryrun_info["preprocessing_group_jobs"] + dryrun_info["preprocessing_ungrouped_jobs"]
                submissions["preprocessing_submissions"] = count
                submissions["submissions_source"] = "dry run with the profile (Group job blocks counted)"
            else:
                submissions["preprocessing_submissions"] = submissions["computed_from_profile"]["submissions"]
                submissions["submissions_source"] = ("computed from the profile's groups/group-components and the "
                                                     "per-rule job counts (the dry run printed no group job)")
        else:
            submissions["error"] = f"{profile}/config.yaml does not exist: submissions not counted"
        result["slurm"] = submissions

        limit = args.cases / SUBMISSIONS_PER_CASES
        n_sub = submissions.get("preprocessing_submissions")
        result["targets"] = {
            "dag_build_lt_60s": {"target": DAG_TARGET_S, "value": result["dryrun"]["wall_s"],
                                 "met": bool(result["dryrun"]["wall_s"] < DAG_TARGET_S)},
            "preprocessing_submissions_le_cases_over_25": {
                "target": limit, "value": n_sub, "met": None if n_sub is None else bool(n_sub <= limit)},
        }
        benchutil.finish_info(info)
        print_report(result)
        path = benchutil.write_result("dag_scale", result, args.out)
        print(f"\nwrote {path}")
        return 0
    finally:
        if temp:
            shutil.rmtree(workdir, ignore_errors=True)


def print_report(result: dict[str, Any]) -> None:
    dry = result["dryrun"]
    rows = [{"rule": rule, "jobs": count, "per_case": "yes" if rule in result["per_case_rules"] else ""}
            for rule, count in dry["job_stats"].items()]
    print(benchutil.format_table(rows, [("rule", "rule", ""), ("jobs", "jobs", "d"), ("per_case", "per case", "")]))
    print(f"\nsnakemake -n: {dry['wall_s']:.1f} s wall, {dry['cpu_s']:.1f} s CPU, peak {dry['peak_rss_mb']:.0f} MB, "
          f"{dry['total_jobs']} jobs")
    slurm = result["slurm"]
    if "profile_dryrun" in slurm:
        p = slurm["profile_dryrun"]
        print(f"dry run with {slurm['profile']}: {p['wall_s']:.1f} s, peak {p['peak_rss_mb']:.0f} MB, "
              f"{p['group_jobs_printed']} group jobs printed ({p['preprocessing_group_jobs']} preprocessing), "
              f"{p['preprocessing_ungrouped_jobs']} ungrouped per-case jobs")
    if "preprocessing_submissions" in slurm:
        print(f"preprocessing SLURM submissions: {slurm['preprocessing_submissions']} "
              f"({slurm['submissions_source']}); from the profile's settings: "
              f"{slurm['computed_from_profile']['submissions']}")
    elif "error" in slurm:
        print(slurm["error"])
    print("\ntargets:")
    for key, t in result["targets"].items():
        met = {True: "MET", False: "NOT met", None: "not measured"}[t["met"]]
        print(f"  {key:<44} value {t['value']!s:>8}  target {t['target']:g}  {met}")


if __name__ == "__main__":
    sys.exit(main())
