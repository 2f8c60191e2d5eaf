"""``k2eg-gateway``: wire options, Kafka and EPICS together and serve until signalled."""
from __future__ import annotations

import json
import logging
import signal
import sys

from . import options as O

log = logging.getLogger("k2eg.gateway")

_LEVELS = {"trace": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR, "fatal": logging.CRITICAL}


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {"ts": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name,
               "msg": record.getMessage()}
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else
                         logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS.get(level.lower(), logging.INFO))
    logging.getLogger("k2eg").setLevel(_LEVELS.get(level.lower(), logging.INFO))


def main(argv: list[str] | None = None) -> int:
    try:
        opts = O.parse(argv)
    except O.OptionError as e:
        print(f"k2eg-gateway: {e}", file=sys.stderr)
        return 2
    if opts.values.get("version"):
        from importlib.metadata import PackageNotFoundError, version
        try:
            print(f"k2eg-gateway {version('k2eg')}")
        except PackageNotFoundError:
            print("k2eg-gateway (version unknown)")
        return 0
    from k2eg.extras import missing_extra

    why = missing_extra("k2eg-gateway")
    if why is not None:  # installed without the EPICS libraries: one sentence, not an import traceback
        print(why, file=sys.stderr)
        return 2
    # First, on the main thread, before any other thread or EPICS library starts (k2eg.scheduling).
    from k2eg.scheduling import epics_scheduling
    scheduling = epics_scheduling(opts.epics_realtime)
    setup_logging(opts.log_level, opts.log_format)
    log.log(*scheduling)
    for warning in opts.warnings:
        log.warning("%s", warning)
    from k2eg.transport import KafkaAccessError, check_credentials
    try:  # a wrong password or no broker: one clear message and exit 1, not endless retries
        check_credentials({"bootstrap.servers": opts.pub_server_address, **opts.kv("pub")},
                          {"bootstrap.servers": opts.sub_server_address, **opts.kv("sub")})
    except KafkaAccessError as e:
        print(f"k2eg-gateway: {e}", file=sys.stderr, flush=True)
        return 1

    from .epics.ca import CAProvider
    from .epics.pva import PVAProvider
    from .journal import PutJournal
    from .kafka import KafkaIO
    from .service import Gateway
    from .state import StateStore

    stopping = False
    io = KafkaIO(opts)
    state = StateStore(opts)
    journal = PutJournal(opts, lambda: stopping)
    io.partitions = journal   # read before the commands of a partition, pruned as they are committed
    idle = opts.channel_idle_timeout
    providers = {"pva": PVAProvider(idle_timeout=idle), "ca": CAProvider(idle_timeout=idle)}
    try:
        gw = Gateway(opts, io, providers, state, journal)
    except ValueError as e:  # e.g. an unreadable access rules file: refuse to start
        print(f"k2eg-gateway: {e}", file=sys.stderr)
        return 2
    metrics = None
    if opts.metric_enable:
        from .metrics import Metrics

        metrics = Metrics(gw.metrics, io.assigned.is_set)
        io.latency = metrics.produce_latency
        gw.snapshots.on_iteration = metrics.snapshot_iteration.observe
        metrics.serve(opts.metric_server_http_port)
    from .status import StatusBeacon

    beacon = StatusBeacon(lambda: gw.status(detail=False), io.publish, io.admin, opts.cmd_input_topic,
                          gw.identity["id"]).start()

    def _stop(signum, frame):
        nonlocal stopping
        stopping = True
        io.stop_consuming()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    announced = False
    try:
        # Monitors and snapshots of the previous run resume before any command is served.
        gw.resume(state.load(lambda: stopping))
        gw.start_expiry()
        # At a stop, commands() ends reading, lets the commands read finish (--command-drain-timeout) and
        # commits those that did; what finishes later is not answered: the next gateway of the group runs it.
        for raws, at in io.commands(busy=gw.busy, drained=gw.stop_replying):
            gw.handle(*raws, at=at)
            if not announced and io.assigned.is_set():
                announced = True
                # Printed, not logged: the stack and the tests wait for this line at any log level.
                print(f"k2eg gateway ready: consuming {opts.cmd_input_topic}", file=sys.stderr, flush=True)
    finally:
        # Order: the drain (above), then Kafka gets what the drain produced, then EPICS closes, then the
        # producers (a callback of a closing provider still finds them).
        log.info("stopping")
        beacon.stop()
        if metrics is not None:
            metrics.close()
        gw.close()
        state.close()
        journal.close()
        left = io.flush()
        if left:
            log.warning("stopping: %d records still on their way to Kafka", left)
        for p in providers.values():
            try:
                p.close()
            except Exception as e:
                log.warning("closing %s provider: %s", p.protocol, e)
        io.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
