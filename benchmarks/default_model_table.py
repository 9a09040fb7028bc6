"""The model card's results table: seven test sets, several models against box filling and Otsu.

The sets (``docs/model-card.md``, "Results at a glance"), made from the demo corpus (``medsam
prepare-demo``) the first time and kept in ``OUT/sets``:

==============  ==========================================================================
ct_organs       the corpus's held-out CT case (``--split test --datasets totalseg_ct``)
mr_atlas        400 objects of the held-out MR atlas (``colin27_aal``, seeded subset, seed 0)
ct_lesions      ``medsam prepare-lesions`` on the CT case: tumours, cysts, nodules, 3 per slice
ct_masses       the same with masses
mr_lesions      the atlas's slices, tumours, cysts, nodules, 1 per slice
mr_masses       the same with masses
fundus_lesions  ``benchmarks/fundus_corpus.py`` (a modality never trained on), 20 lesions per image
==============  ==========================================================================

Every (set, method) runs :func:`medsam.benchmark.run_benchmark` into ``OUT/SET/METHOD`` with exact
boxes and each model's own inference recipe (as ``medsam.Predictor`` segments by default); a run
whose ``summary.csv`` exists is kept, so an interrupted table resumes and a new checkpoint costs
only its own runs. The first model is compared with every other method (paired differences with
a 95 % bootstrap interval resampling slices, :func:`medsam.benchmark.paired_differences`). The
macro row weighs the sets equally.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/default_model_table.py --corpus CORPUS -o bench \\
        [--model NAME=CHECKPOINT ...] [--lite lite_medsam.pth] [--sets ct_masses mr_masses]

``--model`` adds checkpoints after the embedded default (``default``); the first ``--model``
comes first when ``--candidate-first`` is given. Writes ``OUT/table.md`` and prints it.
"""

from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class TestSet:
    """One test set: which corpus (``None``: the demo corpus itself) and which part of it."""

    name: str
    title: str
    lesions: dict = field(default_factory=dict)  # write_lesion_corpus arguments; {} = the corpus's own labels
    fundus: bool = False
    datasets: tuple[str, ...] = ()
    max_objects: int | None = None


TEST_SETS = (
    TestSet("ct_organs", "CT organs", datasets=("totalseg_ct",)),
    TestSet("mr_atlas", "MR atlas Colin27", datasets=("colin27_aal",), max_objects=400),
    TestSet(
        "ct_lesions",
        "CT lesions",
        lesions={"datasets": ("totalseg_ct",), "kinds": ("tumour", "cyst", "nodule"), "variants": 3},
    ),
    TestSet("ct_masses", "CT masses", lesions={"datasets": ("totalseg_ct",), "kinds": ("mass",), "variants": 3}),
    TestSet(
        "mr_lesions",
        "MR lesions",
        lesions={"datasets": ("colin27_aal",), "kinds": ("tumour", "cyst", "nodule"), "variants": 1},
    ),
    TestSet("mr_masses", "MR masses", lesions={"datasets": ("colin27_aal",), "kinds": ("mass",), "variants": 1}),
    TestSet("fundus_lesions", "fundus lesions", lesions={"variants": 20}, fundus=True),
)


def prepare_set(test_set: TestSet, corpus: Path, sets_dir: Path) -> tuple[Path, str]:
    """(corpus folder, split) of ``test_set``; lesion corpora are written once under ``sets_dir``."""
    from medsam.curate.lesion_corpus import write_lesion_corpus

    if not test_set.lesions:
        return corpus, "test"
    out = sets_dir / test_set.name
    if not (out / "manifest.csv").is_file():
        source = corpus
        if test_set.fundus:
            sys.path.insert(0, str(Path(__file__).parent))
            from fundus_corpus import write_fundus_corpus

            source = sets_dir / "fundus"
            if not (source / "manifest.csv").is_file():
                write_fundus_corpus(source)
        write_lesion_corpus(source, out, split="test", **test_set.lesions)
    return out, "test"


