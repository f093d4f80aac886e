"""Benchmark: images/s of the embed pipeline on a folder vs the model's bare forward pass, as JSON.

Usage: python scripts/bench_embed.py FOLDER [--model SPEC] [--batch-size N] [--workers N] [--limit N]
For stable CPU figures run with MALLOC_MMAP_THRESHOLD_=1000000000 MALLOC_TRIM_THRESHOLD_=1000000000.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from cpp.embed import embed_source
from cpp.encoders import Encoder, create_encoder
from cpp.engines import default_workers
from cpp.options import SourceSpec
from cpp.sources import iter_items


def bare_forward(encoder: Encoder, shape: tuple[int, ...], batch_size: int, images: int) -> dict[str, float]:
    """Throughput of ``encode_images`` on pre-made uint8 tensors (one warm-up batch not timed)."""
    batch = torch.randint(0, 256, (batch_size, *shape), dtype=torch.uint8)
    encoder.encode_images(batch)
    batches = math.ceil(images / batch_size)
    started = time.perf_counter()
    for _ in range(batches):
        encoder.encode_images(batch)
    elapsed = time.perf_counter() - started
    return {
        "images": batches * batch_size,
        "seconds": round(elapsed, 3),
        "images_per_s": round(batches * batch_size / elapsed, 2),
    }


def pipeline(
    encoder: Encoder, folder: Path, limit: int | None, batch_size: int, workers: int
) -> dict[str, Any]:
    """Throughput of :func:`embed_source` (decode, preprocess, forward, store) on the first ``limit``."""
    with tempfile.TemporaryDirectory() as tmp:
        items = list(iter_items(SourceSpec(type="folder", path=str(folder))))[:limit]
        file_list = Path(tmp) / "images.txt"
        file_list.write_text("".join(f"{item.path}\n" for item in items))
        started = time.perf_counter()
        store = embed_source(
            SourceSpec(type="files", path=str(file_list)),
            Path(tmp) / "store",
            encoder,
            batch_size=batch_size,
            workers=workers,
        )
        elapsed = time.perf_counter() - started
        return {
            "images": len(items),
            "embedded": len(store),
            "seconds": round(elapsed, 3),
            "images_per_s": round(len(items) / elapsed, 2),
            "timings_s": store.meta["timings_s"],
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--model", default="auto")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=None, help="decode workers (default: the library's)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--limit", type=int, default=None, help="use the first N images (sorted)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    encoder = create_encoder(args.model, device=args.device)
    workers = default_workers(encoder.device) if args.workers is None else args.workers
    shape = tuple(encoder.preprocess(Image.new("RGB", (64, 64))).shape)
    piped = pipeline(encoder, args.folder, args.limit, args.batch_size, workers)
    bare = bare_forward(encoder, shape, args.batch_size, piped["images"])
    report = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "device": str(encoder.device),
            "torch_threads": torch.get_num_threads(),
            "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()],
            "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        },
        "encoder": encoder.id,
        "folder": str(args.folder),
        "batch_size": args.batch_size,
        "workers": workers,
        "input_shape": list(shape),
        "pipeline": piped,
        "bare_forward": bare,
        "pipeline_over_bare": round(piped["images_per_s"] / bare["images_per_s"], 3),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
