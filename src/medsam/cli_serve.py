"""``medsam serve``: the annotation workbench (a FastAPI server and its page) over a data folder.

Wire into the main CLI by listing ``"medsam.cli_serve"`` in ``medsam.cli._COMMAND_MODULES``::

    medsam serve --data DIR [--host 127.0.0.1] [--port 8000] [--token TOKEN] [--checkpoint CKPT]

Needs the ``serve`` extra (``pip install 'medsam[serve]'``). Binds to 127.0.0.1 by default; a
non-loopback ``--host`` requires a token (``--token`` or the ``MEDSAM_TOKEN`` environment
variable, which keeps it out of the process list).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys

__all__ = ["add_parser", "run"]

_LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``serve`` to an ``argparse`` sub-parser collection; returns the new parser."""
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
    p.add_argument("--token", default=None,
                   help="require 'Authorization: Bearer TOKEN' (default: $MEDSAM_TOKEN if set)")
    p.add_argument("--checkpoint", default=None, help="model weights (default: the embedded model)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: automatic)")
    p.add_argument("--max-upload-mb", type=float, default=512, help="largest accepted upload in MiB (default 512)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="extra Host header name to accept (e.g. the machine's DNS name); repeatable")
    p.add_argument("--modality", default=None, help="model-input normalisation: CT, MR, PET, ... (default: from DICOM, else min-max)")
    p.add_argument("--window", default=None, help="CT window for the model input: a name or LEVEL,WIDTH")
    p.set_defaults(func=run)
    return p


def _is_loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    """Run ``medsam serve`` until interrupted; returns the exit code (2 on bad arguments)."""
    import warnings

    try:
        import uvicorn

        from .server import create_app
    except ModuleNotFoundError as exc:
        print(f"medsam: error: the server needs the serve extra (pip install 'medsam[serve]'): {exc}",
              file=sys.stderr)
        return 2
    from .weights import load_model

    token = args.token or os.environ.get("MEDSAM_TOKEN") or None
    if not _is_loopback(args.host) and not token:
        print("medsam: error: binding to a non-loopback address needs --token (or MEDSAM_TOKEN)", file=sys.stderr)
        return 2
    if not 0 < args.port < 65536:
        print(f"medsam: error: --port must be 1..65535, got {args.port}", file=sys.stderr)
        return 2
    window = args.window
    if window and "," in window:
        try:
            level, width = (float(v) for v in window.split(","))
        except ValueError:
            print(f"medsam: error: --window must be a name or LEVEL,WIDTH, got {window!r}", file=sys.stderr)
            return 2
        window = (level, width)
    hosts = list(_LOOPBACK_NAMES) + list(args.allow_host)
    if not _is_loopback(args.host) and args.host not in ("0.0.0.0", "::"):
        hosts.append(args.host)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_model(args.checkpoint, device=args.device)
    for w in caught:
        print(f"WARNING: {w.message}", file=sys.stderr)
    checkpoint = args.checkpoint
    if checkpoint is None and not getattr(model, "is_untrained_default", False):
        from .default_model import bundled_checkpoint

        checkpoint = bundled_checkpoint()
    app = create_app(
        args.data, model=model, token=token, checkpoint=checkpoint,
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024), allowed_hosts=tuple(hosts),
        modality=args.modality, model_window=window,
    )
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"medsam workbench: http://{shown}:{args.port}/  (data: {args.data})", file=sys.stderr)
    if token:
        print("a bearer token is required; the page asks for it once per tab", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", server_header=False)
    return 0


def main(argv=None) -> int:
    """``python -m medsam.cli_serve ...``: the same as ``medsam serve ...``."""
    parser = argparse.ArgumentParser(prog="medsam")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
