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


def recurring(snapshot_name, uris, until, **props):
    """Start a repeating snapshot, collect handler calls until ``until(calls)`` (or T), stop it."""
    from k2eg.broker import SnapshotProperties

    calls, lock, done = [], threading.Lock(), threading.Event()

    def handler(first, data):
        with lock:
            calls.append((first, data))
            if until(calls):
                done.set()

    reply = k.snapshot_recurring(SnapshotProperties(snapshot_name=snapshot_name, pv_uri_list=list(uris), **props),
                                 handler, T)
    done.wait(T)
    k.snapshot_stop(snapshot_name, T)
    with lock:
        return reply, list(calls)


def iterations_summary(calls, snapshot_name, topic, names):
    """What a repeating-snapshot handler received, independent of thread-pool order."""
    its = sorted(d["iteration"] for _, d in calls)
    return {
        "first_arg": sorted({"name" if f == snapshot_name else "topic" if f == topic else f for f, _ in calls}),
        "keys": sorted({key for _, d in calls for key in d}),
        "consecutive": bool(its) and its == list(range(its[0], its[0] + len(its))),
        "every_pv": all(all(n in d for n in names) for _, d in calls),
    }


def snapshot_topic(snapshot_name):
    return "".join(c if c.isalnum() or c == "-" else "_" for c in snapshot_name.lower())


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
            # Restore the demo IOC's initial arrays: other tests read them.
            k.put("pva://channel:short", Vector(payload=[-3, -2, -1, 0, 1, 2, 32767, -32768]), T)
            k.put("pva://channel:waveform", Vector(payload=[i + 0.5 for i in range(16)]), T)
            table = NTTable(labels=["name", "x", "n"])
            table.set_column("name", ["p", "q"]).set_column("x", [0.5, 1.5]).set_column("n", [10, -20])
            k.put("pva://pva:table", table, T)
            out["put table"] = k.get("pva://pva:table", T)["value"]
            k.put("pva://pva:struct", Generic("a", {"b": 42}), T)
            out["put generic"] = k.get("pva://pva:struct", T)["a"]["b"]
            k.put("ca://channel:string", Scalar("value", "hello k2eg"), T)
            out["put string"] = k.get("pva://channel:string", T)["value"]
        elif step == "monitor":
            # PVs no other test monitors over the other protocol: a topic is named after
            # the PV name only, so pva://x and ca://x share one stream.
            for uri in ("pva://pva:counter", "ca://bulk:197"):
                got = collect_monitor(uri, 3, lambda u, h: k.monitor(u, h, T))
                names = sorted({name for name, _ in got})
                # 0.3.0 runs handlers on a thread pool, so arrival order is not compared here.
                out[f"monitor {uri}"] = {"names": names, "n": len(got) >= 3, "shape": shape(got[0][1])}
                k.stop_monitor(uri.split("://", 1)[1])
        elif step == "monitor_many":
            got = collect_monitor(["pva://pva:counter", "ca://bulk:197"], 2,
                                  lambda u, h: k.monitor_many(u, h, T))
            out["monitor_many"] = sorted({name for name, _ in got})
        elif step == "errors":
            out["error unknown pv"] = error_of(lambda: k.get("pva://no:such:pv", T))
            out["error bad uri"] = error_of(lambda: k.get("variable:a", T))
            out["error stop unknown"] = error_of(lambda: k.stop_monitor("never:monitored"))
            # A PV not up yet (an IOC rebooting): accepted, so the client has a handler to stop.
            out["monitor not up"] = error_of(lambda: k.monitor("ca://not:up:yet", lambda *_: None, T))
            out["stop monitor not up"] = error_of(lambda: k.stop_monitor("not:up:yet"))
        elif step == "snapshot":
            snap = k.snapshot_sync(["ca://variable:a", "pva://channel:counter"], timeout=T)
            out["snapshot"] = {"keys": sorted(snap), "all_read": all(len(v) >= 1 for key, v in snap.items()
                                                                     if key != "error")}
        elif step == "snap_one_shot":
            # Async handler; a duplicate URI; an unknown PV still gets a record (an INVALID alarm).
            got, done = [], threading.Event()
            uris = ["ca://variable:a", "pva://channel:counter", "pva://no:such:pv", "ca://variable:a"]
            rid = k.snapshot(uris, lambda i, d: (got.append((i, d)), done.set()))
            done.wait(T)
            i, d = got[0] if got else (None, {})
            unknown = (d.get("no:such:pv") or [{}])[0]
            out["snap_one_shot"] = {
                "id_matches": i == rid, "keys": sorted(d), "counts": {n: len(v) for n, v in sorted(d.items())},
                "unknown": {"has_value": "value" in unknown, "severity": unknown.get("alarm", {}).get("severity"),
                            "names_pv": "no:such:pv" in unknown.get("alarm", {}).get("message", "")},
                "counter_shape": shape(d["channel:counter"][0]) if d.get("channel:counter") else None,
            }
        elif step == "snap_recurring_normal":
            nm = f"Compat_Normal_{app}_{int(time.time() * 1000) % 10**8}"
            uris = ["ca://variable:a", "pva://channel:counter", "pva://channel:enum"]
            names = [u.split("://", 1)[1] for u in uris]
            reply, calls = recurring(nm, uris, lambda c: len(c) >= 3, time_window=200)
            s = iterations_summary(calls, nm, snapshot_topic(nm), names)
            s.update(publishing_topic=reply.get("publishing_topic") == snapshot_topic(nm), n=len(calls) >= 3,
                     one_value_each=all(len(d[n]) == 1 for _, d in calls for n in names))
            out["snap_recurring_normal"] = s
        elif step == "snap_recurring_timed":
            nm = f"Compat_Timed_{app}_{int(time.time() * 1000) % 10**8}"
            from k2eg.broker import SnapshotType
            uris = ["pva://channel:counter", "ca://variable:b"]
            names = [u.split("://", 1)[1] for u in uris]
            reply, calls = recurring(nm, uris, lambda c: len(c) >= 2, time_window=500, sub_push_delay_msec=100,
                                     type=SnapshotType.TIMED_BUFFERED, pv_field_filter_list=["value"])
            s = iterations_summary(calls, nm, snapshot_topic(nm), names)
            counters = [v for _, d in calls for v in d["channel:counter"]]
            s.update(n=len(calls) >= 2, several_per_window=any(len(d["channel:counter"]) >= 2 for _, d in calls),
                     filtered=sorted({key for v in counters for key in v}))
            out["snap_recurring_timed"] = s
        elif step == "snap_triggered":
            from k2eg.broker import SnapshotProperties

            nm = f"Compat_Trig_{app}_{int(time.time() * 1000) % 10**8}"
            uris = ["ca://variable:a", "pva://pva:counter"]
            calls, lock = [], threading.Lock()

            def on_iteration(first, data):
                with lock:
                    calls.append((first, data))

            k.snapshot_recurring(SnapshotProperties(snapshot_name=nm, pv_uri_list=uris, time_window=100,
                                                    triggered=True), on_iteration, T)
            time.sleep(0.5)
            untriggered = len(calls)
            # 0.3.0 reads the stream only once its consumer joined: trigger until a call arrives.
            deadline = time.monotonic() + T
            while not calls and time.monotonic() < deadline:
                k.snapshost_trigger(nm, T)
                time.sleep(0.5)
            before = len(calls)
            for _ in range(5):
                k.snapshost_trigger(nm, T)
            deadline = time.monotonic() + T
            while len(calls) < before + 5 and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)
            k.snapshot_stop(nm, T)
            with lock:
                s = iterations_summary(calls, nm, snapshot_topic(nm), [u.split("://", 1)[1] for u in uris])
                s.update(untriggered=untriggered, after_five=len(calls) - before)
            out["snap_triggered"] = s
        elif step == "snap_stop_first":
            # Scripts written for 0.3.0 stop a recurring snapshot before they start it.
            nm = f"Compat_StopFirst_{app}_{int(time.time() * 1000) % 10**8}"
            before = error_of(lambda: k.snapshot_stop(nm, T))
            reply, calls = recurring(nm, ["pva://variable:a"], lambda c: len(c) >= 1, time_window=200)
            out["snap_stop_first"] = {"stop_before_start": before, "started": reply.get("error"),
                                      "iterations": len(calls) >= 1}
        elif step == "snap_first_iteration":
            # A long timedbuffered window with pushes: is the first iteration seen, and how soon?
            from k2eg.broker import SnapshotProperties, SnapshotType

            nm = f"Compat_First_{app}_{int(time.time() * 1000) % 10**8}"
            calls, lock, done = [], threading.Lock(), threading.Event()

            def on_iteration(first, data):
                with lock:
                    calls.append(data)
                done.set()
            t0 = time.monotonic()
            k.snapshot_recurring(SnapshotProperties(snapshot_name=nm, pv_uri_list=["pva://channel:counter"],
                                                    time_window=5000, sub_push_delay_msec=1000,
                                                    type=SnapshotType.TIMED_BUFFERED), on_iteration, T)
            done.wait(T)
            seconds = time.monotonic() - t0
            k.snapshot_stop(nm, T)
            with lock:
                first = calls[0] if calls else {}
            out["snap_first_iteration"] = {"iteration": first.get("iteration"), "seconds": round(seconds, 1),
                                           "values": len(first.get("channel:counter", []))}
        elif step == "snap_package_example":
            # The package page's own example: a scheduled snapshot (triggered=False), then a trigger.
            from k2eg.broker import SnapshotProperties

            nm = f"Compat_Example_{app}_{int(time.time() * 1000) % 10**8}"
            calls, lock = [], threading.Lock()

            def snapshot_handler(first, data):
                with lock:
                    calls.append(data)
            properties = SnapshotProperties(snapshot_name=nm, pv_uri_list=["pva://variable:a", "ca://channel:counter"],
                                            time_window=30_000, triggered=False)
            k.snapshot_recurring(properties, snapshot_handler, timeout=5.0)
            replies = []
            trigger = error_of(lambda: replies.append(k.snapshost_trigger(nm, timeout=5.0)))
            # 0.3.0 reads the stream only once its consumer joined: trigger again until a call arrives.
            deadline = time.monotonic() + T
            while trigger is None and not calls and time.monotonic() < deadline:
                time.sleep(1)
                if not calls:
                    replies.append(k.snapshost_trigger(nm, timeout=5.0))
            result = replies[0] if replies else {}
            stop = k.snapshot_stop(nm, timeout=5.0)
            with lock:
                out["snap_package_example"] = {
                    "trigger_error": trigger, "trigger_reply": result.get("error"),
                    "iter_index": result.get("iter_index"), "stop_reply": stop.get("error"),
                    "calls": len(calls) >= 1,
                    "values": bool(calls) and all(len(calls[0].get(n, [])) == 1
                                                  for n in ("variable:a", "channel:counter")),
                }
finally:
    k.close()
print(json.dumps(out))
