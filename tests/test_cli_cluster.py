"""``cpp cluster``: the offline demo, the summary table, the output file and user errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cpp import demo
from cpp.cli import main
from cpp.result import ClusterResult


def test_demo_runs_offline_and_finds_the_subjects(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(demo, "VIEWS_PER_SUBJECT", 4)  # 28 images instead of 84: same code path, faster
    out = tmp_path / "out" / "demo.json"
    code = main(["cluster", "--demo", "--out", str(out), "--work-dir", str(tmp_path / "work"), "--quiet"])
    assert code == 0
    result = ClusterResult.model_validate_json(out.read_text())
    assert result.run.counts.embedded == 4 * len(demo.DEMO_SUBJECTS)
    assert result.run.encoder["id"] == "effnet-lite0-in1k"
    assert result.metrics is not None and result.metrics["nmi"] > 0.8
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].split() == ["cluster", "size", "name", "score", "examples"]
    for cluster in result.clusters:
        assert cluster.name in printed
    assert str(out) in printed


def test_cluster_folder_writes_the_result(
    photo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "result.json"
    args = [
        "cluster",
        str(photo_dir),
        "--out",
        str(out),
        "--work-dir",
        str(tmp_path / "work"),
        "--quiet",
        "--model",
        "effnet-lite0-in1k",
        "--clusters",
        "3",
        "--labels-from-folders",
    ]
    assert main(args) == 0
    result = json.loads(out.read_text())
    assert len(result["clusters"]) == 3 and len(result["assignments"]) == 8
    assert result["metrics"] is not None
    assert "3 clusters (K as given)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--clusters", "many"], "--clusters: must be 'auto' or a whole number"),
        (["--clusters", "1"], "--clusters: must be 'auto' or a whole number between 2 and 1000, got 1"),
        (["--vocabulary", "no-such-vocabulary"], "neither a built-in"),
    ],
)
def test_user_errors_exit_2(
    photo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    args = [
        "cluster",
        str(photo_dir),
        "--out",
        str(tmp_path / "r.json"),
        "--work-dir",
        str(tmp_path / "w"),
        "--quiet",
        "--model",
        "effnet-lite0-in1k",
        *extra,
    ]
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_source_or_demo_is_required(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cluster", "--out", str(tmp_path / "r.json"), "--quiet"]) == 2
    assert "give a SOURCE" in capsys.readouterr().err
    assert main(["cluster", str(tmp_path), "--demo", "--out", str(tmp_path / "r.json"), "--quiet"]) == 2
    assert "leave out SOURCE" in capsys.readouterr().err
