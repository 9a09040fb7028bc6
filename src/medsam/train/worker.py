"""A training run as a child process with a structured result: what the workbench starts.

    python -m medsam.train.worker CONFIG.yaml RESULT.json

Runs :func:`medsam.train.loop.train` on the config and writes ``RESULT.json`` (atomically) when it
ends: ``{"ok": true, "global_step": ..., "best_dsc": ..., "run_dir": ...}`` or ``{"ok": false,
"error": "<one line>", "kind": "<exception type>"}``, so the parent reads the outcome instead of
parsing log text. The log (the training loop's progress lines) goes to stderr as usual. With
``MEDSAM_PARENT_PID`` set the process ends when that parent does
(:func:`medsam.lifecycle.die_with_parent`); SIGTERM ends it with the result ``{"ok": false, "kind":
"Terminated"}``. Exit status: 0 done, 1 failed.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path


def run(config_path: str | Path, result_path: str | Path) -> int:
    """Train on ``config_path`` and write ``result_path``; returns the exit status."""
    from ..io.atomic import write_json
    from ..lifecycle import PARENT_PID_ENV, die_with_parent, install_termination_handler

    if os.environ.get(PARENT_PID_ENV):
        die_with_parent()
    install_termination_handler()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        from .config import load_config
        from .loop import train

        result = train(load_config(config_path, []))
    except BaseException as exc:
        text = str(exc).strip()
        write_json(
            result_path,
            {
                "ok": False,
                "kind": type(exc).__name__,
                "error": " ".join(text.splitlines()[0].split()) if text else type(exc).__name__,
            },
        )
        return 1
    best = f", best validation DSC {result.best_dsc:.4f}" if result.best_dsc is not None else ""
    print(f"finished at step {result.global_step}{best}; checkpoints in {result.run_dir}", file=sys.stderr)
    write_json(
        result_path,
        {"ok": True, "global_step": result.global_step, "best_dsc": result.best_dsc, "run_dir": str(result.run_dir)},
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m medsam.train.worker CONFIG.yaml RESULT.json", file=sys.stderr)
        return 2
    return run(args[0], args[1])


if __name__ == "__main__":
    sys.exit(main())
