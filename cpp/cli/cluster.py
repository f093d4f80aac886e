"""``cpp cluster SOURCE --out result.json``: embed, fit, read out and name, then print a summary table."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from pydantic import ValidationError

from cpp.cli.common import (
    add_engine_arguments,
    add_source_arguments,
    clusters_arg,
    engine_from_args,
    source_from_args,
)
from cpp.demo import make_demo_images
from cpp.errors import CppError
from cpp.options import ClusterOptions
from cpp.pipeline import default_work_dir, run_cluster, runs_dir
from cpp.result import ClusterResult
from cpp.vocab import BUILTIN_VOCABULARIES

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
    parser.add_argument("--model", default=None, help="encoder spec (see `cpp encoders`); default: auto")
    parser.add_argument(
        "--clusters", type=clusters_arg, default="auto", help="'auto' or the number of clusters"
    )
    parser.add_argument("--head", choices=["crate", "mlp"], default="crate", help="clustering head")
    parser.add_argument(
        "--vocabulary",
        nargs="+",
        default=["imagenet1k"],
        metavar="VOCAB",
        help=f"built-ins ({', '.join(BUILTIN_VOCABULARIES)}), 'captions', or files with one name per line",
    )
    parser.add_argument(
        "--work-dir",
        default=None,
        help="features, head and caches (default: per source+model under ~/.cache/cpp/runs)",
    )
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: automatic)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda[:N]'")
    parser.add_argument("--batch-size", type=int, default=64, help="embedding batch size")
    add_source_arguments(parser)
    add_engine_arguments(parser)
    parser.add_argument("--demo", action="store_true", help="cluster scikit-image's sample photos (offline)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def _options(args: argparse.Namespace, model: str) -> ClusterOptions:
    try:
        return ClusterOptions(
            model=model,
            clusters=args.clusters,
            head=args.head,
            vocabulary=args.vocabulary,
            epochs=args.epochs,
            seed=args.seed,
            batch_size=args.batch_size,
            device=args.device,
        )
    except ValidationError as exc:
        problems = "; ".join(f"--{'-'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise CppError(f"invalid options: {problems}") from None


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
    text.append("")
    text.append(
        f"{run.counts.embedded} images ({run.counts.skipped} skipped) in {len(result.clusters)} clusters "
        f"(K by {run.k_selection.method}); encoder {run.encoder.get('id')}; "
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
    if args.demo:
        if args.source:
            raise CppError("--demo uses its own photos: leave out SOURCE")
        model = args.model or DEMO_MODEL
        work_dir = Path(args.work_dir) if args.work_dir else runs_dir() / "demo"
        spec = make_demo_images(work_dir / "demo-images")
    else:
        if not args.source:
            raise CppError("give a SOURCE to cluster (or --demo)")
        model = args.model or "auto"
        spec = source_from_args(args)
        work_dir = Path(args.work_dir) if args.work_dir else default_work_dir(spec, model)
    options = _options(args, model)
    result = run_cluster(spec, options, work_dir, engine=engine_from_args(args))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if result.assignments_file is not None:
        companion = out.with_name(f"{out.stem}.assignments.jsonl")
        shutil.copyfile(work_dir / result.assignments_file, companion)
        result = result.model_copy(update={"assignments_file": companion.name})
    out.write_text(result.model_dump_json(indent=1), encoding="utf-8")
    print(format_summary(result))
    print(f"\nresult: {out}   (work directory: {work_dir})")
    return 0
