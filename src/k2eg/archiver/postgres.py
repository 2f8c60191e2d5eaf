"""The PostgreSQL archive, for a facility that wants one shared database server.

Tables (created when missing):

- ``k2eg_events``: one row per event, primary key (topic, partition, offset,
  pv); a partial index (pv, t_ns) over monitor events serves history and
  values_at; ``rest_id`` points into ``k2eg_rest``, which holds each distinct
  ``rest`` blob (display, control ...) once;
- ``k2eg_marks``: snapshot Headers and Tails;
- ``k2eg_offsets``: the highest stored offset per partition, updated in the
  same transaction as the rows, so ``stored_offsets`` is exact and cheap.

A batch goes in with COPY into a temporary table and one INSERT ... ON
CONFLICT DO NOTHING, in one transaction: durable at commit, and a batch
written twice is stored once.
"""
from __future__ import annotations

import hashlib
import threading

from .model import EVENT_COLUMNS, MARK_COLUMNS, Rows
from .store import Columns, Partition, Store, StoreError

MISSING_EXTRA = "the PostgreSQL archive needs psycopg: pip install 'k2eg[postgres]'"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS k2eg_rest (id serial PRIMARY KEY, h bytea UNIQUE NOT NULL, blob bytea NOT NULL);
CREATE TABLE IF NOT EXISTS k2eg_events (
  topic text NOT NULL, "partition" int NOT NULL, "offset" bigint NOT NULL, pv text NOT NULL,
  t_ns bigint NOT NULL, epics_ns bigint, kafka_ms bigint, value double precision, text text, data bytea,
  severity smallint, status smallint, message text, user_tag bigint, rest_id int, opaque boolean NOT NULL,
  snapshot text, iteration bigint,
  PRIMARY KEY (topic, "partition", "offset", pv));
CREATE INDEX IF NOT EXISTS k2eg_events_pv_time ON k2eg_events (pv, t_ns, "offset") WHERE snapshot IS NULL;
CREATE TABLE IF NOT EXISTS k2eg_marks (
  snapshot text NOT NULL, iteration bigint NOT NULL, kind smallint NOT NULL, ts_ms bigint, tags text,
  error int, topic text NOT NULL, "partition" int NOT NULL, "offset" bigint NOT NULL,
  PRIMARY KEY (topic, "partition", "offset"));
CREATE INDEX IF NOT EXISTS k2eg_marks_snapshot ON k2eg_marks (snapshot, ts_ms);
CREATE TABLE IF NOT EXISTS k2eg_offsets (topic text NOT NULL, "partition" int NOT NULL, "offset" bigint NOT NULL,
  PRIMARY KEY (topic, "partition"));
