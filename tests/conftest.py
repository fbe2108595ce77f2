"""pytest fixtures shared by the tests (helpers live in tfa_helpers.py)."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tf_fastattn import _loader  # noqa: E402


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(scope="session", autouse=True)
def _ops_must_load_in_ci():
    # In CI a missing op library is a build failure, not a reason to skip.
    if os.environ.get("CI") and _loader.unavailable_reason() is not None:
        pytest.fail(f"op library did not load in CI: {_loader.unavailable_reason()}")
    if os.environ.get("CI") and _loader.xla_reason() is not None:
        pytest.fail(f"the ops' XLA kernels did not load in CI: {_loader.xla_reason()}")
    yield
