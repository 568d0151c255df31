"""tcia: a small client for TCIA's NBIA REST API (v4): list series, series sizes, download series zips.

Why not tcia-utils: it has no timeouts and no retries, never checks the MD5s the server sends,
turns every HTTP error into ``None`` (so a 400 "not accessible" looks like "no results"), skips a
series whose folder exists even when it is partial, and installing it pulls in about 950 MB
(idc-index, duckdb). Closing those gaps would mean wrapping every call it makes, so hnct uses this
client instead: ``requests`` with urllib3's ``Retry`` (connection errors and 5xx answers on every
call, exponential backoff), explicit ``(connect, read)`` timeouts, and errors that say what
happened. Body-level failures of a download (a connection dropped mid-zip, a truncated zip, an MD5
mismatch) are retried by :mod:`hnct.fetch`, which checks every file.

Facts of the API this client relies on (NBIA v4): ``getSeries?Collection=&PatientID=&Modality=``
answers a JSON list of series (null fields omitted) and, when nothing matches, HTTP 200 with an
EMPTY body; unknown query parameters give 400. ``getImage?SeriesInstanceUID=..&NewFileNames=Yes&
IncludeMD5=yes`` answers a zip (``LICENSE``, ``1-001.dcm`` .., ``md5hashes.csv``); a series the
caller may not access gives 400. ``getSeriesSize`` answers ``TotalSizeInBytes`` and
``ObjectCount``. Restricted collections need a Bearer token (``Authorization`` header); without
one the server answers 401/403.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

log = logging.getLogger("hnct.tcia")

SERIES_ZIP_PARAMS = {"NewFileNames": "Yes", "IncludeMD5": "yes"}


class NBIAError(Exception):
    """The API answered something other than data; ``kind`` says what, for a readable exclusion.

    kinds: ``not_accessible`` (400 on a series), ``permission`` (401/403: the collection needs a
    token), ``server`` (5xx after every retry), ``connection`` (no answer after every retry),
    ``bad_answer`` (an answer that is not what the endpoint documents).
    """

    def __init__(self, kind: str, message: str, status: int | None = None):
        self.kind = kind
        self.status = status
        super().__init__(message)


def read_token(token_file: str = "", token_env: str = "") -> str:
    """The Bearer token for restricted collections: from ``token_file`` or the variable ``token_env``.

    An empty result means anonymous access (public collections). The token never goes to a log.
    """
    if token_file:
        path = Path(token_file).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"tcia.token_file {path} does not exist")
        return path.read_text().strip()
    if token_env:
        return os.environ.get(token_env, "").strip()
    return ""


class NBIAClient:
    """The NBIA v4 endpoints hnct uses, with timeouts, retries and backoff.

    ``api_url`` is the base ending in ``/v4/`` (config ``tcia.api_url``); ``timeout_s`` is the
    connect and per-read timeout in seconds; ``retries`` and ``backoff_s`` drive urllib3's
    ``Retry`` (waits backoff_s * 2**n between tries) on connection errors and 500/502/503/504.
    """

    def __init__(self, api_url: str, timeout_s: float = 60.0, retries: int = 4, backoff_s: float = 1.0,
                 token: str = ""):
        self.api_url = api_url if api_url.endswith("/") else api_url + "/"
        self.timeout = (min(timeout_s, 30.0), timeout_s)
        self.retries = retries
        self.backoff_s = backoff_s
        self.session = requests.Session()
        retry = Retry(
            total=retries, connect=retries, read=retries, status=retries, other=0,
            backoff_factor=backoff_s, status_forcelist=(500, 502, 503, 504),
            allowed_methods=frozenset({"GET"}), raise_on_status=False, respect_retry_after_header=True,
        )
        adapter = HTTPAdapter(max_retries=retry)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    # ------------------------------------------------------------------ plumbing
    def _get(self, endpoint: str, params: dict[str, str], stream: bool = False) -> requests.Response:
        url = self.api_url + endpoint
        try:
            response = self.session.get(url, params=params, timeout=self.timeout, stream=stream)
        except requests.exceptions.RetryError as err:
            raise NBIAError("server", f"{endpoint}: the server kept failing after {self.retries} retries "
                                      f"({err})") from err
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as err:
            raise NBIAError("connection", f"{endpoint}: no answer from {self.api_url} after "
                                          f"{self.retries} retries ({type(err).__name__})") from err
        status = response.status_code
        if status == 200:
            return response
        body = response.text[:200].strip() if not stream else ""
        response.close()
        if status == 400:
            raise NBIAError("not_accessible", f"{endpoint} {params}: HTTP 400 (not accessible with these "
                                              f"credentials, or a bad query) {body}".strip(), status)
        if status in (401, 403):
            raise NBIAError("permission", f"{endpoint} {params}: HTTP {status}: the collection needs "
                                          "permission (set tcia.token_file or tcia.token_env)", status)
        if status >= 500:
            raise NBIAError("server", f"{endpoint}: HTTP {status} after {self.retries} retries", status)
        raise NBIAError("bad_answer", f"{endpoint} {params}: HTTP {status} {body}".strip(), status)

    def _get_json_list(self, endpoint: str, params: dict[str, str]) -> list[dict[str, Any]]:
        response = self._get(endpoint, params)
        text = response.text.strip()
        if not text:  # NBIA: no results is HTTP 200 with an empty body
            return []
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise NBIAError("bad_answer", f"{endpoint}: answer is not JSON: {text[:80]!r}") from err
        if isinstance(data, dict):
            data = [data]
        if not isinstance(data, list):
            raise NBIAError("bad_answer", f"{endpoint}: expected a JSON list, got {type(data).__name__}")
        return data

    # ------------------------------------------------------------------ endpoints
    def get_series(self, collection: str = "", patient_id: str = "", modality: str = "",
                   study_uid: str = "") -> list[dict[str, Any]]:
        """``getSeries``: one dict per series (keys as NBIA writes them; null fields omitted)."""
        params = {k: v for k, v in (("Collection", collection), ("PatientID", patient_id),
                                    ("StudyInstanceUID", study_uid), ("Modality", modality)) if v}
        return self._get_json_list("getSeries", params)

    def get_series_metadata(self, series_uid: str) -> dict[str, Any]:
        """``getSeriesMetaData``: the series' row as in the Data Retriever's metadata.csv (``Subject ID``,
        ``Collection``, ``Study UID``, ``Modality`` ...); empty dict when the UID is unknown."""
        rows = self._get_json_list("getSeriesMetaData", {"SeriesInstanceUID": series_uid})
        return rows[0] if rows else {}

    def get_series_size(self, series_uid: str) -> dict[str, float]:
        """``getSeriesSize``: ``TotalSizeInBytes`` and ``ObjectCount`` (empty dict when unknown)."""
        rows = self._get_json_list("getSeriesSize", {"SeriesInstanceUID": series_uid})
        if not rows:
            return {}
        row = rows[0]
        return {"TotalSizeInBytes": float(row.get("TotalSizeInBytes", 0) or 0),
                "ObjectCount": int(float(row.get("ObjectCount", 0) or 0))}

    def download_series_zip(self, series_uid: str, destination: str | Path, chunk_bytes: int = 1 << 20) -> int:
        """``getImage``: stream the series zip to ``destination``; returns the bytes written.

        Raises :class:`NBIAError` for HTTP errors and ``requests`` exceptions (``ChunkedEncodingError``,
        ``ConnectionError``) when the connection drops mid-body; the caller retries those.
        ``OSError`` (disk full) propagates.
        """
        params = {"SeriesInstanceUID": series_uid, **SERIES_ZIP_PARAMS}
        written = 0
        with self._get("getImage", params, stream=True) as response, open(destination, "wb") as out:
            for chunk in response.iter_content(chunk_size=chunk_bytes):
                out.write(chunk)
                written += len(chunk)
            out.flush()
            os.fsync(out.fileno())
        return written
