"""The commands of ``k2eg``: get, put, monitor, snapshot, info, and status.

Each validates its PV URIs before asking for the client, so a typo fails at
once instead of after connecting to Kafka.
"""
from __future__ import annotations

import queue
import sys
import time
from typing import Any, Sequence

import click
from rich.console import Console
from rich.live import Live

from k2eg.protocol.errors import ProtocolError
from k2eg.protocol.uri import PVUri, parse_pv_uri

from . import render

_TIMEOUT_HELP = "seconds to wait for the gateway's reply"


def parse_uri(text: str) -> PVUri:
    try:
        return parse_pv_uri(text)
    except ProtocolError as e:
        raise ValueError(e.message) from None


def _console() -> Console:
    # Created per command: it must write to whatever sys.stdout is now (shell, pipe, test runner).
    return Console(soft_wrap=False, highlight=False)


def _stdout_is_tty() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def _echo_json(obj: Any, indent: int | None = 2) -> None:
    click.echo(render.to_json(obj, indent=indent))


# ----------------------------------------------------------------------------- get

@click.command()
@click.argument("pv_url")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True,
              help=_TIMEOUT_HELP)
@click.option("--filter", "fields", multiple=True, metavar="FIELD",
              help="keep only this top-level field (repeat, or comma-separate)")
@click.option("--json", "as_json", is_flag=True, help="print the value as exact JSON")
@click.pass_obj
def get(state: Any, pv_url: str, timeout: float, fields: Sequence[str], as_json: bool) -> None:
    """Read a PV once and print its fields (a table, or JSON with --json)."""
    pv = parse_uri(pv_url)
    wanted = render.split_fields(fields)
    value = render.filter_fields(state.client.get(pv_url, timeout=timeout), wanted)
    if as_json:
        _echo_json(value)
        return
    console = _console()
    if render.is_nttable(value):
        console.print(render.fields_table({k: v for k, v in value.items() if k != "value"}, title=pv.uri))
        console.print(render.nttable_table(value, title=f"{pv.name} value"))
    else:
        console.print(render.fields_table(value, title=pv.uri))


# ----------------------------------------------------------------------------- put

@click.command(context_settings={"ignore_unknown_options": True})
@click.argument("pv_url")
@click.argument("value")
@click.option("--field", default="value", show_default=True, metavar="KEY",
              help="top-level field to write instead of 'value'")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True,
              help=_TIMEOUT_HELP)
@click.pass_obj
def put(state: Any, pv_url: str, value: str, field: str, timeout: float) -> None:
    """Write VALUE to a PV.

    VALUE is read as JSON when it parses (42, -1.5, [1,2,3], {"a":1},
    '"quoted text"'), otherwise taken as a string, e.g. an enum choice:
    k2eg put pva://channel:enum On
    """
    pv = parse_uri(pv_url)
    parsed = render.parse_put_value(value)
    if not field:
        raise ValueError("--field must not be empty")
    if field == "value":
        state.client.put(pv_url, parsed, timeout=timeout)
    else:
        from k2eg.serialization import Generic
        state.client.put(pv_url, Generic(field, parsed), timeout=timeout)
    click.echo(f"Put {field}={render.to_json(parsed)} to {pv.uri}")


# ----------------------------------------------------------------------------- monitor

class _JsonSink:
    """One JSON line per event, ``{"pv name": value}`` like the records on the wire."""

    def __init__(self, fields: Sequence[str]):
        self.fields = fields

    def __enter__(self) -> "_JsonSink":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def event(self, name: str, value: Any) -> None:
        click.echo(render.to_json({name: render.filter_fields(value, self.fields)}))

    def flush(self) -> None:
        pass


class _TableSink:
    """A live table, one row per PV, redrawn after each batch of events."""

    def __init__(self, names: Sequence[str], limit_note: str | None):
        self.rows = {n: render.MonitorRow(n) for n in names}
        self.caption = f"Ctrl-C to stop{'; ' + limit_note if limit_note else ''}"
        self.live = Live(self._table(), console=_console(), auto_refresh=False, transient=False)

    def _table(self):
        return render.monitor_table(self.rows.values(), caption=self.caption)

    def __enter__(self) -> "_TableSink":
        self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.live.update(self._table(), refresh=True)
        self.live.__exit__(*exc)

    def event(self, name: str, value: Any) -> None:
        row = self.rows.get(name)
        if row is None:
            row = self.rows[name] = render.MonitorRow(name)
        row.update(value)

    def flush(self) -> None:
        self.live.update(self._table(), refresh=True)


@click.command()
@click.argument("pv_urls", nargs=-1, required=True, metavar="PV_URL...")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True,
              help="seconds to wait for the gateway to start the monitor")
@click.option("--filter", "fields", multiple=True, metavar="FIELD",
              help="JSON output: keep only this top-level field (repeat, or comma-separate)")
@click.option("--json", "as_json", is_flag=True,
              help="one JSON line per event (the default when stdout is not a terminal)")
@click.option("--count", type=click.IntRange(min=1), default=None, help="stop after N events in total")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), default=None, metavar="SECONDS",
              help="stop after this many seconds")
