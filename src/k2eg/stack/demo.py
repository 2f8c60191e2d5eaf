"""A short scripted client session against the local stack: what a newcomer runs first."""
from __future__ import annotations

import os
import threading
import time

from rich.console import Console
from rich.table import Table

from k2eg.dml import dml


def _summary(v: dict) -> str:
    value = v.get("value")
    if isinstance(value, dict) and "index" in value:
        return f"{value['choices'][value['index']]} (index {value['index']})"
    if isinstance(value, dict):
        return ", ".join(f"{k}={list(c)[:3]}" for k, c in value.items())
    if isinstance(value, list):
        return f"{value[:6]}{' ...' if len(value) > 6 else ''}"
    units = (v.get("display") or {}).get("units", "")
    return f"{value} {units}".strip()


def main() -> None:
    console = Console()
    env = os.environ.get("K2EG_ENVIRONMENT", "local")
    with dml(env, "k2eg-demo") as k:
        table = Table(title="PVs read through Kafka by the k2eg gateway")
        for col in ("PV", "value", "alarm severity"):
            table.add_column(col)
        for uri in ("ca://variable:a", "pva://variable:a", "ca://variable:a.EGU", "pva://channel:ramp:ramp",
                    "ca://channel:enum", "pva://channel:short", "pva://pva:table"):
            v = k.get(uri, timeout=10)
            table.add_row(uri, _summary(v), str((v.get("alarm") or {}).get("severity", "")))
        console.print(table)

        console.print("put ca://variable:a = 2.5 and pva://variable:b = 4 ...")
        k.put("ca://variable:a", 2.5, timeout=10)
        k.put("pva://variable:b", 4, timeout=10)
        time.sleep(1.2)  # variable:sum is a calc record scanned every second
        console.print(f"pva://variable:sum = {k.get('pva://variable:sum', timeout=10)['value']}")

        seen: list[float] = []
        three = threading.Event()

        def on_update(name: str, value: dict) -> None:
            seen.append(value["value"])
            console.print(f"monitor {name}: {value['value']}")
            if len(seen) >= 3:
                three.set()

        k.monitor("pva://channel:ramp:ramp", on_update, timeout=10)
        three.wait(10)
        k.stop_monitor("channel:ramp:ramp")
    console.print("[green]demo done[/green]")


if __name__ == "__main__":
    main()
