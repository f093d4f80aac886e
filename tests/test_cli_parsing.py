"""``cpp`` argument parsing: no heavy imports, one-line flag errors with the limits of the option models,
help texts with defaults and limits, and option models that agree with the library's own settings."""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import annotated_types
import pytest
from pydantic import BaseModel

from cpp.cli import build_parser, main
from cpp.errors import OptionError
from cpp.options import (
    MAX_SEED,
    ClusterOptions,
    EmbedOptions,
    EngineOptions,
    FitOptions,
    SourceSpec,
    StoreDtype,
)

HEAVY = ("torch", "open_clip", "faiss", "fastapi", "uvicorn", "ray", "scipy", "skimage", "numpy", "PIL")


def test_building_the_parser_imports_no_heavy_library() -> None:
    code = (
        "import cpp.cli, sys; cpp.cli.build_parser(); "
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {set(HEAVY)!r}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_the_library_imports_no_web_framework() -> None:
    """Every module of cpp outside cpp.service imports without the ``service`` extra's packages."""
    code = (
        "import pkgutil, importlib, sys, cpp; "
        "names = [m.name for m in pkgutil.walk_packages(cpp.__path__, 'cpp.') "
        "if not m.name.startswith('cpp.service')]; "
        "[importlib.import_module(name) for name in names]; "
        "web = {'fastapi', 'starlette', 'uvicorn', 'python_multipart', 'pydantic_settings'}; "
        "print(len(names), sorted(m for m in sys.modules if m.split('.')[0] in web))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    count, web = done.stdout.strip().split(" ", 1)
    assert int(count) > 20 and web == "[]"


def test_serve_without_the_service_extra_says_what_to_install() -> None:
    code = (  # None in sys.modules: what an interpreter without the package raises on import
        "import sys; sys.modules['fastapi'] = None; from cpp.cli import main; sys.exit(main(['serve']))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 2
    assert done.stderr == (
        "error: cpp serve needs the service extra (fastapi is not installed): pip install 'cpp[service]'\n"
    )


EMBED = "embed D --out S"
FIT = "fit F --out R"
CLUSTER = "cluster D --out r.json"
WHOLE = "must be a whole number"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (f"{EMBED} --batch-size 0", f"--batch-size: {WHOLE} between 1 and 4096, got 0"),
        (f"{EMBED} --batch-size 4097", f"--batch-size: {WHOLE} between 1 and 4096"),
        (f"{EMBED} --chunk-size 0", f"--chunk-size: {WHOLE} >= 1, got 0"),
        (f"{EMBED} --max-pixels -5", f"--max-pixels: {WHOLE} >= 1, got -5"),
        (f"{EMBED} --workers -1", f"--workers: {WHOLE} >= 0, got -1"),
        (f"{EMBED} --workers two", f"--workers: {WHOLE} >= 0, got 'two'"),
        (f"{EMBED} --dtype int8", "--dtype: invalid choice: 'int8'"),
        (f"{EMBED} --engine gpu", "--engine: invalid choice: 'gpu'"),
        (f"{EMBED} --ray-actors 0", f"--ray-actors: {WHOLE} >= 1, got 0"),
        (f"{EMBED} --ray-cpus-per-actor 0", "--ray-cpus-per-actor: must be a number > 0"),
        (f"{EMBED} --ray-gpus-per-actor nan", "--ray-gpus-per-actor: must be a number >= 0"),
        (f"{FIT} --epochs 0", f"--epochs: {WHOLE} between 1 and 1000, got 0"),
        (f"{FIT} --batch-size 4", f"--batch-size: {WHOLE} >= 8, got 4"),
        (f"{FIT} --context-k -1", f"--context-k: {WHOLE} >= 0, got -1"),
        (f"{FIT} --view-k 1.5", f"--view-k: {WHOLE} >= 0, got '1.5'"),
        (f"{FIT} --seed -1", f"--seed: {WHOLE} between 0 and {MAX_SEED}, got -1"),
        (f"{FIT} --device gpu", "--device: must be 'auto', 'cpu' or 'cuda[:N]', got 'gpu'"),
        (f"{FIT} --clusters 1", "--clusters: must be 'auto' or a whole number between 2 and 1000"),
        (f"{CLUSTER} --batch-size 0", f"--batch-size: {WHOLE} between 1 and 4096, got 0"),
        (f"{CLUSTER} --clusters 1", "--clusters: must be 'auto' or a whole number between 2 and 1000, got 1"),
        (
            f"{CLUSTER} --clusters 100000",
            "--clusters: must be 'auto' or a whole number between 2 and 1000, got 100000",
        ),
        (
            f"{CLUSTER} --clusters abc",
            "--clusters: must be 'auto' or a whole number between 2 and 1000, got 'abc'",
        ),
        (f"{CLUSTER} --epochs 0", f"--epochs: {WHOLE} between 1 and 1000, got 0"),
        (f"{CLUSTER} --seed -1", f"--seed: {WHOLE} between 0 and {MAX_SEED}, got -1"),
        (f"{CLUSTER} --device cuda0", "--device: must be 'auto', 'cpu' or 'cuda[:N]', got 'cuda0'"),
        (f"{EMBED} --device tpu", "--device: must be 'auto', 'cpu' or 'cuda[:N]', got 'tpu'"),
        (f"{CLUSTER} --workers -1", f"--workers: {WHOLE} >= 0, got -1"),
        (f"{CLUSTER} --head cnn", "--head: invalid choice: 'cnn'"),
        ("cluster D", "the following arguments are required: --out"),
        ("serve --port 70000", f"--port: {WHOLE} between 0 and 65535, got 70000"),
        ("nope", "invalid choice: 'nope'"),
    ],
)
def test_flag_errors_are_one_line_naming_the_flag_and_its_limits(
    argv: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv.split()) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert message in err and err.endswith(" --help`)\n")


def test_option_model_errors_name_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    """What the flags' own checks cannot see (a list length) is still one line naming the flag."""
    vocabularies = [f"v{i}" for i in range(17)]
    assert main(["cluster", "D", "--out", "r.json", "--quiet", "--vocabulary", *vocabularies]) == 2
    err = capsys.readouterr().err
    assert err == "error: --vocabulary: List should have at most 16 items after validation, not 17\n"


@pytest.mark.parametrize(
    ("command", "shown"),
    [
        (
            "cluster",
            ["--clusters K", "(default: auto; between 2 and 1000)", "(default: 64; between 1 and 4096)"],
        ),
        ("embed", ["(default: 64; between 1 and 4096)", "(default: 4096; >= 1)", "{float16,float32}"]),
        (
            "fit",
            ["(default: 512; >= 8)", "(default: by data size; between 1 and 1000)", "(default: 10; >= 0)"],
        ),
        ("serve", ["(default: 8000; between 0 and 65535)"]),
    ],
)
def test_help_shows_defaults_and_limits(
    command: str, shown: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([command, "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for part in shown:
        assert part in text


def test_flags_parse_to_the_model_types() -> None:
    args = build_parser().parse_args(
        ["cluster", "D", "--out", "r.json", "--clusters", "7", "--ray-gpus-per-actor", "0.5"]
    )
    assert (args.clusters, args.ray_gpus_per_actor, args.batch_size, args.workers) == (7, 0.5, 64, None)
    assert build_parser().parse_args(["fit", "F", "--out", "R"]).clusters == "auto"


def test_option_models_agree_with_the_library() -> None:
    """The CLI's light option models hold the defaults and limits of settings defined in heavy modules."""
    from typing import get_args

    from cpp.embed import DTYPES
    from cpp.engines import LocalEngine, list_engines
    from cpp.head_model import FitConfig
    from cpp.heads import HeadConfig
    from cpp.images import DEFAULT_MAX_PIXELS

    for name, field in FitOptions.model_fields.items():
        library = (FitConfig if name in FitConfig.model_fields else HeadConfig).model_fields[name]
        assert (field.default, field.metadata) == (library.default, library.metadata), name
    # `cpp fit --epochs` takes ClusterOptions' limits: FitConfig accepts both ends
    limits = ClusterOptions.model_fields["epochs"].metadata
    FitConfig.model_validate({"epochs": next(m.ge for m in limits if isinstance(m, annotated_types.Ge))})
    FitConfig.model_validate({"epochs": next(m.le for m in limits if isinstance(m, annotated_types.Le))})
    assert sorted(get_args(EngineOptions.model_fields["engine"].annotation)) == list_engines()
    assert get_args(StoreDtype) == DTYPES
    assert EmbedOptions.model_fields["max_pixels"].default == DEFAULT_MAX_PIXELS
    with pytest.raises(ValueError):
        LocalEngine(workers=-1)  # EngineOptions.workers >= 0


def _commands() -> dict[str, argparse.ArgumentParser]:
    (subparsers,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(subparsers.choices)


def _flags(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


def test_every_flag_with_a_value_shows_its_default() -> None:
    for command, parser in _commands().items():
        for action in _flags(parser):
            if action.nargs != 0 and not action.required:  # switches have none; --out has no default
                assert "default: " in (action.help or ""), (command, action.option_strings)


#: Flags named otherwise than their option model field.
RENAMED = {"source_type": "type"}
MODELS: tuple[type[BaseModel], ...] = (ClusterOptions, EmbedOptions, EngineOptions, SourceSpec)


def test_flags_of_option_fields_show_the_fields_default_and_limits() -> None:
    """Every flag that sets an option model field is generated from it (``add_option``): its help shows the
    default and every limit of the field."""
    checked = set()
    for command, parser in _commands().items():
        models: tuple[type[BaseModel], ...] = (FitOptions, *MODELS) if command == "fit" else MODELS
        for action in _flags(parser):
            name = RENAMED.get(action.dest, action.dest)
            model = next((m for m in models if name in m.model_fields), None)
            if model is None:
                continue
            checked.add(f"{command} {action.option_strings[0]}")
            text = action.help or ""
            assert action.nargs == 0 or "(default: " in text, (command, name)
            field = model.model_fields[name]
            limits = [] if field.annotation is str else field.metadata  # a text's length is not shown
            for limit in limits:
                if isinstance(limit, annotated_types.MinLen) and limit.min_length <= 1:
                    continue  # one or more values: the flag's nargs
                bound = next(
                    getattr(limit, a)
                    for a in ("ge", "gt", "le", "lt", "min_length", "max_length")
                    if hasattr(limit, a)
                )
                assert str(bound) in text, (command, name, limit)
    assert {"cluster --vocabulary", "cluster --model", "embed --source-type", "fit --context-k"} <= checked
    assert len(checked) >= 38


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ("embed {photos} --out {tmp}/s --model auto:x", "--model 'auto:x': auto takes no argument, got 'x'"),
        ("embed {photos} --out {tmp}/s --model nope", "--model 'nope': unknown encoder 'nope'; known: "),
        (
            "cluster {photos} --out {tmp}/r.json --work-dir {tmp}/w --model effnet-lite0-in1k:v2",
            "--model 'effnet-lite0-in1k:v2': effnet-lite0-in1k takes no argument, got 'v2'",
        ),
        ("cluster {photos} --out {tmp}/r.json --work-dir {tmp}/w --model x:y", "--model 'x:y': unknown"),
    ],
)
def test_library_option_errors_name_the_flag(
    argv: str, message: str, photo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*argv.format(photos=photo_dir, tmp=tmp_path).split(), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {message}"), err
    assert not (tmp_path / "s").exists() and not (tmp_path / "w" / "features").exists()


def test_a_missing_cuda_device_names_the_flag(
    photo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA, so --device cuda is valid here")
    assert main(["embed", str(photo_dir), "--out", str(tmp_path / "s"), "--device", "cuda", "--quiet"]) == 2
    assert (
        capsys.readouterr().err == "error: --device 'cuda': CUDA is not available here; use 'cpu' or 'auto'\n"
    )


def test_embed_source_names_the_argument(tmp_path: Path) -> None:
    from cpp.embed import embed_source

    spec = SourceSpec(type="folder", path=str(tmp_path))
    with pytest.raises(OptionError) as caught:
        embed_source(spec, tmp_path / "s", encoder=None, batch_size=0)  # type: ignore[arg-type]
    assert (caught.value.option, str(caught.value)) == ("batch_size", "batch_size 0: must be >= 1")
    with pytest.raises(OptionError, match="dtype 'int8': must be one of float16, float32"):
        embed_source(spec, tmp_path / "s", encoder=None, dtype="int8")  # type: ignore[arg-type]


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[dict[str, Any]]:
    """``cpp serve`` with the server replaced by a recorder of what it would serve (nothing is started)."""
    calls: list[dict[str, Any]] = []
    stub = types.ModuleType("cpp.service.server")
    stub.serve = lambda settings, **kwargs: calls.append({"settings": settings, **kwargs})  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "cpp.service.server", stub)
    monkeypatch.setenv("CPP_DATA_DIR", str(tmp_path / "data"))
    return calls


@pytest.mark.parametrize(
    ("env", "argv", "message"),
    [
        ({"CPP_MAX_UPLOAD_BYTES": "abc"}, [], "CPP_MAX_UPLOAD_BYTES: Input should be a valid integer"),
        ({"CPP_WORKER_NICE": "40"}, [], "CPP_WORKER_NICE: Input should be less than or equal to 19"),
        (
            {"CPP_DATABASE_URL": "mysql://user:secret@db/jobs"},
            [],
            "CPP_DATABASE_URL: use postgresql://... or sqlite:///path\n",
        ),
        ({"CPP_DATA_DIR": "/proc/cpp"}, [], "CPP_DATA_DIR /proc/cpp: /proc is a kernel file system"),
        ({}, ["--data-dir", "/proc/cpp"], "--data-dir /proc/cpp: /proc is a kernel file system"),
        ({}, ["--host", "no-such-host.invalid"], "--host no-such-host.invalid: "),
    ],
)
def test_serve_start_up_problems_are_one_line(
    env: dict[str, str],
    argv: list[str],
    message: str,
    started: list[dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["serve", "--port", "0", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {message}"), err
    assert "secret" not in err and started == []


def test_serve_refuses_a_port_in_use(
    started: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    assert capsys.readouterr().err == (
        f"error: --port {port}: cannot listen on 127.0.0.1 port {port} (Address already in use)\n"
    )
    assert started == []


def test_serve_starts_with_the_checked_settings(started: list[dict[str, Any]], tmp_path: Path) -> None:
    assert main(["serve", "--port", "0", "--data-dir", str(tmp_path / "jobs")]) == 0
    (call,) = started
    assert (call["settings"].data_dir, call["host"], call["port"]) == (tmp_path / "jobs", "127.0.0.1", 0)
