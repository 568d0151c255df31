"""manifest: read TCIA ``.tcia`` manifests (the files the NBIA Data Retriever opens).

A manifest is a few ``key=value`` header lines (``downloadServerUrl``, ``includeAnnotation``,
``noOfrRetry``, ``databasketId``, ``manifestVersion``) followed by ``ListOfSeriesToDownload=`` and
one SeriesInstanceUID per line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class ManifestError(ValueError):
    """The manifest file is unusable (names the file and the line)."""


@dataclass
class Manifest:
    path: str
    header: dict[str, str] = field(default_factory=dict)
    series_uids: list[str] = field(default_factory=list)


def read_manifest(path: str | Path) -> Manifest:
    """Parse a ``.tcia`` file: header keys and the series UIDs (in file order, duplicates dropped)."""
    path = Path(path)
    if not path.exists():
        raise ManifestError(f"manifest {path} does not exist")
    manifest = Manifest(path=str(path))
    in_list = False
    seen: set[str] = set()
    for number, raw in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if not in_list:
            key, sep, value = line.partition("=")
            if not sep:
                raise ManifestError(f"{path}:{number}: expected key=value before ListOfSeriesToDownload=, "
                                    f"got {line[:60]!r}")
            if key.strip() == "ListOfSeriesToDownload":
                in_list = True
                if value.strip():  # a UID on the same line
                    line = value.strip()
                else:
                    continue
            else:
                manifest.header[key.strip()] = value.strip()
                continue
        if not UID_PATTERN.match(line) or len(line) > 64:
            raise ManifestError(f"{path}:{number}: not a SeriesInstanceUID: {line[:70]!r}")
        if line not in seen:
            seen.add(line)
            manifest.series_uids.append(line)
    if not in_list:
        raise ManifestError(f"{path}: no ListOfSeriesToDownload= line (not a .tcia manifest)")
    if not manifest.series_uids:
        raise ManifestError(f"{path}: the manifest lists no series")
    return manifest
