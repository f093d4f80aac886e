"""``cpp embed SOURCE --out DIR``: embed a source into a feature store."""

from __future__ import annotations

import argparse
import json

from cpp.cli.common import add_engine_arguments, add_source_arguments, engine_from_args, source_from_args
from cpp.embed import DTYPES, embed_source
from cpp.encoders import create_encoder
from cpp.errors import CppError
from cpp.images import DEFAULT_MAX_PIXELS


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "embed",
        help="embed the images of a source into a feature store",
        description="Embed a folder, file list (.txt/.csv), webdataset shards (.tar, brace patterns) or COCO "
        "images into a resumable feature store directory.",
    )
    parser.add_argument("source", help="image folder, file list, shard pattern, or COCO image folder")
    parser.add_argument("--out", required=True, help="feature store directory (resumed when partial)")
    parser.add_argument("--model", default="auto", help="encoder spec (see `cpp encoders`); default: auto")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda[:N]'")
    add_source_arguments(parser)
    add_engine_arguments(parser)
    parser.add_argument("--chunk-size", type=int, default=4096, help="items per store chunk")
    parser.add_argument("--dtype", choices=DTYPES, default="float16", help="stored feature precision")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="skip larger images")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    spec = source_from_args(args)
    engine = engine_from_args(args)
    try:
        encoder = create_encoder(args.model, device=args.device)
    except ValueError as exc:  # unknown spec or bad argument
        raise CppError(f"--model {args.model!r}: {exc}") from exc
    store = embed_source(
        spec,
        args.out,
        encoder,
        batch_size=args.batch_size,
        engine=engine,
        chunk_size=args.chunk_size,
        dtype=args.dtype,
        max_pixels=args.max_pixels,
    )
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
