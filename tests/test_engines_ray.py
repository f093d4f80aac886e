"""The Ray engine on a local Ray instance (CPU): the local engine's store, resuming, errors and the CLI."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from controls import cancel_after
from photos import write_shard

from cpp.cli import main
from cpp.embed import embed_source
from cpp.encoders import Encoder, create_encoder
from cpp.engines import RayEngine, RayEngineError, create_engine
from cpp.engines.ray import check_reachable
from cpp.options import SourceSpec
from cpp.progress import Cancelled
from cpp.store import FeatureStore

ray = pytest.importorskip("ray")

BATCH, CHUNK = 3, 4  # 10 items: units (0,3) (3,4) (4,7) (7,8) (8,10), chunks of 4


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> object:
    """One small local Ray instance for the module; the engine uses it (and leaves it open)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_encoder(tiny_clip_spec: str) -> Encoder:
    return create_encoder(tiny_clip_spec, device="cpu")


@pytest.fixture
def source(photo_dir: Path) -> SourceSpec:
    """The 8 photos and 2 unusable files."""
    (photo_dir / "empty.jpg").write_bytes(b"")
    (photo_dir / "text.jpg").write_text("this is not an image")
    return SourceSpec(type="folder", path=str(photo_dir), labels_from_folders=True)


def _assert_same_store(store: FeatureStore, reference: FeatureStore) -> None:
    assert store.rows() == reference.rows()
    assert store.counts == reference.counts == {"items": 10, "embedded": 8, "skipped": 2}
    assert [(s.key, s.reason) for s in store.skipped()] == [(s.key, s.reason) for s in reference.skipped()]
    np.testing.assert_allclose(store.features(np.float32), reference.features(np.float32), atol=2e-3)


def test_ray_store_equals_local_store(source: SourceSpec, tmp_path: Path, tiny_encoder: Encoder) -> None:
    local = embed_source(
        source, tmp_path / "local", tiny_encoder, batch_size=BATCH, chunk_size=CHUNK, workers=0
    )
    engine = RayEngine(actors=2)
    store = embed_source(
        source, tmp_path / "ray", tiny_encoder, batch_size=BATCH, chunk_size=CHUNK, engine=engine
    )
    _assert_same_store(store, local)
    assert {Path(s.key).name for s in store.skipped()} == {"empty.jpg", "text.jpg"}
    run = store.meta["run"]
    assert run["engine"] == "ray" and run["actors"] == 2 and run["gpus_per_actor"] == 0.0
    assert run["actor_device"] == "cpu" and run["nodes"] == 1


def test_ray_lists_shards_in_the_actors_like_the_local_engine(
    photo_dir: Path, tmp_path: Path, tiny_encoder: Encoder
) -> None:
    photos = sorted(photo_dir.rglob("*.jpg"))
    for number, size in enumerate([4, 2, 4]):  # units of 3 cross the shard boundaries
        samples = {f"{number}{i:02d}": (photos[(number + i) % 8].read_bytes(), f"c{i}") for i in range(size)}
        write_shard(tmp_path / f"{number:05d}.tar", samples)
    source = SourceSpec(type="webdataset", path=str(tmp_path / "{00000..00002}.tar"))
    local = embed_source(
        source, tmp_path / "local", tiny_encoder, batch_size=BATCH, chunk_size=CHUNK, workers=0
    )
    store = embed_source(
        source, tmp_path / "ray", tiny_encoder, batch_size=BATCH, chunk_size=CHUNK, engine=RayEngine(actors=2)
    )
    assert store.rows() == local.rows() and store.counts == local.counts == {
        "items": 10,
        "embedded": 10,
        "skipped": 0,
    }
    np.testing.assert_allclose(store.features(np.float32), local.features(np.float32), atol=2e-3)


