"""``cpp embed SOURCE --out DIR``: embed a source into a feature store."""

from __future__ import annotations

import argparse
import json

from cpp.cli.common import (
    add_engine_arguments,
    add_option,
    add_source_arguments,
    check_output,
    engine_from_args,
    interrupted,
    recording_control,
    source_from_args,
)
from cpp.options import ClusterOptions, EmbedOptions


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "embed",
        help="embed the images of a source into a feature store",
        description="Embed a folder, file list (.txt/.csv), webdataset shards (.tar, brace patterns) or COCO "
        "images into a resumable feature store directory.",
    )
    parser.add_argument("source", help="image folder, file list, shard pattern, or COCO image folder")
    parser.add_argument("--out", required=True, help="feature store directory (resumed when partial)")
    add_option(parser, ClusterOptions, "model")
    add_option(parser, ClusterOptions, "batch_size")
    add_option(parser, ClusterOptions, "device")
    add_source_arguments(parser)
    add_engine_arguments(parser)
    add_option(parser, EmbedOptions, "chunk_size")
    add_option(parser, EmbedOptions, "dtype")
    add_option(parser, EmbedOptions, "max_pixels")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = check_output(args.out, "--out", directory=True)  # before the slow imports: fails at once
    spec = source_from_args(args)
    from cpp.embed import embed_source
    from cpp.encoders import create_encoder

    engine = engine_from_args(args)
    encoder = create_encoder(args.model, device=args.device)
    control, progress = recording_control()
    try:
        store = embed_source(
            spec,
            out,
            encoder,
            batch_size=args.batch_size,
            engine=engine,
            chunk_size=args.chunk_size,
            dtype=args.dtype,
            max_pixels=args.max_pixels,
            control=control,
        )
    except KeyboardInterrupt:
        raise interrupted(out, progress) from None
    summary = {
        "store": str(store.path),
        "encoder": store.encoder_id,
        "dim": store.dim,
        "counts": store.counts,
        "timings_s": store.meta.get("timings_s", {}),
    }
    print(json.dumps(summary, indent=2))
    for skipped in store.skipped()[:20]:
        print(f"skipped {skipped.path or skipped.key}: {skipped.reason}")
    if len(store.skipped()) > 20:
        print(f"... and {len(store.skipped()) - 20} more skipped (see the store's index files)")
    return 0
