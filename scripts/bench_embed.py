"""Benchmark: images/s of the embed pipeline, as JSON.

Two suites:

``folder`` (default): ``embed_source`` on the first N images of FOLDER against the encoder's bare forward
(the same forward passes on pre-made uint8 batches), ``--rounds`` times, alternated; each pipeline run says
where its seconds went (listing, store set-up, inline decoding, forward, store writes, finishing). A decode
study times the CPU preparation paths per image and compares the features of the default one (reduced-scale
JPEG decode + windowed crop) with the full decode's.
  python scripts/bench_embed.py FOLDER [--model SPEC | --random-weights ARCH] [--engine E] [--batch-size B]
      [--workers W] [--forward-batch F] [--limit N] [--repeat K] [--rounds R] [--out report.json]
  ``--repeat K`` lists a small folder K times over (as symbolic links) for a longer run; ``--random-weights
  ViT-B-32`` times an open_clip architecture with random weights (same compute, features meaningless).
  For stable CPU figures run with MALLOC_MMAP_THRESHOLD_=1000000000 MALLOC_TRIM_THRESHOLD_=1000000000.

``gpu``: generates its own JPEG corpus (``--n`` files of 500x375 cut from scikit-image's photos with random
crops, flips, JPEG quality and chroma subsampling), then for each random-weight open_clip model (``--models``)
reports in one run: the model's bare forward (eager and faster variants), batched decode + resize alone,
the obvious DataLoader + PIL pipeline, and ``embed_source`` end to end with the device engine (also with
``--cpu-share`` of the JPEGs decoded by its readers) and the local engine, with the ratios the targets
name. It also runs on a CPU with tiny settings:
  python scripts/bench_embed.py --suite gpu --models tiny --n 48 --device cpu --out report.json
The report is rewritten after every measurement, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import multiprocessing
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Generator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from cpp.embed import embed_source
from cpp.encoders import Encoder, create_encoder
from cpp.encoders.open_clip import OpenClipEncoder
from cpp.encoders.registry import resolve_device
from cpp.engines import (
    DeviceDecodeEngine,
    EmbedEngine,
    EncodedUnit,
    LocalEngine,
    create_engine,
    default_workers,
    list_engines,
)
from cpp.engines.base import DRAFT_MARGIN, DecodedUnit, encode_unit, prepare_image
from cpp.engines.device import DeviceDecoder
from cpp.engines.local import default_forward_batch
from cpp.images import DEFAULT_MAX_PIXELS, decode_image
from cpp.options import SourceSpec
from cpp.sources import Item, iter_items
from cpp.store import FeatureStore

#: scikit-image sample photos the corpus is cut from (greyscale ones are stored as RGB).
CORPUS_PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "stereo_motorcycle",
    "camera",
    "coins",
    "moon",
    "grass",
    "gravel",
    "brick",
)
#: A small open_clip architecture for CPU smoke runs (the tests' tiny model).
TINY_ARCH = "cpp-bench-tiny"
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
CUDA_VARIANTS = ("flash", "cudagraph", "bf16_cudagraph", "compile_cudagraphs")
COMPILE_VARIANTS = ("compile", "compile_cudagraphs")
ALL_VARIANTS = ("eager", "bf16", "flash", "cudagraph", "bf16_cudagraph", "compile", "compile_cudagraphs")


# ---------------------------------------------------------------------------------------------- folder suite


class TimedEngine(EmbedEngine):
    """Wraps an engine and accounts for the seconds of a run: time waiting on the engine (and, of that, the
    decode and forward seconds its units report) and time in :func:`embed_source` between units."""

    def __init__(self, inner: EmbedEngine) -> None:
        self.inner = inner
        self.name = inner.name
        self.marks: dict[str, float] = {}
        self.engine_s = self.decode_s = self.encode_s = 0.0

    def run(
        self, items: Sequence[Item], units: list[tuple[int, int]], encoder: Encoder, max_pixels: int
    ) -> Generator[EncodedUnit, None, None]:
        self.marks["first_unit_asked"] = time.perf_counter()
        inner = self.inner.run(items, units, encoder, max_pixels)
        try:
            while True:
                asked = time.perf_counter()
                unit = next(inner, None)
                self.engine_s += time.perf_counter() - asked
                if unit is None:
                    break
                self.decode_s += unit.decode_s
                self.encode_s += unit.encode_s
                yield unit
        finally:
            inner.close()
            self.marks["last_unit_done"] = time.perf_counter()

    def describe(self) -> dict[str, object]:
        return self.inner.describe()


def bare_forward(
    encoder: Encoder, shape: tuple[int, ...], batch_size: int, images: int, forward_batch: int | None
) -> dict[str, Any]:
    """Throughput of the forward alone on pre-made uint8 units, in pieces of ``forward_batch`` as the
    engine runs them (one warm-up unit not timed)."""
    batch = torch.randint(0, 256, (batch_size, *shape), dtype=torch.uint8)
    unit = DecodedUnit(start=0, size=batch_size, batch=batch, failures={})
    encode_unit(unit, encoder, forward_batch)
    batches = math.ceil(images / batch_size)
    started = time.perf_counter()
    for _ in range(batches):
        encode_unit(unit, encoder, forward_batch)
    elapsed = time.perf_counter() - started
    return {
        "forward_batch": forward_batch,
        "images": batches * batch_size,
        "seconds": round(elapsed, 3),
        "images_per_s": round(batches * batch_size / elapsed, 2),
    }


def folder_files(folder: Path, limit: int | None, repeat: int, workdir: Path) -> list[str]:
    """The first ``limit`` images of ``folder`` (sorted), listed ``repeat`` times over as symbolic links
    under ``workdir`` (a file list names each file once) so that a small folder makes a longer run."""
    paths = [
        os.path.abspath(str(item.path)) for item in iter_items(SourceSpec(type="folder", path=str(folder)))
    ]
    if not paths:
        raise SystemExit(f"no images in {folder}")
    files = list(paths)
    for round_ in range(1, repeat):
        links = workdir / "repeats" / f"{round_:03d}"
        links.mkdir(parents=True, exist_ok=True)
        for index, path in enumerate(paths):
            link = links / f"{index:06d}{Path(path).suffix}"
            link.symlink_to(path)
            files.append(str(link))
    return files[:limit]


def pipeline(
    encoder: Encoder, files: list[str], batch_size: int, engine: EmbedEngine, workdir: Path
) -> dict[str, Any]:
    """Throughput of :func:`embed_source` (list, read, decode, preprocess, forward, store) on ``files``, and
    where its seconds went."""
    file_list = workdir / "images.txt"
    file_list.write_text("".join(f"{path}\n" for path in files))
    timed = TimedEngine(engine)
    store_dir = workdir / "store"
    shutil.rmtree(store_dir, ignore_errors=True)
    started = time.perf_counter()
    store = embed_source(
        SourceSpec(type="files", path=str(file_list)), store_dir, encoder, batch_size=batch_size, engine=timed
    )
    elapsed = time.perf_counter() - started
    if len(store) < len(files):
        raise SystemExit(f"only {len(store)} of {len(files)} images embedded: {store.skipped()[:3]}")
    listed = float(store.meta["timings_s"]["list"])
    loop_s = timed.marks["last_unit_done"] - timed.marks["first_unit_asked"]
    inline = engine.describe().get("workers") == 0
    seconds = {
        "list": listed,
        "store_open_and_plan": timed.marks["first_unit_asked"] - started - listed,
        "decode_inline" if inline else "wait_for_decoders": timed.decode_s if inline else 0.0,
        "encode": timed.encode_s,
        "engine_other": 0.0,
        "store_writes_and_loop": loop_s - timed.engine_s,
        "finish": started + elapsed - timed.marks["last_unit_done"],
    }
    if inline:
        seconds["engine_other"] = timed.engine_s - timed.decode_s - timed.encode_s
    else:
        seconds["wait_for_decoders"] = timed.engine_s - timed.encode_s
        seconds["decode_in_workers"] = timed.decode_s  # not on this process's clock
    return {
        "images": len(files),
        "embedded": len(store),
        "seconds": round(elapsed, 3),
        "images_per_s": round(len(files) / elapsed, 2),
        "seconds_by_part": {key: round(value, 3) for key, value in seconds.items()},
        "run": store.meta["run"],
    }


def _median(values: list[float]) -> float:
    return float(np.median(np.asarray(values)))


def decode_study(encoder: Encoder, files: list[str], max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[str, Any]:
    """Per-image milliseconds of the CPU preparation paths on ``files`` held in memory, and how far the
    features of the default path (draft + windowed crop) are from those of the full decode + torchvision
    preprocessing (cosines; meaningless with random weights)."""
    datas = [Path(file).read_bytes() for file in files]
    geometry = encoder.geometry
    paths: dict[str, Callable[[bytes], torch.Tensor]] = {
        "full_decode_torchvision": lambda data: prepare_image(data, encoder.preprocess, max_pixels),
        "full_decode_windowed_crop": lambda data: prepare_image(
            data, encoder.preprocess, max_pixels, geometry
        ),
        "draft_windowed_crop": lambda data: prepare_image(
            data, encoder.preprocess, max_pixels, geometry, draft=True
        ),
    }
    report: dict[str, Any] = {"images": len(files), "ms_per_image": {}}
    tensors: dict[str, list[torch.Tensor]] = {}
    for name, prepare in paths.items():
        best = math.inf
        for _ in range(3):
            started = time.perf_counter()
            tensors[name] = [prepare(data) for data in datas]
            best = min(best, time.perf_counter() - started)
        report["ms_per_image"][name] = round(best / len(datas) * 1000, 3)
    if geometry is not None:
        width, height = geometry.min_source_size
        min_size = (width * DRAFT_MARGIN, height * DRAFT_MARGIN)
        report["drafted"] = sum(
            decode_image(data, min_size=min_size).size != decode_image(data).size for data in datas
        )
    reference = tensors["full_decode_torchvision"]
    for name in ("full_decode_windowed_crop", "draft_windowed_crop"):
        differences = [(a.int() - b.int()).abs() for a, b in zip(reference, tensors[name], strict=True)]
        features = [
            torch.cat([encoder.encode_images(torch.stack(part)) for part in _chunks(rows, 32)])
            for rows in (reference, tensors[name])
        ]
        cosines = (features[0] * features[1]).sum(dim=1)
        report[name] = {
            "pixel_max_abs_diff": int(max(int(d.max()) for d in differences)),
            "pixel_mean_abs_diff": round(float(np.mean([float(d.float().mean()) for d in differences])), 4),
            "cosine_mean": round(float(cosines.mean()), 6),
            "cosine_min": round(float(cosines.min()), 6),
        }
    return report


def _chunks(rows: list[torch.Tensor], size: int) -> list[list[torch.Tensor]]:
    return [rows[start : start + size] for start in range(0, len(rows), size)]


def folder_suite(args: argparse.Namespace) -> dict[str, Any]:
    if args.folder is None:
        raise SystemExit("the folder suite needs FOLDER")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if args.random_weights:
            encoder: Encoder = random_weights_encoder(
                args.random_weights, resolve_device(args.device), workdir
            )
            weights = "random (timing only: the features mean nothing)"
        else:
            encoder = create_encoder(args.model, device=args.device)
            weights = str(encoder.describe().get("weights"))
        workers = default_workers(encoder.device) if args.workers is None else args.workers
        forward_batch = args.forward_batch or default_forward_batch(encoder.device)
        batch_size = args.batch_size or 64
        shape = tuple(encoder.preprocess(Image.new("RGB", (64, 64))).shape)
        files = folder_files(args.folder, args.limit, args.repeat, workdir)
        distinct = files[: min(len(files), args.decode_images)]
        result: dict[str, Any] = {
            "machine": machine(encoder.device),
            "encoder": encoder.id,
            "weights": weights,
            "folder": str(args.folder),
            "images": len(files),
            "repeat": args.repeat,
            "batch_size": batch_size,
            "engine": args.engine,
            "workers": workers,
            "forward_batch": forward_batch,
            "input_shape": list(shape),
            "rounds": [],
        }
        for _ in range(args.rounds):  # alternate, so that a change in load hits both
            options: dict[str, Any] = {"workers": workers}
            if args.engine == "local":
                options["forward_batch"] = forward_batch
            engine = create_engine(args.engine, **options)
            piped = pipeline(encoder, files, batch_size, engine, workdir)
            bare = bare_forward(encoder, shape, batch_size, len(files), forward_batch)
            whole = bare_forward(encoder, shape, batch_size, len(files), None)
            result["rounds"].append(
                {
                    "load_avg_1": round(os.getloadavg()[0], 2),
                    "pipeline": piped,
                    "bare_forward": bare,
                    "bare_forward_whole_batch": whole,
                }
            )
        rounds = result["rounds"]
        pipeline_rate = _median([r["pipeline"]["images_per_s"] for r in rounds])
        bare_rate = _median([r["bare_forward"]["images_per_s"] for r in rounds])
        whole_rate = _median([r["bare_forward_whole_batch"]["images_per_s"] for r in rounds])
        result["median_images_per_s"] = {
            "pipeline": pipeline_rate,
            "bare_forward": bare_rate,
            "bare_forward_whole_batch": whole_rate,
        }
        result["pipeline_over_bare"] = round(pipeline_rate / bare_rate, 3)
        result["pipeline_over_best_bare"] = round(pipeline_rate / max(bare_rate, whole_rate), 3)
        if args.decode_images:
            result["decode_study"] = decode_study(encoder, distinct)
        result["machine"]["load_avg_1_5_15_at_end"] = [round(x, 2) for x in os.getloadavg()]
        return result


# ------------------------------------------------------------------------------------------------- gpu suite


def _corpus_photos() -> list[np.ndarray]:
    from skimage import data as skdata

    photos = []
    for name in CORPUS_PHOTOS:
        try:
            array = getattr(skdata, name)()
        except Exception:  # a sample missing from this scikit-image install (some need pooch)
            continue
        array = array[0] if isinstance(array, tuple) else array
        array = np.stack([array] * 3, axis=-1) if array.ndim == 2 else array[..., :3]
        photos.append(np.ascontiguousarray(array.astype(np.uint8)))
    if not photos:
        raise SystemExit("no scikit-image sample photo could be loaded for the corpus")
    return photos


_PHOTOS: list[np.ndarray] = []


def _write_corpus_part(job: tuple[str, int, int, int, int, int]) -> int:
    """Write images ``start..end`` of the corpus (a process-pool task); returns their total bytes."""
    root, start, end, width, height, seed = job
    if not _PHOTOS:
        _PHOTOS.extend(_corpus_photos())
    total = 0
    for index in range(start, end):
        rng = np.random.default_rng(seed + index)
        photo = Image.fromarray(_PHOTOS[index % len(_PHOTOS)])
        area = photo.width * photo.height * rng.uniform(0.35, 1.0)
        aspect = width / height * rng.uniform(0.8, 1.25)
        crop_w = min(photo.width, round(math.sqrt(area * aspect)))
        crop_h = min(photo.height, round(math.sqrt(area / aspect)))
        left = int(rng.integers(0, photo.width - crop_w + 1))
        top = int(rng.integers(0, photo.height - crop_h + 1))
        image = photo.resize(
            (width, height), Image.Resampling.BICUBIC, box=(left, top, left + crop_w, top + crop_h)
        )
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        path = Path(root) / f"{index // 1000:03d}" / f"{index:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        subsampling = 0 if rng.random() < 0.2 else 2  # 4:4:4 or 4:2:0
        image.save(path, "JPEG", quality=int(rng.integers(60, 96)), subsampling=subsampling)
        total += path.stat().st_size
    return total


def make_corpus(root: Path, n: int, size: tuple[int, int], processes: int, seed: int = 0) -> dict[str, Any]:
    """Generate (or reuse, when ``corpus.json`` matches) ``n`` JPEGs of ``size`` under ``root``."""
    manifest = root / "corpus.json"
    wanted = {"files": n, "size": list(size), "seed": seed}
    if manifest.is_file():
        known = json.loads(manifest.read_text())
        if {key: known.get(key) for key in wanted} == wanted:
            return {**known, "path": str(root), "reused": True}
    started = time.perf_counter()
    step = 250
    jobs = [(str(root), start, min(n, start + step), *size, seed) for start in range(0, n, step)]
    if processes > 1 and len(jobs) > 1:
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            total = sum(pool.map(_write_corpus_part, jobs))
    else:
        total = sum(_write_corpus_part(job) for job in jobs)
    described = {
        **wanted,
        "mean_bytes": round(total / max(n, 1)),
        "generate_s": round(time.perf_counter() - started, 2),
    }
    manifest.write_text(json.dumps(described))
    return {**described, "path": str(root), "reused": False}


def random_weights_encoder(arch: str, device: torch.device, workdir: Path) -> OpenClipEncoder:
    """An open_clip encoder with random weights, loaded through the real ``open_clip:<arch>/<file>`` path."""
    if arch == "tiny":
        arch = TINY_ARCH
        config = workdir / f"{arch}.json"
        config.write_text(json.dumps(TINY_CONFIG))
        open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model(arch, pretrained=None, device=device)
    checkpoint = workdir / f"{arch}-random.pt"
    torch.save({key: value.half().cpu() for key, value in model.state_dict().items()}, checkpoint)
    del model
    encoder = create_encoder(f"open_clip:{arch}/{checkpoint}", device=device)
    assert isinstance(encoder, OpenClipEncoder)
    return encoder


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rate(images: int, seconds: float) -> dict[str, float]:
    return {"images": images, "seconds": round(seconds, 3), "images_per_s": round(images / seconds, 2)}


def _timed(fn: Callable[[], object], device: torch.device, batch_size: int, images: int) -> dict[str, float]:
    """Images/s of ``fn`` (one batch per call) over about ``images`` images, after two warm-up calls."""
    started = time.perf_counter()
    fn()
    _sync(device)
    first_s = time.perf_counter() - started
    fn()
    iterations = max(3, math.ceil(images / batch_size))
    _sync(device)
    started = time.perf_counter()
    for _ in range(iterations):
        fn()
    _sync(device)
    return {
        **_rate(iterations * batch_size, time.perf_counter() - started),
        "first_call_s": round(first_s, 3),
    }


def _visual_forward(visual: torch.nn.Module, batch: torch.Tensor, variant: str) -> Callable[[], object]:
    """A no-argument callable running one forward of ``variant`` on ``batch`` (set up and captured here)."""
    if variant in ("eager", "bf16"):
        return lambda: visual(batch)
    if variant == "flash":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def flash() -> object:
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                return visual(batch)

        return flash
    if variant in ("cudagraph", "bf16_cudagraph"):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                visual(batch)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            visual(batch)
        return graph.replay
    if variant == "compile":
        compiled = torch.compile(visual)
        return lambda: compiled(batch)
    if variant == "compile_cudagraphs":
        compiled = torch.compile(visual, mode="reduce-overhead")
        return lambda: compiled(batch)
    raise ValueError(f"unknown variant {variant!r}; known: {', '.join(ALL_VARIANTS)}")


def _input_size(encoder: OpenClipEncoder) -> tuple[int, int]:
    height, width = encoder.model.visual.image_size
    return int(height), int(width)


def forward_variant(encoder: OpenClipEncoder, variant: str, batch_size: int, images: int) -> dict[str, Any]:
    """Images/s of the image tower alone on normalised device tensors; failures become an error string."""
    device = encoder.device
    if variant in CUDA_VARIANTS and device.type != "cuda":
        return {"skipped": "needs CUDA"}
    visual = encoder.model.visual
    dtype = next(visual.parameters()).dtype
    if variant.startswith("bf16"):
        visual, dtype = copy.deepcopy(visual).to(torch.bfloat16), torch.bfloat16
    batch = torch.randn(batch_size, 3, *_input_size(encoder), device=device).to(dtype)
    try:
        with torch.inference_mode():
            result = _timed(_visual_forward(visual, batch, variant), device, batch_size, images)
    except Exception as exc:  # one variant failing (no flash kernel, a compiler error) must not end the run
        return {"error": f"{type(exc).__name__}: {str(exc)[:500]}"}
    finally:
        if variant in COMPILE_VARIANTS:
            torch.compiler.reset()
    return {**result, "dtype": str(dtype).removeprefix("torch.")}


def encode_images_rate(encoder: OpenClipEncoder, batch_size: int, images: int) -> dict[str, float]:
    """Images/s of ``encode_images`` on a uint8 batch already on the device (normalise, forward, copy out)."""
    batch = torch.randint(
        0, 256, (batch_size, 3, *_input_size(encoder)), dtype=torch.uint8, device=encoder.device
    )
    return _timed(lambda: encoder.encode_images(batch), encoder.device, batch_size, images)


def decode_only(encoder: Encoder, files: list[str], batch_size: int) -> dict[str, Any]:
    """Images/s of the device engine's decode stage (batched JPEG decode, resize, crop) on bytes in memory."""
    assert encoder.geometry is not None
    decoder = DeviceDecoder(encoder.device, encoder.geometry, encoder.preprocess, DEFAULT_MAX_PIXELS)
    encoded = [torch.frombuffer(bytearray(Path(file).read_bytes()), dtype=torch.uint8) for file in files]
    batches = [encoded[start : start + batch_size] for start in range(0, len(encoded), batch_size)]

    def run_batch(batch: list[torch.Tensor]) -> torch.Tensor:
        images = decoder.decode(batch)
        if any(image is None for image in images):
            raise RuntimeError("the device decoder rejected a corpus image")
        return torch.stack(decoder.resize_crop([image for image in images if image is not None]))

    run_batch(batches[0])  # warm-up: decoder handles, kernels
    _sync(encoder.device)
    started = time.perf_counter()
    for batch in batches:
        run_batch(batch)
    _sync(encoder.device)
    return {**_rate(len(files), time.perf_counter() - started), "device": str(encoder.device)}


