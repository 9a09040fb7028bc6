"""The image encoder as a service of its own, shared by the workbenches of many annotators.

    medsam serve-encoder --checkpoint medsam_vit_b.pth --host 0.0.0.0 --port 8100 --token ...   # on a GPU machine
    medsam serve --data DIR --checkpoint medsam_vit_b.pth --encoder-url http://gpu01:8100 ...   # each workbench

The encoder is nearly all of the cost of a prompt on a new slice (ViT-B: seconds on a CPU), the
decoder a few milliseconds; one encoder on a GPU can serve the workbenches of a team, which keep
the decoder, the labels and the caches. The workbench sends the slice it would embed (its model
input, uint8) and puts the returned embedding where its own encoder's would go; it caches it as
its own, keyed by the encoder's fingerprint.

API (``create_encoder_app``):

* ``GET /encoder``: ``{"embedding_id", "contract", "input_size", "name"}``; ``embedding_id``
  (:func:`medsam.embedding_cache.embedding_id`) names the encoder's weights and precision: a
  workbench whose own model has another refuses to use the service (one error, 502), so masks
  never mix two encoders;
* ``POST /encode``: body a safetensors file with one tensor ``image``, uint8 ``(H, W)`` or
  ``(H, W, 3)``; answer a safetensors file with ``embedding`` ``(1, C, E, E)`` float32, and the
  ``embedding_id`` in the header ``X-Medsam-Embedding-Id``. 413 for more than ``max_pixels``
  pixels or a larger body, 422 for anything else that is not such an image; the service stays up.

Both ends speak safetensors (no pickle), and a token is checked as by the workbench. Requests run
one at a time on the model (run ``--workers N`` processes for more). SAM2-family models, whose
decoder also needs the encoder's high-resolution features, are not served this way.
"""

# No ``from __future__ import annotations``: FastAPI reads the routes' annotations, and ``Request``
# is imported inside create_encoder_app (no web framework is imported with this module).
import hmac
import threading
from typing import Any

import numpy as np

__all__ = ["EncoderServiceError", "RemoteEncoder", "check_servable", "create_encoder_app"]

DEFAULT_MAX_PIXELS = 4096 * 4096
_HEADER = "X-Medsam-Embedding-Id"


class EncoderServiceError(RuntimeError):
    """The encoder service cannot be used: unreachable, refusing, or serving another encoder."""


def check_servable(model: Any) -> None:
    """ValueError for a model whose embeddings cannot travel alone (the SAM2 family)."""
    from ..model.sam import MedSAMModel
    from ..model.sam2 import SAM2Model

    if isinstance(model, SAM2Model):
        raise ValueError(
            "SAM2-family models are not served as a separate encoder: their decoder also needs the "
            "encoder's high-resolution features"
        )
    if not isinstance(model, MedSAMModel):
        raise ValueError(f"the encoder service serves SAM, MedSAM and LiteMedSAM models, not {type(model).__name__}")


