"""``cpp serve``: run the job service (FastAPI on uvicorn); progress bars stay off."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from cpp.cli.common import number_type
from cpp.errors import MissingExtraError

#: TCP ports (0: any free port).
PORTS = ((0, True), (65535, True))
#: Top-level modules of the ``service`` extra.
SERVICE_MODULES = frozenset({"fastapi", "starlette", "uvicorn", "python_multipart", "pydantic_settings"})


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run the HTTP job service",
        description="Serve the job API. Settings come from CPP_* environment variables "
        "(CPP_DATA_DIR, CPP_ALLOWED_ROOTS, CPP_API_KEYS, CPP_MODEL, CPP_DATABASE_URL, ...); "
        "see docs/service.md.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    parser.add_argument(
        "--port",
        type=number_type(int, *PORTS),
        default=8000,
        help=f"port (default: 8000; between {PORTS[0][0]} and {PORTS[1][0]})",
    )
    parser.add_argument("--data-dir", type=Path, help="overrides CPP_DATA_DIR")
    parser.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    parser.set_defaults(func=run, quiet=True)


def run(args: argparse.Namespace) -> int:
    from cpp.logging import disable_progress_bars

    try:
        from cpp.service.server import serve
        from cpp.service.settings import Settings
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in SERVICE_MODULES:
            raise
        raise MissingExtraError(
            f"cpp serve needs the service extra ({exc.name} is not installed): pip install 'cpp[service]'"
        ) from None

    disable_progress_bars()
    settings = Settings()
    if args.data_dir is not None:
        settings = settings.model_copy(update={"data_dir": args.data_dir})
    serve(settings, host=args.host, port=args.port, log_level=args.log_level)
    return 0
