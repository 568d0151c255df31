"""testdata: place the public test data the tests read in a cache folder, each file checked by SHA-256.

The files, their sizes, SHA-256 sums and public sources are listed in ``tests/testdata.sha256.tsv``
(columns ``path size sha256 source``; ``path`` relative to the cache root). The cache root is
``$HNCT_TESTDATA``, else ``${XDG_CACHE_HOME:-~/.cache}/hnct/testdata``; it holds ``testdata/real/..``
and ``laryngealct/..``, laid out as the workplace copy ``../shared`` beside a clone.

``python -m hnct.testdata fetch`` makes every file present and verified, from the first source that
gives the right bytes:

1. a file already in the cache with the right size and SHA-256 is kept;
2. a local copy (``--copy-from``, by default ``../shared`` beside the clone when it exists) is copied;
3. else the file's ``source``:
   ``nbia:<Collection>/<PatientID>/<SeriesInstanceUID>`` is downloaded through hnct's NBIA client
   (:func:`hnct.fetch.fetch_series`: retries, MD5s of the zip), the file being the zip member named
   like the path's last part; ``github:<owner>/<repo>/<40-digit commit>/<path>`` is the raw file at
   that commit (``--raw-url`` is the raw-file host); ``hnct:<path>`` is a file of this repository
   (derived files with no public copy, see tests/fixtures/laryngealct/README.md).

Every file is written to a temporary name beside its final one and renamed only after its SHA-256
matched, so an interrupted run leaves nothing a rerun takes for complete (leftover temporary files
are removed by the next run). A mismatch is an error naming the file, the expected and the found sum.
``python -m hnct.testdata verify`` checks a cache without changing it.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import requests
import yaml
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from hnct.common import InputError, atomic_path, setup_logging

log = logging.getLogger("hnct.testdata")

REPO = Path(__file__).resolve().parents[2]
MANIFEST = REPO / "tests" / "testdata.sha256.tsv"
SHARED_COPY = REPO.parent / "shared"
RAW_URL = "https://raw.githubusercontent.com"
ENV = "HNCT_TESTDATA"
COLUMNS = ["path", "size", "sha256", "source"]
STAGING = ".hnct-download"
HOW_TO_GET = (f"run `make testdata` (copies ../shared beside the clone when present, else downloads each "
              f"file from its public source), or set {ENV} to a folder that holds a verified copy")


class TestdataError(RuntimeError):
    """Test data missing, unverifiable or not obtainable; the message says which files and why."""

    __test__ = False  # not a pytest test class, despite the name


@dataclass(frozen=True)
class Item:
    """One manifest row: ``path`` relative to the cache root, ``size`` in bytes, hex ``sha256``."""

    path: str
    size: int
    sha256: str
    source: str

    @property
    def kind(self) -> str:
        return self.source.split(":", 1)[0]

    @property
    def locator(self) -> str:
        return self.source.split(":", 1)[1]


def default_root() -> Path:
    """``$HNCT_TESTDATA``, else ``${XDG_CACHE_HOME:-~/.cache}/hnct/testdata``."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "hnct" / "testdata"


def read_manifest(path: str | Path = MANIFEST) -> list[Item]:
    """The manifest's rows; a malformed row is an error naming the file and the line."""
    path = Path(path)
    lines = path.read_text().splitlines()
    if not lines or lines[0].split("\t") != COLUMNS:
        raise TestdataError(f"{path}: the header must be {' '.join(COLUMNS)} (tab-separated)")
    items = []
    for number, line in enumerate(lines[1:], 2):
        fields = line.split("\t")
        if len(fields) != 4 or not fields[1].isdigit() or len(fields[2]) != 64 or ":" not in fields[3]:
            raise TestdataError(f"{path}:{number}: expected path, size, 64-digit sha256, kind:source")
        if fields[3].split(":", 1)[0] not in FETCHERS:
            raise TestdataError(f"{path}:{number}: unknown source kind in {fields[3]!r}")
        items.append(Item(fields[0], int(fields[1]), fields[2].lower(), fields[3]))
    return items


