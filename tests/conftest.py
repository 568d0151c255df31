"""Shared fixtures: the verified real test data (hnct.testdata), and how to run the workflow in a temp dir."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# SimpleITK before anything loads python-gdcm (pydicom's codec plugins do, test modules import
# pydicom): in the other order GDCM's header scanner (hnct.gdcm_index) is refused in the process,
# and the in-process tests would exercise only pydicom's header path.
import SimpleITK  # noqa: E402,F401

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_dir() -> Path:
    return REPO


@pytest.fixture(scope="session")
def testdata_root() -> Path:
    """The verified test data cache ($HNCT_TESTDATA, else the user cache; `make testdata` fills it).

    A missing folder or a file that fails its SHA-256 fails the tests that need it, saying how to
    get the data; nothing is read from ../shared directly.
    """
    from hnct.testdata import TestdataError, verify

    try:
        return verify()
    except TestdataError as err:
        problem = str(err)
    pytest.fail(problem, pytrace=False)  # outside the except: no chained traceback around the message


@pytest.fixture(scope="session")
def testdata_dir(testdata_root: Path) -> Path:
    return testdata_root / "testdata" / "real"


@pytest.fixture(scope="session")
def laryngealct_dir(testdata_root: Path) -> Path:
    return testdata_root / "laryngealct"


def snakemake_cmd(workdir: Path, *args: str, configfile: Path | None = None) -> list[str]:
    """The snakemake command line that runs this repo's workflow in ``workdir``."""
    return [
        sys.executable, "-m", "snakemake",
        "--snakefile", str(REPO / "Snakefile"),
        "--directory", str(workdir),
        "--configfile", str(configfile or REPO / "config" / "config.yaml"),
        *args,
    ]


def run_snakemake(workdir: Path, *args: str, configfile: Path | None = None, check: bool = True,
                  timeout: float = 1500) -> subprocess.CompletedProcess:
    # Rules run `python -m hnct...`: the interpreter running the tests (the venv's) first on PATH.
    env = dict(os.environ, PYTHONPATH=str(REPO / "workflow"),
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    proc = subprocess.run(
        snakemake_cmd(workdir, *args, configfile=configfile),
        cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"snakemake {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
        )
    return proc
