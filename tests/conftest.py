"""Test-wide setup: 8 simulated CPU devices (for the sharding tests) and hypothesis profiles.

XLA reads XLA_FLAGS once, when jax initialises its backend, so it must be set before anything imports jax.
"""
import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One compilation cache for the session, shared with the CLI, example and benchmark subprocesses the tests start
# (they inherit these variables): a program that several of them compile is compiled once. Fresh per session, so
# no result depends on an earlier run.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="jaxprune-tests-xla-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                          derandomize=True)
settings.register_profile("dev", max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
  """Files that hold a test marked ``slow`` run first.

  Under ``--dist loadfile --no-loadscope-reorder`` xdist hands out files in this order: a long file started last
  holds one worker while the others idle (xdist's own reorder, by test count, put the one-test benchmark files
  last). The order of the tests inside a file is kept.
  """
  del config
  slow = {item.path for item in items if item.get_closest_marker("slow")}
  items.sort(key=lambda item: item.path not in slow)
