"""API keys (hashed at rest in SQLite), per-key rate limits, daily quotas and usage records.

Key format: ``cs-<key_id>-<secret>``. The key id (12 hex digits) is public, it names the key in listings
and usage; the secret is 256 random bits. The database stores, per key, a random 16-byte salt and
``sha256(salt || secret)``: never the key itself. Checking a key looks the id up and compares digests in
constant time. Static keys given on the command line and the admin key are held as digests in memory.

Rate limits are token buckets (capacity = requests per minute, refilled continuously). Quotas count images
and tokens per UTC day; a request is refused (429) when its own cost would exceed what is left, with
``Retry-After`` pointing at the next UTC midnight.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import math
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from clipserve.api.settings import KeyLimits

DB_FILE = "clipserve.sqlite3"
KEY_PREFIX = "cs"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    key_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    salt BLOB NOT NULL,
    digest BLOB NOT NULL,
    created REAL NOT NULL,
    revoked REAL,
    rate_limit_rpm INTEGER,
    quota_images INTEGER,
    quota_tokens INTEGER
);
CREATE TABLE IF NOT EXISTS usage (
    key_id TEXT NOT NULL,
    day TEXT NOT NULL,
    requests INTEGER NOT NULL DEFAULT 0,
    images INTEGER NOT NULL DEFAULT 0,
    tokens INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (key_id, day)
);
"""


def _digest(salt: bytes, secret: str) -> bytes:
    return hashlib.sha256(salt + secret.encode("utf-8")).digest()


def utc_day(now: float | None = None) -> str:
    return dt.datetime.fromtimestamp(time.time() if now is None else now, dt.timezone.utc).date().isoformat()


def seconds_to_next_utc_day(now: float | None = None) -> int:
    now = time.time() if now is None else now
    return max(1, math.ceil(86400 - now % 86400))


@dataclass(frozen=True)
class Caller:
    """Who is calling: a key id (or "static", "admin", "anonymous") and that key's limits."""

    key_id: str
    limits: KeyLimits
    admin: bool = False


@dataclass(frozen=True)
class KeyRecord:
    key_id: str
    name: str
    created: float
    revoked: float | None
    limits: KeyLimits


@dataclass(frozen=True)
class UsageRecord:
    key_id: str
    day: str
    requests: int
    images: int
    tokens: int


