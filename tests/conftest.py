"""Fixtures shared by the suite: the backend parametrisation and a per-test RNG."""

import zlib

import numpy as np
import pytest

from oracle import BACKENDS


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture
def rng(request):
    # A seed per test (stable across runs and workers) so failures reproduce.
    seed = zlib.crc32(request.node.nodeid.encode())
    return np.random.default_rng(seed)
