"""The embedded archive: Parquet files in a folder, written with pyarrow and queried with DuckDB.

Why these: no server to run, a columnar file that compresses a PV's
stream well (time stamps delta-encoded, the rarely changing ``rest`` blob
dictionary-encoded), and DuckDB reads a folder of such files with filter
push-down, so a query skips row groups outside its PV and time range.

Durability: each ``write`` is one new file per table, written under a
temporary name, fsynced, renamed and the folder fsynced; a file is either
whole or absent after a crash. Several archivers may share a folder: each
names its files with its own writer id (stable across its restarts, distinct
between archivers) and compacts only its own files.

Compaction merges a writer's small files into one sorted by (pv, t_ns) when
it has ``compact_after`` of them. It first records in a journal which files
the merged one replaces, so a crash between renaming the merged file and
deleting the old ones is finished at the next open instead of leaving
duplicates.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import uuid
from pathlib import Path

from .model import EVENT_COLUMNS, MARK_COLUMNS, Rows
from .store import Columns, Partition, Store, StoreError, empty_columns

log = logging.getLogger("k2eg.archiver.embedded")

MISSING_EXTRA = ("the embedded archive needs DuckDB and pyarrow: pip install 'k2eg[archive]'")


def _imports():
    try:
        import duckdb
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise StoreError(MISSING_EXTRA) from None
    return duckdb, pa, pq


def _schemas(pa):
    events = pa.schema([
        ("topic", pa.string()), ("partition", pa.int32()), ("offset", pa.int64()), ("pv", pa.string()),
        ("t_ns", pa.int64()), ("epics_ns", pa.int64()), ("kafka_ms", pa.int64()), ("value", pa.float64()),
        ("text", pa.string()), ("data", pa.binary()), ("severity", pa.int16()), ("status", pa.int16()),
        ("message", pa.string()), ("user_tag", pa.int64()), ("rest", pa.binary()), ("opaque", pa.bool_()),
        ("snapshot", pa.string()), ("iteration", pa.int64())])
    marks = pa.schema([
        ("snapshot", pa.string()), ("iteration", pa.int64()), ("kind", pa.int8()), ("ts_ms", pa.int64()),
        ("tags", pa.string()), ("error", pa.int32()), ("topic", pa.string()), ("partition", pa.int32()),
        ("offset", pa.int64())])
    assert tuple(events.names) == EVENT_COLUMNS and tuple(marks.names) == MARK_COLUMNS
    return {"events": events, "marks": marks}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class EmbeddedStore(Store):
    """Parquet files under ``root/events`` and ``root/marks``."""

    def __init__(self, root: str | Path, writer: str = "main", compact_after: int = 64,
                 fsync: bool = True):
        self._duckdb, self._pa, self._pq = _imports()
        self.root = Path(root)
        if not writer or not all(c.isalnum() or c in "_-" for c in writer):
            raise StoreError(f"invalid writer id {writer!r}: letters, digits, '_' or '-'")
        self.writer = writer     # stable across restarts: a crashed writer finishes its own compaction
        self.compact_after = compact_after
        self.fsync = fsync
        self._schemas = _schemas(self._pa)
        self._lock = threading.Lock()       # one writer (and compaction) at a time in this process
        self._seq = 0
        try:
            for table in self._schemas:
                (self.root / table).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create the archive folder {self.root}: {e}") from None
        self._finish_compactions()
        self._db = self._duckdb.connect()
        self._offsets = self._read_offsets()

    # ----------------------------------------------------------------- files

    def _files(self, table: str) -> list[Path]:
        return sorted((self.root / table).glob("*.parquet"))

    def _own_files(self, table: str) -> list[Path]:
        return sorted((self.root / table).glob(f"{self.writer}-*.parquet"))

    def _write_file(self, table: str, cols: dict[str, list] | object, sort: bool) -> Path:
        pa, pq = self._pa, self._pq
        tbl = cols if isinstance(cols, pa.Table) else pa.table(cols, schema=self._schemas[table])
        if sort and table == "events":
            tbl = tbl.sort_by([("pv", "ascending"), ("t_ns", "ascending"), ("offset", "ascending")])
        self._seq += 1
        name = f"{self.writer}-{uuid.uuid4().hex[:8]}-{self._seq:08d}.parquet"
        final = self.root / table / name
        tmp = final.with_suffix(".tmp")
        pq.write_table(tbl, tmp, compression="zstd", row_group_size=128 * 1024)
        if self.fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, final)
        return final

    def write(self, rows: Rows) -> int:
        with self._lock:
            rows = rows.keep_after(self._offsets)
            n = 0
            for table, cols in (("events", rows.events), ("marks", rows.marks)):
                if cols["offset"]:
                    try:
                        self._write_file(table, cols, sort=False)    # compaction sorts
                    except (OSError, self._pa.ArrowException) as e:
                        raise StoreError(f"cannot write to the archive folder {self.root / table}: {e}") from None
                    n += len(cols["offset"])
            if n and self.fsync:
                for table in self._schemas:
                    _fsync_dir(self.root / table)
            for key, off in rows.high_offsets().items():
                if off > self._offsets.get(key, -1):
                    self._offsets[key] = off
            for table in self._schemas:
                if len(self._own_files(table)) >= self.compact_after:
                    self._compact(table)
            return n

    # ----------------------------------------------------------------- compaction

    def _journal(self, table: str) -> Path:
        return self.root / table / f"{self.writer}.compacting"

    def _compact(self, table: str) -> None:
        olds = self._own_files(table)
        if len(olds) < 2:
            return
        merged = self._pa.concat_tables([self._pq.read_table(p, schema=self._schemas[table]) for p in olds])
        journal = self._journal(table)
        tmp_journal = journal.with_suffix(".tmp")
        self._seq += 1
        target = f"{self.writer}-{uuid.uuid4().hex[:8]}-{self._seq:08d}.parquet"
        tmp_journal.write_text(json.dumps({"target": target, "replaces": [p.name for p in olds]}))
        os.replace(tmp_journal, journal)
        final = self.root / table / target
        tmp = final.with_suffix(".tmp")
        tbl = merged.sort_by([("pv", "ascending"), ("t_ns", "ascending"), ("offset", "ascending")]) \
            if table == "events" else merged.sort_by([("topic", "ascending"), ("partition", "ascending"),
                                                      ("offset", "ascending")])
        self._pq.write_table(tbl, tmp, compression="zstd", row_group_size=128 * 1024)
        os.replace(tmp, final)
        self._finish_compaction(table, journal)

    def _finish_compaction(self, table: str, journal: Path) -> None:
        doc = json.loads(journal.read_text())
        target = self.root / table / doc["target"]
        if target.exists():          # the merged file is in place: the old ones must go
            for name in doc["replaces"]:
                try:
                    (self.root / table / name).unlink()
                except FileNotFoundError:
                    pass
        else:                        # crashed before the merged file was whole: keep the old ones
            target.with_suffix(".tmp").unlink(missing_ok=True)
        if self.fsync:
            _fsync_dir(self.root / table)
        journal.unlink()

    def _finish_compactions(self) -> None:
        for table in self._schemas:
            journal = self._journal(table)
            if journal.exists():
                self._finish_compaction(table, journal)
            for tmp in (self.root / table).glob(f"{self.writer}-*.tmp"):
                tmp.unlink(missing_ok=True)

    # ----------------------------------------------------------------- queries

    def _query(self, table: str, sql: str, params: list) -> Columns:
        """Run ``sql`` with ``{t}`` standing for ``table``'s files; empty columns when there are none."""
        names = EVENT_COLUMNS if table == "events" else MARK_COLUMNS
        for attempt in range(3):
            files = [str(p) for p in self._files(table)]
            if not files:
                return empty_columns(names)
            src = f"read_parquet({files!r}, union_by_name=false)"
            try:
                cur = self._db.cursor()
                try:
                    rel = cur.sql(sql.format(t=src), params=params)
                    # duckdb 2 renamed a relation's arrow() to to_arrow_table()
                    tbl = rel.to_arrow_table() if hasattr(rel, "to_arrow_table") else rel.arrow()
                finally:
                    cur.close()
                return tbl.to_pydict()
            except self._duckdb.IOException:
                if attempt == 2:     # a file was compacted away between listing and reading: list again
                    raise
        raise AssertionError("unreachable")

    def stored_offsets(self) -> dict[Partition, int]:
        """Read from the files (another writer sharing the folder may have written a partition since)."""
        with self._lock:
            for key, off in self._read_offsets().items():
                if off > self._offsets.get(key, -1):
                    self._offsets[key] = off
            return dict(self._offsets)

    def _read_offsets(self) -> dict[Partition, int]:
        out: dict[Partition, int] = {}
        for table in self._schemas:
            cols = self._query(table, 'SELECT topic, "partition", max("offset") AS "offset" FROM {t} '
                               'GROUP BY topic, "partition"', [])
            for t, p, o in zip(cols["topic"], cols["partition"], cols["offset"]):
                out[(t, p)] = max(o, out.get((t, p), -1))
        return out

    _COLS = ", ".join(f'"{c}"' for c in EVENT_COLUMNS)

    def history(self, pv: str, start_ns: int, end_ns: int, limit: int | None = None) -> Columns:
        return self._query("events", f"SELECT {self._COLS} FROM {{t}} WHERE pv = ? AND t_ns BETWEEN ? AND ? "
                           'AND snapshot IS NULL ORDER BY t_ns, "offset" LIMIT ?',
                           [pv, start_ns, end_ns, limit if limit is not None else 2**62])

    def values_at(self, pvs: list[str], at_ns: int) -> Columns:
        if not pvs:
            return empty_columns()
        return self._query("events", f"SELECT {self._COLS} FROM {{t}} WHERE pv IN (SELECT unnest(?)) "
                           "AND t_ns <= ? AND snapshot IS NULL "
                           'QUALIFY row_number() OVER (PARTITION BY pv ORDER BY t_ns DESC, "offset" DESC) = 1 '
                           "ORDER BY pv", [list(pvs), at_ns])

    def marks(self, snapshot: str, end_ms: int | None) -> Columns:
        names = ", ".join(f'"{c}"' for c in MARK_COLUMNS)
        return self._query("marks", f"SELECT {names} FROM {{t}} WHERE snapshot = ? AND (? IS NULL OR ts_ms <= ?) "
                           'ORDER BY topic, "partition", "offset"', [snapshot, end_ms, end_ms])

    def snapshot_events(self, snapshot: str, topic: str, partition: int, after: int, upto: int) -> Columns:
        return self._query("events", f"SELECT {self._COLS} FROM {{t}} WHERE snapshot = ? AND topic = ? "
                           'AND "partition" = ? AND "offset" > ? AND "offset" <= ? ORDER BY "offset"',
                           [snapshot, topic, partition, after, upto])

    def bytes_on_disk(self) -> int:
        return sum(p.stat().st_size for t in self._schemas for p in self._files(t))

    def close(self) -> None:
        try:
            self._db.close()
        except Exception:
            pass
