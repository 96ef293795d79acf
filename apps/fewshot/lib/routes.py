"""Checks in front of MONAI Label's own REST endpoints, for what its stock handlers get wrong.

Stock 0.8.5 parses ``params``/``info`` form fields inside its handlers: malformed JSON or a JSON
value that is not an object gives a 500 (and for ``PUT /datastore/label`` only after the file is
written). Its ``/infer`` handler is ``async`` but runs the whole inference synchronously, so one
long inference freezes ``/info`` and label saves for every client. ``/batch/infer``, ``/train`` and
``/scoring`` start a second process with a second copy of the app for any name they are given.

These routes are inserted in front of the stock ones (Starlette matches routes in order) with the
same paths, parameters and permissions. Each validates what the client sent, answering 4xx with a
message, then hands over to MONAI Label's own endpoint function. They are plain ``def`` routes, so
FastAPI runs them in its thread pool: the event loop stays free while an inference runs.
"""
from __future__ import annotations

import inspect
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import List, Optional

from fastapi import APIRouter, BackgroundTasks, Depends, File, Form, HTTPException, UploadFile
from monailabel.config import settings
from monailabel.endpoints import batch_infer as batch_ep
from monailabel.endpoints import datastore as datastore_ep
from monailabel.endpoints import infer as infer_ep
from monailabel.endpoints import scoring as scoring_ep
from monailabel.endpoints import session as session_ep
from monailabel.endpoints import train as train_ep
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.tasks.batch_infer import BatchInferImageType
from monailabel.interfaces.utils.app import app_instance
from monailabel.utils.others.generic import get_basename, remove_file

from lib.validation import check_id, parse_json_object, volume_suffix

logger = logging.getLogger(__name__)

MARK = "fewshot_app_route"  # set on our routes, so a reloaded app replaces them instead of stacking
ANNOTATOR = settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR
USER = settings.MONAI_LABEL_AUTH_ROLE_USER
ADMIN = settings.MONAI_LABEL_AUTH_ROLE_ADMIN
BATCH_DEFAULTS = inspect.signature(batch_ep.api_run).parameters["params"].default

router = APIRouter(prefix=settings.MONAI_LABEL_API_STR)


def _upload_id(image: Optional[str], file: UploadFile) -> None:
    """The id the stock handler will derive from the upload's name must be a plain id too."""
    if image:
        check_id(image)
        return
    name = file.filename or ""
    derived = os.path.basename(name).replace("".join(Path(name).suffixes), "")
    if not derived:
        raise HTTPException(400, f"no image id: pass ?image=ID or upload a file named ID.nii.gz (got file name {name!r})")
    check_id(derived)


# ------------------------------------------------------------------ datastore


def _removing_upload_on_failure(background_tasks: BackgroundTasks, call):
    """Stock upload endpoints copy the upload to a temporary file and schedule its removal as a
    background task, which never runs when the request fails: every refused upload would stay in
    the temporary folder. Run those removals on failure too."""
    try:
        return call()
    except BaseException:
        for task in background_tasks.tasks:
            if task.func is remove_file:
                task.func(*task.args, **task.kwargs)
        raise


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
    return _removing_upload_on_failure(
        background_tasks, lambda: datastore_ep.add_image(background_tasks, image, params, file, user.username)
    )


@router.put("/datastore/label", include_in_schema=False)
def save_label(
    background_tasks: BackgroundTasks,
    image: str,
    params: str = Form("{}"),
    tag: str = DefaultLabelTag.FINAL.value,
    label: UploadFile = File(...),
    user: User = Depends(RBAC(ANNOTATOR)),
):
    parse_json_object(params, "params")
    return _removing_upload_on_failure(
        background_tasks, lambda: datastore_ep.save_label(background_tasks, image, params, tag, label, user.username)
    )


@router.put("/datastore/image/info", include_in_schema=False)
def update_image_info(image: str, info: str = Form("{}"), user: User = Depends(RBAC(ANNOTATOR))):
    parse_json_object(info, "info")
    return datastore_ep.update_image_info(image, info, user.username)


@router.put("/datastore/label/info", include_in_schema=False)
def update_label_info(label: str, tag: str, info: str = Form("{}"), user: User = Depends(RBAC(ANNOTATOR))):
    parse_json_object(info, "info")
    return datastore_ep.update_label_info(label, tag, info, user.username)


@router.put("/datastore/updatelabelinfo", include_in_schema=False)
def update_label_info_deprecated(label: str, tag: str, params: str = Form("{}"), user: User = Depends(RBAC(ANNOTATOR))):
    parse_json_object(params, "params")
    return datastore_ep.update_label_info(label, tag, params, user.username)


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
    if file:
        # Stored where only this request's inference may read it (see FewshotApp.check_infer_image).
        suffix = volume_suffix(file.filename or "")
        if suffix is None:
            raise HTTPException(415, f"uploaded image {file.filename!r}: send a 3D volume as .nii.gz, .nii or .nrrd")
        fd, image = tempfile.mkstemp(prefix="fewshot-upload-", suffix=suffix)
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(file.file, out)
        app.register_upload(image)
        background_tasks.add_task(app.forget_upload, image)
        background_tasks.add_task(remove_file, image)
        file = None
    elif session_id:
        sessions = app.sessions()
        if sessions is None or not sessions.get_session(session_id):
            raise HTTPException(404, f"unknown session {session_id!r}: create it with PUT /session/")
    elif image:
        app.check_infer_image(image)
    return infer_ep.run_inference(background_tasks, model, image, session_id, params, file, label, output)


@router.post("/batch/infer/{model}", include_in_schema=False)
def batch_infer(
    model: str,
    images: Optional[BatchInferImageType] = BatchInferImageType.IMAGES_ALL,
    params: Optional[dict] = BATCH_DEFAULTS,
    run_sync: Optional[bool] = False,
    user: User = Depends(RBAC(ADMIN)),
):
    app_instance().check_infer_request(model, params or {})
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


# ------------------------------------------------------------------ sessions


@router.put("/session/", include_in_schema=False)
def create_session(
    background_tasks: BackgroundTasks,
    uncompress: bool = False,
    expiry: int = 0,
    files: List[UploadFile] = File(...),
    user: User = Depends(RBAC(USER)),
):
    for f in files:
        if f.filename:
            check_id(get_basename(f.filename), "uploaded file name")
    return session_ep.create_session(background_tasks, uncompress, expiry, files)


def install(fastapi_app) -> None:
    """Put these routes in front of MONAI Label's (replacing ours from an earlier app instance)."""
    ours = list(router.routes)
    for route in ours:
        setattr(route, MARK, True)
    routes = fastapi_app.router.routes
    routes[:] = ours + [r for r in routes if not getattr(r, MARK, False)]
    logger.info("app routes in front of MONAI Label's: %s", ", ".join(sorted({f"{m} {r.path}" for r in ours for m in r.methods})))
