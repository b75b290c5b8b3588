"""Shared fixtures: an isolated cache, a tiny checkpoint on disk, single-threaded torch.

Unit tests never read the user's cache or $BENCH_DATA: every test except those marked
`integration` gets BENCH_CACHE pointed at a per-session temporary directory and BENCH_DATA unset.
No test touches a hub: the whole session (and every `bench` subprocess it starts) runs offline
($HF_HUB_OFFLINE, $HF_DATASETS_OFFLINE) with empty Hugging Face caches of its own, so a task's
published data is never fetched nor found in the user's cache.
"""

from __future__ import annotations

import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench-cache")


@pytest.fixture(scope="session", autouse=True)
def hf_home(tmp_path_factory) -> Path:
    """Offline, with empty hub and `datasets` caches. The libraries read these variables at
    import (collection may have imported them already), so their copies are patched too."""
    home = tmp_path_factory.mktemp("hf-home")
    with pytest.MonkeyPatch.context() as mp:
        for name, value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("HF_HOME", home),
                            ("HF_HUB_CACHE", home / "hub"), ("HF_DATASETS_CACHE", home / "datasets")):
            mp.setenv(name, str(value))
        mp.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(home / "hub"))
        if "datasets.config" in sys.modules:
            config = sys.modules["datasets.config"]
            mp.setattr(config, "HF_DATASETS_CACHE", home / "datasets")
            mp.setattr(config, "DOWNLOADED_DATASETS_PATH", home / "datasets" / "downloads")
        yield home


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
