"""``k2eg-archiver``: archive PV monitor streams and repeating snapshots from Kafka, answer queries."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from . import wire
from .service import READY, Archiver, ArchiverOptions
from .store import StoreError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="k2eg-archiver", description=__doc__)
    p.add_argument("--bootstrap", required=True, help="Kafka bootstrap servers")
    p.add_argument("--cmd-topic", default=None,
                   help="archive command topic (default: <gateway-cmd-topic>-archive, else k2eg-cmd-archive)")
    p.add_argument("--config-topic", default=None, help="compacted configuration topic (default <cmd-topic>-config)")
    p.add_argument("--gateway-cmd-topic", default=None,
                   help="the gateway's command topic: PVs added as URIs (pva://NAME) are monitored through it")
    p.add_argument("--group-id", default="k2eg-archiver", help="consumer group shared by cooperating archivers")
    p.add_argument("--backend", choices=("embedded", "postgres"), default="embedded")
    p.add_argument("--path", default="archive", help="embedded backend: folder of the Parquet files")
    p.add_argument("--writer-id", default="main",
                   help="this archiver's name in its group (static membership) and its file prefix in a shared "
                        "folder: distinct per archiver, the same across its restarts")
    p.add_argument("--dsn", default=None, help="postgres backend: libpq connection string")
    p.add_argument("--flush-interval", type=float, default=1.0, help="seconds between writes to the store")
    p.add_argument("--flush-rows", type=int, default=50_000, help="rows that trigger a write before the interval")
    p.add_argument("--max-answer-rows", type=int, default=5_000_000,
                   help="history answers with more values are refused (ask for a shorter range)")
    p.add_argument("--http-port", type=int, default=None,
                   help="serve Archiver Appliance style retrieval over HTTP on this port (0: any free port)")
    p.add_argument("--http-host", default="127.0.0.1")
    p.add_argument("--kafka-kv", action="append", default=[], metavar="KEY:VALUE",
                   help="extra librdkafka setting, repeatable (security, tuning)")
    p.add_argument("--log-level", default="info")
    return p


def open_store(args):
    if args.backend == "postgres":
        from .postgres import PostgresStore
        if not args.dsn:
            raise StoreError("--backend postgres needs --dsn (a libpq connection string)")
        return PostgresStore(args.dsn)
    from .embedded import EmbeddedStore
    return EmbeddedStore(args.path, writer=args.writer_id)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    kafka = {}
    # K2EG_ARCHIVER_KAFKA_KV (KEY:VALUE lines) keeps passwords out of the process list; the command line wins.
    env_kv = [line for line in os.environ.get("K2EG_ARCHIVER_KAFKA_KV", "").splitlines() if line.strip()]
    for kv in env_kv + args.kafka_kv:
        key, sep, value = kv.partition(":")
        if not sep:
            print(f"k2eg-archiver: --kafka-kv {kv!r} is not KEY:VALUE", file=sys.stderr)
            return 2
        kafka[key.strip()] = value.strip()
    cmd_topic = args.cmd_topic or (wire.archive_topic(args.gateway_cmd_topic) if args.gateway_cmd_topic
                                   else "k2eg-cmd-archive")
    try:
        store = open_store(args)
    except StoreError as e:
        print(f"k2eg-archiver: {e}", file=sys.stderr)
        return 1
    opts = ArchiverOptions(bootstrap=args.bootstrap, cmd_topic=cmd_topic, config_topic=args.config_topic,
                           group_id=args.group_id, gateway_cmd_topic=args.gateway_cmd_topic,
                           instance_id=f"{args.group_id}-{args.writer_id}",
                           flush_interval=args.flush_interval, flush_rows=args.flush_rows, kafka=kafka,
                           max_answer_rows=args.max_answer_rows)
    archiver = Archiver(opts, store)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    archiver.start()
    http = None
    if args.http_port is not None:
        from .http import serve
        http = serve(store, args.http_host, args.http_port)
        print(f"k2eg archiver http on {args.http_host}:{http.server_port}", file=sys.stderr, flush=True)
    print(f"{READY} (command topic {cmd_topic})", file=sys.stderr, flush=True)
    while not stop.wait(1.0):
        if not all(t.is_alive() for t in archiver._threads):
            print("k2eg-archiver: a thread died; stopping", file=sys.stderr)
            break
    if http is not None:
        http.shutdown()
    archiver.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
