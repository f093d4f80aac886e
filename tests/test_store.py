"""The feature store: chunked writes, resume bookkeeping, identity checks, corruption detection."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cpp.store import FeatureStore, StoreError, StoreWriter, check_complete_store

IDENTITY = {"encoder_id": "enc-a", "encoder_weights": None, "source": {"type": "folder", "path": "/x"}}
SETTINGS = {"chunk_size": 3, "dtype": "float16", "dim": 4, "max_pixels": 100}


def _entries(start: int, statuses: str) -> list[dict[str, Any]]:
    return [
        {
            "item": start + i,
            "key": f"k{start + i}",
            "path": f"/x/k{start + i}.jpg",
            "captions": ["c"],
            "label": "L" if i % 2 else None,
            "status": "ok" if s == "o" else "skipped",
            "reason": None if s == "o" else "empty file",
        }
        for i, s in enumerate(statuses)
    ]


def _write_two_chunks(path: Path) -> tuple[StoreWriter, np.ndarray]:
    rng = np.random.default_rng(0)
    features = rng.standard_normal((5, 4)).astype(np.float32)
    writer = StoreWriter.open(path, IDENTITY, SETTINGS)
    writer.write_chunk(features[:2], _entries(0, "oxo"))
    writer.write_chunk(features[2:], _entries(3, "ooo"))
    return writer, features


def test_write_open_and_read_back(tmp_path: Path) -> None:
    writer, features = _write_two_chunks(tmp_path / "store")
    store = writer.finish({"encoder_id": "enc-a", "encoder": {"id": "enc-a"}, "source": IDENTITY["source"]})
    assert len(store) == 5 and store.dim == 4 and store.encoder_id == "enc-a"
    assert store.counts == {"items": 6, "embedded": 5, "skipped": 1}
    np.testing.assert_array_equal(store.features(), features.astype(np.float16).astype(np.float32))
    assert store.features(np.float16).dtype == np.float16
    assert [chunk.shape for chunk in store.iter_chunks()] == [(2, 4), (3, 4)]
    assert isinstance(next(store.iter_chunks()), np.memmap)
    rows = store.rows()
    assert [row.index for row in rows] == [0, 1, 2, 3, 4]
    assert [row.key for row in rows] == ["k0", "k2", "k3", "k4", "k5"]
    assert rows[0].captions == ("c",) and rows[3].label == "L"
    (skipped,) = store.skipped()
    assert (skipped.key, skipped.reason) == ("k1", "empty file")
    reopened = FeatureStore.open(tmp_path / "store")
    assert reopened.meta == store.meta


def test_reopening_a_partial_store_resumes_after_complete_chunks(tmp_path: Path) -> None:
    _write_two_chunks(tmp_path / "store")
    (tmp_path / "store" / "chunks" / "features-00002.npy").write_bytes(b"leftover of a killed run")
    with pytest.raises(StoreError, match="unfinished"):
        FeatureStore.open(tmp_path / "store")
    writer = StoreWriter.open(tmp_path / "store", IDENTITY, {**SETTINGS, "chunk_size": 99})
    assert writer.items_done == 6 and writer.rows_written == 5
    assert writer.chunk_size == 3  # the original settings win on resume
    writer.write_chunk(np.ones((1, 4)), _entries(6, "o"))
    store = writer.finish({"encoder_id": "enc-a", "encoder": {}, "source": {}})
    assert len(store) == 6 and store.rows()[-1].index == 5


def test_other_identity_is_refused(tmp_path: Path) -> None:
    writer, _ = _write_two_chunks(tmp_path / "store")
    other = {**IDENTITY, "encoder_id": "enc-b"}
    with pytest.raises(StoreError, match="encoder_id: store has 'enc-a', requested 'enc-b'"):
        StoreWriter.open(tmp_path / "store", other, SETTINGS)
    writer.finish({"encoder_id": "enc-a", "encoder": {}, "source": {}})
    assert check_complete_store(tmp_path / "store", IDENTITY) is not None
    with pytest.raises(StoreError, match="another encoder or source"):
        check_complete_store(tmp_path / "store", other)
    assert check_complete_store(tmp_path / "empty", IDENTITY) is None


def test_non_store_directory_and_corrupt_chunks(tmp_path: Path) -> None:
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file.txt").write_text("x")
    with pytest.raises(StoreError, match="not an empty directory"):
        StoreWriter.open(tmp_path / "busy", IDENTITY, SETTINGS)
    with pytest.raises(StoreError, match="no feature store"):
        FeatureStore.open(tmp_path / "busy")
    writer, _ = _write_two_chunks(tmp_path / "store")
    store = writer.finish({"encoder_id": "enc-a", "encoder": {}, "source": {}})
    chunk = tmp_path / "store" / "chunks" / "features-00001.npy"
    chunk.write_bytes(chunk.read_bytes()[:-8])  # truncated
    with pytest.raises(StoreError, match=r"features-00001\.npy"):
        store.features()
    chunk.unlink()
    with pytest.raises(StoreError, match="missing"):
        FeatureStore.open(tmp_path / "store")
