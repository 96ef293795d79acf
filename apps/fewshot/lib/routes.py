"""Checks in front of MONAI Label's own REST endpoints, for what its stock handlers get wrong.

Stock 0.8.5 parses ``params``/``info`` form fields inside its handlers: malformed JSON or a JSON
value that is not an object gives a 500 (and for ``PUT /datastore/label`` only after the file is
written). Its ``/infer`` handler is ``async`` but runs the whole inference synchronously, so one
long inference freezes ``/info`` and label saves for every client. ``/batch/infer``, ``/train`` and
``/scoring`` start a second process with a second copy of the app for any name they are given.
It stores and logs client strings of any length (``/activelearning`` puts ``client_id`` in the
index), and a request that fails leaves its upload in the temporary folder.

These routes are inserted in front of the stock ones (Starlette matches routes in order) with the
same paths, parameters and permissions. Each validates what the client sent, answering 4xx with a
message, then hands over to MONAI Label's own endpoint function (``_handing_over``: the temporary
files of a failed request are removed, and its message names no temporary file). ``PUT /session/``
is handled here whole: the stock handler keeps what it received when the session is refused. They
are plain ``def`` routes, so FastAPI runs them in its thread pool: the event loop stays free while
an inference runs. ``GET /ohif/`` serves MONAI Label's OHIF build with this app's patches
(``lib/ohif.py``) in place of the stock one.
"""
from __future__ import annotations

import inspect
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, List, Optional

from fastapi import APIRouter, BackgroundTasks, Depends, File, Form, HTTPException, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, Response
from monailabel.config import settings
from monailabel.endpoints import activelearning as activelearning_ep
from monailabel.endpoints import batch_infer as batch_ep
from monailabel.endpoints import datastore as datastore_ep
from monailabel.endpoints import infer as infer_ep
from monailabel.endpoints import proxy as proxy_ep
from monailabel.endpoints import scoring as scoring_ep
from monailabel.endpoints import train as train_ep
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.tasks.batch_infer import BatchInferImageType
from monailabel.interfaces.utils.app import app_instance
from monailabel.utils.others.generic import get_basename, remove_file

from lib import ohif_pacs
from lib.ohif import PatchedBuild, PatchError
from lib.ohif import media_type as ohif_media_type
from lib.sessions import ArchiveLimits
from lib.validation import (
    MAX_ID_LENGTH, MAX_JSON_BYTES, check_client_json, check_id, check_tag, clean_paths, parse_json_object, quoted, volume_suffix,
)

logger = logging.getLogger(__name__)

MARK = "fewshot_app_route"  # set on our routes, so a reloaded app replaces them instead of stacking
ANNOTATOR = settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR
USER = settings.MONAI_LABEL_AUTH_ROLE_USER
ADMIN = settings.MONAI_LABEL_AUTH_ROLE_ADMIN
BATCH_DEFAULTS = inspect.signature(batch_ep.api_run).parameters["params"].default

router = APIRouter(prefix=settings.MONAI_LABEL_API_STR)


# Stock handlers name a temporary file tmpXXXXXXXX<suffixes of the upload's name>: what fits a file name
# (a DICOM UID of 64 characters with .nii.gz does).
MAX_SUFFIX_BYTES = 200
MAX_PATH_LENGTH = 4096  # a client's path (Linux's PATH_MAX)


def _check_file_name(upload: UploadFile, what: str) -> None:
    """Stock handlers log an upload's name and make a temporary file's suffix from all its
    suffixes (``a.b.c.nii.gz`` -> ``.b.c.nii.gz``): a name that would not fit a file name gave a 500."""
    # MONAI Label's client (3D Slicer's too) sends the file's whole local path as its name: only
    # the last part becomes a file here, the rest is bounded as any path is.
    name = upload.filename or ""
    if len(name) > MAX_PATH_LENGTH:
        raise HTTPException(400, f"{what}'s file name is {len(name)} characters long; at most {MAX_PATH_LENGTH} are accepted")
    base = os.path.basename(name)
    if len(base) > MAX_ID_LENGTH:
        raise HTTPException(400, f"{what}'s file name is {len(base)} characters long; at most {MAX_ID_LENGTH} are accepted")
    size = len(base.encode("utf-8", "surrogatepass"))
    if size > 255:
        raise HTTPException(400, f"{what}'s file name is {size} bytes long in UTF-8; a file name holds at most 255")
    suffixes = "".join(Path(name).suffixes).encode("utf-8", "surrogatepass")
    if len(suffixes) > MAX_SUFFIX_BYTES:
        raise HTTPException(400, f"{what}'s file name has {len(suffixes)} bytes of extensions; name it e.g. ID.nii.gz")


