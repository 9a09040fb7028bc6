"""``medsam serve``: the annotation workbench (a FastAPI server and its page) over a data folder.

    medsam serve --data DIR [--host 127.0.0.1] [--port 8000] [--token TOKEN] [--checkpoint CKPT]
                 [--workers N] [--database URL]

Needs the ``serve`` extra (``pip install 'medsam[serve]'``). Binds to 127.0.0.1 by default; a
non-loopback ``--host`` requires a token (``--token`` or the ``MEDSAM_TOKEN`` environment
variable, which keeps it out of the process list). Requests must name the server by an allowed
``Host`` (DNS-rebinding protection): the loopback names, a bound address, and for a bind to every
interface (``0.0.0.0``, ``::``) this machine's host names and addresses; ``--allow-host`` adds
more. The address printed is one the server answers. ``--workers N`` runs N server processes on
one port over one state database (:mod:`medsam.server.workers`).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
from typing import TYPE_CHECKING, Any

from .options import ct_window, finite_float
from .runner import CLIError, log

if TYPE_CHECKING:
    from .options import Subparsers

__all__ = ["add_parser", "allowed_hosts", "run"]

_LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
_WILDCARDS = ("0.0.0.0", "::")


def add_parser(subparsers: Subparsers) -> None:
    """Add ``serve`` to an ``argparse`` sub-parser collection."""
    p = subparsers.add_parser(
        "serve",
        help="annotation workbench: a web page and API over a folder of images",
        description=(
            "Serve the images in DIR for annotation: open http://HOST:PORT/ in a browser. Labels are "
            "saved under DIR/.medsam/labels, embeddings cached under DIR/.medsam/cache. "
            "Needs: pip install 'medsam[serve]'."
        ),
    )
    p.add_argument("--data", required=True, metavar="DIR", help="folder of images and volumes")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument(
        "--token", default=None, help="require 'Authorization: Bearer TOKEN' (default: $MEDSAM_TOKEN if set)"
    )
    p.add_argument("--checkpoint", default=None, help="model weights (default: the embedded model)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: automatic)")
    p.add_argument(
        "--max-upload-mb", type=finite_float, default=512, help="largest accepted upload in MiB, as sent (default 512)"
    )
    p.add_argument(
        "--max-image-mvox",
        type=finite_float,
        default=256,
        help="largest image an upload or a file of DIR may declare in its header, in millions "
        "of voxels (Mi); checked before decompressing (default 256)",
    )
    p.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="extra Host header name to accept (e.g. the machine's DNS name); repeatable",
    )
    p.add_argument(
        "--modality",
        default=None,
        help="model-input normalisation: CT, MR, PET, ... (default: from DICOM, else min-max)",
    )
    p.add_argument(
        "--window", type=ct_window, default=None, help="CT window for the model input: a name or LEVEL,WIDTH"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="server processes on one port (default 1); each loads the model, all share the state database",
    )
    p.add_argument(
        "--database",
        default=None,
        metavar="URL",
        help="state database (label versions, history, scores, jobs) as a SQLAlchemy URL, e.g. "
        "postgresql+psycopg://user@host/db (default: SQLite in DIR/.medsam/state.sqlite3)",
    )
    p.add_argument(
        "--encoder-url",
        default=None,
        metavar="URL",
        help="compute embeddings on an encoder service (medsam serve-encoder) with the same checkpoint; "
        "its token from $MEDSAM_ENCODER_TOKEN",
    )
    p.add_argument(
        "--model3d",
        default=None,
        metavar="CKPT",
        help="a SAM-Med3D checkpoint (e.g. sam_med3d_turbo) for POST /segment3d: voxel clicks on volumes",
    )
    p.set_defaults(func=run)
    _add_encoder_parser(subparsers)


def _add_encoder_parser(subparsers: Subparsers) -> None:
    p = subparsers.add_parser(
        "serve-encoder",
        help="the image encoder as a service for the workbenches of many annotators",
        description=(
            "Serve the checkpoint's image encoder over HTTP (POST /encode) for workbenches started with "
            "--encoder-url and the same checkpoint. Needs: pip install 'medsam[serve]'."
        ),
    )
    p.add_argument("--checkpoint", default=None, help="model weights (default: the embedded model)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: automatic)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8100, help="port (default 8100)")
    p.add_argument("--token", default=None, help="require this bearer token (default: $MEDSAM_ENCODER_TOKEN)")
    p.set_defaults(func=run_encoder)


def run_encoder(args: argparse.Namespace) -> int:
    """Run ``medsam serve-encoder`` until interrupted; returns the exit code."""
    token = _token_for(args, "MEDSAM_ENCODER_TOKEN")
    try:
        import uvicorn

        from ..server.encoder_service import create_encoder_app
    except ModuleNotFoundError as exc:
        raise CLIError(f"the encoder service needs the serve extra (pip install 'medsam[serve]'): {exc}") from None
    from ..weights import load_model

    try:
        app = create_encoder_app(load_model(args.checkpoint, device=args.device), token=token)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    log(f"medsam encoder service: http://{args.host}:{args.port}/encode")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", server_header=False)
    return 0


def _token_for(args: argparse.Namespace, env: str) -> str | None:
    """The bearer token (``--token``, else ``$env``), which a non-loopback ``--host`` requires;
    ``--port`` checked too."""
    token = args.token or os.environ.get(env) or None
    if not _is_loopback(args.host) and not token:
        raise CLIError(f"binding to a non-loopback address needs --token (or {env})")
    if not 0 < args.port < 65536:
        raise CLIError(f"--port must be 1..65535, got {args.port}")
    return token


def _is_loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _machine_names() -> list[str]:
    """This machine's host names and the addresses they resolve to (no network traffic)."""
    names: list[str] = []
    for name in {socket.gethostname(), socket.getfqdn()}:
        if not name:
            continue
        names.append(name)
        try:
            for info in socket.getaddrinfo(name, None):
                names.append(str(info[4][0]).split("%")[0])
        except OSError:
            pass
    return names


