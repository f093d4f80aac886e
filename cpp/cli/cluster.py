"""``cpp cluster SOURCE --out result.json``: embed, fit, read out and name, then print a summary table."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from cpp.cli.common import (
    add_engine_arguments,
    add_option,
    add_source_arguments,
    atomic_output,
    check_output,
    engine_from_args,
    interrupted,
    options_from_args,
    recording_control,
    source_from_args,
)
from cpp.errors import CppError
from cpp.options import ClusterOptions

if TYPE_CHECKING:
    from cpp.result import ClusterResult

DEMO_MODEL = "effnet-lite0-in1k"
EXAMPLES = 3


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "cluster",
        help="cluster a collection and name the clusters",
        description="Embed the images (cached in the work directory), train the clustering head, choose the "
        "clusters and name them from a vocabulary. `cpp cluster --demo --out demo.json` runs offline on "
        "scikit-image's sample photos.",
    )
    parser.add_argument(
        "source", nargs="?", help="image folder, file list, shard pattern, or COCO image folder"
    )
    parser.add_argument("--out", required=True, help="result JSON file to write")
    add_option(parser, ClusterOptions, "model", default=None, default_text="auto; with --demo: " + DEMO_MODEL)
    add_option(parser, ClusterOptions, "clusters", metavar="K")
    add_option(parser, ClusterOptions, "head", help="clustering head")
    add_option(parser, ClusterOptions, "vocabulary", metavar="VOCAB")
    parser.add_argument(
        "--work-dir",
        default=None,
        help="features, head and caches (default: per source+model under ~/.cache/cpp/runs)",
    )
    add_option(parser, ClusterOptions, "epochs", help="training epochs", default_text="automatic")
    add_option(parser, ClusterOptions, "seed", help="random seed")
    add_option(parser, ClusterOptions, "device")
    add_option(parser, ClusterOptions, "batch_size")
    add_source_arguments(parser)
    add_engine_arguments(parser)
    parser.add_argument("--demo", action="store_true", help="cluster scikit-image's sample photos (offline)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def format_summary(result: ClusterResult, *, examples: int = EXAMPLES) -> str:
    """A plain-text table: cluster, size, name (``?`` when uncertain), score and a few example files."""
    header = ("cluster", "size", "name", "score", "examples")
    lines = [
        (
            str(c.id),
            str(c.size),
            c.name + (" ?" if c.uncertain else ""),
            f"{c.score:.3f}",
            ", ".join(Path(r).name for r in c.representatives[:examples]),
        )
        for c in result.clusters
    ]
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(4)]
    text = [
        "  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths, strict=True)) + "  " + row[4]
        for row in [header, *lines]
    ]
    run = result.run
    method = run.k_selection.method
    how = "K as given" if method == "fixed" else f"K by {method.replace('_', ' ')}"
    text.append("")
    text.append(
        f"{run.counts.embedded} images ({run.counts.skipped} skipped) in {len(result.clusters)} clusters "
        f"({how}); encoder {run.encoder.get('id')}; "
        f"{run.timings_s.get('total', 0.0):.1f} s"
    )
    if result.metrics:
        text.append(
            "vs ground truth: "
            + ", ".join(f"{name} {value:.3f}" for name, value in result.metrics.items() if name != "labelled")
        )
    if any(c.uncertain for c in result.clusters):
        text.append(
            "? = uncertain: the runner-up name scored almost as high (see `alternatives` in the result)"
        )
    return "\n".join(text)


def run(args: argparse.Namespace) -> int:
    if args.demo and args.source:
        raise CppError("--demo uses its own photos: leave out SOURCE")
    if not args.demo and not args.source:
        raise CppError("give a SOURCE to cluster (or --demo)")
    model = args.model or (DEMO_MODEL if args.demo else "auto")
    flags = ("clusters", "head", "vocabulary", "epochs", "seed", "batch_size", "device")
    options = options_from_args(ClusterOptions, args, *flags, model=model)
    # before the slow imports and any work: bad output paths fail at once
    out = check_output(args.out, "--out", directory=False)
    if args.work_dir:
        check_output(args.work_dir, "--work-dir", directory=True)
    spec = None if args.demo else source_from_args(args)
    from cpp.pipeline import FEATURES_DIR, HEAD_DIR, HEAD_KEY_FILE, default_work_dir, run_cluster, runs_dir

    if args.work_dir:
        work_dir = Path(args.work_dir)
    else:
        work_dir = runs_dir() / "demo" if spec is None else default_work_dir(spec, model)
        check_output(work_dir, "the default --work-dir", directory=True)
    if spec is None:
        from cpp.demo import make_demo_images

        spec = make_demo_images(work_dir / "demo-images")
    engine = engine_from_args(args)
    control, progress = recording_control()
    try:
        result = run_cluster(spec, options, work_dir, control=control, engine=engine)
    except KeyboardInterrupt:
        head = work_dir / HEAD_DIR
        trained = progress.keys() & {"readout", "name"} and (head / HEAD_KEY_FILE).is_file()
        raise interrupted(
            work_dir / FEATURES_DIR, progress, also=f", and the fitted head in {head}" if trained else ""
        ) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    if result.assignments_file is not None:
        companion = out.with_name(f"{out.stem}.assignments.jsonl")
        with atomic_output(companion) as partial:
            shutil.copyfile(work_dir / result.assignments_file, partial)
        result = result.model_copy(update={"assignments_file": companion.name})
    with atomic_output(out) as partial:
        partial.write_text(result.model_dump_json(indent=1), encoding="utf-8")
    print(format_summary(result))
    print(f"\nresult: {out}   (work directory: {work_dir})")
    return 0
