"""The archive backends the store tests run on, opened fresh in a test's tmp folder."""
from __future__ import annotations

from k2eg.archiver.embedded import EmbeddedStore

BACKENDS = ["embedded"]


def open_store(backend: str, tmp_path, request, **kw):
    if backend == "embedded":
        return EmbeddedStore(tmp_path / "archive", fsync=True, **kw)
    raise ValueError(backend)
