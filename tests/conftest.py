"""Shared fixtures: an isolated cache, a tiny checkpoint on disk, single-threaded torch.

Unit tests never read the user's cache or $BENCH_DATA: every test except those marked
`integration` gets BENCH_CACHE pointed at a per-session temporary directory and BENCH_DATA unset.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench-cache")


@pytest.fixture(autouse=True)
def _isolated_env(request, monkeypatch, session_cache):
    if "integration" in request.keywords:
        yield
        return
    monkeypatch.setenv("BENCH_CACHE", str(session_cache))
    monkeypatch.delenv("BENCH_DATA", raising=False)
    yield


@pytest.fixture
def one_thread():
    """Tiny matmuls on a shared machine run far faster (and reproducibly) on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """tests.tiny's Llama (seed 0) saved as an ordinary transformers checkpoint directory."""
    from bench.core.tiny import tiny_model

    path = tmp_path_factory.mktemp("tiny-llama")
    lm = tiny_model("llama")
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def tiny_load(monkeypatch):
    """The run set-up loads a fresh tiny Llama (and its config), whatever the model spec; the
    calls are recorded."""
    import bench.session
    from bench.core.tiny import tiny_config, tiny_model

    calls = []

    def fake_load(spec="smollm2-135m", device="auto", dtype="auto"):
        calls.append((spec, device, dtype))
        return tiny_model("llama")

    monkeypatch.setattr(bench.session, "load_model", fake_load)
    monkeypatch.setattr(bench.session, "load_config", lambda spec="smollm2-135m": tiny_config("llama"))
    return calls
