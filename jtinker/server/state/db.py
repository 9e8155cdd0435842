"""Durable server metadata: sessions, training runs, checkpoints, samplers, futures.

Checkpoint *contents* live in the :class:`jtinker.checkpoints.CheckpointStore`; this database records
who owns what (an API key's owner id per run) and what the checkpoint listing cannot derive from disk
(user metadata, TTLs, session bookkeeping, the state of every future).

Two backends behind one set of queries, which are written once in the SQL both accept (``?``
placeholders, ``INSERT ... ON CONFLICT DO UPDATE`` upserts, ``DOUBLE PRECISION`` timestamps):

* ``sqlite:///path`` (the default, ``<home>/server.db``): one connection in WAL mode with
  ``synchronous=NORMAL``, so a commit does not wait for fsync and the HTTP loop can write small rows
  inline.
* ``postgresql://user:pass@host:port/db``: one autocommit connection through ``psycopg`` (version 3,
  an optional dependency: ``pip install 'jtinker[postgres]'``), imported only when such a URL is used.

A :class:`Dialect` holds what differs: connecting, the placeholder style and session set-up. The
schema has no auto-increment keys (every id is made by the server), so there is no per-dialect
column type either. Both connections are guarded by one lock: the server's writes are small and rare.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    last_heartbeat DOUBLE PRECISION NOT NULL,
    finished_at DOUBLE PRECISION,
    finish_reason TEXT,
    sdk_version TEXT,
    user_metadata TEXT,
    display_name TEXT,
    instance_id TEXT
);
CREATE INDEX IF NOT EXISTS sessions_owner ON sessions(owner);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    session_id TEXT,
    base_model TEXT NOT NULL,
    lora_rank INTEGER,
    train_mlp INTEGER,
    train_attn INTEGER,
    train_unembed INTEGER,
    user_metadata TEXT,
    created_at DOUBLE PRECISION NOT NULL,
    last_request_at DOUBLE PRECISION NOT NULL,
    corrupted INTEGER NOT NULL DEFAULT 0,
    instance_id TEXT
);
CREATE INDEX IF NOT EXISTS runs_owner ON runs(owner);
CREATE TABLE IF NOT EXISTS checkpoints (
    tinker_path TEXT PRIMARY KEY,
    run_id TEXT NOT NULL,
    owner TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    user_metadata TEXT,
    expires_at DOUBLE PRECISION
);
CREATE INDEX IF NOT EXISTS checkpoints_run ON checkpoints(run_id);
CREATE TABLE IF NOT EXISTS samplers (
    sampler_id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    session_id TEXT,
    base_model TEXT NOT NULL,
    model_path TEXT,
    created_at DOUBLE PRECISION NOT NULL,
    instance_id TEXT
);
CREATE TABLE IF NOT EXISTS futures (
    request_id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    kind TEXT NOT NULL,
    model_id TEXT,
    status TEXT NOT NULL,
    result_json TEXT,
    error TEXT,
    category TEXT,
    created_at DOUBLE PRECISION NOT NULL,
    finished_at DOUBLE PRECISION,
    instance_id TEXT NOT NULL
);
"""


POSTGRES_PREFIXES = ("postgresql://", "postgres://", "postgresql+")


def open_database(db_url: str | None, home: Path) -> Database:
    """``None`` means ``sqlite:///<home>/server.db``; else a ``sqlite:///`` or ``postgresql://`` URL."""
    if db_url is None:
        return Database(SqliteDialect(home / "server.db"))
    if db_url.startswith(POSTGRES_PREFIXES):
        return Database(PostgresDialect(db_url))
    if db_url.startswith("sqlite:///"):
        return Database(SqliteDialect(Path(db_url.removeprefix("sqlite:///")).expanduser()))
    raise ValueError(
        f"--db: unsupported URL {db_url!r}; expected sqlite:///path/to/file.db or "
        "postgresql://user:password@host:port/dbname"
    )


class Dialect:
    """What differs between backends; the queries themselves are shared."""

    name = "?"
    location = "?"  # where the data lives, for logs (no password)

    def connect(self) -> Any:
        raise NotImplementedError

    def prepare(self, conn: Any) -> None:
        """Session settings before the schema is created."""

    def sql(self, query: str) -> str:
        """A shared query (``?`` placeholders) in this backend's placeholder style."""
        return query

    def create_schema(self, conn: Any, schema: str) -> None:
        for statement in filter(str.strip, schema.split(";")):
            conn.execute(statement)