def create_encoder_app(model: Any, token: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS):
    """The encoder service's FastAPI app over a loaded SAM / MedSAM / LiteMedSAM ``model``."""
    from fastapi import FastAPI, HTTPException, Request, Response
    from safetensors import SafetensorError
    from safetensors.numpy import load as load_arrays
    from safetensors.torch import save as save_tensors

    from ..embedding_cache import embedding_id
    from ..predictor import Predictor

    check_servable(model)
    predictor = Predictor(model)
    lock = threading.Lock()
    ident = embedding_id(predictor)
    max_body = max_pixels * 3 + (1 << 16)
    app = FastAPI(title="MedSAM encoder", docs_url=None, redoc_url=None)

    @app.middleware("http")
    async def check_token(request: Request, call_next):
        if token is not None:
            sent = request.headers.get("authorization", "")
            if not hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
                return Response("missing or wrong bearer token", status_code=401)
        return await call_next(request)

    @app.get("/encoder")
    def describe() -> dict:
        return {
            "embedding_id": ident,
            "contract": predictor.contract.name,
            "input_size": predictor.contract.input_size,
            "name": getattr(getattr(model, "config", None), "name", type(model).__name__),
        }

    @app.post("/encode")
    async def encode(request: Request) -> Response:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body:
            raise HTTPException(413, f"body larger than {max_body} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body:
                raise HTTPException(413, f"body larger than {max_body} bytes")
        try:
            arrays = load_arrays(bytes(body))
        except (SafetensorError, ValueError, TypeError, OverflowError) as exc:
            raise HTTPException(422, f"not a safetensors file: {str(exc).splitlines()[0][:200]}") from None
        image = arrays.get("image")
        if (
            image is None
            or image.dtype != np.uint8
            or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3))
        ):
            raise HTTPException(422, "the body must hold one uint8 tensor 'image' of shape (H, W) or (H, W, 3)")
        if min(image.shape[:2]) < 1:
            raise HTTPException(422, "the image is empty")
        if image.shape[0] * image.shape[1] > max_pixels:
            raise HTTPException(413, f"image of {image.shape[0]} x {image.shape[1]} pixels: at most {max_pixels}")

        def run() -> bytes:
            with lock:
                predictor.set_image(np.ascontiguousarray(image))
                emb = predictor.embedding.detach().float().cpu().contiguous()
                predictor.reset_image()
            return save_tensors({"embedding": emb})

        from starlette.concurrency import run_in_threadpool

        data = await run_in_threadpool(run)
        return Response(data, media_type="application/octet-stream", headers={_HEADER: ident})

    return app


class RemoteEncoder:
    """The workbench's client of an encoder service (standard library HTTP, no extra dependency).

    Args:
        url: the service's base URL, e.g. ``http://gpu01:8100``.
        token: its bearer token, if it has one.
        timeout: seconds per request.
    """

    def __init__(self, url: str, token: str | None = None, timeout: float = 300.0) -> None:
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"the encoder URL must be http(s)://HOST[:PORT], got {url!r}")
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = float(timeout)
        self.calls = 0
        self._checked: str | None = None

    def _request(self, method: str, path: str, body: bytes | None = None) -> tuple[bytes, dict[str, str]]:
        import urllib.error
        import urllib.request

        req = urllib.request.Request(self.url + path, data=body, method=method)
        if body is not None:
            req.add_header("Content-Type", "application/octet-stream")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as res:
                return res.read(), {k.lower(): v for k, v in res.headers.items()}
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:300].decode(errors="replace")
            raise EncoderServiceError(f"encoder service {self.url} answered {exc.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise EncoderServiceError(f"encoder service {self.url} cannot be reached: {exc}") from None

    def check(self, expected_id: str) -> None:
        """Raise :class:`EncoderServiceError` unless the service's encoder is ``expected_id``."""
        import json

        if self._checked == expected_id:
            return
        raw, _ = self._request("GET", "/encoder")
        try:
            served = json.loads(raw)["embedding_id"]
        except (ValueError, KeyError, TypeError):
            raise EncoderServiceError(f"{self.url} is not a MedSAM encoder service") from None
        if served != expected_id:
            raise EncoderServiceError(
                f"the encoder service {self.url} serves another encoder ({served[:16]}...) than this "
                f"workbench's model ({expected_id[:16]}...): start both with the same checkpoint"
            )
        self._checked = expected_id

    def encode(self, image: np.ndarray, expected_id: str):
        """The ``(1, C, E, E)`` float32 embedding of the uint8 ``image``, computed by the service."""
        from safetensors.numpy import save as save_arrays
        from safetensors.torch import load as load_tensors

        self.check(expected_id)
        raw, headers = self._request("POST", "/encode", save_arrays({"image": np.ascontiguousarray(image)}))
        if headers.get(_HEADER.lower()) != expected_id:
            self._checked = None
            raise EncoderServiceError(f"the encoder service {self.url} changed its encoder: restart the workbench")
        try:
            embedding = load_tensors(raw)["embedding"]
        except Exception as exc:
            raise EncoderServiceError(f"the encoder service {self.url} sent an unreadable embedding: {exc}") from None
        self.calls += 1
        return embedding