def sha256_of(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def check_file(path: Path, item: Item, origin: str) -> None:
    """Raise :class:`TestdataError` unless ``path`` has the item's size and SHA-256."""
    size = path.stat().st_size
    found = sha256_of(path)
    if found != item.sha256:
        raise TestdataError(f"{item.path}: SHA-256 mismatch (from {origin}): expected {item.sha256}, "
                            f"found {found} ({size} bytes, expected {item.size})")


def problem_of(root: Path, item: Item) -> str:
    """Why the cached copy of ``item`` is not usable ('' when it verifies)."""
    target = root / item.path
    if not target.is_file():
        return f"{item.path}: missing"
    if target.stat().st_size != item.size:
        return f"{item.path}: {target.stat().st_size} bytes, expected {item.size}"
    found = sha256_of(target)
    if found != item.sha256:
        return f"{item.path}: SHA-256 mismatch: expected {item.sha256}, found {found}"
    return ""


def verify(root: str | Path | None = None, items: list[Item] | None = None) -> Path:
    """Check every manifest file under ``root``; returns the root or raises :class:`TestdataError`
    listing each missing or changed file and saying how to get the data."""
    root = Path(root) if root is not None else default_root()
    items = read_manifest() if items is None else items
    if not root.is_dir():
        raise TestdataError(f"test data folder {root} does not exist: {HOW_TO_GET}")
    problems = [p for p in (problem_of(root, item) for item in items) if p]
    if problems:
        shown = "\n  ".join(problems[:10]) + (f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise TestdataError(f"test data in {root}: {len(problems)} of {len(items)} files do not verify:\n  "
                            f"{shown}\n{HOW_TO_GET}")
    return root


# ------------------------------------------------------------------------------ sources

@dataclass
class Sources:
    """Where downloads go: NBIA API base (``/v4/``), raw-file host, the repository for ``hnct:``."""

    nbia_url: str
    timeout_s: float
    raw_url: str = RAW_URL
    repo: Path = REPO
    attempts: int = 3
    backoff_s: float = 1.0

    @classmethod
    def public(cls, nbia_url: str | None = None, **fields) -> "Sources":
        """The public sources: TCIA's API and timeout as config/schema.yaml's ``tcia`` defaults give them."""
        return cls(nbia_url=nbia_url or schema_default("tcia", "api_url"),
                   timeout_s=float(schema_default("tcia", "timeout_s")), **fields)

    def session(self) -> requests.Session:
        retry = Retry(total=self.attempts, connect=self.attempts, read=self.attempts, status=self.attempts,
                      backoff_factor=self.backoff_s, status_forcelist=(500, 502, 503, 504),
                      allowed_methods=frozenset({"GET"}), raise_on_status=False)
        session = requests.Session()
        session.mount("http://", HTTPAdapter(max_retries=retry))
        session.mount("https://", HTTPAdapter(max_retries=retry))
        return session


def copy_checked(src: Path, root: Path, item: Item, origin: str) -> None:
    """Copy ``src`` to the item's place under ``root``, renamed into place only once it verifies."""
    with atomic_path(root / item.path, suffix="") as tmp:
        shutil.copyfile(src, tmp)
        check_file(tmp, item, origin)


def fetch_github(items: list[Item], root: Path, sources: Sources) -> list[str]:
    """Download each ``github:`` item's raw file; returns the errors."""
    errors = []
    unreachable = ""  # after a connection failure (every retry spent) the rest is not tried
    with sources.session() as session:
        for item in items:
            url = f"{sources.raw_url.rstrip('/')}/{item.locator}"
            if unreachable:
                errors.append(f"{item.path}: not tried, {unreachable}")
                continue
            log.info("downloading %s", url)
            try:
                with atomic_path(root / item.path, suffix="") as tmp:
                    with session.get(url, stream=True, timeout=(min(sources.timeout_s, 30.0), sources.timeout_s)) as answer:
                        if answer.status_code != 200:
                            raise TestdataError(f"{item.path}: {url}: HTTP {answer.status_code}")
                        with open(tmp, "wb") as out:
                            for chunk in answer.iter_content(1 << 20):
                                out.write(chunk)
                    check_file(tmp, item, url)
            except requests.exceptions.RequestException as err:
                errors.append(f"{item.path}: {url}: download failed ({type(err).__name__}: {err})")
                if isinstance(err, requests.exceptions.ConnectionError) and not isinstance(
                        err, requests.exceptions.ChunkedEncodingError):
                    unreachable = f"{sources.raw_url} cannot be reached"
            except TestdataError as err:
                errors.append(str(err))
    return errors


def fetch_nbia(items: list[Item], root: Path, sources: Sources) -> list[str]:
    """Download each series named by ``nbia:`` items once (hnct.fetch: retries, zip MD5s) and move its
    files into place after their SHA-256 matched; returns the errors."""
    from hnct.fetch import fetch_series
    from hnct.tcia import NBIAClient, NBIAError

    client = NBIAClient(sources.nbia_url, timeout_s=sources.timeout_s, retries=sources.attempts,
                        backoff_s=sources.backoff_s)
    staging = root / STAGING
    by_series: dict[str, list[Item]] = defaultdict(list)
    for item in items:
        by_series[item.locator].append(item)
    errors = []
    for locator, wanted in by_series.items():
        collection, patient, series_uid = locator.split("/")
        where = f"NBIA series {series_uid} ({collection}/{patient}, {sources.nbia_url})"
        try:
            listing = client.get_series(collection=collection, patient_id=patient)
            series = next((s for s in listing if s.get("SeriesInstanceUID") == series_uid), None)
            if series is None:
                raise TestdataError(f"{where}: not among the patient's {len(listing)} series")
            got = fetch_series(client, f"testdata {collection}/{patient}", series,
                               staging / collection / patient, staging / "tmp",
                               attempts=sources.attempts, backoff_s=sources.backoff_s)
        except (NBIAError, InputError, TestdataError) as err:
            errors.append(f"{len(wanted)} file(s) such as {wanted[0].path}: {where}: {err}")
            continue
        folder = Path(got["folder"])
        for item in wanted:
            member = folder / Path(item.path).name
            try:
                if not member.is_file():
                    raise TestdataError(f"{item.path}: {where} has no file {member.name}")
                check_file(member, item, where)
            except TestdataError as err:
                errors.append(str(err))
                continue
            (root / item.path).parent.mkdir(parents=True, exist_ok=True)
            os.replace(member, root / item.path)  # same filesystem: an atomic rename of a checked file
    if not errors:
        shutil.rmtree(staging, ignore_errors=True)
    return errors


def fetch_repository(items: list[Item], root: Path, sources: Sources) -> list[str]:
    """Copy each ``hnct:`` item from this repository; returns the errors."""
    errors = []
    for item in items:
        src = sources.repo / item.locator
        try:
            if not src.is_file():
                raise TestdataError(f"{item.path}: {src} is not in the repository")
            copy_checked(src, root, item, str(src))
        except TestdataError as err:
            errors.append(str(err))
    return errors


FETCHERS = {"nbia": fetch_nbia, "github": fetch_github, "hnct": fetch_repository}


def remove_stale_temporaries(root: Path, items: list[Item]) -> int:
    """Delete what an interrupted run left: temporary files beside the final names and the staging folder."""
    removed = 0
    for folder in {(root / item.path).parent for item in items}:
        for leftover in folder.glob(".*.tmp*") if folder.is_dir() else ():
            leftover.unlink()
            removed += 1
    return removed


def fetch(root: str | Path | None = None, items: list[Item] | None = None, copy_from: str | Path | None = None,
          sources: Sources | None = None) -> dict[str, int]:
    """Make every manifest file present and verified under ``root``; returns counts per origin
    (``kept``, ``copied``, and one per source kind). Raises :class:`TestdataError` listing every file
    that could not be obtained."""
    root = Path(root) if root is not None else default_root()
    items = read_manifest() if items is None else items
    sources = sources or Sources.public()
    root.mkdir(parents=True, exist_ok=True)
    if remove_stale_temporaries(root, items):
        log.info("removed temporary files of an interrupted run")
    counts: dict[str, int] = defaultdict(int)
    missing: list[Item] = []
    for item in items:
        if not problem_of(root, item):
            counts["kept"] += 1
            continue
        local = Path(copy_from) / item.path if copy_from else None
        if local is not None and local.is_file():
            try:
                copy_checked(local, root, item, str(local))
                counts["copied"] += 1
                continue
            except TestdataError as err:
                log.warning("%s: downloading it instead", err)
        missing.append(item)
    errors = []
    for kind, fetcher in FETCHERS.items():
        wanted = [item for item in missing if item.kind == kind]
        if wanted:
            log.info("%d file(s) from %s sources", len(wanted), kind)
            failed = fetcher(wanted, root, sources)
            errors += failed
            counts[kind] += len(wanted) - len(failed)
    if errors:
        raise TestdataError(f"{len(errors)} problem(s) placing the test data in {root}:\n  " + "\n  ".join(errors)
                            + "\nWithout network: copy a verified cache from a machine that has one and set "
                            + f"{ENV} to it (or pass --copy-from a copy laid out like ../shared)")
    return dict(counts)


def schema_default(section: str, key: str):
    """A key's default as config/schema.yaml gives it (the one default of each option)."""
    schema = yaml.safe_load((REPO / "config" / "schema.yaml").read_text())
    return schema["properties"][section]["properties"][key]["default"]


# ------------------------------------------------------------------------------ command line

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hnct.testdata", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("fetch", "verify"):
        cmd = sub.add_parser(name)
        cmd.add_argument("--root", type=Path, default=None, help=f"cache folder (default ${ENV} or the user cache)")
        cmd.add_argument("--manifest", type=Path, default=MANIFEST)
    fetch_cmd = sub.choices["fetch"]
    fetch_cmd.add_argument("--copy-from", type=Path, default=SHARED_COPY if SHARED_COPY.is_dir() else None,
                           help="a local copy laid out like the cache (default ../shared beside the clone, if present)")
    fetch_cmd.add_argument("--no-copy", action="store_true", help="ignore local copies: download what is missing")
    fetch_cmd.add_argument("--nbia-url", default=None, help="NBIA v4 API base (default: tcia.api_url of the schema)")
    fetch_cmd.add_argument("--raw-url", default=RAW_URL, help="host of raw repository files at a commit")
    args = parser.parse_args(argv)
    setup_logging()
    root = args.root or default_root()
    try:
        items = read_manifest(args.manifest)
        if args.command == "verify":
            verify(root, items)
            print(f"{root}: all {len(items)} test data files verify")
            return 0
        sources = Sources.public(args.nbia_url, raw_url=args.raw_url)
        counts = fetch(root, items, None if args.no_copy else args.copy_from, sources)
    except TestdataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{root}: {len(items)} test data files verified ({', '.join(f'{n} {k}' for k, n in sorted(counts.items()))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
