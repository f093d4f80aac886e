"""``cpp`` argument parsing: no heavy imports, one-line flag errors with the limits of the option models,
help texts with defaults and limits, and option models that agree with the library's own settings."""

from __future__ import annotations

import subprocess
import sys

import annotated_types
import pytest

from cpp.cli import build_parser, main
from cpp.options import (
    MAX_SEED,
    ClusterOptions,
    EmbedOptions,
    EngineOptions,
    FitOptions,
    StoreDtype,
)

HEAVY = ("torch", "open_clip", "faiss", "fastapi", "uvicorn", "ray", "scipy", "skimage")


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
    from cpp.fit import FitConfig
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
