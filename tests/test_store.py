"""The feature store: chunked writes, resume bookkeeping, identity checks, the typed contract of its files
(validated on open, compatible with stores written before it), corruption detection."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cpp.sources import Item
from cpp.store import (
    EntryStatus,
    FeatureStore,
    IndexEntry,
    StoreDetails,
    StoreError,
    StoreWriter,
    check_complete_store,
)

IDENTITY: dict[str, Any] = {
    "encoder_id": "enc-a",
    "encoder_weights": None,
    "source": {"type": "folder", "path": "/x"},
}
SETTINGS = {"chunk_size": 3, "dtype": "float16", "dim": 4, "max_pixels": 100}


DATA = Path(__file__).parent / "data"
DETAILS = StoreDetails(encoder={"id": "enc-a"})


def _entries(start: int, statuses: str) -> list[IndexEntry]:
    """Entries of items ``start, start + 1, ...``: embedded (``o``) or skipped (anything else)."""
    return [
        IndexEntry(
            key=f"k{start + i}",
            path=f"/x/k{start + i}.jpg",
            captions=("c",),
            label="L" if i % 2 else None,
            status=EntryStatus.ok if s == "o" else EntryStatus.skipped,
            reason=None if s == "o" else "empty file",
            item=start + i,
        )
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
    store = writer.finish(DETAILS)
    assert store.source == IDENTITY["source"] and store.encoder == {"id": "enc-a"}
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
    store = writer.finish()
    assert len(store) == 6 and store.rows()[-1].index == 5


def test_other_identity_is_refused(tmp_path: Path) -> None:
    writer, _ = _write_two_chunks(tmp_path / "store")
    other = {**IDENTITY, "encoder_id": "enc-b"}
    with pytest.raises(StoreError, match="encoder_id: store has 'enc-a', requested 'enc-b'"):
        StoreWriter.open(tmp_path / "store", other, SETTINGS)
    writer.finish()
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
    store = writer.finish()
    chunk = tmp_path / "store" / "chunks" / "features-00001.npy"
    chunk.write_bytes(chunk.read_bytes()[:-8])  # truncated
    with pytest.raises(StoreError, match=r"features-00001\.npy"):
        store.features()
    chunk.unlink()
    with pytest.raises(StoreError, match="missing"):
        FeatureStore.open(tmp_path / "store")


def _items(keys: range, label: str | None = "new") -> list[Item]:
    """Source items with the keys and paths of :func:`_entries`, a caption and ``label``."""
    return [
        Item(key=f"k{i}", path=f"/x/k{i}.jpg", load_bytes=bytes, captions=(f"c{i}",), label=label)
        for i in keys
    ]


def test_saved_parts_are_resumed_and_become_the_chunk(tmp_path: Path) -> None:
    _, features = _write_two_chunks(tmp_path / "whole")
    writer = StoreWriter.open(tmp_path / "parts", IDENTITY, SETTINGS)
    writer.write_chunk(features[:2], _entries(0, "oxo"))
    second = _entries(3, "ooo")
    writer.write_part(features[2:3], second[:1])
    writer.write_part(features[3:4], second[1:2])
    chunks = tmp_path / "parts" / "chunks"
    assert sorted(path.name for path in chunks.glob("*.part-*")) == [
        "features-00001.part-00000.npy",
        "features-00001.part-00001.npy",
        "index-00001.part-00000.jsonl",
        "index-00001.part-00001.jsonl",
    ]
    resumed = StoreWriter.open(tmp_path / "parts", IDENTITY, SETTINGS)  # a new run after a kill
    assert resumed.items_done == 5 and resumed.rows_written == 2 and len(resumed.parts) == 2
    resumed.write_chunk(features[4:], second[2:])
    assert not list(chunks.glob("*.part-*"))
    store = resumed.finish()
    whole = StoreWriter.open(tmp_path / "whole", IDENTITY, SETTINGS).finish()
    np.testing.assert_array_equal(store.features(), whole.features())
    assert store.rows() == whole.rows() and store.counts == whole.counts


def test_parts_left_by_a_kill_are_cleaned_or_refused(tmp_path: Path) -> None:
    writer, features = _write_two_chunks(tmp_path / "store")
    chunks = tmp_path / "store" / "chunks"
    (chunks / "index-00001.part-00000.jsonl").write_text("{}\n")  # chunk 1 was written, its part not removed
    writer.write_part(np.ones((1, 4)), _entries(6, "o"))
    assert StoreWriter.open(tmp_path / "store", IDENTITY, SETTINGS).items_done == 7
    assert not (chunks / "index-00001.part-00000.jsonl").exists()
    part = chunks / "features-00002.part-00000.npy"
    part.write_bytes(part.read_bytes()[:-4])
    with pytest.raises(StoreError, match=r"features-00002\.part-00000\.npy is corrupt"):
        StoreWriter.open(tmp_path / "store", IDENTITY, SETTINGS)
    part.unlink()
    (chunks / "index-00002.part-00000.jsonl").unlink()
    finished = StoreWriter.open(tmp_path / "store", IDENTITY, SETTINGS)
    finished.write_part(np.ones((1, 4)), _entries(6, "o"))
    store = finished.finish()  # the parts: last chunk
    assert store.counts == {"items": 7, "embedded": 6, "skipped": 1}
    np.testing.assert_array_equal(store.features()[:5], features.astype(np.float16).astype(np.float32))


def test_a_label_only_change_rewrites_the_index_of_a_complete_store(tmp_path: Path) -> None:
    writer, _ = _write_two_chunks(tmp_path / "store")
    before = writer.finish()
    rows, skipped, features = before.rows(), before.skipped(), before.features()
    relabelled = {**IDENTITY, "source": {**IDENTITY["source"], "labels_from_folders": True}}
    with pytest.raises(StoreError, match="another encoder or source"):  # without the items: refused
        check_complete_store(tmp_path / "store", relabelled)
    with pytest.raises(StoreError, match=r"other images \(the store has 'k0' where the source lists 'k1'\)"):
        check_complete_store(tmp_path / "store", relabelled, items=lambda: _items(range(1, 7)))
    with pytest.raises(StoreError, match=r"other images \(the source lists 5 items"):
        check_complete_store(tmp_path / "store", relabelled, items=lambda: _items(range(5)))
    store = check_complete_store(tmp_path / "store", relabelled, items=lambda: _items(range(6)))
    assert store is not None and store.meta["identity"] == relabelled and store.source == relabelled["source"]
    assert [(row.key, row.label, row.captions) for row in store.rows()][:2] == [
        ("k0", "new", ("c0",)),
        ("k2", "new", ("c2",)),
    ]
    assert [(row.index, row.key) for row in store.rows()] == [(row.index, row.key) for row in rows]
    assert store.skipped() == skipped
    np.testing.assert_array_equal(store.features(), features)
    assert sorted(path.name for path in (tmp_path / "store" / "chunks").glob("index-*")) == [
        "index-00000.r1.jsonl",
        "index-00001.r1.jsonl",
    ]
    assert FeatureStore.open(tmp_path / "store").meta == store.meta
    assert check_complete_store(tmp_path / "store", relabelled, items=lambda: []) is not None  # same: kept
    other_path = {**relabelled, "source": {**relabelled["source"], "path": "/y"}}
    with pytest.raises(StoreError, match="another encoder or source"):
        check_complete_store(tmp_path / "store", other_path, items=lambda: _items(range(6)))


def test_a_label_only_change_rewrites_a_partial_store_even_after_an_interruption(tmp_path: Path) -> None:
    writer, _ = _write_two_chunks(tmp_path / "store")
    writer.write_part(np.ones((1, 4)), _entries(6, "o"))
    relabelled = {**IDENTITY, "source": {**IDENTITY["source"], "annotations": ["/x/instances.json"]}}
    with pytest.raises(StoreError, match="labels of this partial store must be updated"):
        StoreWriter.open(tmp_path / "store", relabelled, SETTINGS)
    resumed = StoreWriter.open(tmp_path / "store", relabelled, SETTINGS, items=_items(range(8)))
    assert resumed.run["identity"] == relabelled and resumed.items_done == 7
    assert [entry.label for _, entries in resumed.parts for entry in entries] == ["new"]
    # Interrupted while rewriting: the mark stays in run.json and the next open rewrites everything again.
    run_path = tmp_path / "store" / "run.json"
    run_path.write_text(json.dumps({**json.loads(run_path.read_text()), "relabelling": True}))
    again = StoreWriter.open(tmp_path / "store", relabelled, SETTINGS, items=_items(range(8), label="newer"))
    assert "relabelling" not in json.loads(run_path.read_text())
    again.write_chunk(np.ones((1, 4)), _entries(7, "o"))
    store = again.finish()
    assert [row.label for row in store.rows()] == ["newer"] * 6 + [None]  # chunk 2's new item: as written


def test_a_store_written_before_the_typed_contract_opens_and_relabels(tmp_path: Path) -> None:
    """``tests/data/store-v1``: written by the dict-based store of commit ff67cd7 (two chunks, one skipped
    item, saved as a part first, relabelled once)."""
    root = shutil.copytree(DATA / "store-v1", tmp_path / "store")
    store = FeatureStore.open(root)
    assert store.meta == json.loads((root / "meta.json").read_text())  # as read: head keys stay valid
    assert store.counts == {"items": 6, "embedded": 5, "skipped": 1} and store.meta["relabelled"] == 1
    assert [(row.index, row.key, row.label) for row in store.rows()][:2] == [(0, "k0", "L"), (1, "k2", "L")]
    assert [(s.key, s.reason) for s in store.skipped()] == [("k1", "empty file")]
    np.testing.assert_allclose(store.features(), np.arange(20).reshape(5, 4) / 10, atol=1e-3)
    identity = {**store.meta["identity"], "source": {**store.source, "labels_from_folders": False}}
    items = [Item(key=f"k{i}", path=f"/x/k{i}.jpg", load_bytes=bytes, label="M") for i in range(6)]
    again = check_complete_store(root, identity, items=lambda: items)
    assert again is not None and again.meta["relabelled"] == 2 and {r.label for r in again.rows()} == {"M"}


def test_a_part_saved_before_the_typed_contract_is_resumed(tmp_path: Path) -> None:
    writer = StoreWriter.open(tmp_path / "store", IDENTITY, SETTINGS)
    writer.write_part(np.ones((1, 4)), _entries(0, "o"))
    part = tmp_path / "store" / "chunks" / "index-00000.part-00000.jsonl"
    old = {"key": "k0", "path": "/x/k0.jpg", "captions": ["c"], "label": None, "status": "ok", "reason": None}
    part.write_text(json.dumps(old) + "\n")  # no "item" and no "row", as the old writer left parts
    resumed = StoreWriter.open(tmp_path / "store", IDENTITY, SETTINGS)
    assert resumed.items_done == 1
    resumed.write_chunk(np.ones((1, 4)), _entries(1, "o"))
    assert [row.index for row in resumed.finish().rows()] == [0, 1]


def _damage(meta: dict[str, Any], how: str) -> object:
    if how == "version":
        return {**meta, "version": 2}
    if how == "format":
        return {**meta, "format": "something-else"}
    if how == "missing":
        return {k: v for k, v in meta.items() if k != "counts"}
    if how == "type":
        return {**meta, "chunks": [{**meta["chunks"][0], "rows": "two"}]}
    if how == "unknown":
        return {**meta, "colour": "blue"}
    if how == "counts":
        return {**meta, "counts": {**meta["counts"], "embedded": 4}}
    return [meta]


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("json", r"cannot read .*meta\.json \(Expecting"),
        ("version", r"meta\.json is of store version 2; this cpp reads version 1: delete "),
        ("format", r"meta\.json is not a cpp feature store file; delete "),
        ("list", r"meta\.json is not a cpp feature store file; delete "),
        ("missing", r"meta\.json is damaged \(counts: Field required\); delete "),
        ("type", r"meta\.json is damaged \(chunks\.0\.rows: Input should be a valid integer"),
        ("unknown", r"meta\.json is damaged \(colour: Extra inputs are not permitted\)"),
        ("counts", r"meta\.json is damaged \(the counts do not add up to the chunks'\); delete "),
    ],
)
def test_a_damaged_meta_json_is_a_store_error_naming_it(tmp_path: Path, how: str, message: str) -> None:
    writer, _ = _write_two_chunks(tmp_path / "store")
    writer.finish()
    path = tmp_path / "store" / "meta.json"
    meta = json.loads(path.read_text())
    path.write_text(path.read_text()[:-20] if how == "json" else json.dumps(_damage(meta, how)))
    with pytest.raises(StoreError, match=message):
        FeatureStore.open(tmp_path / "store")
    with pytest.raises(StoreError, match=message):  # reusing the directory: the same error
        check_complete_store(tmp_path / "store", IDENTITY)


def test_damaged_index_lines_and_run_json_are_store_errors_naming_them(tmp_path: Path) -> None:
    _write_two_chunks(tmp_path / "store")
    index = tmp_path / "store" / "chunks" / "index-00001.jsonl"
    lines = index.read_text().splitlines()
    index.write_text("\n".join([lines[0], lines[1].replace('"ok"', '"maybe"'), lines[2]]) + "\n")
    with pytest.raises(StoreError, match=r"index-00001\.jsonl line 2 is damaged \(status: Input should be"):
        StoreWriter.open(tmp_path / "store", IDENTITY, SETTINGS)
    index.write_text("\n".join(lines) + "\n")
    run = tmp_path / "store" / "run.json"
    run.write_text(json.dumps({**json.loads(run.read_text()), "settings": {"chunk_size": 3}}))
    with pytest.raises(StoreError, match=r"run\.json is damaged \(settings\.dtype: Field required\)"):
        StoreWriter.open(tmp_path / "store", IDENTITY, SETTINGS)


def test_entries_and_details_are_checked_when_written(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="reason exactly when it is skipped"):
        IndexEntry(key="k", path=None, status=EntryStatus.skipped)
    writer = StoreWriter.open(tmp_path / "store", IDENTITY, SETTINGS)
    as_json: dict[str, Any] = {
        "key": "k0",
        "path": None,
        "captions": [],
        "label": None,
        "status": "ok",
        "reason": None,
    }
    with pytest.raises(ValueError, match="bad index entry"):
        writer.write_chunk(np.ones((1, 4)), [{**as_json, "status": "fine"}])
    writer.write_chunk(np.ones((1, 4)), [as_json])  # the JSON form of an entry is accepted
    with pytest.raises(ValueError, match=r"source .* is not the store's"):
        writer.finish({"source": {"path": "/elsewhere"}})
    with pytest.raises(ValueError, match="Extra inputs"):
        writer.finish({"colour": "blue"})
    assert writer.finish({"encoder_id": "enc-a", "source": IDENTITY["source"]}).rows()[0].key == "k0"
