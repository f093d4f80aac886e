"""``cpp assign CLUSTERING SOURCE --out assignments.jsonl``: file new images under an existing clustering."""

from __future__ import annotations

import argparse
import hashlib
import json
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
from cpp.options import AssignOptions

if TYPE_CHECKING:
    from cpp.assign import AssignSummary


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "assign",
        help="assign new images to the clusters of an earlier run and flag those that fit none",
        description="Embed the images of SOURCE with the clustering's own encoder, pass them through its "
        "head and file each under the nearest cluster of its newest revision (with that cluster's current "
        "name); images that fit no cluster are marked novel. Resumable: rerun the same command after an "
        "interruption.",
    )
    parser.add_argument(
        "clustering", help="the clustering: a `cpp cluster` work directory, a job folder or its result JSON"
    )
    parser.add_argument("source", help="image folder, file list, shard pattern, or COCO image folder")
    parser.add_argument("--out", required=True, help="JSON lines file to write, one line per image")
    parser.add_argument(
        "--summary",
        default=None,
        help="also write a JSON summary: images per cluster, novel count and share, mean confidence of the "
        "new images per cluster beside the members' (a drift report; default: none)",
    )
    parser.add_argument(
        "--work-dir",
        default=None,
        help="the new images' features (default: per clustering+source under ~/.cache/cpp/runs/assign)",
    )
    add_option(parser, AssignOptions, "novelty_quantile", metavar="Q", default_text="the clustering's")
    add_option(parser, AssignOptions, "batch_size")
    add_option(parser, AssignOptions, "device")
    add_source_arguments(parser)
    add_engine_arguments(parser)
    parser.add_argument(
        "--update",
        action="store_true",
        help="then add the images to the clustering as a new revision without refitting: each joins its "
        "cluster, novel ones a novel pool outside every cluster; images it already holds are skipped",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def format_summary(summary: AssignSummary) -> str:
    """A plain-text table: per cluster its members, the new images filed under it, how many are novel, and
    the mean confidence of the new images beside the members'."""
    header = ("cluster", "name", "members", "new", "novel", "confidence", "members'")
    rows = [
        (
            str(c.id),
            c.name,
            str(c.members),
            str(c.assigned),
            str(c.novel),
            "-" if c.confidence is None else f"{c.confidence:.3f}",
            "-" if c.member_confidence is None else f"{c.member_confidence:.3f}",
        )
        for c in summary.clusters
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in [header, *rows]]
    lines.append("")
    lines.append(
        f"{summary.embedded} images ({len(summary.skipped)} skipped): {summary.novel} novel "
        f"({summary.novel_share:.1%}, threshold {summary.novelty.threshold:.4g} at the members' "
        f"{summary.novelty.quantile:g} quantile), {summary.members} already members; "
        f"revision {summary.clustering['revision']}; {summary.timings_s.get('total', 0.0):.1f} s"
    )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    options = options_from_args(AssignOptions, args, "novelty_quantile", "batch_size", "device")
    out = check_output(args.out, "--out", directory=False)  # before the slow imports: fails at once
    summary_path = check_output(args.summary, "--summary", directory=False) if args.summary else None
    if args.work_dir:
        check_output(args.work_dir, "--work-dir", directory=True)
    spec = source_from_args(args)
    from cpp import clustering
    from cpp.assign import FEATURES_DIR, RESULTS_FILE, assign, update
    from cpp.pipeline import runs_dir
    from cpp.sources import resolved_spec

    found = clustering.open(args.clustering)
    if args.work_dir:
        work_dir = Path(args.work_dir)
    else:
        key = json.dumps({"clustering": found.id, "source": resolved_spec(spec)}, sort_keys=True)
        work_dir = runs_dir() / "assign" / hashlib.sha256(key.encode()).hexdigest()[:16]
        check_output(work_dir, "the default --work-dir", directory=True)
    engine = engine_from_args(args)
    control, progress = recording_control()
    try:
        summary = assign(found, spec, work_dir, options=options, engine=engine, control=control)
    except KeyboardInterrupt:
        raise interrupted(work_dir / FEATURES_DIR, progress) from None
    with atomic_output(out) as partial:
        shutil.copyfile(work_dir / RESULTS_FILE, partial)
    if summary_path is not None:
        with atomic_output(summary_path) as partial:
            partial.write_text(summary.model_dump_json(indent=1), encoding="utf-8")
    print(format_summary(summary))
    for skipped in summary.skipped[:20]:
        print(f"skipped {skipped.path or skipped.key}: {skipped.reason}")
    if len(summary.skipped) > 20:
        print(f"... and {len(summary.skipped) - 20} more skipped (see --summary)")
    print(f"wrote {out} ({summary.embedded} lines)" + (f" and {summary_path}" if summary_path else ""))
    if args.update:
        outcome = update(found, work_dir)
        if outcome.revision is None:
            print(f"nothing to add: the clustering already holds all {outcome.already_members} images")
        else:
            print(
                f"added {outcome.added} images as revision {outcome.revision}: {outcome.filed} filed under "
                f"clusters, {outcome.novel} to the novel pool, {outcome.already_members} already members"
            )
    return 0