class SqliteDialect(Dialect):
    name = "sqlite"

    def __init__(self, path: Path):
        self.path = Path(path)
        self.location = str(self.path)

    def connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        conn.row_factory = sqlite3.Row
        return conn

    def prepare(self, conn: sqlite3.Connection) -> None:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=5000")


_PLACEHOLDER = re.compile(r"'[^']*'|\?")  # a quoted literal (kept as is) or a placeholder


class PostgresDialect(Dialect):
    name = "postgresql"

    def __init__(self, url: str):
        # SQLAlchemy-style ``postgresql+psycopg://`` names a driver; libpq wants the plain scheme.
        self.url = re.sub(r"^postgresql\+[a-z0-9_]+://", "postgresql://", url)
        self.location = re.sub(r"://([^:/@]+):[^@/]*@", r"://\1:***@", self.url)

    def connect(self) -> Any:
        try:
            import psycopg
            from psycopg.rows import dict_row
        except ImportError:
            raise ValueError(
                "--db: a postgresql:// URL needs psycopg 3, which is not installed; "
                "pip install 'jtinker[postgres]' (or psycopg[binary])"
            ) from None
        try:
            return psycopg.connect(self.url, autocommit=True, row_factory=dict_row, connect_timeout=10)
        except psycopg.Error as e:
            raise ValueError(f"--db: cannot connect to {self.location}: {str(e).strip()}") from None

    def prepare(self, conn: Any) -> None:
        conn.execute("SET lock_timeout = '5s'")

    def sql(self, query: str) -> str:
        return _PLACEHOLDER.sub(lambda m: "%s" if m.group() == "?" else m.group(), query)

    def create_schema(self, conn: Any, schema: str) -> None:
        # One server creates the schema at a time (two starting together would race on IF NOT EXISTS).
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(7426011)")
            super().create_schema(conn, schema)


def _upsert(key: str, columns: tuple[str, ...]) -> str:
    """``ON CONFLICT`` clause replacing ``columns`` of the row with this ``key`` (SQLite and PostgreSQL)."""
    return f"ON CONFLICT({key}) DO UPDATE SET " + ", ".join(f"{c}=excluded.{c}" for c in columns)


_RUN_COLUMNS = (
    "owner", "session_id", "base_model", "lora_rank", "train_mlp", "train_attn", "train_unembed",
    "user_metadata", "created_at", "last_request_at", "corrupted", "instance_id",
)  # fmt: skip


def _dumps(value: Any) -> str | None:
    return None if value is None else json.dumps(value)


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


