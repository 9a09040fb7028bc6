"""``medsam train`` and ``medsam export``: a thin command line over :mod:`medsam.train`.

medsam train configs/tiny_cpu.yaml data.corpus=/data/corpus output.dir=runs/tiny
torchrun --nproc_per_node 4 -m medsam train configs/medsam_vit_b.yaml data.corpus=...
medsam train RUN.yaml train.resume=auto            # continue an interrupted run
medsam export runs/tiny/best.pt -o tiny.safetensors
medsam embed configs/decoder.yaml data.cache_embeddings=/data/store --dask tcp://head:8786
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from typing import TYPE_CHECKING

from .options import add_dask_options, dask_scheduler
from .runner import CLIError

if TYPE_CHECKING:
    from .options import Subparsers


def add_parser(subparsers: Subparsers) -> None:
    """Register the ``train`` and ``export`` sub-commands on an argparse ``subparsers`` object."""
    p = subparsers.add_parser(
        "train",
        help="train or fine-tune a model on a curated corpus (one process, or many under torchrun)",
        description=(
            "Train as described by a YAML config; override any setting as section.field=value "
            "(e.g. train.lr=3e-4 data.batch_size=4). Under torchrun every process runs this command."
        ),
    )
    p.add_argument("config", help="YAML config (see configs/ and docs/training.md)")
    p.add_argument("overrides", nargs="*", metavar="section.field=value", help="settings to override")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=run, train_command="train", resume_hint="resume with train.resume=auto")

    e = subparsers.add_parser(
        "export",
        help="turn a training checkpoint into an inference checkpoint (safetensors) for load_model",
        description="Write a .safetensors model (with its config and preprocessing contract; LoRA merged).",
    )
    e.add_argument("checkpoint", help="training checkpoint, e.g. RUN_DIR/best.pt")
    e.add_argument("-o", "--output", required=True, help="output .safetensors path")
    e.set_defaults(func=run, train_command="export")

    m = subparsers.add_parser(
        "embed",
        help="precompute the embedding store of a decoder-only training run (locally or on Dask)",
        description=(
            "Build the store data.cache_embeddings names, exactly as `medsam train` with the same config and "
            "overrides would, in parts: in this process, on a local Dask cluster (--dask) or on the cluster "
            "of --dask SCHEDULER (the corpus and the store on a file system every worker sees). A rerun "
            "resumes; `medsam train` then reuses the store."
        ),
    )
    m.add_argument("config", help="the training config")
    m.add_argument("overrides", nargs="*", metavar="section.field=value", help="settings to override")
    add_dask_options(m, "part of the store (256 views)")
    m.set_defaults(func=run, train_command="embed", resume_hint="rerun the same command to resume")


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0") or 0)
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(message)s"
        if "RANK" in os.environ
        else "%(asctime)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )


def run(args: argparse.Namespace) -> int:
    """Run the sub-command chosen by :func:`add_parser`; returns the exit status."""
    from ..train.config import ConfigError, dump_config, load_config

    if args.train_command == "train":
        try:
            cfg = load_config(args.config, args.overrides)
        except ConfigError as exc:
            raise CLIError(str(exc)) from None
        if args.print_config:
            print(dump_config(cfg), end="")
            return 0
        _setup_logging()
        from ..train.loop import train

        result = train(cfg)
        if int(os.environ.get("RANK", "0") or 0) == 0:
            best = f", best validation DSC {result.best_dsc:.4f}" if result.best_dsc is not None else ""
            print(f"finished at step {result.global_step}{best}; checkpoints in {result.run_dir}")
        return 0
    if args.train_command == "embed":
        return _embed(args)
    from ..train.export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.output)
    print(f"wrote {out}")
    return 0


def _embed(args: argparse.Namespace) -> int:
    from ..cluster import DaskEngine, EngineUnavailable
    from ..train.config import ConfigError, load_config
    from ..train.loop import Trainer

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        raise CLIError(str(exc)) from None
    if not cfg.data.cache_embeddings:
        raise CLIError("give the store's folder: data.cache_embeddings=DIR (with train.mode=decoder)")
    _setup_logging()
    dask = DaskEngine(workers=args.workers, scheduler=dask_scheduler(args.dask)) if args.dask else None
    try:
        with dask if dask is not None else contextlib.nullcontext() as engine:
            Trainer(cfg, store_engine=engine)
    except EngineUnavailable as exc:
        raise CLIError(str(exc)) from None
    print(f"embedding store ready: {cfg.data.cache_embeddings}")
    return 0
