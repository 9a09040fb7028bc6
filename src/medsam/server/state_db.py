"""``StateDatabase``: the workbench's shared state in one SQL database, through SQLAlchemy.

What lives here (the label *maps* stay files under ``DATA/.medsam/labels/``):

* ``label_heads``: one row per labelled image: current version, label file, its SHA-256, label
  definitions, the model of the last save;
* ``label_versions``: one row per saved version (the history: time, action, prompts, edits, model);
  its primary key ``(image_id, version)`` makes a lost or duplicated version impossible;
* ``uncertainty``: active-learning scores per model fingerprint and image;
* ``jobs``: background jobs of every worker (status, progress, result, a cancel request);
* ``training_jobs``: fine-tuning jobs (one at a time across all processes) and their status;
* ``meta``: the schema version, which model is served, one-off markers (sidecars imported).

The database is SQLite at ``DATA/.medsam/state.sqlite3`` by default (write-ahead log, writers
wait up to 30 s for each other), or any SQLAlchemy URL, e.g. ``postgresql+psycopg://user@host/db``
(the ``postgres`` extra), so that several server processes, on one machine or several sharing the
data folder, answer from one state. SQLAlchemy Core is used rather than an ORM: the rows are
small records read and written whole.

Per-image writes are serialised by :meth:`StateDatabase.write_image`: a transaction that, on
PostgreSQL, holds a transaction-scoped advisory lock keyed by the image id, and on SQLite holds
the database's write lock from its start (``BEGIN IMMEDIATE``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["SCHEMA_VERSION", "StateDatabase", "StateDatabaseError", "default_url"]

SCHEMA_VERSION = 1
SQLITE_NAME = "state.sqlite3"
_BUSY_TIMEOUT_S = 30


class StateDatabaseError(ValueError):
    """The state database cannot be opened: a malformed or unsupported URL, an unreachable
    server, a missing driver, or a schema newer than this medsam's."""


def default_url(state_dir: Path) -> str:
    """``sqlite:///<state_dir>/state.sqlite3``."""
    return f"sqlite:///{(Path(state_dir) / SQLITE_NAME).as_posix()}"


def _tables():
    from sqlalchemy import JSON, Boolean, Column, Integer, MetaData, String, Table, Text

    md = MetaData()
    meta = Table("meta", md, Column("key", String(64), primary_key=True), Column("value", Text, nullable=False))
    heads = Table(
        "label_heads",
        md,
        Column("image_id", String, primary_key=True),
        Column("version", Integer, nullable=False),
        Column("created", String(40), nullable=False),
        Column("updated", String(40), nullable=False),
        Column("label_file", String, nullable=False),
        Column("label_format", String(16), nullable=False),
        Column("label_sha256", String(64), nullable=False),
        Column("labels", JSON, nullable=False),
        Column("model", JSON),
    )
    versions = Table(
        "label_versions",
        md,
        Column("image_id", String, primary_key=True),
        Column("version", Integer, primary_key=True, autoincrement=False),
        Column("time", String(40), nullable=False),
        Column("label_sha256", String(64)),
        Column("event", JSON, nullable=False),
        Column("model", JSON),
    )
    uncertainty = Table(
        "uncertainty",
        md,
        Column("fingerprint", String(128), primary_key=True),
        Column("image_id", String, primary_key=True),
        Column("score", JSON, nullable=False),
    )
    jobs = Table(
        "jobs",
        md,
        Column("id", String(32), primary_key=True),
        Column("seq", Integer, nullable=False),
        Column("kind", String(32), nullable=False),
        Column("image_id", String),
        Column("status", String(16), nullable=False),
        Column("done", Integer, nullable=False),
        Column("total", Integer, nullable=False),
        Column("message", Text, nullable=False),
        Column("error", Text),
        Column("error_status", Integer),
        Column("result", JSON),
        Column("created", String(40), nullable=False),
        Column("finished", String(40)),
        Column("cancel_requested", Boolean, nullable=False),
        Column("worker", String(128), nullable=False),
    )
    training = Table(
        "training_jobs",
        md,
        Column("id", String(32), primary_key=True),
        Column("created", String(40), nullable=False),
        Column("state", String(16), nullable=False),
        Column("info", JSON, nullable=False),
        Column("cancel_requested", Boolean, nullable=False),
        Column("worker", String(128), nullable=False),
    )
    return md, meta, heads, versions, uncertainty, jobs, training


