"""Shared plumbing: process CPU/RSS, machine load, workers, raw gateway commands, topic reads, py-spy."""
from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import msgpack

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable
TICK = os.sysconf("SC_CLK_TCK")


def epics_scheduling(realtime: bool = False) -> None:
    """What every bench process that runs EPICS does first (k2eg.scheduling): call before EPICS or a thread starts.

    A ``--src`` tree older than k2eg.scheduling has none: its processes then run as invoked.
    """
    try:
        from k2eg.scheduling import epics_scheduling as first
    except ImportError:
        return
    first(realtime)


# ----------------------------------------------------------------------------- /proc

def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread name (threads of one name summed: librdkafka, pvxs and libca name theirs)."""
    out: dict[str, float] = collections.defaultdict(float)
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                text = f.read()
        except OSError:
            continue
        name = text[text.index("(") + 1:text.rindex(")")]
        fields = text.rsplit(")", 1)[1].split()
        out[name.rstrip("0123456789") or name] += (int(fields[11]) + int(fields[12])) / TICK
    return out


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return sum(v) - idle, sum(v)


def descendants(root: int) -> list[int]:
    kids = collections.defaultdict(list)
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                kids[ppid].append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids[p])
    return out


class Meter:
    """CPU used over a window: by chosen pids, by this process tree, and by the rest of the machine."""

    def __init__(self, **pids: int):
        self.pids = {k: v for k, v in pids.items() if v}
        self.start()

    def _ours(self) -> dict[int, float]:
        out = {}
        for p in descendants(os.getpid()):
            try:
                out[p] = cpu_seconds(p)
            except OSError:
                pass
        return out

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.m0 = _machine_busy()
        self.c0 = {k: cpu_seconds(p) for k, p in self.pids.items()}
        self.th0 = {k: thread_cpu(p) for k, p in self.pids.items() if k == "gateway"}
        self.tree0 = self._ours()
        self.load0 = os.getloadavg()[0]

    def stop(self) -> dict:
        dt = time.monotonic() - self.t0
        m1 = _machine_busy()
        tree1 = self._ours()
        ours = sum(tree1[p] - self.tree0.get(p, 0.0) for p in tree1)
        machine = (m1[0] - self.m0[0]) / TICK
        out = {k: round((cpu_seconds(p) - self.c0[k]) / dt, 3) for k, p in self.pids.items()}
        for k, before in self.th0.items():
            now = thread_cpu(self.pids[k])
            busy = {n: (c - before.get(n, 0.0)) / dt for n, c in now.items()}
            out[f"{k}_threads"] = {n: round(c, 3) for n, c in sorted(busy.items(), key=lambda x: -x[1]) if c >= 0.01}
        out.update(seconds=round(dt, 2), machine_cores=round(machine / dt, 2), bench_tree_cores=round(ours / dt, 2),
                   other_cores=round(max(0.0, machine - ours) / dt, 2), loadavg=round(os.getloadavg()[0], 2))
        return out


# ----------------------------------------------------------------------------- workers

class Worker:
    """A subprocess speaking one JSON object or word per line on stdout, taking words on stdin."""

    def __init__(self, args: list[str], python: str = PY, env: dict | None = None, name: str = "worker"):
        self.name = name
        e = dict(os.environ if env is None else env)
        e.setdefault("PYTHONUNBUFFERED", "1")
        self.proc = subprocess.Popen([python, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=e, cwd=str(ROOT))
        self.pid = self.proc.pid

    def send(self, word: str) -> None:
        self.proc.stdin.write(word + "\n")
        self.proc.stdin.flush()

    def line(self, timeout: float = 60) -> str:
        import select
        end = time.monotonic() + timeout
        while True:
            r, _, _ = select.select([self.proc.stdout], [], [], max(0.0, end - time.monotonic()))
            if not r:
                raise TimeoutError(f"{self.name}: no output within {timeout:g}s; stderr: {self.stderr()}")
            text = self.proc.stdout.readline()
            if not text:
                raise RuntimeError(f"{self.name} exited ({self.proc.wait()}): {self.stderr()}")
            text = text.strip()
            if text:
                return text

    def expect(self, word: str, timeout: float = 60) -> None:
        """Wait for the line ``word``; other lines (library chatter on stdout) are skipped."""
        end = time.monotonic() + timeout
        while (got := self.line(max(0.1, end - time.monotonic()))) != word:
            if time.monotonic() > end:
                raise TimeoutError(f"{self.name}: no {word!r} within {timeout:g}s (last: {got[:200]!r})")

    def json(self, timeout: float = 60) -> dict:
        end = time.monotonic() + timeout
        while not (got := self.line(max(0.1, end - time.monotonic()))).startswith("{"):
            pass
        return json.loads(got)

    def stderr(self) -> str:
        if self.proc.poll() is None:
            return "(still running)"
        return (self.proc.stderr.read() or "")[-2000:]

    def close(self, timeout: float = 10) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def run_json(args: list[str], python: str = PY, env: dict | None = None, timeout: float = 300) -> dict:
    """Run a worker to completion; its last stdout line is a JSON object."""
    e = dict(os.environ if env is None else env)
    p = subprocess.run([python, *args], capture_output=True, text=True, env=e, timeout=timeout, cwd=str(ROOT))
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:3])} failed ({p.returncode}): {p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- Kafka

class Commander:
    """Sends raw JSON commands to the gateway and waits for replies on a private reply topic."""

    def __init__(self, bootstrap: str, cmd_topic: str):
        from confluent_kafka import Consumer, Producer, TopicPartition

        from k2eg.transport import TopicAdmin

        self.cmd_topic = cmd_topic
        self.reply_topic = f"bench-{uuid.uuid4().hex[:8]}-reply"
        TopicAdmin({"bootstrap.servers": bootstrap}).ensure([self.reply_topic])
        self.producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0})
        self.consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": self.reply_topic,
                                  "enable.auto.commit": False, "fetch.wait.max.ms": 10})
        self.consumer.assign([TopicPartition(self.reply_topic, 0, 0)])

    def request(self, cmd: dict, timeout: float = 120) -> dict:
        return self.request_many([cmd], timeout)[0]

    def request_many(self, cmds: list[dict], timeout: float = 120) -> list[dict]:
        """Send all ``cmds`` at once, then collect their replies (``error: "no reply"`` past the timeout)."""
        ids = [uuid.uuid4().hex for _ in cmds]
        for cmd, rid in zip(cmds, ids):
            cmd = dict(cmd, reply_topic=self.reply_topic, reply_id=rid, serialization="msgpack")
            self.producer.produce(self.cmd_topic, json.dumps(cmd).encode())
        self.producer.flush(10)
        replies: dict[str, dict] = {}
        end = time.monotonic() + timeout
        while len(replies) < len(ids) and time.monotonic() < end:
            m = self.consumer.poll(0.2)
            if m is None or m.error():
                continue
            rec = msgpack.unpackb(m.value(), raw=False, strict_map_key=False)
            if isinstance(rec, dict) and rec.get("reply_id") in ids:
                replies[rec["reply_id"]] = rec
        return [replies.get(rid, {"error": "no reply", "message": f"no reply within {timeout:g}s"}) for rid in ids]

    def close(self) -> None:
        self.consumer.close()


def log_append_time(bootstrap: str, topics: list[str]) -> None:
    """Stamp records with the broker's append time, so a record's timestamp says when it *reached* Kafka."""
    from confluent_kafka.admin import (AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource,
                                       ResourceType)

    admin = AdminClient({"bootstrap.servers": bootstrap})
    entry = ConfigEntry("message.timestamp.type", "LogAppendTime", incremental_operation=AlterConfigOpType.SET)
    fs = admin.incremental_alter_configs([ConfigResource(ResourceType.TOPIC, t, incremental_configs=[entry])
                                          for t in topics])
    for f in fs.values():
        f.result(30)


def read_topics(bootstrap: str, topics: list[str], timeout: float = 60) -> dict[str, list[tuple[int, object]]]:
    """Every record of single-partition ``topics`` up to their current end: {topic: [(ts_ms, decoded)]}."""
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-read-{uuid.uuid4().hex[:6]}",
                  "enable.auto.commit": False, "enable.partition.eof": True})
    try:
        ends = {t: c.get_watermark_offsets(TopicPartition(t, 0), timeout=10)[1] for t in topics}
        out: dict[str, list] = {t: [] for t in topics}
        left = {t for t, e in ends.items() if e > 0}
        c.assign([TopicPartition(t, 0, 0) for t in left])
        end = time.monotonic() + timeout
        while left and time.monotonic() < end:
            for m in c.consume(10000, 0.5):
                if m.error():
                    continue
                t = m.topic()
                if m.offset() < ends[t]:
                    out[t].append((m.timestamp()[1], msgpack.unpackb(m.value(), raw=False, strict_map_key=False)))
                if m.offset() + 1 >= ends[t]:
                    left.discard(t)
        return out
    finally:
        c.close()


# ----------------------------------------------------------------------------- stats

def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


# ----------------------------------------------------------------------------- py-spy

def pyspy_start(pid: int, seconds: float, out: Path) -> subprocess.Popen | None:
    """Sample the GIL holder of ``pid`` for ``seconds`` at 100 Hz; None if py-spy is missing.

    ``--gil``: the gateway's throughput is bounded by one GIL, so where the GIL goes is what matters;
    C threads that run without it (librdkafka, pvxs, libca) show up in Meter's per-thread CPU instead.
    """
    exe = Path(PY).with_name("py-spy")
    if not exe.exists():
        return None
    return subprocess.Popen([str(exe), "record", "-p", str(pid), "-d", str(int(seconds)), "-r", "100",
                             "--threads", "--gil", "--nonblocking", "--format", "raw", "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def pyspy_summary(raw: Path, top: int = 12) -> dict:
    """Per-thread CPU share, top self frames and top inclusive functions from a collapsed-stack file."""
    threads, selfs, incl = collections.Counter(), collections.Counter(), collections.Counter()
    total = 0
    try:
        lines = raw.read_text().splitlines()
    except OSError:
        return {}
    for line in lines:
        stack, _, n = line.rpartition(" ")
        n = int(n)
        frames = stack.split(";")
        total += n
        threads[frames[0].strip('"')[:60]] += n  # --threads: the first frame names the thread
        funcs = [_short(f) for f in frames[1:]]
        if funcs:
            selfs[funcs[-1]] += n
            for f in set(funcs):
                incl[f] += n
    share = lambda c: [(k, round(100 * v / total, 1)) for k, v in c.most_common(top)]  # noqa: E731
    return {"samples": total, "threads": share(threads), "self": share(selfs), "inclusive": share(incl)}


def _short(frame: str) -> str:
    # "func (path/to/file.py:123)" -> "func (file.py)"
    name, _, loc = frame.partition(" (")
    loc = loc.rstrip(")")
    path = loc.rsplit(":", 1)[0]
    parts = path.split("/")
    short = "/".join(parts[-2:]) if len(parts) > 1 else path
    return f"{name} ({short})"
