"""Hypothesis profiles: 'ci' (default, fast) and 'soak' (long: HYPOTHESIS_PROFILE=soak)."""
import os
import sys

from hypothesis import HealthCheck, settings

# reference.py lives next to the tests (pytest runs with --import-mode=importlib)
sys.path.insert(0, os.path.dirname(__file__))

settings.register_profile(
    "ci", max_examples=40, deadline=None, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev", max_examples=100, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "soak", max_examples=5000, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


import pytest  # noqa: E402


@pytest.fixture
def tiny_grain(monkeypatch):
    """Let every call use all threads, however small, so that tests on small shapes still run
    the parallel code paths (fastconv normally runs small calls on one thread)."""
    import fastconv.functional

    monkeypatch.setattr(fastconv.functional, "_GRAIN", 1)


@pytest.fixture
def restore_threads():
    """Put fastconv's thread count back after a test that sets it."""
    import fastconv

    old = fastconv.get_num_threads()
    yield
    fastconv.set_num_threads(old)
