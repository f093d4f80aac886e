"""The job store: job rows in SQLite (default, WAL) or PostgreSQL (shared queue, ``FOR UPDATE SKIP LOCKED``).

Both back ends run the same SQL (``?`` placeholders, rewritten for psycopg). Times are Unix seconds.
A worker owns a running job through ``worker_id`` and keeps it with heartbeats; a running job whose
heartbeat is older than the lease is claimed again (its feature store resumes), so a crashed worker loses
nothing. SQLite serves one process, which re-queues its own running jobs at start-up.

Every job has an ``owner``: the id of the API key that created it (never the key itself), or NULL when the
service runs without keys. Reads that take an ``owner`` see only that owner's jobs (``ANY_OWNER``: all of
them, for workers and admin keys); idempotency keys are scoped to their owner.

Every job has a ``kind``: ``cluster`` (``/v1/jobs``: cluster a collection, which makes a clustering) or
``assign`` (assign new images to the clustering of a finished cluster job, its ``parent``). Reads, cancels and
deletes address cluster jobs unless given another ``kind`` (``None``: any); workers claim every kind.
Deleting a cluster job deletes its assignment jobs too.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any


class JobStatus(str, Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


TERMINAL = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled})


class JobKind(str, Enum):
    cluster = "cluster"
    assign = "assign"


class _AnyOwner:
    """The type of :data:`ANY_OWNER`."""


#: ``owner`` argument that matches every job (workers, admin keys, a service without keys).
ANY_OWNER = _AnyOwner()
#: Whose jobs a read may see: a key id, None (jobs made without keys) or :data:`ANY_OWNER`.
Owner = str | None | _AnyOwner


class IdempotencyConflict(Exception):
    """An ``Idempotency-Key`` was reused with a different request body."""


@dataclass(frozen=True)
class JobRecord:
    """One row of the ``jobs`` table."""

    id: str
    status: JobStatus
    source: dict[str, Any]
    options: dict[str, Any]
    device: str
    created_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None
    heartbeat_at: float | None
    worker_id: str | None
    attempts: int
    progress: dict[str, Any] | None
    error: dict[str, Any] | None
    cancel_requested: bool
    idempotency_key: str | None
    request_hash: str
    owner: str | None
    kind: JobKind = JobKind.cluster
    parent: str | None = None

    @classmethod
    def from_row(cls, row: Any) -> JobRecord:
        r = dict(row)
        return cls(
            id=r["id"],
            status=JobStatus(r["status"]),
            source=json.loads(r["source"]),
            options=json.loads(r["options"]),
            device=r["device"],
            created_at=r["created_at"],
            updated_at=r["updated_at"],
            started_at=r["started_at"],
            finished_at=r["finished_at"],
            heartbeat_at=r["heartbeat_at"],
            worker_id=r["worker_id"],
            attempts=r["attempts"],
            progress=json.loads(r["progress"]) if r["progress"] else None,
            error=json.loads(r["error"]) if r["error"] else None,
            cancel_requested=bool(r["cancel_requested"]),
            idempotency_key=_unscoped(r["idempotency_key"]),
            request_hash=r["request_hash"],
            owner=r["owner"],
            kind=JobKind(r["kind"]),
            parent=r["parent"],
        )


_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS jobs (
        id TEXT PRIMARY KEY,
        status TEXT NOT NULL,
        source TEXT NOT NULL,
        options TEXT NOT NULL,
        device TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        started_at DOUBLE PRECISION,
        finished_at DOUBLE PRECISION,
        heartbeat_at DOUBLE PRECISION,
        worker_id TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        progress TEXT,
        error TEXT,
        cancel_requested INTEGER NOT NULL DEFAULT 0,
        idempotency_key TEXT UNIQUE,
        request_hash TEXT NOT NULL,
        owner TEXT,
        kind TEXT NOT NULL DEFAULT 'cluster',
        parent TEXT
    )""",
    "CREATE INDEX IF NOT EXISTS jobs_status_created ON jobs (status, created_at)",
)
#: Columns added after the first release: (name, ALTER statement), applied to older databases at start-up.
_ADDED_COLUMNS = (
    ("owner", "ALTER TABLE jobs ADD COLUMN owner TEXT"),
    ("kind", "ALTER TABLE jobs ADD COLUMN kind TEXT NOT NULL DEFAULT 'cluster'"),
    ("parent", "ALTER TABLE jobs ADD COLUMN parent TEXT"),
)
_INDEXES = (
    "CREATE INDEX IF NOT EXISTS jobs_owner_created ON jobs (owner, created_at)",
    "CREATE INDEX IF NOT EXISTS jobs_parent_created ON jobs (parent, created_at)",
)
_SCOPE = "\x1f"


