"""``cpp`` outputs: unwritable paths refused before any work, atomic writes, and Ctrl-C messages that say
what was kept."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from cpp.cli import main
from cpp.cli.common import atomic_output, check_output
from cpp.embed import embed_source
from cpp.errors import OutputPathError
from cpp.progress import StageReporter
from cpp.store import FeatureStore


def _cpp_without_torch(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """``cpp ARGV`` in a fresh interpreter that prints whether torch was imported before returning."""
    code = (
        "import sys; from cpp.cli import main; code = main(sys.argv[1:]); "
        "print('torch' in sys.modules); sys.exit(code)"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=cwd, check=False
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["cluster", "{photos}", "--out", "/proc/x"], "--out /proc/x: /proc is a kernel file system"),
        (["cluster", "{photos}", "--out", "{tmp}"], "is a directory; give a file path"),
        (["cluster", "{photos}", "--out", "a_file/x.json"], "a_file is not a directory"),
        (["cluster", "{photos}", "--out", "/dev/null"], "--out /dev/null exists and is not a regular file"),
        (["cluster", "{photos}", "--out", "r.json", "--work-dir", "a_file"], "--work-dir a_file is a file"),
        (["cluster", "{photos}", "--out", "r.json", "--work-dir", "/sys/x"], "/sys is a kernel file system"),
        (["embed", "{photos}", "--out", "a_file"], "--out a_file is a file; give a directory"),
        (["embed", "{photos}", "--out", "/proc/self/x"], "/proc is a kernel file system"),
        (["fit", "store", "--out", "a_file/run"], "a_file is not a directory"),
    ],
)
def test_unwritable_outputs_are_refused_before_any_work(
    argv: list[str], message: str, photo_dir: Path, tmp_path: Path
) -> None:
    (tmp_path / "a_file").write_text("not a directory")
    (tmp_path / "store").mkdir()
    argv = [arg.format(photos=photo_dir, tmp=tmp_path) for arg in argv]
    done = _cpp_without_torch([*argv, "--quiet"], tmp_path)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: ") and message in done.stderr
    assert done.stdout.strip() == "False"  # refused before the encoder or the store code was imported
    assert not (tmp_path / "w").exists() and not list(tmp_path.glob("*/features"))


def test_cluster_refuses_proc_out_without_embedding(
    photo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work = tmp_path / "work"
    args = ["cluster", str(photo_dir), "--out", "/proc/x", "--work-dir", str(work), "--quiet"]
    assert main([*args, "--model", "effnet-lite0-in1k"]) == 2
    assert (
        capsys.readouterr().err
        == "error: --out /proc/x: /proc is a kernel file system; choose a path on disk\n"
    )
    assert not FeatureStore.exists(work / "features") and not work.exists()


def test_a_directory_that_takes_no_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Writability is tried with a real file (``os.access`` says yes to root on a read-only mount)."""

    def read_only(*args: object, **kwargs: object) -> tuple[int, str]:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(OutputPathError, match=r"cannot write in .* \(Read-only file system\)"):
        check_output(tmp_path / "missing" / "result.json", "--out", directory=False)


def test_writable_outputs_are_accepted_and_left_untouched(tmp_path: Path) -> None:
    existing = tmp_path / "result.json"
    existing.write_text("old")
    assert check_output(existing, "--out", directory=False) == existing
    assert (
        check_output(tmp_path / "new" / "deeper", "--work-dir", directory=True) == tmp_path / "new" / "deeper"
    )
    assert existing.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


def test_atomic_output_replaces_whole_or_not_at_all(tmp_path: Path) -> None:
    target = tmp_path / "result.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_output(target) as partial:
        partial.write_text("half")
        raise RuntimeError("stopped while writing")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]
    with atomic_output(target) as partial:
        partial.write_text("new")
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


def _interrupt_at(monkeypatch: pytest.MonkeyPatch, stage: str, done: int) -> None:
    """Ctrl-C as soon as ``stage`` reports ``done`` items."""
    advance = StageReporter.advance

    def interrupting(self: StageReporter, n: int = 1) -> None:
        advance(self, n)
        if self.name == stage and self.done >= done:
            raise KeyboardInterrupt

    monkeypatch.setattr(StageReporter, "advance", interrupting)


def test_interrupted_embed_says_what_is_saved_and_resumes(
    photo_dir: Path,
    tmp_path: Path,
    tiny_clip_spec: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    defaults = embed_source.__kwdefaults__  # the CLI passes no save interval
    assert defaults is not None
    out = tmp_path / "store"
    args = ["embed", str(photo_dir), "--out", str(out), "--model", tiny_clip_spec, "--workers", "0"]
    args += ["--chunk-size", "2", "--batch-size", "1", "--quiet"]
    with monkeypatch.context() as patch:
        patch.setitem(defaults, "save_every_s", float("inf"))  # whole chunks only
        _interrupt_at(patch, "embed", 5)  # after the 5th image: 2 chunks of 2 written
        assert main(args) == 130
    assert capsys.readouterr().err.splitlines()[-1] == (  # after the log lines
        f"interrupted: 2 of 4 chunks (4 of 8 images) are saved in {out}; rerun the same command to resume"
    )
    with monkeypatch.context() as patch:
        patch.setitem(defaults, "save_every_s", 0.0)  # a part after every image
        _interrupt_at(patch, "embed", 7)
        assert main(args) == 130
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"interrupted: 3 of 4 chunks and part of the next (7 of 8 images) are saved in {out}; "
        "rerun the same command to resume"
    )
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["counts"] == {"items": 8, "embedded": 8, "skipped": 0}
    assert FeatureStore.open(out).meta["run"]["resumed_items"] == 7


def test_interrupted_cluster_after_embedding_keeps_the_features(
    photo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    work = tmp_path / "work"
    args = ["cluster", str(photo_dir), "--out", str(tmp_path / "r.json"), "--work-dir", str(work)]
    args += ["--model", "effnet-lite0-in1k", "--clusters", "3", "--quiet"]
    with monkeypatch.context() as patch:
        _interrupt_at(patch, "fit", 1)
        assert main(args) == 130
    assert capsys.readouterr().err.splitlines()[-1] == (  # after the log lines
        f"interrupted: the features of all 8 images are saved in {work / 'features'}; "
        "rerun the same command to resume"
    )
    assert main(args) == 0
    assert json.loads((tmp_path / "r.json").read_text())["run"]["counts"]["embedded"] == 8
