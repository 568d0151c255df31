"""Conda envs stay in sync with pyproject.toml, every rule names an env that has what its code imports,
every rule tracks its own code, and ``snakemake --lint`` is clean.

Conda channels are not reachable from CI, so ``--sdm conda`` itself cannot run here: these checks are
what keeps envs/*.yaml honest.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
ENVS = REPO / "envs"
RULES = REPO / "workflow" / "rules"
HNCT = REPO / "workflow" / "hnct"
FAMILIES = ("fetch", "dicom", "train", "report")

# conda-forge name -> PyPI name, where they differ.
CONDA_TO_PYPI = {"simpleitk": "simpleitk", "pytorch": "torch", "matplotlib-base": "matplotlib",
                 "gdcm": "python-gdcm"}
# import name -> PyPI name, for the third-party packages hnct imports.
IMPORT_TO_PYPI = {
    "numpy": "numpy", "scipy": "scipy", "pandas": "pandas", "pydicom": "pydicom",
    "SimpleITK": "simpleitk", "nrrd": "pynrrd", "skimage": "scikit-image",
    "sklearn": "scikit-learn", "PIL": "pillow", "requests": "requests",
    "matplotlib": "matplotlib", "torch": "torch", "monai": "monai", "yaml": "pyyaml",
    "jsonschema": "jsonschema", "highdicom": "highdicom",
}


def pyproject_pins() -> dict[str, str]:
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    pins = {}
    for requirement in data["project"]["dependencies"]:
        name, _, version = requirement.partition("==")
        assert version, f"pyproject.toml: {requirement!r} is not pinned with =="
        pins[name.strip().lower()] = version.strip()
    return pins


def env_pins(family: str) -> dict[str, str]:
    """PyPI name -> version of one env file (python left out)."""
    env = yaml.safe_load((ENVS / f"{family}.yaml").read_text())
    pins = {}
    for spec in env["dependencies"]:
        assert isinstance(spec, str), f"envs/{family}.yaml: pip sections are not allowed ({spec!r})"
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*=\s*([0-9][0-9A-Za-z.]*)", spec.strip())
        assert match, f"envs/{family}.yaml: {spec!r} is not pinned as 'name =version'"
        name, version = match.group(1).lower(), match.group(2)
        if name != "python":
            pins[CONDA_TO_PYPI.get(name, name)] = version
    return pins


def parse_rules() -> dict[str, dict]:
    """Rule name -> {file, conda (path text or None), code_modules (list or None), text} from *.smk.

    A text parse: a rule runs from its ``rule NAME:`` line (at any indentation: rules inside
    ``if``/``for`` blocks count) to the next line indented no deeper. Anonymous rules take their
    ``name:`` directive (an f-string's literal part, e.g. ``demo_case_{...}`` -> ``demo_case_*``).
    """
    rules = {}
    for smk in sorted(RULES.glob("*.smk")):
        source = smk.read_text()
        lines = source.splitlines()
        for start, line in enumerate(lines):
            header = re.match(r"^(\s*)(?:rule|checkpoint)(?:\s+(\w+))?\s*:\s*(#.*)?$", line)
            if not header:
                continue
            indent = len(header.group(1))
            end = start + 1
            while end < len(lines) and (not lines[end].strip()
                                        or len(lines[end]) - len(lines[end].lstrip()) > indent):
                end += 1
            body = "\n".join(lines[start:end])
            name = header.group(2)
            if name is None:
                named = re.search(r"^\s+name:\s*\n\s+f?[\"']([^\"'{]+)", body, re.M)
                assert named, f"{smk.name}:{start + 1}: an anonymous rule without a name: directive"
                name = named.group(1) + "*"
            conda = re.search(r"^\s+conda:\s*\n\s+[\"']([^\"']+)[\"']", body, re.M)
            code = re.search(r"code\s*=\s*code_version\(([^)]*)\)", body)
            modules = None
            if code:
                modules = re.findall(r"[\"']([\w.]+)[\"']", code.group(1))
                if "*" in code.group(1):  # e.g. code_version(*COHORT_MODULES): a list in the same file
                    listed = re.search(rf"{re.escape(code.group(1).strip()[1:])}\s*=\s*[\[(]([^\])]*)",
                                       source)
                    modules += re.findall(r"[\"']([\w.]+)[\"']", listed.group(1)) if listed else []
            rules[name] = {"file": smk, "conda": conda.group(1) if conda else None,
                           "code_modules": modules, "text": body}
    return rules


def module_imports(module: str, seen: set[str] | None = None) -> set[str]:
    """Third-party top-level imports of hnct.<module> and the hnct modules it imports (recursively)."""
    seen = set() if seen is None else seen
    if module in seen:
        return set()
    seen.add(module)
    path = HNCT / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = HNCT / module.replace(".", "/") / "__init__.py"
    if not path.exists():
        return set()
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        for name in names:
            if name.startswith("hnct."):
                found |= module_imports(name[len("hnct."):], seen)
            elif name.split(".")[0] in IMPORT_TO_PYPI:
                found.add(IMPORT_TO_PYPI[name.split(".")[0]])
    return found


@pytest.mark.parametrize("family", FAMILIES)
def test_env_pins_match_pyproject(family):
    env = yaml.safe_load((ENVS / f"{family}.yaml").read_text())
    assert env["channels"] == ["conda-forge", "nodefaults"]
    python = [s for s in env["dependencies"] if str(s).replace(" ", "").startswith("python=")]
    assert python == ["python =3.11"], f"envs/{family}.yaml must pin python =3.11 (pyproject: >=3.11,<3.13)"
    pins = pyproject_pins()
    for name, version in env_pins(family).items():
        assert name in pins, f"envs/{family}.yaml: {name} is not a dependency in pyproject.toml"
        assert version == pins[name], (
            f"envs/{family}.yaml pins {name} {version}, pyproject.toml pins {pins[name]}")


def test_every_pyproject_dependency_is_in_some_env():
    used = set().union(*(env_pins(f) for f in FAMILIES))
    # jsonschema and pyyaml serve Snakemake's config validation in the main process, not the rules.
    missing = set(pyproject_pins()) - used - {"jsonschema", "pyyaml"}
    assert not missing, f"pinned in pyproject.toml but in no env: {sorted(missing)}"


def test_runtime_dependencies_are_permissively_licensed():
    """hnct is MIT: no runtime dependency may be GPL (pylibjpeg-libjpeg, GPL-3.0, was one; GDCM
    decodes the JPEG syntaxes instead). Read from each installed package's licence metadata."""
    from importlib import metadata

    copyleft = {}
    for name in pyproject_pins():
        meta = metadata.metadata(name)
        licences = [meta.get("License-Expression") or ""] + [
            c for c in meta.get_all("Classifier") or [] if c.startswith("License ::")]
        if any("GPL" in text for text in licences):
            copyleft[name] = licences
    assert not copyleft, f"copyleft runtime dependencies: {copyleft}"


def test_every_rule_names_an_existing_env_with_what_its_code_imports():
    rules = parse_rules()
    assert len(rules) >= 10, f"found only {sorted(rules)} in {RULES}"
    problems = []
    for name, rule in rules.items():
        where = f"{rule['file'].name}: rule {name}"
        if rule["conda"] is None:
            problems.append(f"{where} has no conda: directive")
            continue
        env_path = (rule["file"].parent / rule["conda"]).resolve()
        if env_path.parent != ENVS.resolve() or env_path.stem not in FAMILIES or not env_path.exists():
            problems.append(f"{where} names {rule['conda']}, not one of envs/{{{','.join(FAMILIES)}}}.yaml")
            continue
        if rule["code_modules"] is None:
            problems.append(f"{where} has no params code=code_version(...): a code change would not rerun it")
            continue
        available = env_pins(env_path.stem)
        needed = set()
        for module in ["common", *rule["code_modules"]]:
            needed |= module_imports(module)
        missing = needed - set(available) - {"pyyaml", "jsonschema"}
        if missing:
            problems.append(f"{where}: its modules import {sorted(missing)}, not in envs/{env_path.stem}.yaml")
    assert not problems, "\n".join(problems)


def test_code_version_names_existing_modules():
    for name, rule in parse_rules().items():
        for module in rule["code_modules"] or []:
            path = HNCT / (module.replace(".", "/") + ".py")
            package = HNCT / module.replace(".", "/") / "__init__.py"
            assert path.exists() or package.exists(), (
                f"{rule['file'].name}: rule {name}: code_version names {module!r}, no such hnct module")


def test_snakemake_lint_is_clean(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
         "--directory", str(tmp_path), "--configfile", str(REPO / "config" / "config.yaml"),
         "--lint"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"snakemake --lint failed ({proc.returncode}):\n{output[-6000:]}"
    assert "Lints for" not in output, f"snakemake --lint found problems:\n{output[-6000:]}"
