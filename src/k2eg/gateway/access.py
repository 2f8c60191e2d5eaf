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
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from k2eg.protocol.errors import ErrorCode, ProtocolError
from k2eg.protocol.uri import gateway_status_topic


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


# ----------------------------------------------------------------------------- topics a sender may name

KAFKA_INTERNAL_PREFIX = "__"   # __consumer_offsets, __transaction_state, __cluster_metadata, ...


class Unanswerable(ProtocolError):
    """A command's reply topic may not or cannot be written: nobody can be told, so it is logged and counted."""


class TopicGuard:
    """Which topics a sender may make the gateway write to, and how many reply topics it creates for them.

    A sender names reply topics, monitor destinations and (through the snapshot
    name) snapshot topics. None may be one of the gateway's own topics (its
    commands, state, status beacons, put journal, anything named
    ``<cmd-topic>-gateway-*``) or a Kafka internal one (``__*``): a reply there
    would be read back as a command, or corrupt the gateway's state or the
    cluster's bookkeeping. Reply topics the gateway creates are capped
    (``--max-reply-topics``); an existing one never counts.
    """

    def __init__(self, owned: dict[str, str], owned_prefix: str, max_reply_topics: int):
        self.owned = {topic: role for role, topic in owned.items() if topic}
        self.owned_prefix = owned_prefix
        self.max_reply_topics = max_reply_topics
        self.reply_topics: set[str] = set()   # reply topics this gateway created
        self._creating = 0
        self._lock = threading.Lock()

    @classmethod
    def from_options(cls, opts) -> "TopicGuard":
        cmd = opts.cmd_input_topic
        owned = {"command": cmd, "state": opts.state_topic, "status": gateway_status_topic(cmd),
                 # hook: the put journal's option, once the gateway has one
                 "put journal": opts.values.get("put_journal_topic") or ""}
        return cls(owned, f"{cmd}-gateway-", opts.max_reply_topics)

    def refusal(self, topic: str) -> str | None:
        """Why a sender may not name ``topic``, or None."""
        role = self.owned.get(topic)
        if role is not None:
            return f"'{topic}' is this gateway's {role} topic"
        if topic.startswith(self.owned_prefix):
            return f"'{topic}' is a topic of this gateway (names starting with '{self.owned_prefix}')"
        if topic.startswith(KAFKA_INTERNAL_PREFIX):
            return f"'{topic}' is a Kafka internal topic (names starting with '{KAFKA_INTERNAL_PREFIX}')"
        return None

    def check_destination(self, what: str, topic: str) -> None:
        why = self.refusal(topic)
        if why is not None:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"{what} may not be topic {why}")

    def ensure_reply_topic(self, topic: str, ensure: Callable[[list[str]], list[str]],
                           exists: Callable[[str], bool]) -> None:
        """Make a reply topic the topic admin does not know yet exist, within the cap; Unanswerable beyond it."""
        why = self.refusal(topic)
        if why is not None:
            raise Unanswerable(ErrorCode.BAD_REQUEST, f"reply topic refused: {why}")
        with self._lock:
            again = topic in self.reply_topics   # ours, deleted from outside since: made again, not counted twice
            room = again or len(self.reply_topics) + self._creating < self.max_reply_topics
            if room:
                self._creating += 1
        if not room:
            if exists(topic):   # somebody else made it: nothing to create
                return
            raise Unanswerable(ErrorCode.BAD_REQUEST,
                               f"reply topic '{topic}' refused: the gateway created {self.max_reply_topics} reply "
                               f"topics already (--max-reply-topics); create it yourself, or reuse an app name")
        made: list[str] = []
        try:
            made = ensure([topic])
        finally:
            with self._lock:
                self._creating -= 1
                self.reply_topics.update(made)
