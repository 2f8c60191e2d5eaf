"""The archive commands of ``k2eg``: history, at, archive add|remove|list, replay (need k2eg-archiver)."""
from __future__ import annotations

import json
import time
from typing import Any, Sequence

import click

from . import render
from .commands import parse_uri

_TIMEOUT = click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=30.0, show_default=True,
                        help="seconds to wait for the archiver's answer")


def _time(text: str | None, what: str, default: float | None = None) -> Any:
    """ISO 8601, or seconds since 1970, or 'now' / '-SECONDS' (relative to now)."""
    if text is None:
        return default
    t = text.strip()
    if t == "now":
        return time.time()
    try:
        f = float(t)
    except ValueError:
        return t                                  # ISO 8601, checked by the client
    return time.time() + f if t.startswith("-") else f


@click.command()
@click.argument("pv_url")
@click.option("--from", "start", required=True, help="start: ISO 8601, seconds since 1970, or -SECONDS from now")
@click.option("--to", "end", default="now", show_default=True, help="end, as --from")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), help="write the values to this CSV file")
@click.option("--parquet", "parquet_path", type=click.Path(dir_okay=False), help="write to this Parquet file")
@click.option("--json", "as_json", is_flag=True, help="print whole value trees as JSON")
@_TIMEOUT
@click.pass_obj
def history(state: Any, pv_url: str, start: str, end: str, csv_path: str | None, parquet_path: str | None,
            as_json: bool, timeout: float) -> None:
    """Every archived value of a PV in a time range, oldest first."""
    parse_uri(pv_url)
    t0, t1 = _time(start, "from"), _time(end, "to")
    k = state.client
    if csv_path or parquet_path:
        df = k.history(pv_url, t0, t1, timeout=timeout, as_frame=True)
        if csv_path:
            df.to_csv(csv_path, index=False)
        if parquet_path:
            df.to_parquet(parquet_path, index=False)
        click.echo(f"{len(df)} values of {pv_url} written", err=True)
        return
    trees = k.history(pv_url, t0, t1, timeout=timeout)
    if as_json:
        click.echo(render.to_json(trees))
        return
    from k2eg.archiver.wire import ns_to_datetime
    for t in trees:
        ts = t.get("timeStamp") or {}
        when = ns_to_datetime(ts.get("secondsPastEpoch", 0) * 10**9 + ts.get("nanoseconds", 0)).isoformat()
        alarm = t.get("alarm") or {}
        click.echo(f"{when}\t{render.to_json(t.get('value'), indent=None)}\t{alarm.get('severity', '')}")


@click.command()
@click.argument("pv_urls", nargs=-1, required=True)
@click.option("--time", "when", required=True, help="ISO 8601, seconds since 1970, or -SECONDS from now")
@click.option("--json", "as_json", is_flag=True, help="print whole value trees as JSON")
@_TIMEOUT
@click.pass_obj
def at(state: Any, pv_urls: Sequence[str], when: str, as_json: bool, timeout: float) -> None:
    """Each PV's newest archived value at or before a time (as the Archiver Appliance's getDataAtTime)."""
    for u in pv_urls:
        parse_uri(u)
    values = state.client.values_at(list(pv_urls), _time(when, "time"), timeout=timeout)
    if as_json:
        click.echo(render.to_json(values))
        return
    for url, tree in values.items():
        click.echo(f"{url}\t" + ("(no archived value)" if tree is None else
                                 render.to_json(tree.get("value"), indent=None)))


@click.group()
def archive() -> None:
    """What the archivers record: archive add|remove|list."""


def _change(name: str, verb: str, help_text: str) -> None:
    """``archive add`` and ``archive remove``: the same arguments, one client call each."""
    @archive.command(name, help=help_text)
    @click.argument("pvs", nargs=-1)
    @click.option("--snapshot", "snapshots", multiple=True, help=f"a repeating snapshot to {verb} (repeatable)")
    @_TIMEOUT
    @click.pass_obj
    def change(state: Any, pvs: Sequence[str], snapshots: Sequence[str], timeout: float) -> None:
        if not pvs and not snapshots:
            raise click.UsageError("give PVs and/or --snapshot NAME")
        call = getattr(state.client, f"archive_{name}")
        click.echo(json.dumps(call(list(pvs), list(snapshots), timeout=timeout)))


_change("add", "archive", "Archive PVs (names, patterns such as 'bulk:*', or URIs: a URI is also monitored) and "
                          "snapshots.")
_change("remove", "stop archiving", "Stop archiving PV entries and snapshots (what is stored stays).")


@archive.command("list")
@_TIMEOUT
@click.pass_obj
def archive_list(state: Any, timeout: float) -> None:
    """What is archived."""
    click.echo(json.dumps(state.client.archive_list(timeout=timeout)))


@click.command()
@click.option("--snapshot", "snapshot", help="republish this snapshot's archived iterations")
@click.option("--pv", "pv_url", help="republish this PV's archived history as monitor events")
@click.option("--from", "start", default=None, help="start: ISO 8601, seconds since 1970, or -SECONDS from now")
@click.option("--to", "end", default=None, help="end, as --from")
@click.option("--topic", required=True, help="the Kafka topic to publish into")
@click.option("--as", "as_name", default=None, help="snapshot name written in the records (default: the same)")
@click.option("--speed", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="1: the original pace; 10: ten times faster; 0: as fast as possible")
@_TIMEOUT
@click.pass_obj
def replay(state: Any, snapshot: str | None, pv_url: str | None, start: str | None, end: str | None, topic: str,
           as_name: str | None, speed: float, timeout: float) -> None:
    """Republish archived snapshot iterations or a PV's history into a topic, in the original wire format."""
    from k2eg.archiver import replay as rp
    if bool(snapshot) == bool(pv_url):
        raise click.UsageError("give exactly one of --snapshot NAME or --pv PV")
    k = state.client
    t0, t1 = _time(start, "from"), _time(end, "to")
    if snapshot:
        its = k.snapshot_iterations(snapshot, t0, t1, timeout=timeout)
        records = rp.snapshot_records(as_name or snapshot, its)
        what = f"{len(its)} iterations of {snapshot}"
    else:
        pv = parse_uri(pv_url)
        trees = k.history(pv_url, t0 if t0 is not None else 0, t1 if t1 is not None else time.time(),
                          timeout=timeout)
        times = [t["timeStamp"]["secondsPastEpoch"] * 10**9 + t["timeStamp"]["nanoseconds"] if "timeStamp" in t
                 else 0 for t in trees]
        records = rp.event_records(pv.name, trees, times)
        what = f"{len(trees)} values of {pv_url}"
    k._t.admin.ensure([topic], 30)
    n = rp.publish(k._t.producer, topic, records, speed)
    click.echo(f"replayed {what}: {n} records to {topic}", err=True)


ALL = [history, at, archive, replay]