def run_method(test_set: TestSet, corpus: Path, split: str, method: str, checkpoint: str | None, out: Path) -> Path:
    """One benchmark run (kept when its summary exists); ``method`` ``box`` / ``otsu`` are baselines."""
    from medsam.benchmark import run_benchmark

    if (out / "summary.csv").is_file():
        return out
    baseline = method if method in ("box", "otsu") else None
    run_benchmark(
        corpus,
        out,
        split=split,
        checkpoint=checkpoint,
        baseline=baseline,
        datasets=test_set.datasets,
        max_objects=test_set.max_objects,
        seed=0,
        name=method,
        plot=False,
        log=print,
    )
    return out


def overall(run_dir: Path) -> tuple[int, float, float]:
    """(objects, mean DSC, mean NSD) of a benchmark output."""
    with open(run_dir / "summary.csv", newline="") as f:
        for row in csv.DictReader(f):
            if row["level"] == "all":
                return int(row["objects"]), float(row["dsc_mean"]), float(row["nsd_mean"])
    raise ValueError(f"{run_dir}/summary.csv has no 'all' row")


def table(results: dict[str, dict[str, Path]], methods: list[str]) -> str:
    """Markdown: DSC / NSD per set and method, the macro DSC, and the first method's paired
    differences from each other one."""
    from medsam.benchmark import paired_differences

    titles = {s.name: s.title for s in TEST_SETS}
    lines = ["| test set | objects | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    dsc: dict[str, list[float]] = {m: [] for m in methods}
    for name, runs in results.items():
        cells = []
        objects = 0
        for m in methods:
            objects, d, n = overall(runs[m])
            dsc[m].append(d)
            cells.append(f"{d:.3f} / {n:.3f}")
        lines.append(f"| {titles[name]} | {objects} | " + " | ".join(cells) + " |")
    lines.append("| macro DSC | | " + " | ".join(f"{np.mean(dsc[m]):.3f}" for m in methods) + " |")
    lines += ["", f"Paired DSC differences, {methods[0]} minus each method (mean [95 % interval]):", ""]
    lines += ["| test set | " + " | ".join(methods[1:]) + " |", "|---|" + "---|" * (len(methods) - 1)]
    for name, runs in results.items():
        cells = []
        for m in methods[1:]:
            p = paired_differences(runs[methods[0]], runs[m])
            cells.append(f"{p['dsc'][0]:+.3f} [{p['dsc'][1]:+.3f}, {p['dsc'][2]:+.3f}]" if p["objects"] else "-")
        lines.append(f"| {titles[name]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, required=True, help="the demo corpus (medsam prepare-demo)")
    parser.add_argument("-o", "--out", type=Path, required=True, help="output folder (sets and runs)")
    parser.add_argument("--model", action="append", default=[], metavar="NAME=CHECKPOINT", help="another model")
    parser.add_argument("--candidate-first", action="store_true", help="the first --model leads the table")
    parser.add_argument("--lite", help="the released lite_medsam.pth, as method 'lite'")
    parser.add_argument("--no-default", action="store_true", help="leave the embedded default out")
    parser.add_argument("--sets", nargs="+", choices=[s.name for s in TEST_SETS], help="only these sets")
    args = parser.parse_args(argv)
    models: dict[str, str | None] = {} if args.no_default else {"default": None}
    for spec in args.model:
        name, sep, path = spec.partition("=")
        if not sep or not name or name in ("box", "otsu", "lite", "default") or not Path(path).is_file():
            parser.error(f"--model takes NAME=CHECKPOINT with an existing file and a new name, got {spec!r}")
        models[name] = path
    if args.candidate_first and args.model:
        first = args.model[0].partition("=")[0]
        models = {first: models[first], **{k: v for k, v in models.items() if k != first}}
    if args.lite:
        models["lite"] = args.lite
    if not models:
        parser.error("no model to score: drop --no-default or give --model")
    methods = [*models, "box", "otsu"]
    results: dict[str, dict[str, Path]] = {}
    for test_set in TEST_SETS:
        if args.sets and test_set.name not in args.sets:
            continue
        corpus, split = prepare_set(test_set, args.corpus, args.out / "sets")
        results[test_set.name] = {
            m: run_method(test_set, corpus, split, m, models.get(m), args.out / test_set.name / m) for m in methods
        }
    text = table(results, methods)
    (args.out / "table.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
