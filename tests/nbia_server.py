"""A real NBIA v4 API server on 127.0.0.1 for tests, serving a folder of DICOM, with fault injection.

Implements the endpoints hnct uses as NBIA does: ``getSeries`` (JSON list, null fields omitted,
HTTP 200 with an EMPTY body for no results, 400 for unknown parameters), ``getImage`` (a zip with
``LICENSE``, ``1-001.dcm``.. zero-padded to the count in InstanceNumber order, ``md5hashes.csv``),
``getSeriesSize`` and ``getSeriesMetaData``. It is plain ``http.server`` on a port the OS picks.

Faults (attributes of :class:`NBIAServer`; per series UID, a count of how many requests fail, or
``ALWAYS``): ``drop`` (headers and half the body, then the connection is closed), ``error_500``,
``truncate`` (a complete HTTP answer holding a truncated zip), ``wrong_md5`` (one MD5 in
``md5hashes.csv`` is wrong), ``restricted`` (set of UIDs answered with 400),
``permission_collections`` (getSeries answers 401 without a Bearer token), ``empty_patients``
(getSeries answers the empty body as if the patient did not exist), ``stall`` (seconds to wait
before answering getImage for a UID). ``requests`` counts every
request as ``(endpoint, key)``.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
import time
import zipfile
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, RTStructureSetStorage, generate_uid

API_PREFIX = "/nbia-api/services/v4/"
ALWAYS = 10**9
LICENSE_TEXT = b"Creative Commons Attribution 4.0 International License (test server)\n"
GET_SERIES_PARAMS = {"Collection", "PatientID", "StudyInstanceUID", "Modality", "BodyPartExamined",
                     "ManufacturerModelName", "Manufacturer", "format"}


def write_test_series(root: Path, collection: str, patient: str, study_uid: str, series_uid: str,
                      modality: str = "CT", n_files: int = 3, series_number: int = 2,
                      description: str = "Neck 2.0 CE", study_date: str = "20050411",
                      study_description: str = "RT SIMULATION", size: int = 8) -> list[Path]:
    """Write a small real DICOM series (CT slices of ``size``^2 int16, or one RTSTRUCT) under ``root``."""
    folder = root / collection / patient / series_uid
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    rng = np.random.default_rng(int(hashlib.md5(series_uid.encode()).hexdigest()[:8], 16))
    count = 1 if modality == "RTSTRUCT" else n_files
    for k in range(count):
        meta = FileMetaDataset()
        sop_class = RTStructureSetStorage if modality == "RTSTRUCT" else CTImageStorage
        sop_uid = generate_uid(entropy_srcs=[series_uid, str(k)])
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
        ds.PatientID, ds.PatientName = patient, patient
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.StudyDate, ds.StudyDescription = study_date, study_description
        ds.SeriesNumber, ds.SeriesDescription = series_number, description
        ds.Modality, ds.Manufacturer = modality, "TESTCO"
        ds.InstanceNumber = k + 1
        if modality != "RTSTRUCT":
            ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
            ds.Rows = ds.Columns = size
            ds.PixelSpacing = [0.5, 0.5]
            ds.ImagePositionPatient = [0.0, 0.0, float(-2 * k)]
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            ds.SliceThickness = 2.0
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
            ds.RescaleIntercept, ds.RescaleSlope = 0, 1
            ds.PixelData = rng.integers(-1000, 1000, (size, size), dtype=np.int16).tobytes()
        path = folder / f"slice{k:03d}.dcm"
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths


def send_half_and_drop(handler: BaseHTTPRequestHandler, body: bytes, content_type: str | None = None) -> None:
    """A connection dropped mid-body: the full Content-Length announced, half the bytes sent."""
    handler.send_response(200)
    if content_type:
        handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body[: len(body) // 2])
    handler.wfile.flush()
    handler.close_connection = True
    handler.connection.shutdown(2)


class NBIAServer:
    """Serve every DICOM series under ``root`` through NBIA v4 endpoints on 127.0.0.1."""

    def __init__(self, root: str | Path, collection_of: dict[str, str] | None = None, token: str = ""):
        self.root = Path(root)
        self.token = token
        self.series: dict[str, dict] = {}
        self.files: dict[str, list[Path]] = defaultdict(list)
        self._index(collection_of or {})
        self.requests: Counter = Counter()
        self.drop: dict[str, int] = {}
        self.error_500: dict[str, int] = {}
        self.truncate: dict[str, int] = {}
        self.wrong_md5: dict[str, int] = {}
        self.restricted: set[str] = set()
        self.permission_collections: set[str] = set()
        self.empty_patients: set[str] = set()
        self.stall: dict[str, float] = {}
        self.lock = threading.Lock()
        self.httpd: ThreadingHTTPServer | None = None
        self.thread: threading.Thread | None = None

    def _index(self, collection_of: dict[str, str]) -> None:
        for path in sorted(self.root.rglob("*.dcm")):
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            uid = str(ds.SeriesInstanceUID)
            self.files[uid].append(path)
            if uid not in self.series:
                collection = collection_of.get(str(ds.PatientID), path.relative_to(self.root).parts[0])
                self.series[uid] = {
                    "SeriesInstanceUID": uid, "StudyInstanceUID": str(ds.StudyInstanceUID),
                    "Modality": str(ds.Modality), "ProtocolName": None,
                    "SeriesDescription": str(ds.get("SeriesDescription", "")) or None,
                    "SeriesNumber": int(ds.get("SeriesNumber", 0) or 0), "BodyPartExamined": None,
                    "PatientID": str(ds.PatientID), "Collection": collection,
                    "Manufacturer": str(ds.get("Manufacturer", "")) or None,
                    "StudyDescription": str(ds.get("StudyDescription", "")),
                    "StudyDate": str(ds.get("StudyDate", "")),
                }
        for uid, paths in self.files.items():
            paths.sort(key=lambda p: int(pydicom.dcmread(p, stop_before_pixels=True).get("InstanceNumber", 0)))
            self.series[uid]["ImageCount"] = len(paths)
            self.series[uid]["FileSize"] = sum(p.stat().st_size for p in paths)

    # ------------------------------------------------------------------ answers
    def take_fault(self, faults: dict[str, int], uid: str) -> bool:
        with self.lock:
            left = faults.get(uid, 0)
            if left > 0:
                faults[uid] = left - 1
                return True
            return False

    def series_zip(self, uid: str, wrong_md5: bool) -> bytes:
        paths = self.files[uid]
        width = len(str(len(paths)))
        buffer = io.BytesIO()
        lines = ["Filename,MD5Hash"]
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
            archive.writestr("LICENSE", LICENSE_TEXT)
            for k, path in enumerate(paths, 1):
                name = f"1-{k:0{width}d}.dcm"
                data = path.read_bytes()
                archive.writestr(name, data)
                md5 = hashlib.md5(data).hexdigest()
                if wrong_md5 and k == 1:
                    md5 = "0" * 32
                lines.append(f"{name},{md5}")
            archive.writestr("md5hashes.csv", "\n".join(lines) + "\n")
        return buffer.getvalue()

    # ------------------------------------------------------------------ life cycle
    @property
    def api_url(self) -> str:
        assert self.httpd is not None
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{API_PREFIX}"

    def start(self) -> "NBIAServer":
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet tests
                return

            def send_body(self, status: int, body: bytes, content_type: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                url = urlparse(self.path)
                if not url.path.startswith(API_PREFIX):
                    return self.send_body(404, b"not found", "text/plain")
                endpoint = url.path[len(API_PREFIX):]
                params = {k: v[0] for k, v in parse_qs(url.query).items()}
                authorised = self.headers.get("Authorization", "") == f"Bearer {server.token}" and server.token
                if endpoint == "getSeries":
                    return self.get_series(params, authorised)
                uid = params.get("SeriesInstanceUID", "")
                with server.lock:
                    server.requests[(endpoint, uid)] += 1
                if endpoint == "getImage":
                    return self.get_image(uid)
                if endpoint == "getSeriesSize":
                    meta = server.series.get(uid)
                    rows = [{"TotalSizeInBytes": float(meta["FileSize"]), "ObjectCount": meta["ImageCount"]}] if meta else []
                    return self.send_body(200, json.dumps(rows).encode() if rows else b"")
                if endpoint == "getSeriesMetaData":
                    meta = server.series.get(uid)
                    if not meta:
                        return self.send_body(200, b"")
                    row = {"Series UID": uid, "Collection": meta["Collection"], "Subject ID": meta["PatientID"],
                           "Study UID": meta["StudyInstanceUID"], "Modality": meta["Modality"],
                           "Number of Images": str(meta["ImageCount"])}
                    return self.send_body(200, json.dumps([row]).encode())
                return self.send_body(404, b"unknown endpoint", "text/plain")

            def get_series(self, params: dict[str, str], authorised: bool) -> None:
                with server.lock:
                    server.requests[("getSeries", params.get("PatientID", ""))] += 1
                unknown = set(params) - GET_SERIES_PARAMS
                if unknown:
                    return self.send_body(400, f"unknown parameter(s) {sorted(unknown)}".encode(), "text/plain")
                if params.get("Collection") in server.permission_collections and not authorised:
                    return self.send_body(401, b"Unauthorized", "text/plain")
                if params.get("PatientID") in server.empty_patients:
                    return self.send_body(200, b"")
                rows = []
                for meta in server.series.values():
                    if all(meta.get(key) == value for key, value in params.items() if key != "format"):
                        rows.append({k: v for k, v in meta.items()
                                     if v is not None and k not in ("StudyDescription", "StudyDate")})
                return self.send_body(200, json.dumps(rows).encode() if rows else b"")

            def get_image(self, uid: str) -> None:
                if uid not in server.series:
                    return self.send_body(200, b"", "application/zip")
                if uid in server.restricted:
                    return self.send_body(400, b"You do not have access to this series", "text/plain")
                if server.stall.get(uid):  # a slow answer: lets a test kill the client mid-download
                    time.sleep(server.stall[uid])
                if server.take_fault(server.error_500, uid):
                    return self.send_body(500, b"Internal Server Error", "text/plain")
                body = server.series_zip(uid, wrong_md5=server.take_fault(server.wrong_md5, uid))
                if server.take_fault(server.drop, uid):
                    return send_half_and_drop(self, body, "application/zip")
                if server.take_fault(server.truncate, uid):
                    body = body[: len(body) * 2 // 3]
                return self.send_body(200, body, "application/zip")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None


def main() -> None:  # pragma: no cover - manual use: serve a folder until Ctrl-C
    import argparse

    parser = argparse.ArgumentParser(description="serve a DICOM folder as an NBIA v4 API on 127.0.0.1")
    parser.add_argument("root")
    args = parser.parse_args()
    server = NBIAServer(args.root).start()
    print(server.api_url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":  # pragma: no cover
    main()
