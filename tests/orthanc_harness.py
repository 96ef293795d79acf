"""A real Orthanc (Debian's ``orthanc`` + ``orthanc-dicomweb``) for tests: on loopback, on free ports,
with temporary storage and no authentication; and volumes written as DICOM MR series whose
geometry tags come from the volume's affine, so that a series reader gives back the same affine.
Shared by the app's DICOMweb tests and the batch's DICOMweb input test."""
from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from app_harness import free_port

ORTHANC = shutil.which("Orthanc") or next((p for p in ("/usr/sbin/Orthanc", "/usr/bin/Orthanc") if os.access(p, os.X_OK)), None)
DICOMWEB_PLUGIN = next(
    iter(sorted(glob.glob("/usr/share/orthanc/plugins/libOrthancDicomWeb.so*") + glob.glob("/usr/lib/orthanc/libOrthancDicomWeb.so*"))),
    None,
)


def orthanc_or_skip() -> None:
    """Skip (with what to install) where Orthanc or its DICOMweb plugin is absent."""
    if ORTHANC is None:
        pytest.skip("Orthanc is not installed (apt-get install orthanc orthanc-dicomweb): these tests need a real DICOMweb server")
    if DICOMWEB_PLUGIN is None:
        pytest.skip("Orthanc's DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)")


def right_handed(img: nib.Nifti1Image) -> tuple[np.ndarray, np.ndarray]:
    """The volume with its slice axis reversed if needed so that it reads back from DICOM with the
    same affine: series readers order slices along row x column, a right-handed frame in LPS."""
    data, affine = np.asarray(img.dataobj), img.affine.copy()
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    if np.dot(np.cross(lps[:3, 0], lps[:3, 1]), lps[:3, 2]) < 0:
        flip = np.eye(4)
        flip[2, 2], flip[2, 3] = -1.0, data.shape[2] - 1
        data, affine = data[:, :, ::-1], affine @ flip
    return np.ascontiguousarray(data), affine


def dicom_series(data: np.ndarray, affine: np.ndarray, patient: str, uids: dict) -> list:
    """One MR image per slice, geometry from the affine (RAS, as nibabel reads it)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    spacing = [float(np.linalg.norm(lps[:3, i])) for i in range(3)]
    row, col = lps[:3, 0] / spacing[0], lps[:3, 1] / spacing[1]
    voxels = np.rint(data).astype(np.int16)
    out = []
    for k in range(data.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MRImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.PatientID = ds.PatientName = patient
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = uids["study"], uids["series"], uids["frame"]
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "MR", 1, k + 1
        ds.StudyDate = ds.SeriesDate = "20240101"
        ds.StudyTime = ds.SeriesTime = "120000"
        ds.ImagePositionPatient = [f"{v:.6f}" for v in (lps @ [0, 0, k, 1])[:3]]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row, *col)]
        ds.PixelSpacing = [f"{spacing[1]:.6f}", f"{spacing[0]:.6f}"]  # between rows, between columns
        ds.SliceThickness = f"{spacing[2]:.6f}"
        ds.Rows, ds.Columns = data.shape[1], data.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = np.ascontiguousarray(voxels[:, :, k].T).tobytes()  # rows are y, columns x
        out.append(ds)
    return out


def upload_volume(orthanc: "Orthanc", img: nib.Nifti1Image, patient: str) -> dict:
    """The volume as an MR series on ``orthanc``: its UIDs, and the affine and voxels it reads back as."""
    from pydicom.uid import generate_uid

    uids = {"study": generate_uid(), "series": generate_uid(), "frame": generate_uid()}
    data, affine = right_handed(img)
    datasets = dicom_series(data, affine, patient, uids)
    orthanc.client().store_instances(datasets)
    return dict(uids, datasets=datasets, affine=affine, voxels=np.rint(data).astype(np.int16))


class Orthanc:
    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dicomweb = f"{self.url}/dicom-web"
        config = {
            "Name": "fewshot-test",
            "StorageDirectory": str(root / "storage"),
            "IndexDirectory": str(root / "storage"),
            "HttpPort": self.port,
            "DicomServerEnabled": False,  # DICOMweb only; no DICOM port to claim
            "RemoteAccessAllowed": False,  # loopback clients only
            "AuthenticationEnabled": False,
            "Plugins": [DICOMWEB_PLUGIN],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False, "Host": f"127.0.0.1:{self.port}", "Ssl": False},
            "SaveJobs": False,
        }
        (root / "orthanc.json").write_text(json.dumps(config, indent=1))
        self.log_path = root / "orthanc.log"
        self.start()

    def start(self) -> None:
        """Starts (again: same port, same storage) and waits until DICOMweb answers."""
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([ORTHANC, str(self.root / "orthanc.json")], stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 30
        while True:
            if self.proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"Orthanc did not start:\n{self.log_path.read_text(errors='replace')[-3000:]}")
            try:
                if "dicom-web" in json.loads(self.get("/plugins")):
                    break
            except (OSError, ValueError):
                time.sleep(0.1)

    def get(self, path: str) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return r.read()

    def rest(self, method: str, path: str, body: bytes | None = None) -> bytes:
        request = urllib.request.Request(self.url + path, data=body, method=method)
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.read()

    def client(self):
        from dicomweb_client import DICOMwebClient

        return DICOMwebClient(self.dicomweb)

    def segs(self) -> dict[str, dict]:
        """SEG SeriesInstanceUID -> its instance's metadata (pydicom Dataset) on this server."""
        from pydicom.dataset import Dataset

        client, out = self.client(), {}
        for item in client.search_for_series(search_filters={"Modality": "SEG"}):
            ds = Dataset.from_json(item)
            meta = Dataset.from_json(client.retrieve_series_metadata(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID))[0])
            out[str(ds.SeriesInstanceUID)] = meta
        return out

    def retrieve(self, study: str, series: str):
        return self.client().retrieve_series(study, series)

    def delete_series(self, series_uid: str) -> None:
        found = json.loads(self.rest("POST", "/tools/lookup", series_uid.encode()))
        (orthanc_id,) = [f["ID"] for f in found if f["Type"] == "Series"]
        self.rest("DELETE", f"/series/{orthanc_id}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
