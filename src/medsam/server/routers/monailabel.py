"""``/monailabel``: the part of MONAI Label's REST API that 3D Slicer's MONAILabel module, OHIF's
plugin and MONAI Label's Python client use, over the workbench's own datastore and labels.

Point a client at ``http://HOST:PORT/monailabel``. Covered: ``/info/``; ``/datastore/`` (listing,
image upload and download, label save and download, their info); ``/infer/{model}`` for two
interactive models, ``medsam`` (one slice, from a region of interest and/or clicks) and
``medsam_3d`` (the object through the volume); ``/activelearning/{strategy}``; ``/train/``;
``/session/`` (an image from the client's disk, for inference only); ``/auth/`` (the server's
bearer token doubles as the password). Not covered: infer on a file or label sent with the
request, scribbles, batch infer, scoring, WSI, DICOMweb datastores, deleting.

One datastore: an image id is the workbench's (its path in the data folder; the suffix may be
left off where one image matches, as MONAI Label names images). A label saved here
is the workbench's label of that image, saved as its next version with a history entry (tag,
client id); the one current label is offered under both tags ``final`` and ``original`` (Slicer
loads ``original`` when it opens an image). Coordinates: see
:mod:`medsam.server.monailabel_protocol`.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio.to_thread
from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from starlette.background import BackgroundTask
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect

from ...io.formats import image_suffix
from ..datastore import UPLOAD_SUFFIXES, UploadRefused
from ..labels import default_definitions
from ..monailabel_protocol import ParamsRefused, label_names, multipart_body
from ..schemas import TrainRequest
from ..security import UnsafePathError, token_matches
from ..state import Workbench, WorkbenchDep
from ..training_job import TrainingRefused

router = APIRouter(prefix="/monailabel", tags=["monailabel"])

MODEL_2D = "medsam"
MODEL_3D = "medsam_3d"
TAGS = ("final", "original")
STRATEGIES = {
    "uncertainty": "the unlabelled image the served model is least sure of (scores from POST /next/score), "
    "then the unscored ones in id order",
    "first": "the first unlabelled image in id order",
    "random": "a random unlabelled image",
}
LABEL_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha", ".png")
_CHUNK = 1 << 20


# ---------------------------------------------------------------------------- request bodies
async def _read_form(request: Request, file_fields: tuple[str, ...]) -> tuple[dict, dict[str, UploadFile]]:
    """``(params, files)`` of a multipart form (``params`` a JSON object in a form field) or of a
    JSON body; 400/422 for anything else."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    files: dict[str, UploadFile] = {}
    try:
        if ctype == "multipart/form-data":
            form = await request.form(max_files=len(file_fields), max_fields=16)
            raw: Any = form.get("params") or "{}"
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    if key not in file_fields:
                        raise HTTPException(422, f"unexpected file field {key!r}")
                    files[key] = value
            if not isinstance(raw, str):
                raise HTTPException(422, "params must be a form field holding a JSON object")
        elif ctype in ("application/json", "text/plain", ""):
            raw = (await request.body()).decode("utf-8", "replace") or "{}"
        else:
            raise HTTPException(415, "send a multipart form or a JSON body")
    except ClientDisconnect:
        raise HTTPException(400, "request interrupted") from None
    try:
        params = json.loads(raw)
    except ValueError:
        raise HTTPException(422, "params is not valid JSON") from None
    if not isinstance(params, dict):
        raise HTTPException(422, "params must be a JSON object")
    return params, files


async def _chunks(upload: UploadFile):
    while chunk := await upload.read(_CHUNK):
        yield chunk


def _file_name(upload: UploadFile) -> str:
    return (upload.filename or "").replace("\\", "/").rsplit("/", 1)[-1]


# ---------------------------------------------------------------------------- info
def train_stats(jobs: list[Any]) -> dict:
    """``{trainer: {"best_metric": mean DSC on the held-out labels, ...}}`` of the latest
    training job that scored its model (what Slicer's accuracy bar shows); ``{}`` before any."""
    scored = [j for j in jobs if isinstance(j.after, dict) and "dsc" in j.after]
    if not scored:
        return {}
    last = scored[-1]
    return {MODEL_2D: {"best_metric": float(last.after["dsc"]), "id": last.id, "finished": last.finished}}


