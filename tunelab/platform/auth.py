"""API keys, roles and projects.

A key reads ``tlk-<id>-<secret>``. It is shown once, when created; the catalog keeps its id, role,
project, a random salt and the scrypt hash of the secret (hashlib.scrypt, RFC 7914), so a copy of
tunelab.db does not give the keys away. A request names its key in ``Authorization: Bearer``
(what the openai client and boto3's bearer-token auth send) or ``x-api-key``.

Roles (what each may do; every resource belongs to the key's project, and another project's ids
answer 404, as if they did not exist):

| role | may |
|---|---|
| admin | everything, plus keys and the audit log |
| trainer | files, jobs (training, data, evaluation, export), chat with models |
| labeler | human feedback only (judgments and labels) |
| viewer | read files, jobs, events, checkpoints and models, chat with models |

With no key in the catalog the server is open (every request acts as an admin of project
``default``), which ``tunelab server`` allows on a loopback address only.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from dataclasses import dataclass

from tunelab.errors import TunelabError
from tunelab.platform.store import Store

ROLES = ("admin", "trainer", "labeler", "viewer")
PERMISSIONS: dict[str, set[str]] = {
    "admin": {"read", "write", "infer", "feedback", "admin"},
    "trainer": {"read", "write", "infer"},
    "labeler": {"feedback"},
    "viewer": {"read", "infer"},
}
PROJECT_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_SCRYPT = dict(n=2 ** 14, r=8, p=1, dklen=32)
KEY_RE = re.compile(r"^tlk-([0-9a-f]{12})-([A-Za-z0-9_-]{20,100})$")


@dataclass(frozen=True)
class Principal:
    key_id: str | None  # None: the open server (no keys configured)
    role: str
    project: str

    def can(self, permission: str) -> bool:
        return permission in PERMISSIONS[self.role]


OPEN = Principal(None, "admin", "default")


def _hash(secret: str, salt: str) -> str:
    return hashlib.scrypt(secret.encode(), salt=bytes.fromhex(salt), **_SCRYPT).hex()


def create_key(store: Store, role: str, project: str = "default", name: str | None = None) -> tuple[str, str]:
    """Make a key; returns (key id, the full key). The full key is not stored and cannot be shown again."""
    if role not in ROLES:
        raise TunelabError(f"unknown role '{role}'; roles: {', '.join(ROLES)}")
    if not PROJECT_RE.match(project):
        raise TunelabError(f"project '{project}': use lowercase letters, digits, '-' and '_' (at most 63)")
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    salt = secrets.token_hex(16)
    store.add_key(id=key_id, name=name, role=role, project=project, salt=salt, hash=_hash(secret, salt))
    return key_id, f"tlk-{key_id}-{secret}"


class Authenticator:
    """Key → Principal. The scrypt check is cached by an HMAC of the key (never the key itself) for a
    minute; revocation is read from the catalog on every request, so it takes effect at once."""

    def __init__(self, store: Store):
        self.store = store
        self._pepper = secrets.token_bytes(32)
        self._ok: dict[bytes, float] = {}
        self._lock = threading.Lock()
        self._touched: dict[str, float] = {}

    def open_mode(self) -> bool:
        return self.store.active_keys() == 0

    def authenticate(self, key: str | None) -> Principal | None:
        """The principal for a key, OPEN when no key is configured, None when the key is missing or wrong."""
        if self.open_mode():  # no keys configured (loopback only): any or no key acts as the open server's admin
            return OPEN
        if not key:
            return None
        m = KEY_RE.match(key.strip())
        if not m:
            return None
        row = self.store.get_key(m.group(1))
        if row is None or row["revoked_at"] is not None:
            return None
        tag = hmac.new(self._pepper, key.encode(), "sha256").digest()
        now = time.time()
        with self._lock:
            fresh = self._ok.get(tag, 0) > now
        if not fresh:
            if not hmac.compare_digest(_hash(m.group(2), row["salt"]), row["hash"]):
                return None
            with self._lock:
                self._ok[tag] = now + 60
        if now - self._touched.get(row["id"], 0) > 30:  # last_used_at, at most twice a minute per key
            self._touched[row["id"]] = now
            self.store.touch_key(row["id"])
        return Principal(row["id"], row["role"], row["project"])


SESSION_COOKIE = "tunelab_key"  # the console keeps the signed-in key here (HttpOnly, SameSite=Strict)


def same_origin(headers) -> bool:
    """A browser request sent by a page of this server: Origin (or, without one, Referer) names this host, or the
    browser says so in Sec-Fetch-Site. Requests authenticated by the session cookie must pass this to change
    anything (a second line behind SameSite=Strict against cross-site request forgery)."""
    from urllib.parse import urlsplit

    site = headers.get("sec-fetch-site")
    if site is not None:
        return site in ("same-origin", "none")
    origin = headers.get("origin") or headers.get("referer")
    host = headers.get("host")
    return bool(origin and host and urlsplit(origin).netloc == host)


def key_from_headers(headers) -> str | None:
    auth = headers.get("authorization") or ""
    if auth.lower().startswith("bearer "):
        return auth[7:].strip() or None
    return headers.get("x-api-key") or None
