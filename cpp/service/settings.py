"""Service settings, read from ``CPP_*`` environment variables (pydantic-settings)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MiB = 1024 * 1024
#: How ``database_url`` may start (:func:`cpp.service.store.open_store`).
DATABASE_SCHEMES = ("postgresql://", "postgres://", "sqlite:///")


def _split_commas(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """Configuration of one service process: field ``x`` is ``CPP_X`` (lists are comma-separated)."""

    model_config = SettingsConfigDict(env_prefix="CPP_", extra="ignore")

    data_dir: Path = Field(default=Path("cpp-data"), description="Job database (SQLite) and job artifacts.")
    database_url: str | None = Field(
        default=None,
        description="postgresql://... to share one job queue between processes; default SQLite in data_dir.",
    )
    allowed_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Folders whose contents jobs may read by server-side path; empty: no server paths.",
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Accepted API keys; each key sees only the jobs it created. Empty (and no admin keys): "
        "no authentication.",
    )
    admin_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="API keys that also see and manage every key's jobs."
    )
    model: str = Field(default="auto", description="Encoder spec used when a job asks for 'auto'.")
    allowed_models: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Encoder specs jobs may request besides `model`."
    )
    devices: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["auto"],
        description="One worker thread per device ('auto', 'cpu', 'cuda:0').",
    )
    run_workers: bool = Field(default=True, description="Run jobs in this process (false: API only).")
    max_upload_bytes: int = Field(default=1024 * MiB, ge=1, description="Largest upload request body.")
    max_upload_files: int = Field(default=20_000, ge=1, description="Most images one upload may hold.")
    max_image_pixels: int = Field(default=50_000_000, ge=1, description="Largest width*height per image.")
    max_zip_ratio: float = Field(
        default=200.0, gt=1, description="Largest uncompressed/compressed zip ratio."
    )
    max_json_bytes: int = Field(default=1 * MiB, ge=1024, description="Largest JSON request body.")
    worker_nice: int = Field(
        default=10,
        ge=0,
        le=19,
        description="Niceness of worker threads (inherited by the compute threads and decode processes "
        "they start), so API requests win the CPU while a job runs; 0 keeps the default priority.",
    )
    poll_interval_s: float = Field(default=1.0, gt=0, description="How often an idle worker looks for jobs.")
    lease_s: float = Field(
        default=120.0, gt=0, description="A running job without a heartbeat this long is taken over."
    )
    delete_wait_s: float = Field(default=30.0, ge=0, description="How long DELETE waits for a job to stop.")
    max_header_bytes: int = Field(
        default=64 * 1024, ge=4096, description="Largest request line plus headers (larger: 400, closed)."
    )
    body_timeout_s: float = Field(
        default=30.0, gt=0, description="Longest wait for the next part of a request body (then 408)."
    )

    @field_validator("allowed_roots", "api_keys", "admin_keys", "allowed_models", "devices", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        return _split_commas(value)

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, url: str | None) -> str | None:
        if url and not url.startswith(DATABASE_SCHEMES):
            raise ValueError("use postgresql://... or sqlite:///path")
        return url

    @field_validator("allowed_roots")
    @classmethod
    def _resolve_roots(cls, roots: list[Path]) -> list[Path]:
        return [root.expanduser().resolve() for root in roots]

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"

    @property
    def sqlite_path(self) -> Path:
        return self.data_dir / "jobs.sqlite3"