@router.get("/info/", summary="The app: models, trainers, strategies, labels, datastore counts")
def info(wb: WorkbenchDep) -> dict:
    from ... import __version__

    served = wb.engine.model_info()
    names = list(label_names(default_definitions()))
    prompts = {"roi": "[i0, i1, j0, j1, k0, k1]", "foreground": "[[i, j, k], ...]", "background": "[[i, j, k], ...]"}
    models = {
        MODEL_2D: {
            "type": "deepgrow",
            "dimension": 2,
            "labels": names,
            "prompts": dict(prompts, slice="k"),
            "description": f"{served['name']}: the object on one slice, from a region of interest "
            "and/or clicks on that slice",
            "config": {},
        },
        MODEL_3D: {
            "type": "deepgrow",
            "dimension": 3,
            "labels": names,
            "prompts": prompts,
            "description": f"{served['name']}: the object through the volume, within a region of interest "
            "(key slice = its middle), or from foreground clicks on one slice",
            "config": {},
        },
    }
    defaults = TrainRequest()
    return {
        "name": "MedSAM workbench",
        "description": "MedSAM through MONAI Label's API: one datastore with the workbench's labels",
        "version": __version__,
        "labels": names,
        "models": models,
        "trainers": {
            MODEL_2D: {
                "description": "fine-tune the served model on the saved labels (a child process)",
                "config": {"mode": ["decoder", "lora"], "steps": defaults.steps, "lr": defaults.lr},
            }
        },
        "strategies": {k: {"description": v} for k, v in STRATEGIES.items()},
        "scoring": {},
        "train_stats": train_stats(wb.training.all()),
        "datastore": _datastore_stats(wb),
    }


# ---------------------------------------------------------------------------- datastore
def _image_ext(wb: Workbench, image_id: str) -> str:
    path = wb.datastore.path_of(image_id)
    if path.is_dir():
        return ".nii.gz"  # a DICOM series is handed out as one NIfTI file
    return (image_suffix(path) or path.suffix).lower()


def _label_entry(rec: dict) -> dict:
    return {
        "ext": ".png" if rec.get("label_format") == "png" else ".nii.gz",
        "info": {
            "version": int(rec.get("version", 0)),
            "ts": rec.get("updated"),
            "params": {"label_names": label_names(rec.get("labels") or default_definitions())},
        },
    }


def _datastore_stats(wb: Workbench) -> dict:
    ids = wb.datastore.list_ids()
    done = sum(wb.labels.status(i)[0] == "labelled" for i in ids)
    return {"total": len(ids), "completed": done, "label_tags": dict.fromkeys(TAGS, done) if done else {}}


@router.get("/datastore/", summary="The datastore: stats (default), all objects, or the training list")
def datastore(wb: WorkbenchDep, output: str = "stats") -> Any:
    if output == "stats":
        return _datastore_stats(wb)
    if output not in ("all", "train"):
        raise HTTPException(422, "output must be stats, all or train")
    objects: dict[str, dict] = {}
    train = []
    for image_id in wb.datastore.list_ids():
        try:
            rec = wb.labels.record(image_id)
        except RuntimeError:
            rec = {"version": 0}
        labels = {}
        if int(rec.get("version", 0)) > 0:
            entry = _label_entry(rec)
            labels = dict.fromkeys(TAGS, entry)
            train.append({"image": image_id, "label": image_id})
        ext = _image_ext(wb, image_id)
        objects[image_id] = {"image": {"ext": ext, "info": {"name": _download_name(image_id, ext)}}, "labels": labels}
    if output == "train":
        return train
    return {
        "name": wb.settings.data_dir.name,
        "description": "the workbench's data folder",
        "images_dir": "",
        "labels_dir": ".medsam/labels",
        "objects": objects,
    }


def _download_name(image_id: str, ext: str) -> str:
    name = image_id.rsplit("/", 1)[-1]
    return name if name.lower().endswith(ext) else name + ext


def resolve_id(wb: Workbench, image_id: str) -> str:
    """The datastore id a client means: ``image_id`` itself, or, as MONAI Label names images
    without their suffix, the one image ``image_id`` + a suffix (``case7`` -> ``case7.nii.gz``);
    400 for unsafe ids, 404 for unknown or ambiguous ones."""
    try:
        wb.datastore.path_of(image_id)
        return image_id
    except UnsafePathError as exc:
        raise HTTPException(400, f"refused image id: {exc}") from None
    except LookupError:
        pass
    matches = []
    for suffix in sorted(set(UPLOAD_SUFFIXES) | {".nhdr", ".mhd"}):
        try:
            wb.datastore.path_of(image_id + suffix)
            matches.append(image_id + suffix)
        except (UnsafePathError, LookupError):
            continue
    if len(matches) != 1:
        raise HTTPException(404, f"no image {image_id!r}" + (f" (several: {', '.join(matches)})" if matches else ""))
    return matches[0]


