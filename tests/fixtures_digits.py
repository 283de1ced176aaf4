"""A CLIP trained on scikit-learn's digits, for tests that need a model that really does something.

Trained once per recipe and kept under `$CLIPSERVE_CACHE` (default `~/.cache/clipserve`), keyed by a hash of
the recipe (see `clipserve.train.digits.cached_digits_model`); enabled for every test by
`pytest_plugins = ["fixtures_digits"]` in conftest.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def digits_checkpoint() -> Path:
    """Directory of the trained digits checkpoint (open_clip layout), with `digits_metrics.json` beside it."""
    from clipserve.train.digits import cached_digits_model

    return cached_digits_model()


@pytest.fixture(scope="session")
def digits_model(digits_checkpoint: Path):
    import clipserve

    return clipserve.load(str(digits_checkpoint), precision="fp32")
