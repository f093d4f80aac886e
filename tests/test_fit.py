"""Training: repeatability, checkpoints, cancellation, and that the rate reduction actually increases."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from synthetic import subspace_mixture, write_store

from cpp.errors import CppError
from cpp.head_model import FitConfig, FittedHead
from cpp.heads import HeadConfig
from cpp.progress import Cancelled, ProgressEvent, RunControl
from cpp.train import auto_epochs, fit_head

SMALL_HEAD = HeadConfig(width=32, layers=1, heads=4, z_dim=16, context_k=3)
SMALL_FIT = FitConfig(epochs=3, batch_size=64, warmup_epochs=1, cluster_rows=16, device="cpu")


def test_two_cpu_runs_give_identical_weights() -> None:
    x, _ = subspace_mixture(200, 20, 3, 2)
    a = fit_head(x, SMALL_HEAD, SMALL_FIT)
    b = fit_head(x, SMALL_HEAD, SMALL_FIT)
    for (name, pa), pb in zip(a.head.state_dict().items(), b.head.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    c = fit_head(x, SMALL_HEAD, SMALL_FIT.model_copy(update={"seed": 1}))
    assert not torch.equal(a.head.state_dict()["z_proj.weight"], c.head.state_dict()["z_proj.weight"])


def test_training_raises_the_rate_reduction_and_copies_z_into_c() -> None:
    x, _ = subspace_mixture(256, 20, 4, 2)
    fitted = fit_head(x, SMALL_HEAD, SMALL_FIT.model_copy(update={"epochs": 6}))
    history = fitted.history
    assert len(history) == 6
    assert "rate_clusters" not in history[0] and "rate_clusters" in history[1]
    reduction = [h["rate"] - h["rate_clusters"] for h in history[1:]]
    assert reduction[-1] > reduction[0]


def test_auto_epochs_count_anchor_steps_with_neighbour_views() -> None:
    plain = FitConfig(batch_size=100, target_steps=40, view_k=0, warmup_epochs=1)
    assert auto_epochs(1000, plain) == 4  # 10 steps per epoch
    assert auto_epochs(1000, plain.model_copy(update={"view_k": 5})) == 2  # 50 anchors per step


def test_neighbour_views_are_repeatable_and_change_training() -> None:
    x, _ = subspace_mixture(200, 20, 3, 2)
    views = SMALL_FIT.model_copy(update={"view_k": 4})
    a, b = fit_head(x, SMALL_HEAD, views), fit_head(x, SMALL_HEAD, views)
    assert torch.equal(a.head.state_dict()["c_proj.weight"], b.head.state_dict()["c_proj.weight"])
    plain = fit_head(x, SMALL_HEAD, SMALL_FIT.model_copy(update={"view_k": 0}))
    assert not torch.equal(a.head.state_dict()["c_proj.weight"], plain.head.state_dict()["c_proj.weight"])


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    x, _ = subspace_mixture(150, 20, 3, 2)
    fitted = fit_head(x, SMALL_HEAD, SMALL_FIT)
    fitted.save(tmp_path / "run")
    assert (tmp_path / "run" / "head.safetensors").is_file()
    loaded = FittedHead.load(tmp_path / "run", device="cpu")
    assert loaded.head_config == fitted.head_config
    assert loaded.fit_config == fitted.fit_config
    assert loaded.history == fitted.history
    z1, c1 = fitted.transform(x)
    z2, c2 = loaded.transform(x)
    np.testing.assert_allclose(z1, z2, atol=1e-6)
    np.testing.assert_allclose(c1, c2, atol=1e-6)
    assert z1.dtype == np.float32 and z1.shape == (150, 16)


def test_load_missing_checkpoint_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(CppError, match=r"head\.safetensors is missing: pass the head directory .*RUN/head"):
        FittedHead.load(tmp_path)


def test_weights_that_do_not_match_the_configuration_are_refused(tmp_path: Path) -> None:
    x, _ = subspace_mixture(128, 20, 3, 2)
    first = fit_head(x, SMALL_HEAD, SMALL_FIT)
    first.save(tmp_path / "a")
    second = fit_head(x, SMALL_HEAD, SMALL_FIT.model_copy(update={"seed": 1}))
    second.save(tmp_path / "b")
    FittedHead.load(tmp_path / "a")  # a whole save loads
    # new weights beside the old configuration, as a save killed between its two renames leaves them
    (tmp_path / "b" / "head.safetensors").replace(tmp_path / "a" / "head.safetensors")
    with pytest.raises(CppError, match=r"does not match .*head\.json.*fit the head again"):
        FittedHead.load(tmp_path / "a")


def test_progress_and_cancellation() -> None:
    x, _ = subspace_mixture(128, 20, 3, 2)
    events: list[ProgressEvent] = []
    fit_head(x, SMALL_HEAD, SMALL_FIT, control=RunControl(on_progress=events.append))
    assert [(e.stage, e.done, e.total) for e in events] == [("fit", i, 3) for i in range(4)]

    control = RunControl(on_progress=lambda e: control.cancel() if e.done == 1 else None)
    with pytest.raises(Cancelled):
        fit_head(x, SMALL_HEAD, SMALL_FIT, control=control)


@pytest.mark.parametrize(
    ("features", "message"),
    [
        (np.zeros((1, 4), dtype=np.float32), "2-D array"),
        (np.full((10, 4), np.nan, dtype=np.float32), "NaN"),
    ],
)
def test_bad_features_are_user_errors(features: np.ndarray, message: str) -> None:
    with pytest.raises(CppError, match=message):
        fit_head(features, SMALL_HEAD, SMALL_FIT)


def test_transform_rejects_wrong_dimension() -> None:
    x, _ = subspace_mixture(100, 20, 3, 2)
    fitted = fit_head(x, SMALL_HEAD, SMALL_FIT.model_copy(update={"epochs": 2}))
    with pytest.raises(CppError, match="dimension"):
        fitted.transform(np.ones((10, 7), dtype=np.float32))


#: 7 subjects x 37 views = 259 images: above SMALL_N, so a head is trained.
VIEWS = 37


def test_cli_fit_writes_the_clustering_of_cpp_cluster(
    tmp_path: Path, tiny_clip_spec: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``cpp fit`` on the store of a ``cpp cluster`` run: the same clusters, names and confidences, in a
    clustering that opens, links the store, and that ``cpp export`` and ``cpp assign`` take."""
    from cpp import clustering
    from cpp.cli import main
    from cpp.demo import make_demo_images
    from cpp.options import ClusterOptions
    from cpp.pipeline import SMALL_N, run_cluster

    spec = make_demo_images(tmp_path / "images", views=VIEWS, seed=1)
    options = ClusterOptions(model=tiny_clip_spec, vocabulary=["cifar10"], epochs=1, device="cpu")
    cluster = run_cluster(spec, options, tmp_path / "cluster")
    assert cluster.run.counts.embedded > SMALL_N and cluster.run.head["type"] == "crate"

    store, out = tmp_path / "cluster" / "features", tmp_path / "fit"
    argv = ["fit", str(store), "--out", str(out), "--vocabulary", "cifar10", "--epochs", "1"]
    assert main([*argv, "--device", "cpu", "--quiet"]) == 0
    assert f"clustering: {out}" in capsys.readouterr().out
    fitted, made = clustering.open(out), clustering.open(tmp_path / "cluster")
    assert (out / "features").is_symlink() and (out / "features").resolve() == store.resolve()
    assert fitted.manifest.model == tiny_clip_spec and fitted.manifest.space == made.manifest.space
    assert fitted.manifest.members == cluster.run.counts.embedded
    np.testing.assert_array_equal(fitted.readout().labels, made.readout().labels)
    result = fitted.result()
    assert [(c.name, c.size) for c in result.clusters] == [(c.name, c.size) for c in cluster.clusters]
    assert result.assignments is not None and cluster.assignments is not None
    assert [(a.key, a.cluster, a.confidence, a.label) for a in result.assignments] == [
        (a.key, a.cluster, a.confidence, a.label) for a in cluster.assignments
    ]
    assert result.run.work_dir == str(out.resolve()) and result.run.source == cluster.run.source
    assert FittedHead.load(out / "head", device="cpu").head_config.context_k == 10

    assert main(["export", str(out), "--format", "csv", "--out", str(tmp_path / "fit.csv")]) == 0
    assert len((tmp_path / "fit.csv").read_text().splitlines()) == cluster.run.counts.embedded + 1
    new = tmp_path / "new"
    new.mkdir()
    for image in sorted((tmp_path / "images").rglob("*_00.jpg")):
        (new / image.name).write_bytes(image.read_bytes())
    assigned = tmp_path / "new.jsonl"
    assert main(["assign", str(out), str(new), "--out", str(assigned), "--device", "cpu", "--quiet"]) == 0
    assert len(assigned.read_text().splitlines()) == 7