def _checked(wb: Workbench, image_id: str) -> Path:
    return wb.datastore.path_of(resolve_id(wb, image_id))


@router.put("/datastore/", summary="Upload an image (multipart: file, params)")
@router.put("/datastore/image", summary="Upload an image (multipart: file, params)")
async def upload_image(request: Request, wb: WorkbenchDep, image: str | None = None) -> dict:
    _, files = await _read_form(request, ("file",))
    upload = files.get("file")
    if upload is None:
        raise HTTPException(422, "send the image as the form's 'file' part")
    sent = _file_name(upload)
    suffix = image_suffix(sent) or ""
    name = sent
    if image:
        name = image if image.lower().endswith(UPLOAD_SUFFIXES) else image + suffix
    try:
        image_id = await wb.datastore.add_upload(name, _chunks(upload), upload.size)
    except UnsafePathError as exc:
        raise HTTPException(400, f"refused file name: {exc}") from None
    except UploadRefused as exc:
        raise HTTPException(exc.status, str(exc)) from None
    return {"image": image_id}


@router.head("/datastore/image", summary="Whether an image exists")
def check_image(image: str, wb: WorkbenchDep) -> Response:
    _checked(wb, image)
    return Response(status_code=200)


@router.get("/datastore/image", summary="Download an image (a DICOM series as one NIfTI file)")
def download_image(image: str, wb: WorkbenchDep) -> Response:
    image = resolve_id(wb, image)
    path = _checked(wb, image)
    if path.is_file():
        return FileResponse(path, filename=path.name, media_type="application/octet-stream")
    from ...io import write_volume

    loaded = wb.load(image)
    if loaded.image.is_color:
        raise HTTPException(422, "colour series are not handed out as volumes")
    tmpdir = Path(tempfile.mkdtemp(prefix="ml-image."))
    out = write_volume(loaded.image, tmpdir / "image.nii.gz")
    return FileResponse(
        out,
        filename=_download_name(image, ".nii.gz"),
        media_type="application/octet-stream",
        background=BackgroundTask(shutil.rmtree, tmpdir, True),
    )


@router.get("/datastore/image/info", summary="An image's shape, geometry and label state")
def image_info(image: str, wb: WorkbenchDep) -> dict:
    image = resolve_id(wb, image)
    loaded = wb.load(image)
    img = loaded.image
    status, version = wb.labels.status(image)
    return {
        "name": _download_name(image, _image_ext(wb, image)),
        "shape_xyz": list(reversed(img.spatial_shape)),
        "spacing": list(img.spacing),
        "origin": list(img.origin),
        "modality": img.modality,
        "status": status,
        "label_version": version,
    }


def _label_file(wb: Workbench, label: str, tag: str) -> Path:
    label = resolve_id(wb, label)
    if tag not in TAGS:
        raise HTTPException(404, f"no label tagged {tag!r}; tags: {', '.join(TAGS)}")
    try:
        path = wb.labels.label_file(label)
    except RuntimeError as exc:
        raise HTTPException(500, str(exc)) from None
    if path is None or not path.is_file():
        raise HTTPException(404, f"image {label!r} has no label yet")
    return path


@router.head("/datastore/label", summary="Whether an image has a label")
def check_label(wb: WorkbenchDep, image: str, tag: str = "final") -> Response:
    _label_file(wb, image, tag)
    return Response(status_code=200)


@router.get("/datastore/label", summary="Download an image's label (the workbench's current version)")
def download_label(wb: WorkbenchDep, label: str, tag: str = "final") -> FileResponse:
    path = _label_file(wb, label, tag)
    ext = ".png" if path.name.endswith(".png") else ".nii.gz"
    stem = label.rsplit("/", 1)[-1].split(".", 1)[0] or "image"
    return FileResponse(path, filename=f"{stem}_label{ext}", media_type="application/octet-stream")


@router.get("/datastore/label/info", summary="A label's version, names and provenance")
def label_info(wb: WorkbenchDep, label: str, tag: str = "final") -> dict:
    _label_file(wb, label, tag)
    label = resolve_id(wb, label)
    rec = wb.labels.record(label)
    entry = _label_entry(rec)["info"]
    return dict(entry, labels=rec.get("labels"), model=rec.get("model"), history_length=len(rec.get("history", [])))


