"""Benchmark: ``cpp embed`` against clip-retrieval's ``inference`` on the same images and checkpoint, as JSON.

  python scripts/bench_peers.py FOLDER [--limit N] [--arch ViT-B-32] [--checkpoint FILE] [--rounds R]
      [--batch-size B] [--peer-workers W] [--peer-python PYTHON] [--out report.json]

Both tools run as fresh processes on the first N images of FOLDER (sorted; linked into one flat folder that
both read), with the same open_clip checkpoint (``--checkpoint``, or random weights of ``--arch`` written
here: timing only, the features mean nothing) and batch size; the runs alternate (cpp first in even rounds,
the peer first in odd ones) so that a change in load hits both. Each run records its wall-clock seconds,
images/s and peak RSS; the report gives the medians, the ratio peer seconds / cpp seconds (above 1: cpp
is faster) and the cosines between the two tools' features of each image.

clip-retrieval is an optional peer: when ``PYTHON -c 'import clip_retrieval'`` fails (it is not a
dependency of cpp; ``--peer-python`` may name another environment that has it), the peer is skipped with
the reason in the report and cpp is timed alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

PEER = "clip-retrieval"
#: Lists clip-retrieval's output rows as JSON (its metadata parquet files, in the order of its embeddings).
_PEER_PATHS = (
    "import json, sys, pathlib, pyarrow.parquet as pq; "
    "files = sorted(pathlib.Path(sys.argv[1], 'metadata').glob('metadata_*.parquet')); "
    "print(json.dumps([p for f in files for p in pq.read_table(f).column('image_path').to_pylist()]))"
)


def link_images(folder: Path, limit: int | None, target: Path) -> list[Path]:
    """Symbolic links ``target/NNNNNN.ext`` to the first ``limit`` images of ``folder``, in sorted order."""
    from cpp.options import SourceSpec
    from cpp.sources import iter_items

    paths = [
        Path(str(item.path)).resolve() for item in iter_items(SourceSpec(type="folder", path=str(folder)))
    ]
    if not paths:
        raise SystemExit(f"no images in {folder}")
    target.mkdir(parents=True)
    links = []
    for index, path in enumerate(paths[:limit]):
        link = target / f"{index:06d}{path.suffix.lower()}"
        link.symlink_to(path)
        links.append(link)
    return links


def random_checkpoint(arch: str, workdir: Path) -> Path:
    """An open_clip checkpoint of ``arch`` with random weights (seed 0)."""
    import open_clip
    import torch

    torch.manual_seed(0)
    model = open_clip.create_model(arch, pretrained=None)
    path = workdir / f"{arch}-random.pt"
    torch.save(model.state_dict(), path)
    return path


def timed_run(command: list[str], images: int) -> dict[str, Any]:
    """Run ``command`` to completion: wall seconds, images/s and the peak RSS of the process tree it waited
    for (``wait4``); a failure is raised with the end of its output."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert process.stdout is not None
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    elapsed = time.perf_counter() - started
    if process.returncode != 0:
        tail = output.decode(errors="replace")[-2000:]
        raise SystemExit(f"{command[0]} ... failed ({process.returncode}):\n{tail}")
    return {
        "seconds": round(elapsed, 3),
        "images_per_s": round(images / elapsed, 2),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "load_avg_1": round(os.getloadavg()[0], 2),
    }


def cpp_command(images: Path, out: Path, model: str, batch_size: int) -> list[str]:
    return [
        sys.executable,
        "-c",
        "import sys; from cpp.cli import main; sys.exit(main())",
        "embed",
        str(images),
        "--out",
        str(out),
        "--model",
        model,
        "--batch-size",
        str(batch_size),
        "--quiet",
    ]


def peer_command(
    python: str, images: Path, out: Path, arch: str, checkpoint: Path, batch_size: int, workers: int
) -> list[str]:
    call = (
        "from clip_retrieval.clip_inference.main import main; "
        f"main(input_dataset={str(images)!r}, output_folder={str(out)!r}, input_format='files', "
        f"clip_model={f'open_clip:{arch}/{checkpoint}'!r}, enable_text=False, enable_metadata=False, "
        f"batch_size={batch_size}, num_prepro_workers={workers})"
    )
    return [python, "-c", call]


