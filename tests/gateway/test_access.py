import pytest

from k2eg.gateway.access import PutPolicy, RulesError, app_of, governed_names, parse_rules
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


WALKAROUND = """
DENY  MAG:1\\.PROC          # a field rule: before the record's rule, it decides for that field
ALLOW MAG:1\\.VAL    ops
DENY  MAG:1
ALLOW .*
"""


@pytest.mark.parametrize("pv", ["MAG:1.PROC", "MAG:1.proc", "MAG:1.DISV", "MAG:1.VAL", "MAG:1", "MAG:1.DESC",
                                "MAG:1.VAL.sub"])
def test_a_rule_about_a_record_governs_every_field_of_it(pv):
    p = PutPolicy(parse_rules(WALKAROUND, "acl"), source="acl")
    msg = refused(p, pv, "physicist")
    assert "acl:2" in msg if pv.upper() == "MAG:1.PROC" else "acl:4" in msg
    if pv != "MAG:1":
        assert "governs" in msg or pv == "MAG:1.PROC"


def test_a_field_rule_before_the_record_rule_is_an_exception_and_a_bare_name_is_its_val():
    p = PutPolicy(parse_rules(WALKAROUND, "acl"), source="acl")
    p.check("MAG:1.VAL", "ops")
    p.check("MAG:1", "ops")            # writes VAL: allowed by the VAL rule
    assert "acl:2" in refused(p, "MAG:1.PROC", "ops")
    assert "acl:4" in refused(p, "MAG:1.DISV", "ops")
    p.check("MAG:10.PROC", "ops")      # another record
    p.check("MAG:1X", "physicist")


def test_a_field_rule_after_the_record_rule_never_decides():
    p = PutPolicy(parse_rules("ALLOW MAG:1\nDENY MAG:1\\.PROC\n", "acl"), source="acl")
    p.check("MAG:1.PROC", "x")


def test_governed_names():
    assert governed_names("R:1") == ("R:1", "R:1.VAL")
    assert governed_names("R:1.proc") == ("R:1.proc", "R:1.PROC", "R:1")
    assert governed_names("R:1.VAL") == ("R:1.VAL", "R:1")
