"""Shared fixtures: tiny HF model directories are made once per test session."""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Eight fake CPU devices for mesh tests; single-device work still runs on cpu:0 at full speed.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import logging  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from jtinker import hostmem  # noqa: E402
from jtinker.models import make_tiny  # noqa: E402

FAMILIES = ("llama", "qwen2", "qwen3")

# The SDK's session heartbeats warn for every client whose server a test killed on purpose (restart
# tests), from background threads that outlive pytest's captured streams: errors still show.
logging.getLogger("tinker.lib.internal_client_holder").setLevel(logging.ERROR)


@pytest.fixture(autouse=True)
def _within_the_map_limit():
    """A worker runs hundreds of tests, each compiling programs of its own: dropped between tests at
    half the memory-map limit, they never reach the engine's own (3/4), which fires mid-test."""
    yield
    hostmem.release_programs_near_map_limit(fraction=0.5, interval=0)


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """``make(family, **config_overrides) -> Path``, cached per distinct arguments."""
    cache: dict = {}

    def make(family: str = "qwen3", size: str = "tiny", shards: int = 1, **overrides) -> Path:
        key = (family, size, shards, tuple(sorted(overrides.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"{family}_{size}")
            cache[key] = make_tiny(out, family=family, size=size, shards=shards, **overrides)
        return cache[key]

    return make


@pytest.fixture(scope="session", params=FAMILIES)
def tiny_model_dir(request, tiny_model_factory) -> Path:
    """One tiny model directory per family."""
    return tiny_model_factory(request.param)


@pytest.fixture(scope="session")
def qwen3_dir(tiny_model_factory) -> Path:
    return tiny_model_factory("qwen3")


@pytest.fixture
def service(tmp_path, monkeypatch):
    """An in-process ``jtinker.ServiceClient`` with a private ``JTINKER_HOME`` (its default store,
    which ``jtinker export`` and a bare ``RestClient()`` read too)."""
    import jtinker

    monkeypatch.setenv("JTINKER_HOME", str(tmp_path / "home"))
    return jtinker.ServiceClient()