class StateDatabase:
    """One engine and the workbench tables (created when missing).

    Args:
        url: a SQLAlchemy URL; ``sqlite:///PATH`` or ``postgresql+psycopg://...``.

    Attributes ``meta``, ``heads``, ``versions``, ``uncertainty``, ``jobs``, ``training`` are the tables.
    """

    def __init__(self, url: str) -> None:
        from sqlalchemy.exc import SQLAlchemyError

        try:
            self._open(url)
        except SQLAlchemyError as exc:
            raise StateDatabaseError(f"cannot open the state database: {str(exc).splitlines()[0]}") from None
        except ModuleNotFoundError as exc:
            raise StateDatabaseError(f"the state database's driver is not installed: {exc}") from None

    def _open(self, url: str) -> None:
        from sqlalchemy import create_engine, event, make_url

        parsed = make_url(str(url))
        self.url = str(url)
        self.dialect = parsed.get_backend_name()
        if self.dialect == "sqlite":
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            engine = create_engine(self.url, connect_args={"timeout": _BUSY_TIMEOUT_S, "check_same_thread": False})

            @event.listens_for(engine, "connect")
            def _on_connect(dbapi_conn, _record) -> None:
                # Transactions are begun explicitly below (pysqlite's own BEGIN is deferred).
                dbapi_conn.isolation_level = None
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_S * 1000}")
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.close()

            @event.listens_for(engine, "begin")
            def _on_begin(conn) -> None:
                mode = conn.info.pop("medsam_begin", "DEFERRED")
                conn.exec_driver_sql(f"BEGIN {mode}")

        elif self.dialect == "postgresql":
            engine = create_engine(self.url, pool_pre_ping=True)
        else:
            raise StateDatabaseError(
                f"unsupported state database {self.dialect!r}: use sqlite:///PATH or postgresql+psycopg://..."
            )
        self.engine = engine
        (self.metadata, self.meta, self.heads, self.versions, self.uncertainty, self.jobs, self.training) = _tables()
        self._create()

    def _create(self) -> None:
        from sqlalchemy import insert, select

        with self.write_image("\0schema") as conn:  # two workers creating the tables at once
            self.metadata.create_all(conn)
            row = conn.execute(select(self.meta.c.value).where(self.meta.c.key == "schema")).first()
            if row is None:
                conn.execute(insert(self.meta).values(key="schema", value=str(SCHEMA_VERSION)))
            elif int(row[0]) > SCHEMA_VERSION:
                raise StateDatabaseError(
                    f"the state database has schema {row[0]}, newer than this medsam's {SCHEMA_VERSION}: upgrade medsam"
                )

    @contextmanager
    def read(self) -> Iterator[Any]:
        """A connection in a read transaction."""
        with self.engine.connect() as conn, conn.begin():
            yield conn

    @contextmanager
    def write(self) -> Iterator[Any]:
        """A connection in a write transaction (SQLite: holding the write lock from the start);
        committed on leaving, rolled back on an exception."""
        with self.engine.connect() as conn:
            if self.dialect == "sqlite":
                conn.info["medsam_begin"] = "IMMEDIATE"
            with conn.begin():
                yield conn

    @contextmanager
    def write_image(self, image_id: str) -> Iterator[Any]:
        """:meth:`write`, serialised with every other writer of ``image_id`` in every process (other
        keys than image ids, starting with a NUL, serialise the database's own one-off writes)."""
        with self.write() as conn:
            if self.dialect == "postgresql":
                key = int.from_bytes(hashlib.sha256(image_id.encode()).digest()[:8], "big", signed=True)
                conn.exec_driver_sql("SELECT pg_advisory_xact_lock(%s)", (key,))
            yield conn

    def get_meta(self, key: str) -> str | None:
        from sqlalchemy import select

        with self.read() as conn:
            row = conn.execute(select(self.meta.c.value).where(self.meta.c.key == key)).first()
        return None if row is None else str(row[0])

    def set_meta(self, conn, key: str, value: str) -> None:
        """Insert or replace ``meta[key]`` inside the transaction ``conn``."""
        from sqlalchemy import delete, insert

        conn.execute(delete(self.meta).where(self.meta.c.key == key))
        conn.execute(insert(self.meta).values(key=key, value=value))

    def dispose(self) -> None:
        self.engine.dispose()
