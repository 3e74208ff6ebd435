"""Fixtures shared by the fault tests."""

from __future__ import annotations

import pytest

import procpool

from .helpers import START_METHODS


@pytest.fixture(params=START_METHODS)
def pool(request, leak_check):
    """A 2-worker pool for each start method, terminated afterwards; nothing may leak."""
    p = procpool.Pool(2, start_method=request.param)
    try:
        yield p
    finally:
        p.terminate()
        p.join(10)
