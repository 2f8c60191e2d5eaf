import pytest

from k2eg.gateway.access import PutPolicy, RulesError, app_of, parse_rules
from k2eg.protocol.errors import ProtocolError

RULES = """
# operators may write setpoints, nobody writes the alarm record
DENY  channel:alarm.*
ALLOW variable:[ab]      operator-.*
ALLOW channel:string
"""


def policy():
    return PutPolicy(parse_rules(RULES, "acl"), source="acl")


def refused(p, pv, app):
    with pytest.raises(ProtocolError) as e:
        p.check(pv, app)
    assert e.value.code == -4
    return e.value.message


def test_first_match_wins_and_message_names_the_rule():
    p = policy()
    assert "acl:3" in refused(p, "channel:alarm", "operator-1")
    p.check("variable:a", "operator-1")
    p.check("channel:string", "anyone")


def test_unmatched_is_denied_and_app_pattern_applies():
    p = policy()
    assert "no rule" in refused(p, "variable:a", "physicist")
    assert "no rule" in refused(p, "variable:sum", "operator-1")


def test_field_suffix_is_part_of_the_name():
    assert "acl:3" in refused(policy(), "channel:alarm.HIHI", "operator-1")


def test_read_only_refuses_everything():
    assert "read-only" in refused(PutPolicy(read_only=True), "variable:a", "x")


def test_no_rules_allows():
    PutPolicy().check("anything", "anyone")


@pytest.mark.parametrize("text", ["PERMIT x", "ALLOW", "ALLOW ( x", "DENY a b c"])
def test_bad_lines_are_reported_with_their_number(text):
    with pytest.raises(RulesError, match="acl:1"):
        parse_rules(text, "acl")


def test_app_of_reply_topic():
    assert app_of("my-app-reply") == "my-app" and app_of(None) == ""
