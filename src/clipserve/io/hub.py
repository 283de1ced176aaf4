"""Hugging Face Hub downloads, through `huggingface_hub` (its cache, HF_HUB_OFFLINE, HF_ENDPOINT, HF_TOKEN)."""

from __future__ import annotations

import functools
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

HF_HUB_PREFIX = "hf-hub:"


class HubError(RuntimeError):
    """A file that could not be fetched; the message names the repository, the file and why."""


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


@functools.cache
def _endpoint_reachable(endpoint: str) -> bool:
    """One quick TCP connect to the endpoint, so that an unreachable Hub costs seconds rather than the
    minute of retries huggingface_hub spends per file; from then on only the cache is used."""
    parts = urlsplit(endpoint)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "", port), timeout=3):
            return True
    except OSError:
        return False


def fetch(repo_id: str, filename: str, *, revision: str | None = None, required: bool = True) -> Path | None:
    """Path of `filename` in `repo_id`, downloaded into the huggingface_hub cache if not there yet.

    Returns None for a file the repository does not have when `required` is False.
    """
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            GatedRepoError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise HubError(f"huggingface_hub is required to download {repo_id}: {exc}") from None
    try:
        from huggingface_hub import constants

        local_only = not _offline() and not _endpoint_reachable(constants.ENDPOINT)
        return Path(hf_hub_download(repo_id, filename, revision=revision, local_files_only=local_only))
    except LocalEntryNotFoundError:
        # Offline (or unreachable) and not cached. For an optional file we cannot tell whether the
        # repository has it, so the caller decides (fetch_first reports all candidates at the end).
        if not required:
            return None
        raise HubError(_not_cached(repo_id, filename)) from None
    except EntryNotFoundError:
        if required:
            raise HubError(f"{repo_id} has no file {filename}") from None
        return None
    except GatedRepoError:
        raise HubError(f"{repo_id} is gated: accept its terms on the Hub and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise HubError(f"no Hub repository {repo_id} (or it is private: set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise HubError(f"{repo_id} has no revision {revision}") from None
    except OSError as exc:
        raise HubError(f"cannot get {filename} from {repo_id}: {exc}") from None


def _not_cached(repo_id: str, filename: str) -> str:
    why = "HF_HUB_OFFLINE is set" if _offline() else "the Hub cannot be reached"
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
    return f"cannot get {filename} from {repo_id}: {why} and it is not in the Hugging Face cache ({cache})"


def fetch_first(repo_id: str, filenames: tuple[str, ...], *, revision: str | None = None) -> Path:
    """The first of `filenames` the repository has (open_clip's safetensors-before-pickle preference)."""
    for name in filenames:
        path = fetch(repo_id, name, revision=revision, required=False)
        if path is not None:
            return path
    # Either the repository has none of them, or we could not ask: say which.
    try:
        fetch(repo_id, filenames[-1], revision=revision, required=True)
    except HubError as exc:
        raise HubError(str(exc).replace(filenames[-1], " or ".join(filenames), 1)) from None
    raise HubError(f"{repo_id} has none of: {', '.join(filenames)}")


@dataclass(frozen=True)
class HubRepo:
    repo_id: str
    revision: str | None = None

    @classmethod
    def parse(cls, source: str) -> HubRepo:
        """`hf-hub:ORG/REPO[@REVISION]`."""
        spec = source[len(HF_HUB_PREFIX) :] if source.startswith(HF_HUB_PREFIX) else source
        spec = spec.strip("/")
        repo, _, revision = spec.partition("@")
        if repo.count("/") != 1 or not all(repo.split("/")):
            raise HubError(f"{source!r}: expected hf-hub:ORG/REPO")
        return cls(repo, revision or None)
