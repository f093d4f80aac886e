"""Memory of listing a sharded source: every item in a list versus :class:`cpp.sources.SourceItems`.

    python scripts/bench_listing.py --shards 20 --per-shard 10000 --work-dir /tmp/listing

Writes ``--shards`` webdataset shards of ``--per-shard`` samples as img2dataset does (``.jpg`` of 200 bytes,
``.txt`` caption of about 80 characters, ``.json``), then reads them the way ``cpp embed`` does, unit by unit
(``--batch`` items), once from a plain list of all items and once from ``SourceItems``. Each way runs in its
own process, once timed and once traced; prints JSON with the time to list and to read, the peak
Python heap (tracemalloc), and the bytes per item of the job rows the Ray engine's driver builds from them.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import tarfile
import time
import tracemalloc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cpp.engines.ray import unit_payload
from cpp.options import SourceSpec
from cpp.sources import Item, SourceItems, iter_items


def write_shards(root: Path, shards: int, per_shard: int) -> SourceSpec:
    """``shards`` tar files of ``per_shard`` samples each (written once; reused when present)."""
    root.mkdir(parents=True, exist_ok=True)
    for shard in range(shards):
        path = root / f"{shard:05d}.tar"
        if path.exists():
            continue
        with tarfile.open(path.with_suffix(".partial"), "w") as archive:
            for index in range(per_shard):
                key = f"{shard:05d}{index:05d}"
                caption = f"sample {key}: a photo of something, with a caption about eighty characters long"
                for name, data in (
                    (f"{key}.jpg", bytes(200)),
                    (f"{key}.txt", caption.encode()),
                    (f"{key}.json", json.dumps({"key": key, "caption": caption}).encode()),
                ):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
        path.with_suffix(".partial").rename(path)
    return SourceSpec(type="webdataset", path=str(root / f"{{00000..{shards - 1:05d}}}.tar"))


def _read_units(items: Sequence[Item], batch: int) -> int:
    """Read every unit's items in order, as an engine does; the number of items seen."""
    seen = 0
    for start in range(0, len(items), batch):
        seen += len(items[start : start + batch])
    return seen


def _measure(way: str, spec: SourceSpec, batch: int, traced: bool, out: Any) -> None:
    if traced:
        tracemalloc.start()
    started = time.perf_counter()
    items: Sequence[Item] = list(iter_items(spec)) if way == "list" else SourceItems.of(spec)
    listed = time.perf_counter()
    seen = _read_units(items, batch)
    finished = time.perf_counter()
    if traced:
        peak = tracemalloc.get_traced_memory()[1]
        out.put({"peak_heap_mib": round(peak / 2**20, 1), "heap_bytes_per_item": round(peak / seen, 1)})
    else:
        payload = sum(
            len(unit_payload(items, start, min(start + batch, len(items))))
            for start in range(0, len(items), batch)
        )
        out.put(
            {
                "items": seen,
                "list_s": round(listed - started, 2),
                "read_s": round(finished - listed, 2),
                "ray_payload_bytes_per_item": round(payload / seen, 2),
            }
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shards", type=int, default=20)
    parser.add_argument("--per-shard", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--work-dir", type=Path, required=True, help="where the shards are written")
    args = parser.parse_args()
    if args.shards < 1 or args.per_shard < 1 or args.batch < 1:
        parser.error("--shards, --per-shard and --batch must be positive")
    started = time.perf_counter()
    spec = write_shards(args.work_dir, args.shards, args.per_shard)
    report: dict[str, Any] = {
        "shards": args.shards,
        "per_shard": args.per_shard,
        "write_s": round(time.perf_counter() - started, 1),
    }
    context = multiprocessing.get_context("spawn")  # a fresh heap for each measurement
    for way in ("list", "source_items"):
        report[way] = {}
        for traced in (False, True):  # times without tracemalloc's overhead, then the peak heap
            queue = context.Queue()
            process = context.Process(target=_measure, args=(way, spec, args.batch, traced, queue))
            process.start()
            report[way].update(queue.get())
            process.join()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