class KeyStore:
    """The SQLite database of API keys and usage; safe to use from several threads."""

    def __init__(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self.path = state_dir / DB_FILE
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def create(self, name: str, limits: KeyLimits = KeyLimits()) -> tuple[KeyRecord, str]:
        """A new key; the plain key is returned here once and stored nowhere."""
        key_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(32)
        salt = secrets.token_bytes(16)
        created = time.time()
        with self._lock:
            self._db.execute(
                "INSERT INTO api_keys (key_id, name, salt, digest, created, rate_limit_rpm, quota_images, "
                "quota_tokens) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (key_id, name, salt, _digest(salt, secret), created, limits.rate_limit_rpm, limits.quota_images,
                 limits.quota_tokens),
            )
        return KeyRecord(key_id, name, created, None, limits), f"{KEY_PREFIX}-{key_id}-{secret}"

    def verify(self, key: str) -> KeyRecord | None:
        """The record of a valid, unrevoked key, else None."""
        prefix, _, rest = key.partition("-")
        key_id, _, secret = rest.partition("-")
        if prefix != KEY_PREFIX or not key_id or not secret:
            return None
        with self._lock:
            row = self._db.execute(
                "SELECT key_id, name, created, revoked, rate_limit_rpm, quota_images, quota_tokens, salt, digest "
                "FROM api_keys WHERE key_id = ?",
                (key_id,),
            ).fetchone()
        if row is None or row[3] is not None:
            return None
        if not hmac.compare_digest(_digest(row[7], secret), row[8]):
            return None
        return KeyRecord(row[0], row[1], row[2], row[3], KeyLimits(row[4], row[5], row[6]))

    def list(self) -> list[KeyRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT key_id, name, created, revoked, rate_limit_rpm, quota_images, quota_tokens "
                "FROM api_keys ORDER BY created"
            ).fetchall()
        return [KeyRecord(r[0], r[1], r[2], r[3], KeyLimits(r[4], r[5], r[6])) for r in rows]

    def revoke(self, key_id: str) -> bool:
        """True if an active key was revoked."""
        with self._lock:
            cursor = self._db.execute(
                "UPDATE api_keys SET revoked = ? WHERE key_id = ? AND revoked IS NULL", (time.time(), key_id)
            )
        return cursor.rowcount == 1

    def charge(self, key_id: str, limits: KeyLimits, images: int, tokens: int, day: str) -> str | None:
        """Add one request and its cost to the key's usage of `day`, atomically with the check against its
        daily quotas (concurrent requests, even from other processes on this database, cannot both take
        the last of a quota): None once added, else why it would exceed them, nothing added."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute(
                    "SELECT images, tokens FROM usage WHERE key_id = ? AND day = ?", (key_id, day)
                ).fetchone()
                refusal = quota_refusal(limits, *(row or (0, 0)), images, tokens)
                if refusal is None:
                    self._add_usage(key_id, day, 1, images, tokens)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return refusal

    def refund(self, key_id: str, images: int, tokens: int, day: str) -> None:
        """Take back a `charge` whose request failed before its model work was done."""
        with self._lock:
            self._add_usage(key_id, day, -1, -images, -tokens)

    def _add_usage(self, key_id: str, day: str, requests: int, images: int, tokens: int) -> None:
        self._db.execute(
            "INSERT INTO usage (key_id, day, requests, images, tokens) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (key_id, day) DO UPDATE SET requests = requests + excluded.requests, "
            "images = images + excluded.images, tokens = tokens + excluded.tokens",
            (key_id, day, requests, images, tokens),
        )

    def usage(self, key_id: str | None = None, day: str | None = None) -> list[UsageRecord]:
        query = "SELECT key_id, day, requests, images, tokens FROM usage"
        clauses, args = [], []
        if key_id is not None:
            clauses.append("key_id = ?")
            args.append(key_id)
        if day is not None:
            clauses.append("day = ?")
            args.append(day)
        if clauses:
            query += " WHERE " + " AND ".join(clauses)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY day, key_id", args).fetchall()
        return [UsageRecord(*r) for r in rows]


class StaticKeys:
    """Keys given on the command line, held as salted digests (the salt lives only in this process)."""

    def __init__(self, keys: tuple[str, ...]) -> None:
        self._salt = secrets.token_bytes(16)
        self._digests = [_digest(self._salt, k) for k in keys]

    def __contains__(self, key: str) -> bool:
        digest = _digest(self._salt, key)
        return any(hmac.compare_digest(digest, d) for d in self._digests)


class RateLimiter:
    """Token buckets per key: `rpm` requests per minute, bursts up to `rpm`."""

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def acquire(self, key_id: str, rpm: int, now: float | None = None) -> float:
        """0 if the request may go now (and is counted), else the seconds until it may."""
        now = time.monotonic() if now is None else now
        rate = rpm / 60.0
        with self._lock:
            tokens, last = self._buckets.get(key_id, (float(rpm), now))
            tokens = min(float(rpm), tokens + (now - last) * rate)
            if tokens >= 1.0:
                self._buckets[key_id] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key_id] = (tokens, now)
            return (1.0 - tokens) / rate


def quota_refusal(limits: KeyLimits, used_images: int, used_tokens: int, images: int, tokens: int) -> str | None:
    """Why a request of `images` and `tokens` would exceed daily quotas already used this much, or None."""
    if limits.quota_images is not None and used_images + images > limits.quota_images:
        return f"daily image quota exceeded: {used_images} used + {images} requested > {limits.quota_images}"
    if limits.quota_tokens is not None and used_tokens + tokens > limits.quota_tokens:
        return f"daily token quota exceeded: {used_tokens} used + {tokens} requested > {limits.quota_tokens}"
    return None
