"""Pure torch modules: no file, network or tokenizer I/O here."""

from clipserve.models.clip import CLIP

__all__ = ["CLIP"]