def _upload_id(image: Optional[str], file: UploadFile) -> None:
    """The id the stock handler will derive from the upload's name must be a plain id too."""
    _check_file_name(file, "the uploaded image")
    if image:
        check_id(image)
        return
    name = file.filename or ""
    derived = os.path.basename(name).replace("".join(Path(name).suffixes), "")
    if not derived:
        raise HTTPException(400, f"no image id: pass ?image=ID or upload a file named ID.nii.gz (got file name {name!r})")
    check_id(derived)


def _handing_over(background_tasks: BackgroundTasks, call: Callable, names: Optional[dict] = None, cleanups=(remove_file,)):
    """Runs a stock endpoint function. Stock upload endpoints copy the upload to a temporary file and
    schedule its removal as a background task, which never runs when the request fails: every
    refused upload would stay in the temporary folder. Run those removals (``cleanups``) on failure
    too. A 4xx message names what the client sent (``names``: server path -> name), never a
    temporary file."""
    try:
        return call()
    except BaseException as exc:
        for task in list(background_tasks.tasks):
            if any(task.func == cleanup for cleanup in cleanups):
                task.func(*task.args, **task.kwargs)
        if isinstance(exc, HTTPException) and isinstance(exc.detail, str):
            raise HTTPException(exc.status_code, clean_paths(exc.detail, names or {}), headers=exc.headers) from None
        raise


def _check_stored_info(existing: dict, update: dict, what: str) -> None:
    """The datastore merges info into what it keeps for an image or label: the whole stays bounded,
    not only each request."""
    merged = {k: v for k, v in {**existing, **update}.items() if k != "path"}  # path is derived, not stored
    size = len(json.dumps(merged, default=str))
    if size > MAX_JSON_BYTES:
        raise HTTPException(400, f"info: the info kept for {what} would grow to {size} bytes of JSON; at most {MAX_JSON_BYTES} are kept")


def _check_result_tag(request: dict) -> None:
    """MONAI Label saves an inference result under the client's ``label_tag`` after the inference:
    the datastore's rule for tags (no case variant of ``final``) is applied before any work."""
    if request.get("save_label"):
        check_tag(request.get("label_tag", DefaultLabelTag.ORIGINAL.value))


# ------------------------------------------------------------------ datastore


@router.put("/datastore/image", include_in_schema=False)
@router.put("/datastore/", include_in_schema=False)
def add_image(
    background_tasks: BackgroundTasks,
    image: Optional[str] = None,
    params: str = Form("{}"),
    file: UploadFile = File(...),
    user: User = Depends(RBAC(ANNOTATOR)),
):
    parse_json_object(params, "params")
    _upload_id(image, file)
    return _handing_over(background_tasks, lambda: datastore_ep.add_image(background_tasks, image, params, file, user.username))


@router.put("/datastore/label", include_in_schema=False)
def save_label(
    background_tasks: BackgroundTasks,
    image: str,
    params: str = Form("{}"),
    tag: str = DefaultLabelTag.FINAL.value,
    label: UploadFile = File(...),
    user: User = Depends(RBAC(ANNOTATOR)),
):
    # Checked here too: the stock handler logs them before the datastore sees them.
    check_id(image)
    check_tag(tag or DefaultLabelTag.FINAL.value)
    _check_file_name(label, "the uploaded label")
    parse_json_object(params, "params")
    return _handing_over(background_tasks, lambda: datastore_ep.save_label(background_tasks, image, params, tag, label, user.username))


@router.put("/datastore/image/info", include_in_schema=False)
def update_image_info(image: str, info: str = Form("{}"), user: User = Depends(RBAC(ANNOTATOR))):
    update = parse_json_object(info, "info")
    check_id(image)
    _check_stored_info(app_instance().datastore().get_image_info(image), update, f"image {image!r}")
    return datastore_ep.update_image_info(image, info, user.username)


def _update_label_info(label: str, tag: str, info: str, field: str, user: User):
    update = parse_json_object(info, field)
    check_id(label)
    check_tag(tag)
    _check_stored_info(app_instance().datastore().get_label_info(label, tag), update, f"the {tag!r} label of {label!r}")
    return datastore_ep.update_label_info(label, tag, info, user.username)


@router.put("/datastore/label/info", include_in_schema=False)
def update_label_info(label: str, tag: str, info: str = Form("{}"), user: User = Depends(RBAC(ANNOTATOR))):
    return _update_label_info(label, tag, info, "info", user)


