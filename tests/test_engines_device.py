"""The device engine on the CPU: tensor geometry, EXIF orientation, fallbacks, failures, order and resume."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from controls import cancel_after
from photos import photo_array
from PIL import Image
from torchvision import transforms

from cpp.embed import embed_source
from cpp.encoders import Encoder, create_encoder
from cpp.encoders.preprocessing import ImageGeometry, tensor_geometry
from cpp.engines import AutoEngine, DeviceDecodeEngine, LocalEngine, create_engine
from cpp.engines import device as device_module
from cpp.engines.device import FittingEncode, JpegHeader, jpeg_header, read_unit
from cpp.errors import CppError
from cpp.images import decode_image
from cpp.options import SourceSpec
from cpp.progress import Cancelled
from cpp.sources import Item, iter_items

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:torchvision.io.image")

ROOT = Path(__file__).resolve().parents[1]
#: Where the engine tests run their encoder: CPU in CI; ``CPP_TEST_DEVICE=cuda`` on a GPU machine also
#: checks nvJPEG decoding, side-stream hand-over and pinned copies against the local engine.
TEST_DEVICE = os.environ.get("CPP_TEST_DEVICE", "cpu")
# Features of the two engines differ only by decoding and resampling: on the CPU torch's antialiased bicubic
# on the decoded tensor against PIL's (at most 2 levels of 255 apart), measured cosines >= 0.99998. On CUDA
# nvJPEG upsamples chroma its own way and the forward runs in fp16: a looser bound, not yet measured.
MIN_COSINE = 0.99 if TEST_DEVICE == "cuda" else 0.999


def _full_decode() -> LocalEngine:
    """The local engine decoding every JPEG at full size, as the device engine does (by default the local
    engine decodes large ones at reduced scale, tests/test_engines_local.py)."""
    return LocalEngine(0, draft=False)


@pytest.fixture(scope="module")
def tiny_encoder(tiny_clip_spec: str) -> Encoder:
    return create_encoder(tiny_clip_spec, device=TEST_DEVICE)


def _jpeg(array: np.ndarray, **save: Any) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "JPEG", **save)
    return buffer.getvalue()


def _with_orientation(array: np.ndarray, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _jpeg(array, quality=92, exif=exif.tobytes())


def _corrupt_tables(data: bytes) -> bytes:
    """A JPEG whose header opens but whose tables are destroyed: both decoders reject its pixels."""
    broken = bytearray(data)
    broken[20:60] = bytes(40)
    return bytes(broken)


def _mixed_folder(photo_dir: Path) -> Path:
    """The 8 photos plus the odd, the non-JPEG and the broken files a real collection has."""
    odd = photo_dir / "odd"
    odd.mkdir()
    coffee, rocket = photo_array("coffee"), photo_array("rocket")
    (odd / "rotated.jpg").write_bytes(_with_orientation(coffee, 6))
    (odd / "mirrored.jpg").write_bytes(_with_orientation(rocket, 2))
    (odd / "progressive.jpg").write_bytes(_jpeg(rocket, quality=80, progressive=True))
    (odd / "grey.jpg").write_bytes(_jpeg(photo_array("camera")[..., 0]))
    (odd / "subsampled444.jpg").write_bytes(_jpeg(coffee, quality=95, subsampling=0))
    Image.fromarray(photo_array("astronaut")).convert("CMYK").save(odd / "cmyk.jpg")
    Image.fromarray(photo_array("rocket")).convert("RGBA").save(odd / "alpha.png")
    Image.fromarray(photo_array("coffee")).convert("P").save(odd / "palette.gif")
    Image.fromarray(photo_array("chelsea")).save(odd / "photo.tiff")
    (odd / "named-png.jpg").write_bytes((odd / "alpha.png").read_bytes())
    bad = photo_dir / "bad"
    bad.mkdir()
    jpeg = _jpeg(coffee)
    (bad / "truncated.jpg").write_bytes(jpeg[:3000])
    (bad / "corrupt.jpg").write_bytes(_corrupt_tables(jpeg))
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "text.jpg").write_text("this is not an image")
    return photo_dir


def _folder(path: Path) -> SourceSpec:
    return SourceSpec(type="folder", path=str(path), labels_from_folders=True)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float32), b.astype(np.float32)
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_tensor_geometry_of_transforms() -> None:
    bicubic = transforms.InterpolationMode.BICUBIC
    shortest = transforms.Compose(
        [transforms.Resize(256, interpolation=bicubic), transforms.CenterCrop(224), transforms.PILToTensor()]
    )
    assert tensor_geometry(shortest) == ImageGeometry(size=(256,), crop=(224, 224), interpolation="bicubic")
    squash = transforms.Compose([transforms.Resize((64, 96)), transforms.PILToTensor()])
    assert tensor_geometry(squash) == ImageGeometry(size=(64, 96), crop=None, interpolation="bilinear")
    assert tensor_geometry(transforms.Compose([transforms.RandomCrop(8), transforms.PILToTensor()])) is None
    padded = transforms.Compose([transforms.Resize(8), transforms.Pad(2), transforms.PILToTensor()])
    assert tensor_geometry(padded) is None


@pytest.mark.parametrize("spec", ["tiny", "effnet-lite0-in1k"])
def test_geometry_on_tensors_matches_pil_preprocess(spec: str, tiny_clip_spec: str) -> None:
    encoder = create_encoder(tiny_clip_spec if spec == "tiny" else spec, device="cpu")
    assert encoder.geometry is not None
    for name in ("chelsea", "coffee", "hubble", "coins"):
        data = _jpeg(photo_array(name), quality=90)
        expected = encoder.preprocess(decode_image(data)).int()
        decoder = device_module.DeviceDecoder(
            torch.device("cpu"), encoder.geometry, encoder.preprocess, 10**8
        )
        decoded = decoder.decode([torch.frombuffer(bytearray(data), dtype=torch.uint8)])
        assert decoded[0] is not None
        got = decoder.resize_crop([decoded[0]])
        difference = (got[0].int() - expected).abs()
        assert got[0].shape == expected.shape
        assert difference.max() <= 3 and difference.float().mean() < 0.05, name


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_applied_like_pil(orientation: int) -> None:
    data = _with_orientation(photo_array("rocket")[:120, :200], orientation)
    assert jpeg_header(data, 10**8) == JpegHeader(orientation, 120 * 200)
    to_tensor = transforms.PILToTensor()
    unit = read_unit([Item("x", None, lambda: data)], 0, to_tensor, 10**8)
    geometry = ImageGeometry((1,), None, "nearest")  # unused here
    decoder = device_module.DeviceDecoder(torch.device("cpu"), geometry, to_tensor, 10**8)
    decoded = decoder.decode(list(unit.jpeg_data.split(unit.jpeg_lengths)))[0]
    assert decoded is not None
    expected = to_tensor(decode_image(data))
    assert torch.equal(device_module.orient(decoded, orientation), expected)


def test_sniffing_sends_only_plain_complete_jpegs_to_the_device() -> None:
    coffee = photo_array("coffee")
    jpeg = _jpeg(coffee)
    assert jpeg_header(jpeg, 10**8) == JpegHeader(1, coffee.shape[0] * coffee.shape[1])
    assert jpeg_header(jpeg, max_pixels=100) is None  # too large: the CPU path gives the reason
    assert jpeg_header(jpeg[:3000], 10**8) is None  # truncated
    cmyk = io.BytesIO()
    Image.fromarray(coffee).convert("CMYK").save(cmyk, "JPEG")
    assert jpeg_header(cmyk.getvalue(), 10**8) is None
    png = io.BytesIO()
    Image.fromarray(coffee).save(png, "PNG")
    assert jpeg_header(png.getvalue(), 10**8) is None


@pytest.mark.parametrize(("model", "workers"), [("tiny", 1), ("effnet-lite0-in1k", 0)])
def test_device_engine_matches_local_engine(
    photo_dir: Path, tmp_path: Path, tiny_encoder: Encoder, model: str, workers: int
) -> None:
    """Same rows and reasons, same features up to resampling. The random tiny model tells photos apart
    only weakly (cosines 0.93 on average between different photos), the EfficientNet clearly (0.19)."""
    encoder = tiny_encoder if model == "tiny" else create_encoder(model, device=TEST_DEVICE)
    spec = _folder(_mixed_folder(photo_dir))
    local = embed_source(spec, tmp_path / "local", encoder, batch_size=5, engine=_full_decode(), chunk_size=8)
    engine = DeviceDecodeEngine(workers=workers)
    device = embed_source(spec, tmp_path / "device", encoder, batch_size=5, engine=engine, chunk_size=8)

    assert device.rows() == local.rows()  # keys, order, labels, status and reasons
    assert device.counts == local.counts == {"items": 22, "embedded": 18, "skipped": 4}
    reasons = {Path(s.key).name: s.reason for s in device.skipped()}
    assert "truncated" in reasons["truncated.jpg"] and "broken data stream" in reasons["corrupt.jpg"]
    assert "empty" in reasons["empty.jpg"] and "not an image" in reasons["text.jpg"]
    cosines = _cosines(device.features(), local.features())
    assert cosines.min() >= MIN_COSINE, f"min cosine {cosines.min():.5f}"
    run = device.meta["run"]
    assert run["engine"] == "device" and run["workers"] == workers
    # 8 photos + rotated, mirrored, progressive, grey, 4:4:4 on the device; CMYK, PNGs, GIF, TIFF, and
    # the corrupt JPEG (rejected by the device decoder, then by PIL) on the CPU
    assert (run["device_decoded"], run["cpu_decoded"]) == (13, 5)


def test_large_units_are_decoded_in_pixel_budgeted_batches(
    photo_dir: Path, tiny_encoder: Encoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    items = list(iter_items(_folder(photo_dir)))
    unit = read_unit(items, 0, tiny_encoder.preprocess, 10**8)
    assert tiny_encoder.geometry is not None
    whole = device_module.DeviceDecoder(
        tiny_encoder.device, tiny_encoder.geometry, tiny_encoder.preprocess, 10**8
    )(unit)
    real = device_module.decode_jpeg
    calls: list[int] = []

    def counting(encoded: list[torch.Tensor], **kwargs: Any) -> Any:
        calls.append(len(encoded))
        return real(encoded, **kwargs)

    monkeypatch.setattr(device_module, "decode_jpeg", counting)
    budget = max(header.pixels for header in unit.jpeg_headers)
    split = device_module.DeviceDecoder(
        tiny_encoder.device, tiny_encoder.geometry, tiny_encoder.preprocess, 10**8, max_batch_pixels=budget
    )(unit)
    assert len(calls) > 1 and sum(calls) == len(items)
    assert whole.batch is not None and split.batch is not None
    assert torch.equal(split.batch, whole.batch) and split.failures == whole.failures == {}


def test_a_share_of_jpegs_decoded_by_the_readers(
    photo_dir: Path, tmp_path: Path, tiny_encoder: Encoder
) -> None:
    spec = _folder(photo_dir)
    engine = DeviceDecodeEngine(workers=1, cpu_share=0.5)
    shared = embed_source(spec, tmp_path / "shared", tiny_encoder, batch_size=3, engine=engine)
    local = embed_source(spec, tmp_path / "local", tiny_encoder, batch_size=3, engine=_full_decode())
    assert shared.rows() == local.rows()
    run = shared.meta["run"]
    assert (run["device_decoded"], run["cpu_decoded"], run["cpu_share"]) == (4, 4, 0.5)
    assert _cosines(shared.features(), local.features()).min() >= MIN_COSINE
    with pytest.raises(ValueError, match="cpu_share"):
        DeviceDecodeEngine(cpu_share=1.5)


def test_rejected_batch_is_retried_per_image_and_falls_back_to_pil(
    photo_dir: Path, tmp_path: Path, tiny_encoder: Encoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An image the device decoder rejects (but PIL reads) is embedded, the rest of its batch too."""
    rejected = (photo_dir / "objects" / "coffee.jpg").read_bytes()
    real = device_module.decode_jpeg
    calls: list[int] = []

    def picky(encoded: list[torch.Tensor], **kwargs: Any) -> Any:
        calls.append(len(encoded))
        if any(data.numpy().tobytes() == rejected for data in encoded):
            raise RuntimeError("simulated nvJPEG rejection")
        return real(encoded, **kwargs)

    monkeypatch.setattr(device_module, "decode_jpeg", picky)
    spec = _folder(photo_dir)
    engine = DeviceDecodeEngine(workers=0)
    device = embed_source(spec, tmp_path / "device", tiny_encoder, batch_size=4, engine=engine)
    local = embed_source(spec, tmp_path / "local", tiny_encoder, batch_size=4, engine=_full_decode())
    assert calls == [4, 1, 1, 1, 1, 4]  # the batch with the coffee, retried image by image, then the next
    assert device.rows() == local.rows() and device.counts["skipped"] == 0
    assert (device.meta["run"]["device_decoded"], device.meta["run"]["cpu_decoded"]) == (7, 1)
    assert _cosines(device.features(), local.features()).min() >= MIN_COSINE