def test_cli_fit_flags_set_the_head(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cpp import pipeline
    from cpp.cli import main

    x, _ = subspace_mixture(300, 20, 3, 2)
    write_store(tmp_path / "store", x, chunk_size=200)
    seen: list[pipeline.HeadSettings] = []

    def capture(features: Path, options: object, out: Path, *, configs: pipeline.HeadSettings) -> None:
        seen.append(configs)
        raise CppError("stop")

    monkeypatch.setattr(pipeline, "cluster_features", capture)
    argv = ["fit", str(tmp_path / "store"), "--out", str(tmp_path / "run"), "--epochs", "2", "--seed", "4"]
    assert main([*argv, "--batch-size", "64", "--context-k", "2", "--view-k", "0"]) == 2
    [(head, fit)] = seen
    assert (head.context_k, fit.batch_size, fit.view_k, fit.epochs, fit.seed) == (2, 64, 0, 2, 4)


def test_cli_fit_option_model_errors_name_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """What the flags' own checks cannot see (a list length) is one line naming the flag, as in cluster."""
    from cpp.cli import main

    (tmp_path / "store").mkdir()
    vocabularies = [f"v{i}" for i in range(17)]
    argv = ["fit", str(tmp_path / "store"), "--out", str(tmp_path / "run"), "--quiet", "--vocabulary"]
    assert main([*argv, *vocabularies]) == 2
    err = capsys.readouterr().err
    assert err == "error: --vocabulary: List should have at most 16 items after validation, not 17\n"


def test_cli_fit_refuses_stores_it_cannot_cluster(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cpp.cli import main

    out = str(tmp_path / "run")
    assert main(["fit", str(tmp_path / "missing"), "--out", out, "--quiet"]) == 2
    assert "is not a directory" in capsys.readouterr().err
    x, _ = subspace_mixture(120, 20, 3, 2)
    write_store(tmp_path / "store", x, chunk_size=200)  # source {"path": ...}, encoder "synthetic"
    assert main(["fit", str(tmp_path / "store"), "--out", out, "--quiet"]) == 2
    assert "records no image source" in capsys.readouterr().err
    assert main(["fit", str(tmp_path / "store"), "--out", str(tmp_path / "store"), "--quiet"]) == 2
    assert "is the feature store itself" in capsys.readouterr().err
