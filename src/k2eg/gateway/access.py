"""Put access control: an ordered rules file, first match wins, like EPICS gateway access files.

Each line: ``ALLOW|DENY <pv-regex> [<app-regex>]``; regexes must match the
whole PV name (as written after ``://``, any ``.FIELD`` included) and the
client's app name (its reply topic without ``-reply``). A PV that no rule
matches is denied: a rules file is an allow-list. The app name comes from
the command and is not authenticated; authenticate clients at the Kafka
level (SASL ACLs on the command topic) where that matters.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from k2eg.protocol.errors import ErrorCode, ProtocolError


@dataclass(frozen=True)
class Rule:
    line: int
    allow: bool
    pv: re.Pattern
    app: re.Pattern
    text: str


class RulesError(ValueError):
    pass


def parse_rules(text: str, source: str = "rules") -> list[Rule]:
    rules = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if parts[0].upper() not in ("ALLOW", "DENY") or len(parts) not in (2, 3):
            raise RulesError(f"{source}:{n}: expected 'ALLOW|DENY <pv-regex> [<app-regex>]', got '{raw.strip()}'")
        try:
            pv = re.compile(parts[1])
            app = re.compile(parts[2] if len(parts) == 3 else ".*")
        except re.error as e:
            raise RulesError(f"{source}:{n}: bad regular expression: {e}") from None
        rules.append(Rule(n, parts[0].upper() == "ALLOW", pv, app, line))
    return rules


def app_of(reply_topic: str | None) -> str:
    if not reply_topic:
        return ""
    return reply_topic[: -len("-reply")] if reply_topic.endswith("-reply") else reply_topic


class PutPolicy:
    """Decides whether a put may reach the IOC; the refusal names the rule."""

    def __init__(self, rules: list[Rule] | None = None, read_only: bool = False, source: str = ""):
        self.rules = rules
        self.read_only = read_only
        self.source = source

    @classmethod
    def from_options(cls, rules_path: str, read_only: bool) -> "PutPolicy":
        if not rules_path:
            return cls(None, read_only)
        try:
            text = Path(rules_path).read_text()
        except OSError as e:
            raise RulesError(f"cannot read access rules {rules_path}: {e.strerror}") from None
        return cls(parse_rules(text, rules_path), read_only, rules_path)

    def check(self, pv_name: str, app: str) -> None:
        if self.read_only:
            raise ProtocolError(ErrorCode.DENIED, f"put to '{pv_name}' denied: the gateway is read-only")
        if self.rules is None:
            return
        for rule in self.rules:
            if rule.pv.fullmatch(pv_name) and rule.app.fullmatch(app):
                if rule.allow:
                    return
                raise ProtocolError(ErrorCode.DENIED, f"put to '{pv_name}' by '{app}' denied by rule "
                                                      f"{self.source}:{rule.line} '{rule.text}'")
        raise ProtocolError(ErrorCode.DENIED, f"put to '{pv_name}' by '{app}' denied: no rule in {self.source} "
                                              "allows it")
