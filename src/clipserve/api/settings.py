"""`ServerSettings`: everything `create_app` needs, as dataclasses validated where they are built."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from clipserve.engine.batching import BatchSettings
from clipserve.engine.loading import BACKENDS, PRECISION_CHOICES
from clipserve.io.fetch import FetchPolicy
from clipserve.io.images import ImageLimits
from clipserve.registry import DEFAULT_MODEL

_ALIAS = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")


@dataclass(frozen=True)
class ModelSpec:
    """A model to serve: what `clipserve.load` accepts, and the name clients use for it."""

    source: str
    alias: str | None = None

    def __post_init__(self) -> None:
        if not self.source.strip():
            raise ValueError("empty model name")
        if self.alias is not None and not _ALIAS.match(self.alias):
            raise ValueError(f"bad model alias {self.alias!r}: letters, digits and ._:/- only, at most 128")

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        """`NAME` or `NAME=ALIAS` (split at the last `=`)."""
        source, sep, alias = text.rpartition("=")
        return cls(source, alias) if sep else cls(text)


@dataclass(frozen=True)
class ProbeSpec:
    """A linear probe directory (`clipserve probe` output) served as a fixed-class classifier.

    It is attached to the served model it was trained on (`probe.json`'s model, matched by alias or source),
    or to the only model when one is served; clients name it in `/v1/classifications` as `classifier`.
    """

    path: Path
    name: str | None = None

    def __post_init__(self) -> None:
        if self.name is not None and not _ALIAS.match(self.name):
            raise ValueError(f"bad classifier name {self.name!r}: letters, digits and ._:/- only, at most 128")

    @property
    def key(self) -> str:
        return self.name or self.path.name

    @classmethod
    def parse(cls, text: str) -> ProbeSpec:
        """`DIR` or `DIR=NAME` (split at the last `=`)."""
        path, sep, name = text.rpartition("=")
        return cls(Path(path), name) if sep else cls(Path(text))


@dataclass(frozen=True)
class Limits:
    """Per-request caps; anything above them is refused with 413 (sizes) or 400 (counts)."""

    max_body_bytes: int = 64 * 2**20
    max_items: int = 256
    max_image_bytes: int = 16 * 2**20
    max_image_pixels: int = 40_000_000
    max_labels: int = 1000
    max_templates: int = 100
    request_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_items", "max_image_bytes", "max_image_pixels", "max_labels",
                     "max_templates"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.request_timeout_s <= 0:
            raise ValueError(f"request timeout must be positive, got {self.request_timeout_s}")

    @property
    def image_limits(self) -> ImageLimits:
        return ImageLimits(max_bytes=self.max_image_bytes, max_pixels=self.max_image_pixels)


@dataclass(frozen=True)
class KeyLimits:
    """Per API key: requests per minute and daily (UTC) quotas; None = unlimited."""

    rate_limit_rpm: int | None = None
    quota_images: int | None = None
    quota_tokens: int | None = None

    def __post_init__(self) -> None:
        for name in ("rate_limit_rpm", "quota_images", "quota_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or unset, got {value}")


@dataclass(frozen=True)
class AuthSettings:
    """Who may call the server.

    Keys created through the admin API live hashed in SQLite under the state directory; `api_keys` are
    static keys given on the command line (held only as hashes in memory too). `no_auth` opens every
    inference route (logged as a warning). The admin key is distinct from every API key.
    """

    api_keys: tuple[str, ...] = ()
    admin_key: str | None = None
    no_auth: bool = False
    default_limits: KeyLimits = KeyLimits()

    def __post_init__(self) -> None:
        if self.no_auth and self.api_keys:
            raise ValueError("--no-auth and --api-key contradict each other")
        for key in (*self.api_keys, *([self.admin_key] if self.admin_key else [])):
            if len(key) < 16:
                raise ValueError("API and admin keys must have at least 16 characters")
        if self.admin_key is not None and self.admin_key in self.api_keys:
            raise ValueError("the admin key must differ from every API key")


@dataclass(frozen=True)
class ServerSettings:
    models: tuple[ModelSpec, ...] = (ModelSpec(DEFAULT_MODEL),)
    probes: tuple[ProbeSpec, ...] = ()
    host: str = "127.0.0.1"
    port: int = 8000
    state_dir: Path = Path(".clipserve")
    device: str = "auto"
    precision: str = "auto"
    backend: str = "torch"
    compile: bool = False
    auth: AuthSettings = AuthSettings()
    limits: Limits = Limits()
    batching: BatchSettings = BatchSettings()
    fetch: FetchPolicy = FetchPolicy()
    preprocess_workers: int = 4
    graceful_shutdown_s: float = 30.0

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be 0..65535, got {self.port}")
        if self.precision not in PRECISION_CHOICES:
            raise ValueError(f"unknown precision {self.precision!r}; choose from {', '.join(PRECISION_CHOICES)}")
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; choose from {', '.join(BACKENDS)}")
        if self.preprocess_workers < 1:
            raise ValueError(f"preprocess workers must be >= 1, got {self.preprocess_workers}")
        aliases = [m.alias for m in self.models if m.alias]
        if len(set(aliases)) != len(aliases):
            raise ValueError(f"duplicate model aliases: {aliases}")