@click.pass_obj
def monitor(state: Any, pv_urls: Sequence[str], timeout: float, fields: Sequence[str], as_json: bool,
            count: int | None, duration: float | None) -> None:
    """Print every update of one or more PVs until Ctrl-C (or --count / --duration)."""
    pvs = list(dict.fromkeys(parse_uri(u) for u in pv_urls))
    wanted = render.split_fields(fields)
    names = list(dict.fromkeys(pv.name for pv in pvs))
    uris = [pv.uri for pv in pvs]
    client = state.client
    events: queue.SimpleQueue = queue.SimpleQueue()

    def handler(name: str, value: Any) -> None:
        events.put((name, value))

    table = not as_json and _stdout_is_tty()
    limits = [f"{count} events" if count else "", f"{duration:g} s" if duration else ""]
    note = ("stops after " + " or ".join(x for x in limits if x)) if any(limits) else None
    sink = _TableSink(names, note) if table else _JsonSink(wanted)
    try:
        if len(uris) == 1:
            client.monitor(uris[0], handler, timeout=timeout)
        else:
            client.monitor_many(uris, handler, timeout=timeout)
        _pump(events, sink, count, duration)
    except KeyboardInterrupt:
        pass  # Ctrl-C is how a monitor normally ends
    finally:
        for uri in uris:
            try:
                client.stop_monitor(uri)
            except KeyError:
                pass  # never started (the start failed or was interrupted)


def _pump(events: queue.SimpleQueue, sink: Any, count: int | None, duration: float | None) -> None:
    deadline = time.monotonic() + duration if duration else None
    seen = 0
    with sink:
        while count is None or seen < count:
            wait = 0.25
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    return
            try:
                item = events.get(timeout=wait)
            except queue.Empty:
                continue
            while item is not None and (count is None or seen < count):
                sink.event(*item)
                seen += 1
                try:
                    item = events.get_nowait()
                except queue.Empty:
                    item = None
            sink.flush()


# ----------------------------------------------------------------------------- snapshot

@click.command()
@click.argument("pv_urls", nargs=-1, required=True, metavar="PV_URL...")
@click.option("--window", type=click.IntRange(min=1), default=1000, show_default=True, metavar="MS",
              help="collection window in milliseconds")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              help="seconds to wait for the snapshot [default: window + 10 s]")
@click.option("--json", "as_json", is_flag=True, help="print {pv: [values...]} as JSON")
@click.pass_obj
def snapshot(state: Any, pv_urls: Sequence[str], window: int, timeout: float | None, as_json: bool) -> None:
    """Collect the values of several PVs over a time window, once."""
    from k2eg.client.errors import OperationError

    pvs = list(dict.fromkeys(parse_uri(u) for u in pv_urls))
    names = list(dict.fromkeys(pv.name for pv in pvs))
    wait = timeout if timeout is not None else window / 1000 + 10
    result = state.client.snapshot_sync([pv.uri for pv in pvs], timeout=wait, time_window_msec=window)
    if result.get("error", 0) not in (0, None):
        raise OperationError(result["error"], result.get("message"))
    if as_json:
        _echo_json({k: v for k, v in result.items() if k not in ("error", "message") or k in names})
        return
    _console().print(render.snapshot_table(render.snapshot_rows(result, names),
                                           title=f"snapshot of {len(names)} PVs, {window} ms window"))


# ----------------------------------------------------------------------------- info

@click.command()
@click.argument("pv_url")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True,
              help=_TIMEOUT_HELP)
@click.option("--json", "as_json", is_flag=True, help="print the info structure as JSON")
@click.pass_obj
def info(state: Any, pv_url: str, timeout: float, as_json: bool) -> None:
    """Show what the gateway knows of a PV: protocol, connection, type and structure."""
    pv = parse_uri(pv_url)
    data = state.client.info(pv_url, timeout=timeout)
    if as_json:
        _echo_json(data)
    else:
        _console().print(render.fields_table(data, title=f"{pv.uri} info"))


# ----------------------------------------------------------------------------- status

@click.command()
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=5.0, show_default=True,
              help="seconds to wait for the live answer and for the gateways' announcements")
@click.option("--json", "as_json", is_flag=True, help="print every gateway's full status as JSON")
@click.pass_obj
def status(state: Any, timeout: float, as_json: bool) -> None:
    """Show the gateways reachable through Kafka: monitors, repeating snapshots, PVs and rates.

    The gateway consuming the command topic answers live (marked *); others
    sharing the topic are listed from their announcements of the last 30 s.
    """
    from k2eg.client.errors import OperationTimeout

    client = state.client
    try:
        live = client.status(timeout=timeout)
    except OperationTimeout:
        live = None
    gateways = render.merge_gateways(client.gateways(timeout=timeout), live)
    if not gateways:
        raise click.ClickException(f"no gateway answered on {client.environment.cmd_topic} within {timeout:g} s, "
                                   "and none announced itself in the last 30 s")
    if as_json:
        _echo_json({"gateways": gateways})
        return
    console = _console()
    console.print(render.gateways_table(gateways))
    if live is not None:
        if live.get("monitors"):
            console.print(render.monitors_status_table(live))
        if live.get("snapshots"):
            console.print(render.snapshots_status_table(live))
        console.print(render.totals_line(live))
    else:
        console.print(f"no live answer on {client.environment.cmd_topic} within {timeout:g} s: "
                      "the table shows the last announcements")


ALL = [get, put, monitor, snapshot, info, status]