@router.put("/datastore/updatelabelinfo", include_in_schema=False)
def update_label_info_deprecated(label: str, tag: str, params: str = Form("{}"), user: User = Depends(RBAC(ANNOTATOR))):
    return _update_label_info(label, tag, params, "params", user)


# ------------------------------------------------------------------ inference


@router.post("/infer/{model}", include_in_schema=False)
def run_inference(
    background_tasks: BackgroundTasks,
    model: str,
    image: str = "",
    session_id: str = "",
    params: str = Form("{}"),
    file: UploadFile = File(None),
    label: UploadFile = File(None),
    output: Optional[infer_ep.ResultType] = None,
    user: User = Depends(RBAC(USER)),
):
    app = app_instance()
    request = parse_json_object(params, "params")
    app.check_infer_request(model, request)
    _check_result_tag(request)
    if label:
        # The stock handler would convert a raw .bin label into a temporary file it never removes.
        raise HTTPException(400, f"{model} takes no label input (scribbles or clicks): send the image alone")
    if output == infer_ep.ResultType.dicom_seg:
        # Stock code fails on it after the inference (500): it needs dcmqi, and a DICOMweb datastore.
        raise HTTPException(400, "output=dicom_seg is not served: results are NIfTI or NRRD (params result_extension); "
                                 "final labels saved to a DICOMweb datastore are stored there as DICOM SEG")
    names = {}  # server paths in messages -> what the client calls them
    if file:
        # Stored where only this request's inference may read it (see FewshotApp.check_infer_image).
        image = _store_upload(file)
        try:
            # A decompression bomb is refused from its header, before the engine reads a voxel.
            app.check_upload(image, "the uploaded image")
        except BaseException:
            os.unlink(image)
            raise
        names[image] = "the uploaded image"
        app.register_upload(image)
        background_tasks.add_task(app.forget_upload, image)
        background_tasks.add_task(remove_file, image)
        file = None
    elif session_id:
        sessions = app.sessions()
        session = sessions.get_session(session_id) if sessions is not None else None
        if not session:
            raise HTTPException(404, f"unknown session {session_id!r}: create it with PUT /session/")
        names[session.image] = f"the image of session {session_id!r}"
        if os.path.isfile(session.image) and volume_suffix(session.image):  # a DICOM series is a folder
            app.check_upload(session.image, names[session.image])
    elif image:
        app.check_infer_image(image)
        names[image if os.path.isabs(image) else app.datastore().get_image_uri(image)] = f"image {quoted(image)}"
    else:
        raise HTTPException(400, "no image: pass ?image=ID or ?session_id=ID, or upload the image as 'file'")
    return _handing_over(
        background_tasks, lambda: infer_ep.run_inference(background_tasks, model, image, session_id, params, file, label, output),
        names, cleanups=(remove_file, app.forget_upload),
    )


