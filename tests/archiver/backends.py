"""The archive backends the store tests run on: files in the test's tmp folder, or a database of its own in
a throwaway PostgreSQL cluster (one per test session)."""
from __future__ import annotations

from k2eg.archiver.embedded import EmbeddedStore

BACKENDS = ["embedded", "postgres"]

_cluster = None
_databases: dict[str, str] = {}


def cluster():
    """The session's PostgreSQL cluster, started on first use."""
    global _cluster
    if _cluster is None:
        from k2eg.stack.postgres import ThrowawayPostgres
        _cluster = ThrowawayPostgres().start()
    return _cluster


def stop_cluster() -> None:
    """End the session's cluster (tests/archiver/conftest.py, at the end of the session)."""
    global _cluster
    if _cluster is not None:
        _cluster.stop()
        _cluster = None


def open_store(backend: str, tmp_path, request, **kw):
    if backend == "embedded":
        return EmbeddedStore(tmp_path / "archive", fsync=True, **kw)
    if backend == "postgres":
        from k2eg.archiver.postgres import PostgresStore
        key = str(tmp_path)
        if key not in _databases:                  # the same test opening it again gets the same database
            _databases[key] = cluster().create_database()
        return PostgresStore(_databases[key])
    raise ValueError(backend)