def peer_missing(python: str) -> str | None:
    """Why the peer cannot run with ``python``, or ``None`` when it can."""
    done = subprocess.run(
        [python, "-c", "import clip_retrieval.clip_inference.main"],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode == 0:
        return None
    last = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return f"{PEER} is not installed for {python} ({last}); pip install clip-retrieval, or pass --peer-python"


def agreement(cpp_store: Path, peer_out: Path, python: str) -> dict[str, Any]:
    """Cosines between the two tools' features of each image (matched by file name)."""
    from cpp.store import FeatureStore

    store = FeatureStore.open(cpp_store)
    ours = {Path(row.path or row.key).name: index for index, row in enumerate(store.rows())}
    features = store.features(np.float32)
    listed = subprocess.run(
        [python, "-c", _PEER_PATHS, str(peer_out)], capture_output=True, text=True, check=True
    )
    names = [Path(path).name for path in json.loads(listed.stdout)]
    theirs = np.concatenate(
        [np.load(path) for path in sorted((peer_out / "img_emb").glob("img_emb_*.npy"))], axis=0
    ).astype(np.float32)
    rows = [(ours[name], index) for index, name in enumerate(names) if name in ours]
    a = features[[row for row, _ in rows]]
    b = theirs[[index for _, index in rows]]
    cosines = (a * b).sum(axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    return {
        "images_compared": len(rows),
        "cosine_mean": round(float(cosines.mean()), 6),
        "cosine_min": round(float(cosines.min()), 6),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("folder", type=Path, help="images (searched recursively)")
    parser.add_argument("--limit", type=int, default=None, help="the first N images (sorted)")
    parser.add_argument("--arch", default="ViT-B-32", help="open_clip architecture")
    parser.add_argument(
        "--checkpoint", type=Path, default=None, help="open_clip checkpoint file (default: random weights)"
    )
    parser.add_argument("--rounds", type=int, default=2, help="runs of each tool, alternated")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--peer-workers",
        type=int,
        default=None,
        help="clip-retrieval's preprocessing workers (default: cores)",
    )
    parser.add_argument("--peer-python", default=sys.executable, help="the Python that has clip-retrieval")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON report here")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    workers = cores if args.peer_workers is None else args.peer_workers
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        links = link_images(args.folder, args.limit, workdir / "images")
        checkpoint = args.checkpoint or random_checkpoint(args.arch, workdir)
        model = f"open_clip:{args.arch}/{checkpoint}"
        missing = peer_missing(args.peer_python)
        report: dict[str, Any] = {
            "machine": {
                "cpu_count": cores,
                "platform": platform.platform(),
                "python": platform.python_version(),
                "load_avg_1_5_15_at_start": [round(x, 2) for x in os.getloadavg()],
                "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
            },
            "folder": str(args.folder),
            "images": len(links),
            "checkpoint": str(checkpoint)
            if args.checkpoint
            else f"random weights of {args.arch} (timing only)",
            "batch_size": args.batch_size,
            "peer_workers": workers,
            "runs": {"cpp": [], PEER: []},
        }
        if missing:
            report["runs"].pop(PEER)
            report["skipped"] = {PEER: missing}
            print(f"skipping {PEER}: {missing}", file=sys.stderr)
        for round_ in range(args.rounds):
            order = ["cpp", PEER] if round_ % 2 == 0 else [PEER, "cpp"]
            for tool in order:
                if tool not in report["runs"]:
                    continue
                out = workdir / f"{tool}-{round_}"
                if tool == "cpp":
                    command = cpp_command(workdir / "images", out, model, args.batch_size)
                else:
                    command = peer_command(
                        args.peer_python,
                        workdir / "images",
                        out,
                        args.arch,
                        checkpoint,
                        args.batch_size,
                        workers,
                    )
                report["runs"][tool].append(timed_run(command, len(links)))
        medians = {
            tool: float(np.median([run["seconds"] for run in runs])) for tool, runs in report["runs"].items()
        }
        report["median_seconds"] = medians
        if PEER in medians:
            report["peer_seconds_over_cpp"] = round(medians[PEER] / medians["cpp"], 3)
            report["agreement"] = agreement(workdir / "cpp-0", workdir / f"{PEER}-0", args.peer_python)
        report["machine"]["load_avg_1_5_15_at_end"] = [round(x, 2) for x in os.getloadavg()]
    text = json.dumps(report, indent=2)
    if args.out is not None:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
