"""A client process for the two-processes-one-app-name test.

usage: worker.py ENV APP TAG. Prints ``ready`` once constructed, waits for
``go`` on stdin, gets its PVs and collects monitor events, prints ``done``
and a JSON line, then waits for ``exit`` before closing, so both processes
are alive (and reading the same reply topic) during each other's work.
"""
import json
import sys
import threading

from k2eg.dml import dml

env, app, tag = sys.argv[1:4]
T = 30
out: dict = {"tag": tag, "gets": [], "events": []}
with dml(env, app) as k:
    print("ready", flush=True)
    assert sys.stdin.readline().strip() == "go"
    three = threading.Event()

    def on_event(name, value):
        out["events"].append([name, value["value"]])
        if len(out["events"]) >= 3:
            three.set()

    k.monitor("pva://pva:counter", on_event, T)
    for i in range(20):
        # bulk:NNN's description identifies the PV, so a reply meant for the other process would show.
        name = f"bulk:{(i * 7 + (0 if tag == 'A' else 3)) % 200:03d}"
        v = k.get(f"ca://{name}", T)
        out["gets"].append([name, v["display"]["description"]])
    out["three_events"] = three.wait(T)
    print("done", flush=True)
    print(json.dumps(out), flush=True)
    assert sys.stdin.readline().strip() == "exit"
