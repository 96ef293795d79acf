"""Where OHIF reads its studies when the datastore is a folder.

OHIF reads images only over DICOMweb, through MONAI Label's ``/proxy/dicom/{qido,wado,stow}``
routes (the build's ``app-config.js``), which forward to ``--studies``: with a folder there, every
request failed (a 500 from ``requests``), so OHIF showed no study. With ``-c ohif_dicomweb URL`` the
app forwards them to that DICOMweb server (the PACS holding the series whose scans the folder
keeps as ``<SeriesInstanceUID>.nii.gz``, see the README's "In OHIF"); without it they get a 404 that
says so. In a DICOMweb datastore MONAI Label's own proxy serves them, unchanged.
"""
from __future__ import annotations

import requests
from fastapi import HTTPException
from fastapi.responses import Response
from monailabel.config import settings

OPS = ("qido", "wado", "stow")
# Headers that describe one hop of the connection, not the answer (RFC 9110 7.6.1), and those the
# body's new framing sets again.
HOP_HEADERS = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
               "transfer-encoding", "upgrade", "content-length", "host"}
TIMEOUT = (10, 300)  # connect, read: a large series' metadata can take minutes on a busy PACS


def no_pacs(op: str) -> HTTPException:
    return HTTPException(404, f"OHIF's DICOMweb request ({op}) has nowhere to go: this server's datastore is a folder. "
                              "Start it with -c ohif_dicomweb http://<pacs>/dicom-web, the PACS holding the series of "
                              "the datastore's images (named <SeriesInstanceUID>.nii.gz)")


def forward(base: str, method: str, path: str, query: str, headers: dict, body: bytes | None) -> Response:
    """One DICOMweb request, sent on to ``base`` as OHIF made it (query string included)."""
    url = f"{base.rstrip('/')}/{path.lstrip('/')}" + (f"?{query}" if query else "")
    auth = ((settings.MONAI_LABEL_DICOMWEB_USERNAME, settings.MONAI_LABEL_DICOMWEB_PASSWORD)
            if settings.MONAI_LABEL_DICOMWEB_USERNAME and settings.MONAI_LABEL_DICOMWEB_PASSWORD else None)
    sent = {k: v for k, v in headers.items() if k.lower() not in HOP_HEADERS | {"cookie", "authorization"}}
    try:
        answer = requests.request(method, url, headers=sent, data=body, auth=auth, timeout=TIMEOUT)
    except requests.RequestException as exc:
        raise HTTPException(502, f"the DICOMweb server for OHIF (-c ohif_dicomweb {base}) did not answer: "
                                 f"{type(exc).__name__}") from None
    kept = {k: v for k, v in answer.headers.items() if k.lower() not in HOP_HEADERS | {"content-encoding"}}
    return Response(content=answer.content, status_code=answer.status_code, headers=kept)