class Database:
    """Thread-safe access to the server's metadata (SQLite or PostgreSQL, see :class:`Dialect`)."""

    def __init__(self, dialect: Dialect):
        self.dialect = dialect
        self._lock = threading.Lock()
        self._conn = dialect.connect()
        with self._lock:
            dialect.prepare(self._conn)
            dialect.create_schema(self._conn, _SCHEMA)
            row = self._one_locked("SELECT value FROM meta WHERE key='schema_version'")
            if row is None:
                self._conn.execute(
                    dialect.sql(
                        "INSERT INTO meta(key, value) VALUES('schema_version', ?) ON CONFLICT DO NOTHING"
                    ),
                    (str(SCHEMA_VERSION),),
                )
            elif int(row["value"]) > SCHEMA_VERSION:
                raise RuntimeError(
                    f"{dialect.location}: schema version {row['value']} is newer than this jtinker's "
                    f"({SCHEMA_VERSION})"
                )

    @property
    def location(self) -> str:
        return self.dialect.location

    def _one_locked(self, sql: str, args: tuple = ()) -> dict | None:
        row = self._conn.execute(self.dialect.sql(sql), args).fetchone()
        return None if row is None else dict(row)

    def _exec(self, sql: str, args: tuple = ()) -> Any:
        with self._lock:
            return self._conn.execute(self.dialect.sql(sql), args)

    def _one(self, sql: str, args: tuple = ()) -> dict | None:
        with self._lock:
            return self._one_locked(sql, args)

    def _all(self, sql: str, args: tuple = ()) -> list[dict]:
        with self._lock:
            return [dict(r) for r in self._conn.execute(self.dialect.sql(sql), args).fetchall()]

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # -- startup ------------------------------------------------------------------------------
    def fail_orphaned_futures(self, instance_id: str, message: str) -> int:
        """Futures left pending by a previous server process can never finish: mark them failed."""
        cur = self._exec(
            "UPDATE futures SET status='failed', error=?, category='server', finished_at=? "
            "WHERE status='pending' AND instance_id != ?",
            (message, time.time(), instance_id),
        )
        return cur.rowcount

    def prune_futures(self, older_than_s: float) -> None:
        self._exec("DELETE FROM futures WHERE created_at < ?", (time.time() - older_than_s,))

    # -- sessions -----------------------------------------------------------------------------
    def add_session(
        self,
        session_id: str,
        owner: str,
        sdk_version: str | None,
        user_metadata: dict | None,
        display_name: str | None,
        instance_id: str,
    ) -> None:
        now = time.time()
        self._exec(
            "INSERT INTO sessions(session_id, owner, created_at, last_heartbeat, sdk_version, user_metadata, "
            "display_name, instance_id) VALUES(?,?,?,?,?,?,?,?)",
            (session_id, owner, now, now, sdk_version, _dumps(user_metadata), display_name, instance_id),
        )

    def session(self, session_id: str) -> dict | None:
        row = self._one("SELECT * FROM sessions WHERE session_id=?", (session_id,))
        if row is not None:
            row["user_metadata"] = _loads(row["user_metadata"])
        return row

    def heartbeat(self, session_id: str) -> None:
        self._exec("UPDATE sessions SET last_heartbeat=? WHERE session_id=?", (time.time(), session_id))

    def finish_session(self, session_id: str, reason: str | None) -> None:
        self._exec(
            "UPDATE sessions SET finished_at=?, finish_reason=? WHERE session_id=? AND finished_at IS NULL",
            (time.time(), reason, session_id),
        )

    def sessions_of(self, owner: str, limit: int, offset: int) -> tuple[list[str], int]:
        rows = self._all(
            "SELECT session_id FROM sessions WHERE owner=? ORDER BY created_at DESC LIMIT ? OFFSET ?",
            (owner, limit, offset),
        )
        total = self._one("SELECT COUNT(*) AS n FROM sessions WHERE owner=?", (owner,))["n"]
        return [r["session_id"] for r in rows], total

    def stale_sessions(self, older_than: float) -> list[str]:
        rows = self._all(
            "SELECT session_id FROM sessions WHERE finished_at IS NULL AND last_heartbeat < ?", (older_than,)
        )
        return [r["session_id"] for r in rows]

    # -- runs ---------------------------------------------------------------------------------
    def add_run(
        self,
        run_id: str,
        owner: str,
        session_id: str | None,
        base_model: str,
        lora: dict,
        user_metadata: dict | None,
        instance_id: str,
    ) -> None:
        now = time.time()
        self._exec(
            "INSERT INTO runs(run_id, owner, session_id, base_model, lora_rank, train_mlp, train_attn, "
            "train_unembed, user_metadata, created_at, last_request_at, instance_id) "
            "VALUES(?,?,?,?,?,?,?,?,?,?,?,?) " + _upsert("run_id", _RUN_COLUMNS),
            (
                run_id,
                owner,
                session_id,
                base_model,
                lora.get("rank"),
                int(bool(lora.get("train_mlp", True))),
                int(bool(lora.get("train_attn", True))),
                int(bool(lora.get("train_unembed", True))),
                _dumps(user_metadata),
                now,
                now,
                instance_id,
            ),
        )

    def run(self, run_id: str) -> dict | None:
        row = self._one("SELECT * FROM runs WHERE run_id=?", (run_id,))
        if row is not None:
            row["user_metadata"] = _loads(row["user_metadata"])
        return row

    def touch_run(self, run_id: str) -> None:
        self._exec("UPDATE runs SET last_request_at=? WHERE run_id=?", (time.time(), run_id))

    def mark_run_corrupted(self, run_id: str) -> None:
        self._exec("UPDATE runs SET corrupted=1 WHERE run_id=?", (run_id,))

    def runs_of(self, owner: str, limit: int | None = None, offset: int = 0) -> tuple[list[dict], int]:
        sql = "SELECT * FROM runs WHERE owner=? ORDER BY created_at DESC"
        args: tuple = (owner,)
        if limit is not None:
            sql += " LIMIT ? OFFSET ?"
            args = (owner, limit, offset)
        rows = self._all(sql, args)
        for row in rows:
            row["user_metadata"] = _loads(row["user_metadata"])
        total = self._one("SELECT COUNT(*) AS n FROM runs WHERE owner=?", (owner,))["n"]
        return rows, total

    def run_ids_of_session(self, session_id: str) -> list[str]:
        rows = self._all("SELECT run_id FROM runs WHERE session_id=? ORDER BY created_at", (session_id,))
        return [r["run_id"] for r in rows]

    # -- checkpoints --------------------------------------------------------------------------
    def add_checkpoint(
        self,
        tinker_path: str,
        run_id: str,
        owner: str,
        user_metadata: dict | None,
        ttl_seconds: float | None,
    ) -> None:
        now = time.time()
        self._exec(
            "INSERT INTO checkpoints(tinker_path, run_id, owner, created_at, user_metadata, expires_at) "
            "VALUES(?,?,?,?,?,?) "
            + _upsert("tinker_path", ("run_id", "owner", "created_at", "user_metadata", "expires_at")),
            (
                tinker_path,
                run_id,
                owner,
                now,
                _dumps(user_metadata),
                None if ttl_seconds is None else now + ttl_seconds,
            ),
        )

    def checkpoint_rows(self, run_id: str) -> dict[str, dict]:
        rows = self._all("SELECT * FROM checkpoints WHERE run_id=?", (run_id,))
        for row in rows:
            row["user_metadata"] = _loads(row["user_metadata"])
        return {r["tinker_path"]: r for r in rows}

    def expired_checkpoints(self, now: float) -> list[str]:
        rows = self._all("SELECT tinker_path FROM checkpoints WHERE expires_at <= ?", (now,))
        return [r["tinker_path"] for r in rows]

    def delete_checkpoint(self, tinker_path: str) -> None:
        self._exec("DELETE FROM checkpoints WHERE tinker_path=?", (tinker_path,))

    # -- samplers -----------------------------------------------------------------------------
    def add_sampler(
        self,
        sampler_id: str,
        owner: str,
        session_id: str | None,
        base_model: str,
        model_path: str | None,
        instance_id: str,
    ) -> None:
        self._exec(
            "INSERT INTO samplers(sampler_id, owner, session_id, base_model, model_path, created_at, "
            "instance_id) VALUES(?,?,?,?,?,?,?) "
            + _upsert(
                "sampler_id", ("owner", "session_id", "base_model", "model_path", "created_at", "instance_id")
            ),
            (sampler_id, owner, session_id, base_model, model_path, time.time(), instance_id),
        )

    def sampler(self, sampler_id: str) -> dict | None:
        return self._one("SELECT * FROM samplers WHERE sampler_id=?", (sampler_id,))

    def sampler_ids_of_session(self, session_id: str) -> list[str]:
        rows = self._all(
            "SELECT sampler_id FROM samplers WHERE session_id=? ORDER BY created_at", (session_id,)
        )
        return [r["sampler_id"] for r in rows]

    # -- futures ------------------------------------------------------------------------------
    def add_future(
        self, request_id: str, owner: str, kind: str, model_id: str | None, instance_id: str
    ) -> None:
        self._exec(
            "INSERT INTO futures(request_id, owner, kind, model_id, status, created_at, instance_id) "
            "VALUES(?,?,?,?,'pending',?,?)",
            (request_id, owner, kind, model_id, time.time(), instance_id),
        )

    def finish_future(
        self,
        request_id: str,
        *,
        result: dict | None = None,
        error: str | None = None,
        category: str | None = None,
    ) -> None:
        self._exec(
            "UPDATE futures SET status=?, result_json=?, error=?, category=?, finished_at=? "
            "WHERE request_id=?",
            (
                "failed" if error is not None else "complete",
                _dumps(result),
                error,
                category,
                time.time(),
                request_id,
            ),
        )

    def future(self, request_id: str) -> dict | None:
        row = self._one("SELECT * FROM futures WHERE request_id=?", (request_id,))
        if row is not None:
            row["result_json"] = _loads(row["result_json"])
        return row

    def future_counts(self) -> dict[str, int]:
        rows = self._all("SELECT status, COUNT(*) AS n FROM futures GROUP BY status")
        return {r["status"]: r["n"] for r in rows}
