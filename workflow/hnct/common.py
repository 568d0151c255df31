"""Shared plumbing for every stage: per-case sidecars, exclusions, atomic writes, logging.

Per-case stages (convert, crop, slices) always write a JSON sidecar. Its ``status`` is
``"ok"`` when the stage produced its data files, or ``"excluded"`` with the ``stage``,
``file`` and ``reason`` when the case could not be used. A case excluded upstream is
passed on as excluded (``reason`` names the upstream stage). A per-case stage declares two
Snakemake outputs: the sidecar and a per-case folder of data files (``out_dir`` of
:func:`run_case_stage`; empty for an excluded case), so Snakemake sees and cleans every file,
and nothing downstream ever reads a half-written or missing volume (the sidecar, which names
the data files, is written last). ``hnct.exclusions`` gathers them into ``exclusions.tsv``.
Files are written with the umask's mode (:func:`atomic_path`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

log = logging.getLogger("hnct")

SIDECAR_VERSION = 1

# Packages whose versions are recorded in every sidecar and checkpoint.
TRACKED_PACKAGES = (
    "numpy", "pydicom", "python-gdcm", "SimpleITK", "pynrrd", "scikit-image", "scikit-learn",
    "pandas", "torch", "monai",
)


class InputError(Exception):
    """A case cannot be used: bad or missing input that a person must look at.

    Always names the case, the file (or folder) and the reason; the stage catches it,
    writes an exclusion sidecar and the workflow goes on with the other cases.
    """

    def __init__(self, case: str, file: str | os.PathLike | None, reason: str):
        self.case = case
        self.file = "" if file is None else str(file)
        self.reason = reason
        where = f" ({self.file})" if self.file else ""
        super().__init__(f"case {case}: {reason}{where}")


def software_versions() -> dict[str, str]:
    """Python's, hnct's and each installed tracked package's version (the sidecars' and checkpoints'
    provenance).

    Versions come from the installed distributions' ``<name>-<version>.dist-info`` folder names on
    ``sys.path`` (the wheel and PEP 376 naming that importlib.metadata reads too, first match on the
    path wins as for an import): one directory listing per path entry, where importlib.metadata's
    import and lookups cost 0.05-0.06 s, a sixth of a whole plain convert. A tracked package found
    otherwise (first on the path as an ``.egg-info``, or in no folder named so) is looked up with
    importlib.metadata.
    """
    versions = {"python": platform.python_version(), "hnct": _hnct_version()}
    found = _dist_info_versions()
    unresolved = []
    for name in TRACKED_PACKAGES:
        version = found.get(_distribution_key(name))
        if version is None:
            unresolved.append(name)
        else:
            versions[name] = version
    if unresolved:
        from importlib import metadata

        for name in unresolved:
            try:
                versions[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                continue
    return versions


def _distribution_key(name: str) -> str:
    """A distribution name as its dist-info folder spells it, lower-cased (PEP 503 normalisation with
    ``_``, as wheels escape it: ``scikit-learn`` -> ``scikit_learn``)."""
    import re

    return re.sub(r"[-_.]+", "_", name).lower()


def _dist_info_versions() -> dict[str, str | None]:
    """{normalised distribution name: version} from the ``*.dist-info`` folders on ``sys.path``; None
    where the first distribution of that name on the path is an ``.egg-info`` (or a dist-info folder
    without a version in its name): importlib.metadata reads its metadata file then."""
    found: dict[str, str | None] = {}
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        for folder in names:
            stem, dot, kind = folder.rpartition(".")
            if not dot or kind not in ("dist-info", "egg-info"):
                continue
            name, _, version = stem.partition("-")
            found.setdefault(_distribution_key(name), version if kind == "dist-info" and version else None)
    return found


def _hnct_version() -> str:
    from hnct import __version__

    return __version__


def umask_mode(mode: int = 0o666) -> int:
    """``mode`` less the process umask: what ``open()`` or ``mkdir()`` would give a new file or folder.

    Results live on shared cluster filesystems; a collaborator reads them through the group and
    other bits that the user's umask leaves (022 gives files 0644, 002 gives 0664).
    """
    current = os.umask(0)  # the only way to read the umask; set back at once
    os.umask(current)
    return mode & ~current


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it into place only if the block succeeds.

    A crash or an exception leaves no half-written file under the final name.
    ``suffix`` keeps the extension that writers such as SimpleITK or pynrrd look at.
    The file gets the mode a plain ``open()`` would give it (0666 less the umask), not
    ``mkstemp``'s private 0600, so others on a shared filesystem can read the results.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = suffix if suffix is not None else "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # After the writer: some writers replace the file instead of writing into it.
        os.chmod(tmp_path, umask_mode())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def fresh_dir(path: str | os.PathLike) -> Path:
    """An empty folder at ``path`` (a previous run's files removed), made with the umask's mode."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    path.mkdir(parents=True)
    return path


def write_json(path: str | os.PathLike, payload: Any) -> Path:
    """Write JSON atomically (sorted keys, 2-space indent, trailing newline)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=_json_default) + "\n")
    return path


def _json_default(obj: Any) -> Any:
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:  # pragma: no cover - numpy is a hard dependency
        pass
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def ok_sidecar(case: str, stage: str, **fields: Any) -> dict[str, Any]:
    """The sidecar of a case that a stage processed; ``fields`` carry the provenance."""
    return {
        "sidecar_version": SIDECAR_VERSION,
        "case": case,
        "stage": stage,
        "status": "ok",
        "created": now_utc(),
        "software": software_versions(),
        **fields,
    }


def excluded_sidecar(case: str, stage: str, file: str, reason: str, **fields: Any) -> dict[str, Any]:
    """The sidecar of a case a stage could not use: stage, file and reason for the report."""
    return {
        "sidecar_version": SIDECAR_VERSION,
        "case": case,
        "stage": stage,
        "status": "excluded",
        "file": str(file),
        "reason": reason,
        "created": now_utc(),
        "software": software_versions(),
        **fields,
    }


def read_sidecar(path: str | os.PathLike) -> dict[str, Any]:
    sidecar = read_json(path)
    if sidecar.get("status") not in {"ok", "excluded"}:
        raise ValueError(f"{path}: not an hnct sidecar (status={sidecar.get('status')!r})")
    return sidecar


def is_ok(sidecar: dict[str, Any]) -> bool:
    return sidecar.get("status") == "ok"


def upstream_exclusion(case: str, stage: str, upstream: dict[str, Any]) -> dict[str, Any]:
    """Carry an upstream exclusion forward, keeping the original stage, file and reason."""
    return excluded_sidecar(
        case,
        stage,
        upstream.get("file", ""),
        upstream.get("reason", "excluded upstream"),
        excluded_at=upstream.get("excluded_at", upstream.get("stage")),
    )


def run_case_stage(
    case: str,
    stage: str,
    sidecar_path: str | os.PathLike,
    work: Callable[[], dict[str, Any]],
    upstream: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Run one stage for one case and always leave a sidecar behind.

    ``work()`` does the stage and returns the provenance fields of the ok sidecar; it
    raises :class:`InputError` for bad input. An excluded ``upstream`` sidecar is passed
    on without calling ``work``. Any other exception is a bug: it propagates, and
    Snakemake removes the outputs of the failed job.

    ``out_dir`` is the stage's declared per-case folder of data files, named after the case
    (``results/crops/{case}``; anything else is refused, as it is emptied): it is emptied before
    ``work`` runs (no file of an earlier run survives) and stays, empty, when the case is
    excluded, so the job still has all its outputs and the DAG goes on. The sidecar is
    removed first and written last (atomically): a job killed at any point leaves no
    sidecar, and Snakemake runs it again.
    """
    sidecar_path = Path(sidecar_path)
    if out_dir is not None and Path(out_dir).name != case:
        # It is emptied: never a folder that holds anything but this case's files.
        raise ValueError(f"case {case}: out_dir {out_dir} is not the case's own folder (named {case})")
    if sidecar_path.exists():
        sidecar_path.unlink()
    if out_dir is not None:
        fresh_dir(out_dir)
    if upstream is not None:
        up = read_sidecar(upstream)
        if not is_ok(up):
            sidecar = upstream_exclusion(case, stage, up)
            log.warning("case %s: excluded upstream at %s: %s", case, sidecar["excluded_at"], sidecar["reason"])
            write_json(sidecar_path, sidecar)
            return sidecar
    try:
        fields = work()
    except InputError as err:
        if err.case != case:
            raise
        log.error("EXCLUDED %s", err)
        if out_dir is not None:
            fresh_dir(out_dir)  # nothing the work wrote before it gave up
        sidecar = excluded_sidecar(case, stage, err.file, err.reason, excluded_at=stage)
        write_json(sidecar_path, sidecar)
        return sidecar
    sidecar = ok_sidecar(case, stage, **fields)
    write_json(sidecar_path, sidecar)
    return sidecar


def setup_logging(log_file: str | os.PathLike | None = None, level: int = logging.INFO) -> None:
    """Log to stderr and, when given, to ``log_file`` (Snakemake's ``log:``)."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=handlers,
        force=True,
    )


def exit_status(run: Callable[[], Any], logger: logging.Logger = log) -> int:
    """A whole-cohort command's exit status: 0 when ``run()`` returns, 1 (the error logged, no
    traceback) when it raises InputError. Per-case stages go through run_case_stage instead."""
    try:
        run()
    except InputError as err:
        logger.error("%s", err)
        return 1
    return 0


def progress(iterable, total: int | None = None, every: int = 50, what: str = "items"):
    """Yield from ``iterable`` logging ``done/total`` every ``every`` items (long loops show progress)."""
    total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
    for i, item in enumerate(iterable, 1):
        yield item
        if i % every == 0 or (total is not None and i == total):
            log.info("%s: %d/%s", what, i, total if total is not None else "?")


def prepare_job_environment(package_dir: str | os.PathLike) -> None:
    """Make the shell jobs of a Snakemake run find this hnct and the Python running Snakemake.

    Rules call ``python -m hnct.<stage>``. Inside a SLURM job Snakemake parses the workflow
    again, so this runs there too. ``package_dir`` (the folder holding ``hnct/``) goes first
    on PYTHONPATH, so no install is needed on the cluster; the directory of the interpreter
    running Snakemake goes first on PATH, so ``python`` is the one with hnct's dependencies
    even when its virtual environment is not activated (a conda env made by ``--sdm conda``
    puts its own ``bin`` in front of this and still wins).
    """
    package_dir = str(package_dir)
    python_dir = os.path.dirname(sys.executable)
    for variable, first in (("PYTHONPATH", package_dir), ("PATH", python_dir)):
        rest = [p for p in os.environ.get(variable, "").split(os.pathsep) if p and p != first]
        os.environ[variable] = os.pathsep.join([first, *rest])


def read_image(case: str, path: str | os.PathLike, what: str):
    """A SimpleITK image of one case, or an InputError naming the case, the file and what it was."""
    import SimpleITK as sitk

    path = Path(path)
    if not path.exists():
        raise InputError(case, path, f"{what} file is missing")
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise InputError(case, path, f"cannot read {what}: {str(err).strip().splitlines()[-1]}") from err


def structure_values(labels: dict, structure: str) -> list[int]:
    """Label values named ``structure`` (case-insensitive) in a sidecar's ``labels`` (value -> name):
    the one structure-name lookup (training targets, slice positives, 3D evaluation)."""
    return [int(value) for value, name in labels.items() if str(name).lower() == structure.lower()]
