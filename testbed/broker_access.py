"""Who may do what on the broker: the run's identities, their topic rules, and those rules in Mosquitto's syntax."""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

from testbed.core.topics import Topics

Access = Literal["read", "write"]

# Every run: ACL rules cannot know the run id (it is made when the run starts), so they match any run.
ANY_RUN = Topics("+")
DEVICE_PUBLISHES = ("hello", "status", "report", "nack")
USERNAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
MOSQUITTO_PBKDF2_ITERATIONS = 1000  # mosquitto_passwd uses 101; any count is read back from the hash
MOSQUITTO_SALT_BYTES = 12


@dataclass(frozen=True)
class Identity:
    """A username and password the broker knows."""

    username: str
    password: str = ""

    def __repr__(self) -> str:  # a password never lands in a log or a test failure
        return f"Identity(username={self.username!r})"


@dataclass(frozen=True)
class TopicRule:
    """Read (subscribe and receive) or write (publish) access to the topics a filter matches."""

    access: Access
    topic_filter: str


@dataclass(frozen=True)
class BrokerAccess:
    """The run's identities: the server's, and one per device (device id -> identity).

    With `devices` empty every client of the run uses the server's identity and there are no topic
    rules (authentication only); with devices, each identity is held to its own topics (`rules`).
    """

    server: Identity
    devices: Mapping[str, Identity]

    @property
    def restricts_topics(self) -> bool:
        return bool(self.devices)

    def identities(self) -> list[Identity]:
        """Every identity, the server's first."""
        return [self.server, *self.devices.values()]

    def rules(self) -> dict[str, tuple[TopicRule, ...]]:
        """Username -> what it may do; a username not listed may do nothing."""
        return dict(self._rules_by_user)

    @cached_property
    def _rules_by_user(self) -> dict[str, tuple[TopicRule, ...]]:
        by_user = {self.server.username: server_rules()}
        for device_id, identity in self.devices.items():
            by_user[identity.username] = device_rules(device_id)
        return by_user

    def allows(self, username: str | None, access: Access, topic_or_filter: str) -> bool:
        """Whether `username` may publish on a topic (write) or subscribe to a filter / receive a topic (read)."""
        if username is None:
            return False
        if not self.restricts_topics:
            return username == self.server.username
        rules = self._rules_by_user.get(username, ())
        return any(rule.access == access and filter_covers(rule.topic_filter, topic_or_filter) for rule in rules)


def server_rules() -> tuple[TopicRule, ...]:
    """The server publishes manifests, the run config, every update and report requests; it reads every device topic."""
    writes = (ANY_RUN.manifest, ANY_RUN.config, ANY_RUN.update_chunks, ANY_RUN.device("+", "manifest"),
              ANY_RUN.device_update_chunks("+"), ANY_RUN.report_request)
    return (*(TopicRule("write", topic) for topic in writes), TopicRule("read", ANY_RUN.prefix + "device/#"))


def device_rules(device_id: str) -> tuple[TopicRule, ...]:
    """A device publishes only its own hello, status, report and nack; it reads the broadcasts (report requests
    too) and its own updates."""
    reads = (ANY_RUN.manifest, ANY_RUN.config, ANY_RUN.update_chunks, ANY_RUN.device(device_id, "manifest"),
             ANY_RUN.device_update_chunks(device_id), ANY_RUN.report_request)
    return (*(TopicRule("write", ANY_RUN.device(device_id, kind)) for kind in DEVICE_PUBLISHES),
            *(TopicRule("read", topic) for topic in reads))


def filter_covers(allowed: str, requested: str) -> bool:
    """Whether every topic matching `requested` (a topic, or a subscription filter) also matches `allowed`.

    `+` in `allowed` stands for any one level (also a `+` in `requested`); `#` as its last level for the
    rest, including nothing more; a wildcard in `requested` is covered only by a wildcard.
    """
    allowed_levels, requested_levels = allowed.split("/"), requested.split("/")
    for index, level in enumerate(allowed_levels):
        if level == "#" and index == len(allowed_levels) - 1:
            return True
        if index >= len(requested_levels):
            return False
        wanted = requested_levels[index]
        if wanted == "#" or (level != "+" and level != wanted):
            return False
    return len(requested_levels) == len(allowed_levels)


def check_username(username: str, where: str) -> str | None:
    """Why `username` cannot be written to Mosquitto's password and ACL files, or None when it can."""
    if not USERNAME_PATTERN.fullmatch(username):
        return (f"{where}: username {username!r} must be 1-64 letters, digits, '.', '_', '@' or '-' "
                "(starting with a letter or digit)")
    return None


def mosquitto_password_hash(password: str, salt: bytes, iterations: int = MOSQUITTO_PBKDF2_ITERATIONS) -> str:
    """Mosquitto 2's `$7$` hash: PBKDF2-HMAC-SHA512 of the password with the salt, as mosquitto_passwd writes it."""
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations, 64)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def mosquitto_password_file(access: BrokerAccess, salts: Mapping[str, bytes]) -> str:
    """A Mosquitto `password_file`: one `username:hash` line per identity (`salts` by username)."""
    return "".join(f"{identity.username}:{mosquitto_password_hash(identity.password, salts[identity.username])}\n"
                   for identity in access.identities())


def mosquitto_acl_file(access: BrokerAccess, source: str) -> str:
    """A Mosquitto `acl_file`: a `user` block per identity; nothing for anonymous clients."""
    lines = [f"# Topic rules of {source} (written by `testbed broker-config`).",
             "# Anonymous clients get no rule: they may neither publish nor subscribe.", ""]
    for username, rules in access.rules().items():
        lines.append(f"user {username}")
        lines.extend(f"topic {rule.access} {rule.topic_filter}" for rule in rules)
        lines.append("")
    return "\n".join(lines)


def mosquitto_conf_snippet(password_file: str, acl_file: str, source: str) -> str:
    """The mosquitto.conf lines that use the two files (the listeners, and TLS on them, are the broker's own)."""
    return (f"# Authentication and topic rules of {source} (written by `testbed broker-config`).\n"
            "# Include this file from mosquitto.conf, or copy the lines next to your listeners.\n"
            "per_listener_settings false\n"
            "allow_anonymous false\n"
            f"password_file {password_file}\n"
            f"acl_file {acl_file}\n")
