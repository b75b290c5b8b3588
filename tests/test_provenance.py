"""What a run records of its code and machine: the git commit (and whether the tree was dirty)
and the peak memory."""

import shutil
import subprocess

import pytest

from bench.core.provenance import git_commit, peak_memory, peak_rss_mb


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_git_commit_of_a_checkout_and_of_a_plain_folder(tmp_path):
    assert git_commit(tmp_path) == {"git_commit": None}  # not a work tree: no commit, no error
    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)
    git("init", "-q")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "x")
    sha = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True,
                         text=True, check=True).stdout.strip()
    (tmp_path / "f.py").write_text("a = 1\n")
    git("add", "f.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "y")
    head = git_commit(tmp_path)
    assert head["git_dirty"] is False and head["git_commit"] != sha and len(head["git_commit"]) == 40
    (tmp_path / "f.py").write_text("a = 2\n")  # an uncommitted change: the commit alone does not reproduce it
    assert git_commit(tmp_path)["git_dirty"] is True


def test_peak_memory_on_cpu_is_the_peak_resident_set():
    before = peak_rss_mb()
    block = bytearray(64 << 20)  # touch 64 MB: the peak can only grow
    block[::4096] = b"x" * len(block[::4096])
    m = peak_memory("cpu")
    # the peak never falls and covers what this process holds now (64 MB and more)
    assert m["peak_mb"] == m["peak_rss_mb"] >= max(before, 64) and "peak_gpu_mb" not in m
    del block