def _scoped(owner: str | None, idempotency_key: str | None) -> str | None:
    """The stored form of an idempotency key: unique per owner, not across owners."""
    return None if idempotency_key is None else f"{owner or ''}{_SCOPE}{idempotency_key}"


def _unscoped(stored: str | None) -> str | None:
    return None if stored is None else stored.partition(_SCOPE)[2]  # owner ids are hex: no separator


def _owner_clause(owner: Owner) -> tuple[str, list[Any]]:
    """SQL condition (with its parameters) restricting rows to ``owner``."""
    if owner is ANY_OWNER:
        return "1 = 1", []
    if owner is None:
        return "owner IS NULL", []
    return "owner = ?", [owner]


def _kind_clause(kind: JobKind | None) -> tuple[str, list[Any]]:
    """SQL condition (with its parameters) restricting rows to ``kind`` (None: any kind)."""
    return ("1 = 1", []) if kind is None else ("kind = ?", [kind.value])


_ACTIVE = "('queued', 'running')"


class JobStore(ABC):
    """Job persistence over a DB-API connection; subclasses supply connections and the claim lock clause."""

    #: Appended to the claim sub-select (PostgreSQL: ``FOR UPDATE SKIP LOCKED``).
    claim_lock = ""
    #: True when one process owns the database and may re-queue every running job at start-up.
    single_process = False
    #: Lists the ``jobs`` table's columns (rows with a ``name`` field).
    columns_sql = "SELECT column_name AS name FROM information_schema.columns WHERE table_name = 'jobs'"

    @abstractmethod
    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """Run one statement; return its rows (empty for statements without a result)."""

    @abstractmethod
    def _rowcount(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one statement; return the number of rows it changed."""

    @abstractmethod
    def close(self) -> None: ...

    def init_schema(self) -> None:
        self._apply_schema(self._query)

    def _apply_schema(self, query: Callable[[str], list[Any]]) -> None:
        """Create the table, add the columns an older database lacks, then the indexes."""
        for statement in _SCHEMA:
            query(statement)
        present = {dict(row)["name"] for row in query(self.columns_sql)}
        for name, alter in _ADDED_COLUMNS:
            if name not in present:
                query(alter)
        for statement in _INDEXES:
            query(statement)

    def ping(self) -> None:
        """Raise if the database cannot answer."""
        self._query("SELECT 1")

    def create(
        self,
        *,
        job_id: str,
        source: dict[str, Any],
        options: dict[str, Any],
        device: str,
        request_hash: str,
        idempotency_key: str | None = None,
        owner: str | None = None,
        kind: JobKind = JobKind.cluster,
        parent: str | None = None,
    ) -> tuple[JobRecord, bool]:
        """Insert a queued job of ``owner`` (an assignment job names its cluster job as ``parent``); with an
        ``idempotency_key`` this owner used before, return that job instead (``created`` False).

        Raises :class:`IdempotencyConflict` when the key was used with another request (or another kind).
        """
        now = time.time()
        scoped = _scoped(owner, idempotency_key)
        rows = self._query(
            "INSERT INTO jobs (id, status, source, options, device, created_at, updated_at, "
            "idempotency_key, request_hash, owner, kind, parent) "
            "VALUES (?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (idempotency_key) DO NOTHING RETURNING *",
            (
                job_id,
                json.dumps(source),
                json.dumps(options),
                device,
                now,
                now,
                scoped,
                request_hash,
                owner,
                kind.value,
                parent,
            ),
        )
        if rows:
            return JobRecord.from_row(rows[0]), True
        existing = self._query("SELECT * FROM jobs WHERE idempotency_key = ?", (scoped,))
        if not existing:  # deleted between the two statements: try again under the same key
            return self.create(
                job_id=job_id,
                source=source,
                options=options,
                device=device,
                request_hash=request_hash,
                idempotency_key=idempotency_key,
                owner=owner,
                kind=kind,
                parent=parent,
            )
        job = JobRecord.from_row(existing[0])
        if job.request_hash != request_hash or job.kind is not kind or job.parent != parent:
            raise IdempotencyConflict(idempotency_key)
        return job, False

    def get(
        self, job_id: str, owner: Owner = ANY_OWNER, *, kind: JobKind | None = JobKind.cluster
    ) -> JobRecord | None:
        """The job ``job_id`` if ``owner`` may see it and it is of ``kind``."""
        clause, params = _owner_clause(owner)
        kind_clause, kind_params = _kind_clause(kind)
        rows = self._query(
            f"SELECT * FROM jobs WHERE id = ? AND {clause} AND {kind_clause}", (job_id, *params, *kind_params)
        )
        return JobRecord.from_row(rows[0]) if rows else None

    def list_jobs(
        self,
        *,
        status: JobStatus | None = None,
        offset: int = 0,
        limit: int = 50,
        owner: Owner = ANY_OWNER,
        kind: JobKind | None = JobKind.cluster,
        parent: str | None = None,
    ) -> tuple[list[JobRecord], int]:
        """A page of ``owner``'s jobs of ``kind`` (with ``parent``: only its children), newest first, and
        the total matching."""
        clause, params = _owner_clause(owner)
        kind_clause, kind_params = _kind_clause(kind)
        where, params = f"WHERE {clause} AND {kind_clause}", [*params, *kind_params]
        if parent is not None:
            where, params = f"{where} AND parent = ?", [*params, parent]
        if status:
            where, params = f"{where} AND status = ?", [*params, status.value]
        total = self._query(f"SELECT COUNT(*) AS n FROM jobs {where}", params)[0]
        rows = self._query(
            f"SELECT * FROM jobs {where} ORDER BY created_at DESC, id DESC LIMIT ? OFFSET ?",
            [*params, limit, offset],
        )
        return [JobRecord.from_row(r) for r in rows], int(dict(total)["n"])

    def counts(self) -> dict[JobStatus, int]:
        rows = self._query("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status")
        found = {JobStatus(dict(r)["status"]): int(dict(r)["n"]) for r in rows}
        return {status: found.get(status, 0) for status in JobStatus}

    def claim(self, worker_id: str, device: str, lease_s: float) -> JobRecord | None:
        """Take the oldest queued job (or one whose worker stopped heartbeating) for ``device``."""
        now = time.time()
        rows = self._query(
            "UPDATE jobs SET status = 'running', worker_id = ?, started_at = COALESCE(started_at, ?), "
            "heartbeat_at = ?, updated_at = ?, attempts = attempts + 1 WHERE id = ("
            "SELECT id FROM jobs WHERE (status = 'queued' OR (status = 'running' AND heartbeat_at < ?)) "
            f"AND device IN ('auto', ?) ORDER BY created_at, id LIMIT 1 {self.claim_lock}) RETURNING *",
            (worker_id, now, now, now, now - lease_s, device),
        )
        return JobRecord.from_row(rows[0]) if rows else None

    def heartbeat(self, job_id: str, worker_id: str, progress: dict[str, Any] | None = None) -> bool | None:
        """Keep the lease (and store progress); return whether cancellation was asked, None if not owned."""
        now = time.time()
        rows = self._query(
            "UPDATE jobs SET heartbeat_at = ?, updated_at = ?, progress = COALESCE(?, progress) "
            "WHERE id = ? AND worker_id = ? AND status = 'running' RETURNING cancel_requested",
            (now, now, json.dumps(progress) if progress is not None else None, job_id, worker_id),
        )
        return bool(dict(rows[0])["cancel_requested"]) if rows else None

    def finish(
        self,
        job_id: str,
        worker_id: str,
        status: JobStatus,
        error: dict[str, Any] | None = None,
        progress: dict[str, Any] | None = None,
    ) -> bool:
        """Record the end of a run this worker owns; False when the job is gone or owned by another."""
        now = time.time()
        return (
            self._rowcount(
                "UPDATE jobs SET status = ?, error = ?, progress = COALESCE(?, progress), finished_at = ?, "
                "updated_at = ?, heartbeat_at = NULL WHERE id = ? AND worker_id = ? AND status = 'running'",
                (
                    status.value,
                    json.dumps(error) if error else None,
                    json.dumps(progress) if progress is not None else None,
                    now,
                    now,
                    job_id,
                    worker_id,
                ),
            )
            == 1
        )

    def release(self, job_id: str, worker_id: str) -> bool:
        """Put a running job back in the queue (its worker is shutting down)."""
        return (
            self._rowcount(
                "UPDATE jobs SET status = 'queued', worker_id = NULL, heartbeat_at = NULL, updated_at = ? "
                "WHERE id = ? AND worker_id = ? AND status = 'running'",
                (time.time(), job_id, worker_id),
            )
            == 1
        )

    def requeue_running(self) -> int:
        """Re-queue every running job (single-process stores, at start-up); returns how many."""
        return self._rowcount(
            "UPDATE jobs SET status = 'queued', worker_id = NULL, heartbeat_at = NULL, updated_at = ? "
            "WHERE status = 'running'",
            (time.time(),),
        )

    def request_cancel(
        self, job_id: str, owner: Owner = ANY_OWNER, *, kind: JobKind | None = JobKind.cluster
    ) -> JobRecord | None:
        """Cancel a queued job now, or flag a running one; returns the job (None if unknown to ``owner``)."""
        now = time.time()
        clause, params = _owner_clause(owner)
        kind_clause, kind_params = _kind_clause(kind)
        rows = self._query(
            "UPDATE jobs SET cancel_requested = 1, updated_at = ?, "
            "finished_at = CASE WHEN status = 'queued' THEN ? ELSE finished_at END, "
            "status = CASE WHEN status = 'queued' THEN 'cancelled' ELSE status END "
            f"WHERE id = ? AND status IN {_ACTIVE} AND {clause} AND {kind_clause} RETURNING *",
            (now, now, job_id, *params, *kind_params),
        )
        return JobRecord.from_row(rows[0]) if rows else self.get(job_id, owner, kind=kind)

    def delete(
        self, job_id: str, owner: Owner = ANY_OWNER, *, kind: JobKind | None = JobKind.cluster
    ) -> bool:
        """Delete the job and the jobs it is the parent of; False when ``owner`` has no such job."""
        clause, params = _owner_clause(owner)
        kind_clause, kind_params = _kind_clause(kind)
        sql = f"DELETE FROM jobs WHERE id = ? AND {clause} AND {kind_clause}"
        deleted = self._rowcount(sql, (job_id, *params, *kind_params)) == 1
        if deleted:
            self._rowcount("DELETE FROM jobs WHERE parent = ?", (job_id,))
        return deleted


class SqliteJobStore(JobStore):
    """One SQLite file in WAL mode, one connection serialised by a lock (one service process)."""

    single_process = True
    columns_sql = "SELECT name FROM pragma_table_info('jobs')"

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        with self._lock:
            return self._conn.execute(sql, tuple(params)).fetchall()

    def _rowcount(self, sql: str, params: Sequence[Any] = ()) -> int:
        with self._lock:
            return self._conn.execute(sql, tuple(params)).rowcount

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class PostgresJobStore(JobStore):
    """PostgreSQL via psycopg 3: an autocommit connection per thread; claims skip rows others have locked."""

    claim_lock = "FOR UPDATE SKIP LOCKED"

    def __init__(self, url: str) -> None:
        import psycopg  # optional dependency: pip install 'cpp[postgres]'
        from psycopg.rows import dict_row

        self._psycopg = psycopg
        self._dict_row = dict_row
        self._url = url
        self._local = threading.local()
        self._all: list[Any] = []
        self._lock = threading.Lock()
        self._conn()  # fail early on a bad URL

    def _conn(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None or conn.closed:
            conn = self._psycopg.connect(self._url, autocommit=True, row_factory=self._dict_row)
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    @contextmanager
    def _cursor(self) -> Iterator[Any]:
        with self._conn().cursor() as cur:
            yield cur

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        with self._cursor() as cur:
            cur.execute(sql.replace("?", "%s"), tuple(params))
            return cur.fetchall() if cur.description is not None else []

    def _rowcount(self, sql: str, params: Sequence[Any] = ()) -> int:
        with self._cursor() as cur:
            cur.execute(sql.replace("?", "%s"), tuple(params))
            return int(cur.rowcount)

    def init_schema(self) -> None:
        with self._conn().transaction(), self._cursor() as cur:
            # Serialise concurrent start-ups: CREATE TABLE IF NOT EXISTS races in PostgreSQL.
            cur.execute("SELECT pg_advisory_xact_lock(727274)")

            def query(sql: str) -> list[Any]:
                cur.execute(sql)
                return cur.fetchall() if cur.description is not None else []

            self._apply_schema(query)

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                conn.close()
            self._all.clear()


def open_store(database_url: str | None, sqlite_path: Path) -> JobStore:
    """The store named by ``database_url`` (``postgresql://...``), else SQLite at ``sqlite_path``."""
    if database_url and database_url.startswith(("postgresql://", "postgres://")):
        store: JobStore = PostgresJobStore(database_url)
    elif database_url and database_url.startswith("sqlite:///"):
        store = SqliteJobStore(Path(database_url.removeprefix("sqlite:///")))
    elif database_url:
        raise ValueError(f"CPP_DATABASE_URL {database_url!r}: use postgresql://... or sqlite:///path")
    else:
        store = SqliteJobStore(sqlite_path)
    store.init_schema()
    return store
