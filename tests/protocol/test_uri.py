import pytest

from k2eg.protocol.errors import ProtocolError
from k2eg.protocol.uri import parse_pv_uri, pv_topic, snapshot_topic


@pytest.mark.parametrize("text,proto,name", [
    ("pva://variable:a", "pva", "variable:a"),
    ("ca://variable:a.EGU", "ca", "variable:a.EGU"),
    ("PVA://x", "pva", "x"),
    ("Ca://a-b_c:d", "ca", "a-b_c:d"),
    ("pv://x", "pva", "x"),
])
def test_parse_keeps_name_and_field(text, proto, name):
    pv = parse_pv_uri(text)
    assert (pv.protocol, pv.name, pv.uri) == (proto, name, text)


@pytest.mark.parametrize("text,fragment", [
    ("variable:a", "missing protocol"),
    ("http://x", "unknown protocol 'http'"),
    ("ca://bad name", "may only hold"),
    ("ca://", "may only hold"),
    ("ca://a..b", "may only hold"),
    (42, "must be a string"),
])
def test_parse_rejects_with_reason(text, fragment):
    with pytest.raises(ProtocolError) as e:
        parse_pv_uri(text)
    assert fragment in e.value.message and e.value.code == -1


def test_equal_pvs_compare_equal_whatever_the_prefix_case():
    assert parse_pv_uri("PVA://x") == parse_pv_uri("pva://x")


def test_topic_names():
    assert pv_topic("variable:a") == "variable_a"      # 0.3.0 rule for ':'
    assert pv_topic("variable:a.EGU") == "variable_a.EGU"
    assert snapshot_topic("My Snap:1") == "my_snap_1"
    assert snapshot_topic("snap-A_b") == "snap-a_b"