@router.put("/datastore/label", summary="Save a label (multipart: label, params) as the image's next version")
async def save_label(request: Request, wb: WorkbenchDep, image: str, tag: str = "final") -> dict:
    from ..monailabel_tasks import stage_upload, store_label

    if not tag or len(tag) > 64 or not tag.replace("_", "").replace("-", "").isalnum():
        raise HTTPException(422, "tag must be a short name of letters, digits, '-' and '_'")
    image = resolve_id(wb, image)
    params, files = await _read_form(request, ("label",))
    upload = files.get("label")
    if upload is None:
        raise HTTPException(422, "send the label file as the form's 'label' part")
    name = _file_name(upload).lower()
    suffix = next((s for s in LABEL_SUFFIXES if name.endswith(s)), None)
    if suffix is None:
        raise HTTPException(415, f"label files: {', '.join(LABEL_SUFFIXES)}")
    staged = await stage_upload(wb, upload, suffix)
    try:
        rec = await anyio.to_thread.run_sync(store_label, wb, image, staged, params, tag)
    finally:
        shutil.rmtree(staged.parent, ignore_errors=True)
    return {"image": image, "label": image, "tag": tag, "version": rec.version}


# ---------------------------------------------------------------------------- infer
@router.post("/infer/{model}", summary="Segment with a click or a region of interest; answers the label file")
async def infer(
    model: str, request: Request, wb: WorkbenchDep, image: str = "", session_id: str = "", output: str | None = None
) -> Response:
    from ..monailabel_tasks import run_infer

    if model not in (MODEL_2D, MODEL_3D):
        raise HTTPException(404, f"no model {model!r}; models: {MODEL_2D}, {MODEL_3D}")
    if not image and not session_id:
        raise HTTPException(422, "name the image (?image=ID) or a session (?session_id=...)")
    if output not in (None, "all", "image", "json"):
        raise HTTPException(422, "output must be all, image or json")
    params, files = await _read_form(request, ("file", "label"))
    if files:
        raise HTTPException(422, "infer on an uploaded file or label is not supported: open a session (PUT /session/)")
    t0 = time.perf_counter()
    if session_id:
        found = wb.sessions.get(session_id)
        if found is None:
            raise HTTPException(404, "no such session (it may have expired)")
        loaded = await anyio.to_thread.run_sync(_load_session_image, wb, session_id, found[1])
    else:
        loaded = await anyio.to_thread.run_sync(wb.load, resolve_id(wb, image))
    if loaded.image.is_color and loaded.image.is_volume:
        raise HTTPException(422, "colour volumes are not supported")
    try:
        labels, answer, suffix = await anyio.to_thread.run_sync(run_infer, wb, loaded, model, params)
    except ParamsRefused as exc:
        raise HTTPException(422, str(exc)) from None
    answer["elapsed_ms"] = round((time.perf_counter() - t0) * 1e3, 1)
    if output == "json":
        return JSONResponse(answer)
    from ...io import write_mask

    with tempfile.TemporaryDirectory(prefix="ml-infer.") as tmp:
        data = write_mask(labels, loaded.image, Path(tmp) / f"result{suffix}").read_bytes()
    filename = f"{model}{suffix}"
    if output == "image":
        return Response(
            data,
            media_type="application/octet-stream",
            headers={"Content-Disposition": f'attachment; filename="{filename}"'},
        )
    content_type, body = multipart_body(answer, filename, data)
    return Response(body, media_type=content_type)


def _load_session_image(wb: Workbench, session_id: str, path: Path) -> Any:
    try:
        return wb.datastore.load_file(path, f"session:{session_id}")
    except ValueError as exc:
        raise HTTPException(422, f"cannot read the session's image: {str(exc).splitlines()[0]}") from None


# ---------------------------------------------------------------------------- sessions
@router.put("/session/", summary="Open a session: one image for inference, kept out of the datastore")
async def create_session(request: Request, wb: WorkbenchDep, expiry: int = 0, uncompress: bool = False) -> dict:
    if uncompress:
        raise HTTPException(422, "compressed archives are not taken: send one image file")
    _, files = await _read_form(request, ("files",))
    upload = files.get("files")
    if upload is None:
        raise HTTPException(422, "send the image as the form's 'files' part")
    try:
        info = await wb.sessions.create(_file_name(upload), _chunks(upload), upload.size, expiry)
    except UnsafePathError as exc:
        raise HTTPException(400, f"refused file name: {exc}") from None
    except UploadRefused as exc:
        raise HTTPException(exc.status, str(exc)) from None
    return {"session_id": info["session_id"], "session_info": info}


@router.get("/session/{session_id}", summary="A session's info (?image=true: its image)")
def get_session(session_id: str, wb: WorkbenchDep, image: bool = False) -> Any:
    found = wb.sessions.get(session_id)
    if found is None:
        raise HTTPException(404, "no such session (it may have expired)")
    info, path = found
    if image:
        return FileResponse(path, filename=path.name, media_type="application/octet-stream")
    return info