"""

_STORED = [c for c in EVENT_COLUMNS if c != "rest"] + ["rest_id"]
_Q = ", ".join(f'"{c}"' for c in _STORED)
_SELECT = ", ".join("r.blob AS rest" if c == "rest" else f'e."{c}"' for c in EVENT_COLUMNS)
_MARKS = ", ".join(f'"{c}"' for c in MARK_COLUMNS)


class PostgresStore(Store):
    def __init__(self, dsn: str):
        try:
            import psycopg
        except ImportError:
            raise StoreError(MISSING_EXTRA) from None
        self._psycopg = psycopg
        try:
            self._conn = psycopg.connect(dsn)            # writes (one transaction per batch)
            self._read = psycopg.connect(dsn, autocommit=True)
        except psycopg.Error as e:
            raise StoreError(f"cannot connect to PostgreSQL ({dsn}): {e}") from None
        with self._conn.transaction():
            self._conn.execute("SELECT pg_advisory_xact_lock(4242019)")   # archivers starting together
            self._conn.execute(_SCHEMA)
        self._lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._rest: dict[bytes, int] = {}

    def _rest_ids(self, cur, blobs: list) -> list:
        """Ids of the ``rest`` blobs (None stays None), inserting the new ones."""
        hashes = {}
        for b in blobs:
            if b is not None and b not in self._rest and b not in hashes:
                hashes[b] = hashlib.sha1(b).digest()
        if hashes:
            cur.executemany("INSERT INTO k2eg_rest (h, blob) VALUES (%s, %s) ON CONFLICT (h) DO NOTHING",
                            [(h, b) for b, h in hashes.items()])
            by_hash = {h: b for b, h in hashes.items()}
            for i, h in cur.execute("SELECT id, h FROM k2eg_rest WHERE h = ANY(%s)", [list(by_hash)]).fetchall():
                self._rest[by_hash[bytes(h)]] = i
        rest = self._rest
        return [None if b is None else rest[b] for b in blobs]

    def write(self, rows: Rows) -> int:
        n = 0
        with self._lock:
            try:
                with self._conn.transaction():
                    cur = self._conn.cursor()
                    stored = {(t, p): o for t, p, o in cur.execute(
                        'SELECT topic, "partition", "offset" FROM k2eg_offsets FOR UPDATE').fetchall()}
                    rows = rows.keep_after(stored)
                    ev = rows.events
                    if ev["offset"]:
                        cols = dict(ev)
                        cols["rest_id"] = self._rest_ids(cur, ev["rest"])
                        cur.execute("CREATE TEMP TABLE IF NOT EXISTS k2eg_stage (LIKE k2eg_events) ON COMMIT DELETE ROWS")
                        with cur.copy(f"COPY k2eg_stage ({_Q}) FROM STDIN") as cp:
                            for row in zip(*(cols[c] for c in _STORED)):
                                cp.write_row(row)
                        cur.execute(f"INSERT INTO k2eg_events ({_Q}) SELECT {_Q} FROM k2eg_stage "
                                    "ON CONFLICT DO NOTHING")
                        n += cur.rowcount
                    mk = rows.marks
                    if mk["offset"]:
                        cur.executemany(f"INSERT INTO k2eg_marks ({_MARKS}) VALUES ({', '.join(['%s'] * len(MARK_COLUMNS))}) "
                                        "ON CONFLICT DO NOTHING", list(zip(*(mk[c] for c in MARK_COLUMNS))))
                        n += len(mk["offset"])
                    highs = rows.high_offsets()
                    if highs:
                        cur.executemany('INSERT INTO k2eg_offsets (topic, "partition", "offset") VALUES (%s, %s, %s) '
                                        'ON CONFLICT (topic, "partition") DO UPDATE SET "offset" = '
                                        'GREATEST(k2eg_offsets."offset", EXCLUDED."offset")',
                                        [(t, p, o) for (t, p), o in highs.items()])
            except self._psycopg.Error as e:
                self._rest.clear()     # ids of a rolled-back transaction are not there
                raise StoreError(f"PostgreSQL refused the batch: {e}") from None
        return n

    def stored_offsets(self) -> dict[Partition, int]:
        with self._read_lock:
            rows = self._read.execute('SELECT topic, "partition", "offset" FROM k2eg_offsets').fetchall()
        return {(t, p): o for t, p, o in rows}

    def _columns(self, sql: str, params: list, names) -> Columns:
        with self._read_lock:
            cur = self._read.execute(sql, params)
            rows = cur.fetchall()
        out: Columns = {c: [] for c in names}
        cols = [out[c] for c in names]
        for row in rows:
            for col, v in zip(cols, row):
                col.append(bytes(v) if isinstance(v, memoryview) else v)
        return out

    def history(self, pv: str, start_ns: int, end_ns: int, limit: int | None = None) -> Columns:
        return self._columns(f"SELECT {_SELECT} FROM k2eg_events e LEFT JOIN k2eg_rest r ON r.id = e.rest_id "
                             'WHERE e.pv = %s AND e.t_ns BETWEEN %s AND %s AND e.snapshot IS NULL '
                             'ORDER BY e.t_ns, e."offset" LIMIT %s', [pv, start_ns, end_ns, limit], EVENT_COLUMNS)

    def values_at(self, pvs: list[str], at_ns: int) -> Columns:
        return self._columns(
            f"SELECT {_SELECT} FROM unnest(%s::text[]) AS q(pv) CROSS JOIN LATERAL ("
            "  SELECT * FROM k2eg_events x WHERE x.pv = q.pv AND x.t_ns <= %s AND x.snapshot IS NULL"
            '  ORDER BY x.t_ns DESC, x."offset" DESC LIMIT 1) e '
            "LEFT JOIN k2eg_rest r ON r.id = e.rest_id ORDER BY e.pv", [list(pvs), at_ns], EVENT_COLUMNS)

    def marks(self, snapshot: str, end_ms: int | None) -> Columns:
        return self._columns(f"SELECT {_MARKS} FROM k2eg_marks WHERE snapshot = %s "
                             "AND (%s::bigint IS NULL OR ts_ms <= %s::bigint) "
                             'ORDER BY topic, "partition", "offset"', [snapshot, end_ms, end_ms], MARK_COLUMNS)

    def snapshot_events(self, snapshot: str, topic: str, partition: int, after: int, upto: int) -> Columns:
        return self._columns(f"SELECT {_SELECT} FROM k2eg_events e LEFT JOIN k2eg_rest r ON r.id = e.rest_id "
                             'WHERE e.snapshot = %s AND e.topic = %s AND e."partition" = %s '
                             'AND e."offset" > %s AND e."offset" <= %s ORDER BY e."offset"',
                             [snapshot, topic, partition, after, upto], EVENT_COLUMNS)

    def bytes_on_disk(self) -> int:
        with self._read_lock:
            return sum(self._read.execute(f"SELECT pg_total_relation_size('{t}')").fetchone()[0]
                       for t in ("k2eg_events", "k2eg_rest", "k2eg_marks", "k2eg_offsets"))

    def close(self) -> None:
        for c in (self._conn, self._read):
            try:
                c.close()
            except Exception:
                pass