def test_resume_with_the_other_engine_matches(photo_dir: Path, tmp_path: Path, tiny_encoder: Encoder) -> None:
    spec = _folder(photo_dir)
    full = embed_source(
        spec, tmp_path / "full", tiny_encoder, batch_size=2, chunk_size=3, engine=_full_decode()
    )
    control = cancel_after(4)  # after the first chunk
    with pytest.raises(Cancelled):
        embed_source(
            spec,
            tmp_path / "resumed",
            tiny_encoder,
            batch_size=2,
            chunk_size=3,
            engine=DeviceDecodeEngine(workers=1),
            control=control,
        )
    resumed = embed_source(
        spec, tmp_path / "resumed", tiny_encoder, batch_size=2, chunk_size=3, engine=_full_decode()
    )
    # chunk 0 (3 items) and the part saved when the run was cancelled (2 more)
    assert resumed.meta["run"]["resumed_items"] == 5 and resumed.meta["run"]["engine"] == "local"
    assert resumed.rows() == full.rows()
    assert _cosines(resumed.features(), full.features()).min() >= MIN_COSINE


class _SmallMemoryEncoder(Encoder):
    """Fails like a GPU out of memory above ``capacity`` images per forward."""

    id = "small-memory"
    dim = 2
    device = torch.device("cpu")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.batches: list[int] = []

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        raise NotImplementedError

    def encode_images(self, batch: torch.Tensor) -> torch.Tensor:
        if len(batch) > self.capacity:
            raise torch.cuda.OutOfMemoryError("simulated")
        self.batches.append(len(batch))
        return batch.float().reshape(len(batch), -1)[:, :2]

    def embed_labels(self, names: Sequence[str], templates: Sequence[str] | None = None) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"id": self.id}


