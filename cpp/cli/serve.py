"""``cpp serve``: run the job service (FastAPI on uvicorn); progress bars stay off.

Settings, the data directory and the address are checked before the service and its libraries are loaded,
so a bad ``CPP_*`` variable, an unwritable data directory or a port in use is one ``error:`` line.
"""

from __future__ import annotations

import argparse
import importlib.util
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cpp.cli.common import check_output, number_type
from cpp.errors import CppError, MissingExtraError

if TYPE_CHECKING:
    from cpp.service.settings import Settings

#: TCP ports (0: any free port).
PORTS = ((0, True), (65535, True))
#: Top-level modules of the ``service`` extra.
SERVICE_MODULES = frozenset({"fastapi", "starlette", "uvicorn", "python_multipart", "pydantic_settings"})


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run the HTTP job service (needs cpp[service])",
        description="Serve the job API. Settings come from CPP_* environment variables "
        "(CPP_DATA_DIR, CPP_ALLOWED_ROOTS, CPP_API_KEYS, CPP_MODEL, CPP_DATABASE_URL, ...); "
        "see docs/service.md. Needs the service extra: pip install 'cpp[service]'.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: 127.0.0.1)")
    parser.add_argument(
        "--port",
        type=number_type(int, *PORTS),
        default=8000,
        help=f"port (default: 8000; between {PORTS[0][0]} and {PORTS[1][0]})",
    )
    parser.add_argument(
        "--data-dir", type=Path, help="job database and artifacts (default: $CPP_DATA_DIR, else cpp-data)"
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="server log level (default: info)",
    )
    parser.set_defaults(func=run, quiet=True)


def _missing_extra(exc: ModuleNotFoundError) -> MissingExtraError:
    if (exc.name or "").split(".")[0] not in SERVICE_MODULES:
        raise exc
    return MissingExtraError(
        f"cpp serve needs the service extra ({exc.name} is not installed): pip install 'cpp[service]'"
    )


def _settings(data_dir: Path | None) -> Settings:
    """The settings from ``CPP_*`` variables (``--data-dir`` over ``CPP_DATA_DIR``), or one error naming
    the variable."""
    from pydantic import ValidationError

    try:
        from cpp.service.settings import Settings
    except ModuleNotFoundError as exc:
        raise _missing_extra(exc) from None
    try:
        settings = Settings()
    except ValidationError as exc:
        prefix = Settings.model_config.get("env_prefix", "")
        raise CppError(
            "; ".join(
                f"{prefix}{str(e['loc'][0]).upper()}: {e['msg'].removeprefix('Value error, ')}"
                for e in exc.errors()
            )
        ) from None
    if data_dir is not None:
        settings = settings.model_copy(update={"data_dir": data_dir})
    return settings


def _check_address(host: str, port: int) -> None:
    """Bind ``host``:``port`` once, so that an unknown host or a port in use fails before start-up."""
    try:
        family, kind, _, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise CppError(f"--host {host}: {exc.strerror}") from None
    try:
        with socket.socket(family, kind) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind(address)
    except OSError as exc:
        raise CppError(f"--port {port}: cannot listen on {host} port {port} ({exc.strerror})") from None


def run(args: argparse.Namespace) -> int:
    settings = _settings(args.data_dir)
    check_output(settings.data_dir, "--data-dir" if args.data_dir else "CPP_DATA_DIR", directory=True)
    url = settings.database_url or ""
    if url.startswith(("postgresql://", "postgres://")) and importlib.util.find_spec("psycopg") is None:
        raise MissingExtraError("CPP_DATABASE_URL is PostgreSQL, which needs: pip install 'cpp[postgres]'")
    _check_address(args.host, args.port)
    from cpp.logging import disable_progress_bars

    try:
        from cpp.service.server import serve
    except ModuleNotFoundError as exc:
        raise _missing_extra(exc) from None
    disable_progress_bars()
    serve(settings, host=args.host, port=args.port, log_level=args.log_level)
    return 0
