"""One scripted session written against the k2eg 0.3.0 API, run by either client.

Prints a JSON summary of what user code received (values, handler arguments,
exception types) so the two clients can be compared.
usage: scenario.py ENV APP STEP[,STEP...]
"""
import json
import sys
import threading
import time

from k2eg.dml import OperationError, OperationTimeout, dml
from k2eg.serialization import Generic, NTTable, Scalar, Vector

env, app, steps = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
k = dml(env, app)
out = {}
T = 20


def shape(v):
    """Types and keys of a value tree, to compare what two clients hand to user code."""
    if isinstance(v, dict):
        return {key: shape(x) for key, x in sorted(v.items())}
    if isinstance(v, list):
        return ["list", shape(v[0]) if v else None]
    return type(v).__name__


def error_of(fn):
    try:
        fn()
    except (OperationError, OperationTimeout, ValueError, KeyError) as e:
        kind = next(c for c in (OperationError, OperationTimeout, ValueError, KeyError) if isinstance(e, c))
        return {"type": kind.__name__, "code": getattr(e, "error", None)}
    return None


def collect_monitor(uris, n, start):
    """Events until every PV in ``uris`` delivered ``n`` of them (or the timeout)."""
    got, done = [], threading.Event()
    wanted = {u.split("://", 1)[1] for u in ([uris] if isinstance(uris, str) else uris)}

    def handler(name, value):
        got.append((name, value))
        if all(sum(1 for g, _ in got if g == w) >= n for w in wanted):
            done.set()

    start(uris, handler)
    done.wait(T)
    return got


try:
    for step in steps:
        if step == "get":
            for uri in ("ca://variable:a", "pva://variable:a", "ca://channel:enum", "pva://channel:enum",
                        "pva://pva:table", "ca://channel:short", "pva://channel:short"):
                v = k.get(uri, T)
                out[f"get {uri}"] = {"shape": shape(v), "negative": min(v["value"]) < 0 if "short" in uri else None}
        elif step == "put":
            k.put("pva://variable:a", Scalar("value", 3.25), T)
            k.put("ca://variable:b", Scalar(payload=1.5), T)
            out["put scalar"] = [k.get("ca://variable:a", T)["value"], k.get("pva://variable:b", T)["value"]]
            k.put("pva://channel:waveform", Vector(payload=[1.0, 2.0, 3.0]), T)
            k.put("ca://channel:short", Vector(payload=[-7, 7, -32768]), T)
            out["put vector"] = [list(k.get("ca://channel:waveform", T)["value"])[:3],
                                 list(k.get("pva://channel:short", T)["value"])[:3]]
            k.put("pva://channel:short", Vector(payload=[-3, -2, -1, 0, 1, 2, 32767, -32768]), T)
            table = NTTable(labels=["name", "x", "n"])
            table.set_column("name", ["p", "q"]).set_column("x", [0.5, 1.5]).set_column("n", [10, -20])
            k.put("pva://pva:table", table, T)
            out["put table"] = k.get("pva://pva:table", T)["value"]
            k.put("pva://pva:struct", Generic("a", {"b": 42}), T)
            out["put generic"] = k.get("pva://pva:struct", T)["a"]["b"]
            k.put("ca://channel:string", Scalar("value", "hello k2eg"), T)
            out["put string"] = k.get("pva://channel:string", T)["value"]
        elif step == "monitor":
            # Distinct names per protocol: a topic is named after the PV name only, so
            # pva://x and ca://x would share one stream.
            for uri in ("pva://channel:counter", "ca://channel:ramp:ramp"):
                got = collect_monitor(uri, 3, lambda u, h: k.monitor(u, h, T))
                names = sorted({name for name, _ in got})
                # 0.3.0 runs handlers on a thread pool, so arrival order is not compared here.
                out[f"monitor {uri}"] = {"names": names, "n": len(got) >= 3, "shape": shape(got[0][1])}
                k.stop_monitor(uri.split("://", 1)[1])
        elif step == "monitor_many":
            got = collect_monitor(["pva://pva:counter", "ca://channel:ramp:ramp"], 2,
                                  lambda u, h: k.monitor_many(u, h, T))
            out["monitor_many"] = sorted({name for name, _ in got})
        elif step == "errors":
            out["error unknown pv"] = error_of(lambda: k.get("pva://no:such:pv", T))
            out["error bad uri"] = error_of(lambda: k.get("variable:a", T))
            out["error stop unknown"] = error_of(lambda: k.stop_monitor("never:monitored"))
        elif step == "snapshot":
            snap = k.snapshot_sync(["ca://variable:a", "pva://channel:counter"], timeout=T)
            out["snapshot"] = {"keys": sorted(snap), "all_read": all(len(v) >= 1 for key, v in snap.items()
                                                                     if key != "error")}
finally:
    k.close()
print(json.dumps(out))
