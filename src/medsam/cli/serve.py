"""``medsam serve``: the annotation workbench (a FastAPI server and its page) over a data folder.

    medsam serve --data DIR [--host 127.0.0.1] [--port 8000] [--token TOKEN] [--checkpoint CKPT]

Needs the ``serve`` extra (``pip install 'medsam[serve]'``). Binds to 127.0.0.1 by default; a
non-loopback ``--host`` requires a token (``--token`` or the ``MEDSAM_TOKEN`` environment
variable, which keeps it out of the process list). Requests must name the server by an allowed
``Host`` (DNS-rebinding protection): the loopback names, a bound address, and for a bind to every
interface (``0.0.0.0``, ``::``) this machine's host names and addresses; ``--allow-host`` adds
more. The address printed is one the server answers.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
from typing import TYPE_CHECKING

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
    p.set_defaults(func=run)


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


def run(args: argparse.Namespace) -> int:
    """Run ``medsam serve`` until interrupted; returns the exit code."""
    token = args.token or os.environ.get("MEDSAM_TOKEN") or None
    if not _is_loopback(args.host) and not token:
        raise CLIError("binding to a non-loopback address needs --token (or MEDSAM_TOKEN)")
    if not 0 < args.port < 65536:
        raise CLIError(f"--port must be 1..65535, got {args.port}")
    if args.max_upload_mb <= 0 or args.max_image_mvox <= 0:
        raise CLIError("--max-upload-mb and --max-image-mvox must be > 0")
    if not os.path.isdir(args.data):
        raise CLIError(f"--data is not a folder: {args.data}")
    try:
        import uvicorn

        from ..server import create_app
    except ModuleNotFoundError as exc:
        raise CLIError(f"the server needs the serve extra (pip install 'medsam[serve]'): {exc}") from None
    from ..weights import load_model

    hosts = allowed_hosts(args.host, args.allow_host)
    from ..model.sam_med3d import SamMed3DModel

    model = load_model(args.checkpoint, device=args.device)
    if isinstance(model, SamMed3DModel):
        raise CLIError(
            "the workbench serves SAM / MedSAM / SAM2-family models; SAM-Med3D segments from the command "
            "line (medsam segment VOLUME --point I J K)"
        )
    checkpoint = args.checkpoint
    if checkpoint is None and not getattr(model, "is_untrained_default", False):
        from ..default_model import bundled_checkpoint

        checkpoint = bundled_checkpoint()
    app = create_app(
        args.data,
        model=model,
        token=token,
        checkpoint=checkpoint,
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
        max_image_voxels=int(args.max_image_mvox * 1024 * 1024),
        allowed_hosts=hosts,
        modality=args.modality,
        model_window=args.window,
    )
    log(f"medsam workbench: http://{_shown_address(args.host, hosts)}:{args.port}/  (data: {args.data})")
    if args.host in _WILDCARDS:
        log(
            f"medsam: warning: listening on every interface; requests must name the server as one of "
            f"{', '.join(hosts)} (add names with --allow-host)"
        )
    if token:
        log("a bearer token is required; the page asks for it once per tab")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", server_header=False)
    return 0
