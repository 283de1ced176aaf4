"""clipserve: OpenCLIP models as a library, a command line and an OpenAI-compatible HTTP API."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from clipserve.engine.loading import load
    from clipserve.engine.model import Model, ModelInfo

__all__ = ["Model", "ModelInfo", "__version__", "load"]


def __getattr__(name: str) -> Any:
    # Imported lazily so that `clipserve.config` or the CLI's --help do not pay for torch and the engine.
    if name == "load":
        from clipserve.engine.loading import load

        return load
    if name in ("Model", "ModelInfo"):
        from clipserve.engine import model

        return getattr(model, name)
    raise AttributeError(f"module 'clipserve' has no attribute {name!r}")