@router.delete("/session/{session_id}", summary="Close a session")
def remove_session(session_id: str, wb: WorkbenchDep) -> dict:
    info = wb.sessions.remove(session_id)
    if info is None:
        raise HTTPException(404, "no such session")
    return info


# ---------------------------------------------------------------------------- active learning
@router.post("/activelearning/{strategy}", summary="The next image to label")
async def next_sample(strategy: str, request: Request, wb: WorkbenchDep) -> dict:
    from ..active_learning import rank_images

    if strategy not in STRATEGIES:
        raise HTTPException(404, f"no strategy {strategy!r}; strategies: {', '.join(STRATEGIES)}")
    await _read_form(request, ())
    ids = [i for i in wb.datastore.list_ids() if wb.labels.status(i)[0] == "unlabelled"]
    if not ids:
        return {}
    if strategy == "first":
        chosen = ids[0]
    elif strategy == "random":
        chosen = random.choice(ids)
    else:
        scores = wb.uncertainty.scores(wb.engine.fingerprint())
        chosen = rank_images(ids, dict.fromkeys(ids, "unlabelled"), scores)[0]["image_id"]
    ext = _image_ext(wb, chosen)
    return {"id": chosen, "name": _download_name(chosen, ext), "strategy": strategy}


# ---------------------------------------------------------------------------- training
def _train_status(job) -> dict:
    info = job.info(tail=20)
    status = {"queued": "RUNNING", "running": "RUNNING", "done": "DONE", "failed": "ERROR", "cancelled": "STOPPED"}
    return dict(info, status=status.get(job.state, job.state.upper()))


@router.post("/train/", summary="Start fine-tuning on the saved labels (see POST /train)")
@router.post("/train/{model}", summary="Start fine-tuning on the saved labels (see POST /train)")
async def train_start(request: Request, wb: WorkbenchDep, model: str = MODEL_2D) -> dict:
    if model != MODEL_2D:
        raise HTTPException(404, f"no trainer {model!r}; trainers: {MODEL_2D}")
    params, _ = await _read_form(request, ())
    mode = params.get("mode", "decoder")
    if isinstance(mode, list):  # Slicer sends a choice list with the chosen value first
        mode = mode[0] if mode else "decoder"
    fields = {"mode": mode}
    for key in ("steps", "lr"):
        if key in params:
            fields[key] = params[key]
    try:
        body = TrainRequest(**fields)
    except ValueError as exc:
        raise HTTPException(422, f"bad training parameters: {str(exc).splitlines()[0]}") from None
    try:
        job = wb.training.start(body.mode, body.steps, body.lr)
    except TrainingRefused as exc:
        raise HTTPException(exc.status, str(exc)) from None
    return _train_status(job)


@router.get("/train/", summary="The latest training job; ?check_if_running=true answers 200 or 404")
def train_status(wb: WorkbenchDep, check_if_running: bool = False) -> dict:
    active = wb.training.active_job()
    if check_if_running:
        if active is None:
            raise HTTPException(404, "no training job is running")
        return {"status": "RUNNING"}
    jobs = wb.training.all()
    return _train_status(jobs[-1]) if jobs else {}


@router.delete("/train/", summary="Stop the running training job (the served model stays)")
def train_stop(wb: WorkbenchDep) -> dict:
    active = wb.training.active_job()
    if active is None:
        return {}
    job = wb.training.cancel(active.id)
    return _train_status(job) if job else {}


# ---------------------------------------------------------------------------- auth
@router.get("/auth/", summary="Whether a token is needed (public)")
def auth_enabled(wb: WorkbenchDep) -> dict:
    return {"enabled": wb.settings.token is not None}


@router.post("/auth/token", summary="Trade the server's token, sent as the password, for a bearer token (public)")
async def auth_token(request: Request, wb: WorkbenchDep) -> dict:
    if wb.settings.token is None:
        raise HTTPException(404, "this server needs no token")
    try:
        form = await request.form(max_files=0, max_fields=8)
    except ClientDisconnect:
        raise HTTPException(400, "request interrupted") from None
    password = form.get("password")
    if not isinstance(password, str) or not token_matches(f"Bearer {password}", wb.settings.token):
        raise HTTPException(401, "wrong password: give the server's token")
    return {"access_token": wb.settings.token, "token_type": "bearer"}


@router.get("/auth/token/valid", summary="200 when the bearer token is right")
def auth_valid() -> dict:
    return {}