def end_to_end(
    encoder: Encoder, corpus: Path, batch_size: int, engine: EmbedEngine, store_dir: Path
) -> dict[str, Any]:
    """Wall-clock images/s of :func:`embed_source` on the corpus folder (listing and writes included)."""
    started = time.perf_counter()
    store = embed_source(
        SourceSpec(type="folder", path=str(corpus)), store_dir, encoder, batch_size=batch_size, engine=engine
    )
    elapsed = time.perf_counter() - started
    return {
        **_rate(store.counts["items"], elapsed),
        "embedded": store.counts["embedded"],
        "run": store.meta["run"],
        "store_timings_s": store.meta["timings_s"],
    }


def agreement(first: Path, second: Path) -> dict[str, Any]:
    """How closely two stores of the same corpus agree: same rows, and the cosines of their features."""
    a, b = FeatureStore.open(first), FeatureStore.open(second)
    if a.rows() != b.rows():
        return {"rows_equal": False}
    x, y = a.features(np.float32), b.features(np.float32)
    cosines = (x * y).sum(axis=1) / np.maximum(np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1), 1e-12)
    return {
        "rows_equal": True,
        "min_cosine": round(float(cosines.min()), 5),
        "mean_cosine": round(float(cosines.mean()), 5),
    }


class _Files(Dataset[torch.Tensor]):
    def __init__(self, files: list[str], transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.files = files
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        with Image.open(self.files[index]) as image:
            return self.transform(image.convert("RGB"))


def obvious_pipeline(
    encoder: OpenClipEncoder, files: list[str], batch_size: int, workers: int
) -> dict[str, Any]:
    """Images/s of the usual recipe: a DataLoader of PIL decode + open_clip's float transform in ``workers``
    processes, pinned batches, the model's own precision (fp16 on CUDA) forward."""
    cfg = dict(encoder.model.visual.preprocess_cfg)
    transform = open_clip.transform.image_transform(
        cfg["size"],
        is_train=False,
        mean=cfg.get("mean"),
        std=cfg.get("std"),
        resize_mode=cfg.get("resize_mode"),
        interpolation=cfg.get("interpolation"),
    )
    device = encoder.device
    dtype = next(encoder.model.parameters()).dtype
    loader = DataLoader(
        _Files(files, transform),
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers else None,
    )
    started = time.perf_counter()
    with torch.inference_mode():
        for batch in loader:
            features = encoder.model.encode_image(batch.to(device, non_blocking=True).to(dtype))
            torch.nn.functional.normalize(features.float(), dim=-1).cpu()
    return {
        **_rate(len(files), time.perf_counter() - started),
        "workers": workers,
        "dtype": str(dtype).removeprefix("torch."),
    }


class Report:
    """The JSON report, rewritten to ``path`` after every measurement."""

    def __init__(self, path: Path | None, deadline: float) -> None:
        self.path = path
        self.deadline = deadline
        self.data: dict[str, Any] = {}

    def save(self) -> None:
        if self.path is not None:
            self.path.write_text(json.dumps(self.data, indent=2))

    def measure(self, target: dict[str, Any], key: str, fn: Callable[[], dict[str, Any]]) -> None:
        """Run ``fn`` into ``target[key]`` unless the deadline has passed; errors are recorded, not raised."""
        if time.monotonic() > self.deadline:
            target[key] = {"skipped": "time limit (--max-seconds)"}
        else:
            try:
                target[key] = fn()
            except Exception as exc:
                target[key] = {"error": f"{type(exc).__name__}: {str(exc)[:500]}"}
        self.save()


def _ratio(numerator: dict[str, Any], denominator: dict[str, Any]) -> float | None:
    if "images_per_s" not in numerator or "images_per_s" not in denominator:
        return None
    return round(numerator["images_per_s"] / denominator["images_per_s"], 3)


def _targets(models: dict[str, dict[str, Any]]) -> dict[str, Any]:
    targets: dict[str, Any] = {}
    if "ViT-B-32" in models:
        ratios = models["ViT-B-32"]["ratios"]
        for key, label in (
            ("end_to_end_over_obvious", ""),
            ("cpu_share_end_to_end_over_obvious", " (cpu_share)"),
        ):
            ratio = ratios[key]
            targets[f"ViT-B-32 end to end{label} >= 4x the obvious pipeline"] = {
                "ratio": ratio,
                "met": ratio is not None and ratio >= 4,
            }
    if "ViT-L-14" in models:
        large = models["ViT-L-14"]
        ratio = large["ratios"]["end_to_end_over_eager_forward"]
        targets["ViT-L-14 end to end >= 0.95x its eager forward"] = {
            "ratio": ratio,
            "met": ratio is not None and ratio >= 0.95,
        }
        rates = {
            name: v["images_per_s"]
            for name, v in large["forward"].items()
            if name != "eager" and "images_per_s" in v
        }
        eager = large["forward"].get("eager", {}).get("images_per_s")
        if rates and eager:
            best = max(rates, key=lambda name: rates[name])
            targets["ViT-L-14 a forward variant beats eager"] = {
                "best": best,
                "ratio": round(rates[best] / eager, 3),
                "met": rates[best] > eager,
            }
    return targets


def gpu_suite(args: argparse.Namespace, report: Report) -> None:
    device = torch.device(
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    width, height = (int(x) for x in args.image_size.lower().split("x"))
    batch_size = args.batch_size or 256
    cores = os.cpu_count() or 1
    loader_workers = min(16, cores) if args.loader_workers is None else args.loader_workers
    hybrid_workers = max(1, cores - 2) if args.workers is None else args.workers
    variants = (
        args.variants.split(",")
        if args.variants
        else list(ALL_VARIANTS if device.type == "cuda" else ("eager", "bf16"))
    )
    corpus = args.corpus or Path(tempfile.gettempdir()) / f"cpp-bench-corpus-{args.n}-{width}x{height}"
    data = report.data
    data.update(
        {
            "suite": "gpu",
            "machine": machine(device),
            "settings": {
                "batch_size": batch_size,
                "engine_workers": default_workers(device) if args.workers is None else args.workers,
                "loader_workers": loader_workers,
                "cpu_share": args.cpu_share,
                "cpu_share_workers": hybrid_workers,
                "forward_images": args.forward_images,
                "variants": variants,
            },
            "models": {},
        }
    )
    data["corpus"] = make_corpus(corpus, args.n, (width, height), processes=cores)
    report.save()
    files = sorted(str(item.path) for item in iter_items(SourceSpec(type="folder", path=str(corpus))))
    models: dict[str, dict[str, Any]] = data["models"]
    encoders: dict[str, OpenClipEncoder] = {}
    with tempfile.TemporaryDirectory() as workdir:
        for arch in args.models.split(","):
            encoder = encoders[arch] = random_weights_encoder(arch, device, Path(workdir))
            entry = models[arch] = {
                "encoder": encoder.id,
                "precision": encoder.precision,
                "geometry": str(encoder.geometry),
                "forward": {},
            }
            forward = entry["forward"]
            # forward first: it warms up the kernels the pipelines use
            images = args.forward_images
            report.measure(forward, "eager", partial(forward_variant, encoder, "eager", batch_size, images))
            report.measure(forward, "encode_images", partial(encode_images_rate, encoder, batch_size, images))
            report.measure(entry, "decode_only", partial(decode_only, encoder, files, batch_size))
            stores = Path(workdir) / f"stores-{len(models)}"
            engines: dict[str, EmbedEngine] = {
                "end_to_end": DeviceDecodeEngine(args.workers),
                "end_to_end_local_engine": LocalEngine(args.workers),
                "end_to_end_cpu_share": DeviceDecodeEngine(hybrid_workers, cpu_share=args.cpu_share),
            }
            for key, engine in engines.items():
                measured = partial(end_to_end, encoder, corpus, batch_size, engine, stores / key)
                report.measure(entry, key, measured)
            compared = partial(agreement, stores / "end_to_end", stores / "end_to_end_local_engine")
            report.measure(entry, "device_vs_local_engine", compared)
            obvious = partial(obvious_pipeline, encoder, files, batch_size, loader_workers)
            report.measure(entry, "obvious_pipeline", obvious)
            entry["ratios"] = {
                "end_to_end_over_obvious": _ratio(entry["end_to_end"], entry["obvious_pipeline"]),
                "end_to_end_over_eager_forward": _ratio(entry["end_to_end"], forward["eager"]),
                "cpu_share_end_to_end_over_obvious": _ratio(
                    entry["end_to_end_cpu_share"], entry["obvious_pipeline"]
                ),
            }
            data["targets"] = _targets(models)
            report.save()
        # the variants last, the compiled ones after all others: they take longest to set up
        for arch, encoder in encoders.items():
            forward = models[arch]["forward"]
            for variant in sorted((v for v in variants if v != "eager"), key=lambda v: v in COMPILE_VARIANTS):
                measured = partial(forward_variant, encoder, variant, batch_size, args.forward_images)
                report.measure(forward, variant, measured)
            data["targets"] = _targets(models)
            report.save()


def machine(device: torch.device) -> dict[str, Any]:
    described: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "open_clip": open_clip.__version__,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
    }
    if device.type == "cuda":
        described["gpu"] = torch.cuda.get_device_name(device)
        described["cuda"] = torch.version.cuda
    return described


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("folder", type=Path, nargs="?", help="images to embed (folder suite)")
    parser.add_argument("--suite", choices=("folder", "gpu"), default="folder")
    parser.add_argument("--model", default="auto", help="encoder spec (folder suite)")
    parser.add_argument(
        "--engine", choices=list_engines(), default="local", help="embed engine (folder suite)"
    )
    parser.add_argument("--batch-size", type=int, default=None, help="default: 64 (folder), 256 (gpu)")
    parser.add_argument(
        "--workers", type=int, default=None, help="engine decode/read workers (default: the library's)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument(
        "--limit",
        type=int,
        default=None,
        help="use the first N images (sorted, after --repeat; folder suite)",
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="list the folder's images this many times over (folder suite)"
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="pipeline and bare forward runs, alternated (folder suite)"
    )
    parser.add_argument(
        "--forward-batch", type=int, default=None, help="images per forward pass (default: the engine's)"
    )
    parser.add_argument(
        "--random-weights",
        metavar="ARCH",
        default=None,
        help="time this open_clip architecture with random weights instead of --model (timing only)",
    )
    parser.add_argument(
        "--decode-images",
        type=int,
        default=200,
        help="images for the decode-path study: milliseconds and feature cosines (folder suite; 0: none)",
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--n", type=int, default=20000, help="corpus size (gpu suite)")
    parser.add_argument("--image-size", default="500x375", help="corpus image WIDTHxHEIGHT (gpu suite)")
    parser.add_argument(
        "--corpus", type=Path, default=None, help="corpus folder (default: under the temp dir)"
    )
    parser.add_argument("--models", default="ViT-B-32,ViT-L-14", help="open_clip architectures, or 'tiny'")
    parser.add_argument("--variants", default=None, help=f"forward variants, from {','.join(ALL_VARIANTS)}")
    parser.add_argument(
        "--loader-workers",
        type=int,
        default=None,
        help="obvious pipeline's DataLoader workers (default: min(16, cores))",
    )
    parser.add_argument(
        "--cpu-share", type=float, default=0.2, help="share of JPEGs the readers decode with PIL (gpu suite)"
    )
    parser.add_argument("--forward-images", type=int, default=10240, help="images per forward measurement")
    parser.add_argument(
        "--max-seconds", type=float, default=None, help="skip measurements that would start later than this"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="also write the JSON report here (rewritten as it grows)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.suite == "folder":
        result = folder_suite(args)
        if args.out is not None:
            args.out.write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
        return
    report = Report(args.out, time.monotonic() + (args.max_seconds or math.inf))
    with contextlib.suppress(KeyboardInterrupt):
        gpu_suite(args, report)
    print(json.dumps(report.data, indent=2))


if __name__ == "__main__":
    main()