def test_out_of_memory_halves_the_forward_batch() -> None:
    encoder = _SmallMemoryEncoder(capacity=3)
    encode = FittingEncode(encoder)
    batch = torch.arange(20, dtype=torch.uint8).reshape(10, 2)
    torch.testing.assert_close(encode(batch), batch.float())
    assert encoder.batches == [2, 2, 2, 2, 2] and encode.limit == 2
    encode(batch[:3])
    assert encoder.batches[-2:] == [2, 1]  # the limit is remembered
    with pytest.raises(torch.cuda.OutOfMemoryError):
        FittingEncode(_SmallMemoryEncoder(capacity=0))(batch)


def test_errors_in_the_decode_thread_reach_the_caller(
    photo_dir: Path, tmp_path: Path, tiny_encoder: Encoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: object, unit: object) -> None:
        raise MemoryError("simulated")

    monkeypatch.setattr(device_module.DeviceDecoder, "__call__", broken)
    with pytest.raises(MemoryError, match="simulated"):
        embed_source(_folder(photo_dir), tmp_path / "store", tiny_encoder, engine=DeviceDecodeEngine(0))


def test_engine_choice(tiny_encoder: Encoder, monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(create_engine("device", workers=0, prefetch=1), DeviceDecodeEngine)
    auto = create_engine("auto", workers=0)
    assert isinstance(auto, AutoEngine) and auto.describe() == {"engine": "auto"}
    assert list(auto.run([], [], tiny_encoder, 10**6)) == []
    chosen = auto.describe()
    assert (
        chosen["engine"] == ("device" if TEST_DEVICE == "cuda" else "local") and chosen["chosen_by"] == "auto"
    )
    monkeypatch.setattr(tiny_encoder, "geometry", None)
    with pytest.raises(CppError, match="no tensor geometry"):
        list(DeviceDecodeEngine(0).run([], [], tiny_encoder, 10**6))


def test_gpu_benchmark_suite_runs_on_cpu(tmp_path: Path) -> None:
    """The GPU suite with tiny settings: corpus, decode, the obvious pipeline, end to end, forward."""
    out = tmp_path / "report.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(ROOT / "scripts" / "bench_embed.py"), "--suite", "gpu", "--models", "tiny"]
    command += ["--n", "48", "--batch-size", "16", "--device", "cpu", "--loader-workers", "1"]
    command += ["--forward-images", "64"]
    command += ["--corpus", str(tmp_path / "corpus"), "--out", str(out), "--variants", "eager,bf16,cudagraph"]
    subprocess.run(command, check=True, env=env, timeout=120, capture_output=True)
    report = json.loads(out.read_text())
    tiny = report["models"]["tiny"]
    assert report["corpus"]["files"] == 48
    assert tiny["end_to_end"]["embedded"] == 48 and tiny["end_to_end"]["images_per_s"] > 0
    assert tiny["obvious_pipeline"]["images"] == 48 and tiny["decode_only"]["images"] == 48
    assert tiny["forward"]["eager"]["images_per_s"] > 0 and "images_per_s" in tiny["forward"]["bf16"]
    assert tiny["forward"]["cudagraph"] == {"skipped": "needs CUDA"}
    assert tiny["end_to_end_cpu_share"]["run"]["cpu_share"] == 0.2
    assert tiny["device_vs_local_engine"]["rows_equal"] is True
    assert set(tiny["ratios"]) == {
        "end_to_end_over_obvious",
        "end_to_end_over_eager_forward",
        "cpu_share_end_to_end_over_obvious",
    }


def test_unit_iterator_closes_cleanly(photo_dir: Path, tiny_encoder: Encoder) -> None:
    """Stopping early (a cancelled run) stops the decode thread instead of leaving it blocked."""
    items = list(iter_items(_folder(photo_dir)))
    units: Iterator[Any] = DeviceDecodeEngine(0, prefetch=1).run(
        items, [(0, 2), (2, 4), (4, 6), (6, 8)], tiny_encoder, 10**8
    )
    first = next(units)
    assert first.start == 0 and first.features.shape == (2, tiny_encoder.dim)
    units.close()  # type: ignore[attr-defined]
    assert not [thread for thread in threading.enumerate() if thread.name == "cpp-device-decode"]