def test_resume_local_chunks_with_ray_and_ray_chunks_after_cancel(
    source: SourceSpec, tmp_path: Path, tiny_encoder: Encoder
) -> None:
    reference = embed_source(
        source, tmp_path / "local", tiny_encoder, batch_size=BATCH, chunk_size=CHUNK, workers=0
    )
    # A local run cancelled after its first chunk, finished by one ray actor decoding with 2 threads.
    partial = tmp_path / "local-then-ray"
    with pytest.raises(Cancelled):
        embed_source(
            source,
            partial,
            tiny_encoder,
            batch_size=BATCH,
            chunk_size=CHUNK,
            workers=0,
            control=cancel_after(CHUNK),
        )
    finished = embed_source(
        source,
        partial,
        tiny_encoder,
        batch_size=BATCH,
        chunk_size=CHUNK,
        engine=RayEngine(actors=1, cpus_per_actor=2),
    )
    assert finished.meta["run"]["resumed_items"] == CHUNK
    assert finished.meta["run"]["cpus_per_actor"] == 2
    _assert_same_store(finished, reference)

    # A ray run cancelled between units keeps its complete chunks; a ray run resumes after them.
    interrupted = tmp_path / "ray-then-ray"
    with pytest.raises(Cancelled):
        embed_source(
            source,
            interrupted,
            tiny_encoder,
            batch_size=BATCH,
            chunk_size=CHUNK,
            engine=RayEngine(actors=1),
            control=cancel_after(CHUNK),
        )
    assert (interrupted / "chunks" / "index-00000.jsonl").is_file()
    assert not (interrupted / "meta.json").exists()
    resumed = embed_source(
        source, interrupted, tiny_encoder, batch_size=BATCH, chunk_size=CHUNK, engine=RayEngine(actors=1)
    )
    assert resumed.meta["run"]["resumed_items"] >= CHUNK
    _assert_same_store(resumed, reference)


def test_an_actor_that_cannot_build_the_encoder_is_a_clear_error(
    source: SourceSpec, tmp_path: Path, tiny_encoder: Encoder
) -> None:
    elsewhere = copy.copy(tiny_encoder)
    elsewhere.id = "open_clip:cpp-no-such-arch//nowhere/weights.pt"  # weights missing on the workers
    with pytest.raises(RayEngineError, match=r"^the Ray embedding actors failed: cpp\..*EncoderUnavailable"):
        embed_source(source, tmp_path / "store", elsewhere, engine=RayEngine(actors=1))


def test_cli_embed_and_cluster_with_the_ray_engine(
    source: SourceSpec, tmp_path: Path, tiny_clip_spec: str, capsys: pytest.CaptureFixture[str]
) -> None:
    common = [source.path, "--model", tiny_clip_spec, "--device", "cpu", "--quiet", "--batch-size", "4"]
    ray_options = ["--engine", "ray", "--ray-actors", "1"]
    assert main(["embed", *common, "--out", str(tmp_path / "store"), *ray_options]) == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed[: printed.index("\n}") + 2])
    assert summary["counts"] == {"items": 10, "embedded": 8, "skipped": 2}
    assert "skipped" in printed.split("\n}")[1]
    store = FeatureStore.open(tmp_path / "store")
    assert store.meta["run"]["engine"] == "ray" and store.meta["run"]["actors"] == 1

    work = tmp_path / "work"
    out = tmp_path / "result.json"
    names = tmp_path / "names.txt"
    names.write_text("cat\nrocket\ngalaxy\n")
    cluster = ["cluster", *common, "--out", str(out), "--work-dir", str(work), "--vocabulary", str(names)]
    assert main([*cluster, *ray_options]) == 0
    assert FeatureStore.open(work / "features").meta["run"]["engine"] == "ray"
    assert json.loads(out.read_text())["run"]["counts"]["embedded"] == 8


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--ray-actors", "2"], "--ray-actors need --engine ray"),
        (["--engine", "ray", "--workers", "2"], "with --engine ray use --ray-actors"),
        (["--engine", "ray", "--ray-actors", "0"], "--ray-actors: must be a whole number >= 1"),
        (["--engine", "local", "--workers", "-1"], "--workers: must be a whole number >= 0"),
    ],
)
def test_cli_engine_option_errors(
    photo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], options: list[str], message: str
) -> None:
    for command in ("embed", "cluster"):
        assert main([command, str(photo_dir), "--out", str(tmp_path / "out"), "--quiet", *options]) == 2
        assert message in capsys.readouterr().err


def test_an_unreachable_cluster_fails_fast() -> None:
    with pytest.raises(OSError):
        check_reachable("127.0.0.1:1")
    check_reachable("auto")  # resolved by Ray itself


def test_without_ray_installed_the_engine_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, photo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(RayEngineError, match=r"pip install 'cpp\[ray\]'"):
        create_engine("ray")
    assert main(["embed", str(photo_dir), "--out", str(tmp_path / "out"), "--engine", "ray", "--quiet"]) == 2
    assert "pip install 'cpp[ray]'" in capsys.readouterr().err
