"""Rates and identity of the status reports (pure: a hand-driven clock)."""
from k2eg.gateway.status import RateMeter, gateway_identity
from k2eg.protocol.uri import gateway_status_topic


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_rates_are_differences_over_time_between_samples():
    clock = Clock()
    meter = RateMeter(min_interval=1.0, clock=clock)
    assert meter.sample({"a": 10, "b": 0}) == {"a": 0.0, "b": 0.0}
    clock.t += 2
    assert meter.sample({"a": 30, "b": 5}) == {"a": 10.0, "b": 2.5}


def test_samples_closer_than_the_interval_repeat_the_last_rates():
    clock = Clock()
    meter = RateMeter(min_interval=1.0, clock=clock)
    meter.sample({"a": 0})
    clock.t += 1
    assert meter.sample({"a": 50}) == {"a": 50.0}
    clock.t += 0.01
    assert meter.sample({"a": 51}) == {"a": 50.0}   # not 100/s from one event in 10 ms


def test_a_new_key_starts_at_zero_and_a_reset_counter_is_not_negative():
    clock = Clock()
    meter = RateMeter(min_interval=1.0, clock=clock)
    meter.sample({"a": 100})
    clock.t += 1
    assert meter.sample({"a": 40, "new": 7}) == {"a": 0.0, "new": 0.0}


def test_identity_names_host_pid_and_topic():
    ident = gateway_identity("cmd")
    assert ident["id"] == f"{ident['host']}:{ident['pid']}" and ident["cmd_topic"] == "cmd"
    assert gateway_status_topic("cmd") == "cmd-gateway-status"


def test_capped_keeps_at_most_the_limit_and_says_how_many_there_are():
    from k2eg.gateway.status import capped

    doc: dict = {}
    capped(doc, "topics", (f"t{i}" for i in range(5)), limit=3)
    capped(doc, "monitors", ["m"], limit=3, total=9)
    assert doc == {"topics": ["t0", "t1", "t2"], "topics_total": 5, "monitors": ["m"], "monitors_total": 9}
