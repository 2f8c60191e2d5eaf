"""Put access control: an ordered rules file, first match wins, like EPICS gateway access files.

Each line: ``ALLOW|DENY <pv-regex> [<app-regex>]``; regexes must match a
whole name and the client's app name (its reply topic without ``-reply``).
A PV that no rule matches is denied: a rules file is an allow-list. The app
name comes from the command and is not authenticated; authenticate clients
at the Kafka level (SASL ACLs on the command topic) where that matters.

A rule about a record governs every field of it: a put to ``REC.FIELD`` is
checked under the names ``REC.FIELD`` and ``REC``, so ``DENY MAG:1`` stops
``MAG:1.PROC`` too, whatever the protocol (CA and PVA both address a field as
``REC.FIELD`` after ``://``). A put without a field writes the record's VAL,
so it is also checked as ``REC.VAL``. Field names are compared upper-cased,
as the IOC spells them. First match wins as before: a rule about one field
(``DENY MAG:1\\.PROC``) decides for that field only if it comes before the
record's rule.
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


def governed_names(name: str) -> tuple[str, ...]:
    """The names a put to channel ``name`` is checked under: as written, its record, and its field.

    ``REC`` -> (REC, REC.VAL); ``REC.fld`` -> (REC.fld, REC.FLD, REC). The record is the part before
    the first '.', as for PVUri.record.
    """
    record, dot, fld = name.partition(".")
    field_name = f"{record}.{fld.upper()}" if dot else f"{record}.VAL"
    return tuple(dict.fromkeys((name, field_name, record)))


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
        names = governed_names(pv_name)
        for rule in self.rules:
            matched = next((n for n in names if rule.pv.fullmatch(n)), None) if rule.app.fullmatch(app) else None
            if matched is not None:
                if rule.allow:
                    return
                about = "" if matched == pv_name else f" (a rule about {matched} governs {pv_name})"
                raise ProtocolError(ErrorCode.DENIED, f"put to '{pv_name}' by '{app}' denied by rule "
                                                      f"{self.source}:{rule.line} '{rule.text}'{about}")
        raise ProtocolError(ErrorCode.DENIED, f"put to '{pv_name}' by '{app}' denied: no rule in {self.source} "
                                              "allows it")