def allowed_hosts(host: str, extra: list[str]) -> tuple[str, ...]:
    """The ``Host`` names the server accepts when bound to ``host`` (see the module docstring)."""
    names = list(_LOOPBACK_NAMES)
    if host in _WILDCARDS:
        names += _machine_names()
    elif not _is_loopback(host):
        names.append(host)
    names += list(extra)
    return tuple(dict.fromkeys(n.lower() for n in names if n))


def _shown_address(host: str, hosts: tuple[str, ...]) -> str:
    """An address the server answers (for the printed URL): not a wildcard, and an allowed name."""
    if host in _WILDCARDS:
        host = next((h for h in hosts if h not in _LOOPBACK_NAMES and not _is_loopback(h)), "127.0.0.1")
    return f"[{host}]" if ":" in host else host


def _check_encoder_service(app: Any) -> None:
    """With ``--encoder-url``: the service is reachable and serves this model's encoder (said at
    start, not at the first prompt)."""
    from ..server.encoder_service import EncoderServiceError

    engine = app.state.workbench.engine
    if engine.remote_encoder is not None:
        try:
            engine.remote_encoder.check(engine.embedding_fingerprint())
        except EncoderServiceError as exc:
            raise CLIError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    """Run ``medsam serve`` until interrupted; returns the exit code."""
    token = _token_for(args, "MEDSAM_TOKEN")
    if args.max_upload_mb <= 0 or args.max_image_mvox <= 0:
        raise CLIError("--max-upload-mb and --max-image-mvox must be > 0")
    if not os.path.isdir(args.data):
        raise CLIError(f"--data is not a folder: {args.data}")
    if args.workers < 1:
        raise CLIError(f"--workers must be >= 1, got {args.workers}")
    try:
        import sqlalchemy  # noqa: F401
        import uvicorn

        from ..server.state_db import StateDatabaseError
        from ..server.workers import CONFIG_ENV, ModelNotServable, ServeConfig, build_app, prepare_state
    except ModuleNotFoundError as exc:
        raise CLIError(f"the server needs the serve extra (pip install 'medsam[serve]'): {exc}") from None
    if args.database and args.database.startswith("postgresql"):
        try:
            import psycopg  # noqa: F401
        except ModuleNotFoundError:
            raise CLIError(
                "a PostgreSQL --database needs the postgres extra (pip install 'medsam[postgres]')"
            ) from None

    hosts = allowed_hosts(args.host, args.allow_host)
    config = ServeConfig(
        data=args.data,
        checkpoint=args.checkpoint,
        device=args.device,
        token=token,
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
        max_image_voxels=int(args.max_image_mvox * 1024 * 1024),
        allowed_hosts=hosts,
        modality=args.modality,
        window=args.window,
        database=args.database,
        encoder_url=args.encoder_url,
        encoder_token=os.environ.get("MEDSAM_ENCODER_TOKEN") or None,
        model3d=args.model3d,
    )
    try:
        app = build_app(config)  # in the parent too when N > 1: a bad checkpoint is one error line
    except ModelNotServable as exc:
        raise CLIError(str(exc)) from None
    except (StateDatabaseError, ValueError) as exc:  # ValueError: a malformed --encoder-url
        raise CLIError(str(exc)) from None
    _check_encoder_service(app)
    log(f"medsam workbench: http://{_shown_address(args.host, hosts)}:{args.port}/  (data: {args.data})")
    if args.host in _WILDCARDS:
        log(
            f"medsam: warning: listening on every interface; requests must name the server as one of "
            f"{', '.join(hosts)} (add names with --allow-host)"
        )
    if token:
        log("a bearer token is required; the page asks for it once per tab")
    common = {"host": args.host, "port": args.port, "log_level": "warning", "server_header": False}
    if args.workers == 1:
        uvicorn.run(app, **common)
        return 0
    del app
    prepare_state(config)
    os.environ[CONFIG_ENV] = config.to_json()
    log(f"{args.workers} worker processes; shared state: {args.database or 'DIR/.medsam/state.sqlite3'}")
    uvicorn.run("medsam.server.workers:app_from_environment", factory=True, workers=args.workers, **common)
    return 0