def _store_upload(file: UploadFile) -> str:
    """An /infer upload in a temporary file of ours (removed here if the copy fails)."""
    _check_file_name(file, "the uploaded image")
    suffix = volume_suffix(file.filename or "")
    if suffix is None:
        raise HTTPException(415, f"uploaded image {file.filename!r}: send a 3D volume as .nii.gz, .nii or .nrrd")
    fd, path = tempfile.mkstemp(prefix="fewshot-upload-", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(file.file, out)
    except BaseException:
        os.unlink(path)
        raise
    return path


@router.post("/batch/infer/{model}", include_in_schema=False)
def batch_infer(
    model: str,
    images: Optional[BatchInferImageType] = BatchInferImageType.IMAGES_ALL,
    params: Optional[dict] = BATCH_DEFAULTS,
    run_sync: Optional[bool] = False,
    user: User = Depends(RBAC(ADMIN)),
):
    check_client_json(params or {}, "params")
    app_instance().check_infer_request(model, params or {})
    _check_result_tag(params or {})
    return batch_ep.run(model, images, params, run_sync)


@router.post("/train/{model}", include_in_schema=False)
def train(model: str, params: Optional[dict] = None, run_sync: Optional[bool] = False, enqueue: Optional[bool] = False,
          user: User = Depends(RBAC(ADMIN))):
    if model not in app_instance().info().get("trainers", {}):
        raise HTTPException(404, f"no training task {model!r}: this app learns from saved labels, without training")
    return train_ep.run_model(model, params, run_sync, enqueue)


@router.post("/scoring/{method}", include_in_schema=False)
def scoring(method: str, params: Optional[dict] = None, run_sync: Optional[bool] = False, user: User = Depends(RBAC(ANNOTATOR))):
    if method not in app_instance().info().get("scoring", {}):
        raise HTTPException(404, f"no scoring method {method!r} in this app")
    return scoring_ep.run_method(method, params, run_sync)


@router.post("/activelearning/{strategy}", include_in_schema=False)
def sample(strategy: str, params: Optional[dict] = None, user: User = Depends(RBAC(USER))):
    # The stock handler logs the request and stores params' client_id in the image's info.
    strategies = app_instance().info().get("strategies", {})
    if strategy not in strategies:
        raise HTTPException(404, f"no strategy {quoted(strategy)} in this app; it has {sorted(strategies)}")
    check_client_json(params or {}, "params")
    # The stock handler lets params' "strategy" override the one in the path (500 when unknown).
    other = (params or {}).get("strategy", strategy)
    if other != strategy:
        shown = quoted(other) if isinstance(other, str) else repr(other)[:60]
        raise HTTPException(400, f"params name strategy {shown}, the path {quoted(strategy)}: leave 'strategy' out of params")
    return activelearning_ep.sample(strategy, params, user.username)


# ------------------------------------------------------------------ inference progress


@router.get("/fewshot/progress/{key}", include_in_schema=False)
def inference_progress(key: str, user: User = Depends(RBAC(USER))):
    """How far the latest inference under ``key`` (its request_id, else its image id) is: see the app's README."""
    check_id(key, "request_id or image id")
    item = app_instance().progress.get(key)
    if item is None:
        raise HTTPException(404, f"no inference under {quoted(key)} since the server started: pass the request_id "
                                 "sent in the infer params, or the image id inferred")
    return item.as_dict()


@router.get("/fewshot/progress", include_in_schema=False)
def all_inference_progress(user: User = Depends(RBAC(USER))):
    return {"inferences": app_instance().progress.all()}


# ------------------------------------------------------------------ sessions


@router.put("/session/", include_in_schema=False)
def create_session(
    uncompress: bool = False,
    expiry: int = 0,
    files: List[UploadFile] = File(...),
    user: User = Depends(RBAC(USER)),
):
    """Stock create_session, with what it received removed whatever happens (stock removes it
    only after a session was made) and the app's archive limits."""
    for f in files:
        if f.filename:
            check_id(get_basename(f.filename), "uploaded file name")
    app = app_instance()
    sessions = app.sessions()
    if sessions is None:
        raise HTTPException(406, "Session Feature is Not Enabled")
    received = tempfile.mkdtemp(prefix="fewshot-session-upload-")
    try:
        paths = [_receive(f, received, i) for i, f in enumerate(files)]
        # One file is the session's image (or its archive); several are a DICOM series' folder.
        data = paths[0] if len(paths) == 1 else received
        session_id, session_info = sessions.add_session(data, expiry, uncompress, limits=_archive_limits(app.app_config))
    except HTTPException as exc:
        raise HTTPException(exc.status_code, clean_paths(str(exc.detail), {received: "the upload"}), headers=exc.headers) from None
    finally:
        shutil.rmtree(received, ignore_errors=True)  # add_session moved what it keeps into the session store
    logger.info("session %s created from %d file(s)%s", session_id, len(paths), ", unpacked" if uncompress else "")
    return {"session_id": session_id, "session_info": session_info.to_json()}


def _archive_limits(config) -> ArchiveLimits:
    return ArchiveLimits(max_bytes=config.session_max_unpacked_mb << 20, max_files=config.session_max_files)


def _receive(upload: UploadFile, folder: str, index: int) -> str:
    path = os.path.join(folder, get_basename(upload.filename) if upload.filename else f"upload-{index}")
    with open(path, "wb") as out:
        shutil.copyfileobj(upload.file, out)
    return path


# ------------------------------------------------------------------ request bodies


class _BodyTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware around the whole server: a request body over its cap gets 413 before it is
    read when it says its length (Content-Length), or as soon as it passes the cap (chunked), so an
    upload can neither fill the temporary folder nor hold memory. Caps (``limits``, bytes):
    ``session`` for PUT /session/, ``upload`` for other multipart bodies, ``json`` for the rest."""

    def __init__(self, app, limits: dict[str, int]):
        self.app = app
        self.limits = dict(limits)

    def limit_for(self, scope) -> tuple[int, str]:
        path = scope.get("path", "")
        headers = dict(scope.get("headers") or [])
        if path.rstrip("/").endswith("/session"):
            return self.limits["session"], "-c session_max_unpacked_mb"
        if headers.get(b"content-type", b"").lower().startswith(b"multipart/"):
            return self.limits["upload"], "-c max_volume_mb"
        return self.limits["json"], "a request without an upload"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit, knob = self.limit_for(scope)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.strip().isdigit() and int(length) > limit:
            logger.warning("%s %s refused: a %d-byte body, over the %d-byte cap", scope.get("method"), scope.get("path"), int(length), limit)
            return await _too_large(send, limit, knob)
        state = {"received": 0, "over": False, "started": False}

        async def counted_receive():
            message = await receive()
            if message.get("type") == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > limit:
                    state["over"] = True
                    raise _BodyTooLarge()
            return message

        async def guarded_send(message):
            if state["over"]:
                return  # the app's answer to the aborted body (a 500); ours goes instead
            state["started"] = True
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except _BodyTooLarge:
            pass
        except Exception:
            if not state["over"]:
                raise
        if state["over"] and not state["started"]:
            logger.warning("%s %s refused: its body passed the %d-byte cap", scope.get("method"), scope.get("path"), limit)
            await _too_large(send, limit, knob)


async def _too_large(send, limit: int, knob: str) -> None:
    body = json.dumps({"detail": f"the request body is larger than this server accepts ({limit >> 20} MB; {knob}); "
                                 "nothing was stored"}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


# ------------------------------------------------------------------ OHIF


@router.get("/ohif/{path:path}", include_in_schema=False)
def ohif_file(path: str, user: User = Depends(RBAC(USER))):
    """MONAI Label's OHIF build with this app's patches (``lib/ohif.py``): brush, eraser and Save in
    the MONAI Label panel. Patched files come from memory, the rest from the wheel's build."""
    try:
        patched = OHIF_BUILD.files()
    except PatchError as exc:
        logger.error("%s", exc)
        raise HTTPException(500, str(exc)) from None
    rel, target = OHIF_BUILD.resolve(path)
    if rel in patched:  # same name as the stock chunk: revalidate, never reuse a cached stock copy
        return Response(patched[rel], media_type=ohif_media_type(target),
                        headers={"Cache-Control": "no-cache", "ETag": f'"{OHIF_BUILD.etag(rel)}"'})
    return FileResponse(target, media_type=ohif_media_type(target))


OHIF_BUILD = PatchedBuild()


@router.get("/proxy/dicom/{op}/{path:path}", include_in_schema=False)
@router.post("/proxy/dicom/{op}/{path:path}", include_in_schema=False)
async def dicom_proxy(request: Request, op: str, path: str, user: User = Depends(RBAC(USER))):
    """OHIF's DICOMweb requests: to the datastore's PACS (MONAI Label's proxy), or with a folder
    datastore to ``-c ohif_dicomweb`` (``lib/ohif_pacs.py``)."""
    if op not in ohif_pacs.OPS:  # MONAI Label's /proxy/dicom/{path}: no prefix of its own
        op, path = "", f"{op}/{path}"
    app = app_instance()
    if app.dicomweb_client is not None:
        return await proxy_ep.proxy_dicom(request, op, path)
    base = app.app_config.ohif_dicomweb
    if not base:
        raise ohif_pacs.no_pacs(op or path)
    body = await request.body() if request.method == "POST" else None
    return await run_in_threadpool(ohif_pacs.forward, base, request.method, path, request.url.query, dict(request.headers), body)


def install(fastapi_app, limits: dict[str, int] | None = None) -> None:
    """Put these routes in front of MONAI Label's (replacing ours from an earlier app instance), and
    the body caps around the whole server (the server has started: its middleware stack is built)."""
    ours = list(router.routes)
    for route in ours:
        setattr(route, MARK, True)
    routes = fastapi_app.router.routes
    routes[:] = ours + [r for r in routes if not getattr(r, MARK, False)]
    logger.info("app routes in front of MONAI Label's: %s", ", ".join(sorted({f"{m} {r.path}" for r in ours for m in r.methods})))
    if limits:
        stack = fastapi_app.middleware_stack or fastapi_app.build_middleware_stack()
        if isinstance(stack, BodyLimit):
            stack.limits = dict(limits)  # POST /reload: new caps, one wrapper
        else:
            fastapi_app.middleware_stack = BodyLimit(stack, limits)
        logger.info("request bodies capped at %s", ", ".join(f"{k} {v >> 20} MB" if v >= 1 << 20 else f"{k} {v} bytes"
                                                              for k, v in limits.items()))
