"""Archiver Appliance style retrieval over HTTP, so scripts written for an appliance work unchanged.

- ``GET /retrieval/data/getData.json?pv=NAME&from=ISO&to=ISO`` ->
  ``[{"meta": {"name": NAME, ...}, "data": [{"secs", "nanos", "val", "severity", "status"}, ...]}]``
- ``POST /retrieval/data/getDataAtTime?at=ISO`` with a JSON list of PV names ->
  ``{NAME: {"secs", "nanos", "val", "severity", "status"}, ...}`` (PVs without a value are left out)

The standard library's ``http.server`` serves it: two read-only routes,
local retrieval next to the archiver, no new dependency to keep secure and
current; a thread per request (``ThreadingHTTPServer``).
"""
from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from k2eg.protocol.codec import json_safe

from .model import column_rows, tree_of
from .store import Store, drop_republished
from .wire import ArchiveCommandError, query_pv_name, to_ns

log = logging.getLogger("k2eg.archiver.http")

MAX_BODY = 4 << 20
MAX_ROWS = 5_000_000
MAX_AT_PVS = 100_000


def sample(row: dict) -> dict:
    """One stored row as an appliance sample: ``secs``/``nanos`` of its time, ``val``, alarm."""
    secs, nanos = divmod(int(row["t_ns"]), 1_000_000_000)
    if row.get("data") is not None or row.get("opaque"):
        tree = tree_of(row)
        val = tree.get("value") if isinstance(tree, dict) else tree
    elif row.get("text") is not None:
        val = row["text"]
    else:
        val = row.get("value")
    return {"secs": secs, "nanos": nanos, "val": json_safe(val), "severity": row.get("severity") or 0,
            "status": row.get("status") or 0}


def meta(name: str, rows: list[dict]) -> dict:
    out: dict = {"name": name}
    if rows:
        tree = tree_of(rows[-1])
        display = tree.get("display") if isinstance(tree, dict) else None
        if isinstance(display, dict):
            if "precision" in display:
                out["PREC"] = str(display["precision"])
            if display.get("units"):
                out["EGU"] = str(display["units"])
    return out


def get_data(store: Store, query: dict[str, list[str]]) -> list[dict]:
    pv = (query.get("pv") or [None])[0]
    if not pv:
        raise ArchiveCommandError("missing parameter 'pv'")
    name = query_pv_name(pv)
    now = time.time_ns()
    try:
        start = to_ns(query["from"][0], "from") if "from" in query else now - 3600 * 10**9
        end = to_ns(query["to"][0], "to") if "to" in query else now
    except ValueError as e:
        raise ArchiveCommandError(str(e)) from None
    cols = store.history(name, start, end, MAX_ROWS + 1)
    if len(cols["pv"]) > MAX_ROWS:
        raise ArchiveCommandError(f"more than {MAX_ROWS:,} values of {name} in that range: ask for a shorter range")
    rows = column_rows(drop_republished(cols))
    return [{"meta": meta(name, rows), "data": [sample(r) for r in rows]}]


def data_at_time(store: Store, query: dict[str, list[str]], body: bytes) -> dict:
    try:
        at = to_ns(query["at"][0], "at") if "at" in query else time.time_ns()
    except ValueError as e:
        raise ArchiveCommandError(str(e)) from None
    try:
        pvs = json.loads(body or b"[]")
    except ValueError:
        raise ArchiveCommandError("the body must be a JSON list of PV names") from None
    if not isinstance(pvs, list) or not all(isinstance(p, str) for p in pvs):
        raise ArchiveCommandError("the body must be a JSON list of PV names")
    if len(pvs) > MAX_AT_PVS:
        raise ArchiveCommandError(f"{len(pvs)} PVs, more than the limit of {MAX_AT_PVS}")
    names = {query_pv_name(p): p for p in pvs}
    rows = column_rows(store.values_at(list(names), at))
    return {names[r["pv"]]: sample(r) for r in rows}


class _Handler(BaseHTTPRequestHandler):
    store: Store
    server_version = "k2eg-archiver"

    def log_message(self, fmt, *args):  # to logging, not stderr
        log.debug("%s " + fmt, self.address_string(), *args)

    def _send(self, code: int, doc) -> None:
        body = json.dumps(doc, allow_nan=False, separators=(",", ":")).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _route(self, method: str) -> None:
        url = urlparse(self.path)
        query = parse_qs(url.query)
        try:
            if method == "GET" and url.path == "/retrieval/data/getData.json":
                self._send(200, get_data(self.store, query))
            elif method == "POST" and url.path == "/retrieval/data/getDataAtTime":
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_BODY:
                    raise ArchiveCommandError(f"body of {length} bytes, more than the limit of {MAX_BODY}")
                self._send(200, data_at_time(self.store, query, self.rfile.read(length)))
            else:
                self._send(404, {"error": f"no such endpoint: {method} {url.path} (have GET "
                                          "/retrieval/data/getData.json, POST /retrieval/data/getDataAtTime)"})
        except ArchiveCommandError as e:
            self._send(400, {"error": str(e)})
        except Exception as e:  # the server keeps serving
            log.exception("HTTP %s %s failed", method, self.path)
            self._send(500, {"error": f"{type(e).__name__}: {e}"})

    def do_GET(self):  # noqa: N802
        self._route("GET")

    def do_POST(self):  # noqa: N802
        self._route("POST")


def serve(store: Store, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """Start serving in a daemon thread; ``.server_port`` is the port, ``.shutdown()`` stops it."""
    handler = type("Handler", (_Handler,), {"store": store})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="k2eg-archiver-http", daemon=True).start()
    return server
