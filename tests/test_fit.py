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
    with pytest.raises(CppError, match=r"head\.safetensors"):
        FittedHead.load(tmp_path)


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


def test_cli_fit_writes_checkpoint_and_labels(tmp_path: Path) -> None:
    from cpp.cli import main

    x, _ = subspace_mixture(120, 20, 3, 2)
    write_store(tmp_path / "store", x, chunk_size=200)
    out = tmp_path / "run"
    argv = ["fit", str(tmp_path / "store"), "--out", str(out), "--clusters", "3", "--epochs", "2"]
    assert main([*argv, "--batch-size", "64", "--context-k", "2", "--device", "cpu", "--quiet"]) == 0
    assert np.load(out / "labels.npy").shape == (120,)
    assert FittedHead.load(out, device="cpu").head_config.context_k == 2
    assert main(["fit", str(tmp_path / "missing"), "--out", str(out), "--quiet"]) == 2
