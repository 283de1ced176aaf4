"""The OpenAI-compatible HTTP server (`clipserve serve`)."""

from clipserve.api.app import create_app
from clipserve.api.settings import AuthSettings, KeyLimits, Limits, ModelSpec, ServerSettings

__all__ = ["AuthSettings", "KeyLimits", "Limits", "ModelSpec", "ServerSettings", "create_app"]
