"""Published copies of a task's files (card `source.remote`): finding them in the cache, fetching
them, and checking them against the sha256 the card pins.

* hub sources (a dataset repository at a pinned commit) go through huggingface_hub's
  `hf_hub_download` into the usual hub cache ($HF_HUB_CACHE, default ~/.cache/huggingface/hub),
  which is what `datasets` itself does with hf:// files; because the revision is a commit, a
  cached file is found with no network access at all.
* url sources go through `datasets`' download cache ($HF_DATASETS_CACHE/downloads), keyed by the
  URL alone: the sha256 pin, not a server's ETag, says whether the content is right.

Offline ($HF_HUB_OFFLINE, $HF_DATASETS_OFFLINE or $TRANSFORMERS_OFFLINE set) nothing is
downloaded. Online, each hub download is preceded by one request with a short timeout
(HUB_TIMEOUT_S, no retry): a hub that does not answer is one error line, once per process (later
files fail at once), instead of huggingface_hub's five retries with back-off for every file.
Files are read by the harness's own reader (tasks.loaders), whatever their origin, so a record is
a case or a counted skip the same way from a data directory or a cache.
"""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import errors as hub_errors
from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url, try_to_load_from_cache

from bench.core.errors import BenchError
from bench.core.io import file_sha256
from tasks.card import Remote, TaskCard

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
_TRUE = {"1", "ON", "YES", "TRUE"}
# Set once the hub could not be reached in this process: the next files fail at once instead of
# asking again.
_hub_unreachable = False
# How long the one request that checks whether the hub answers may wait (seconds). Without it,
# huggingface_hub retries an unanswered request five times with back-off for every file.
HUB_TIMEOUT_S = 10.0


def offline() -> str | None:
    """The variable that puts the hub offline, or None. Read at every call: tests and launchers
    set it after huggingface_hub has read its own copy at import."""
    for name in OFFLINE_VARIABLES:
        if os.environ.get(name, "").strip().upper() in _TRUE:
            return name
    return None


def _url_cache_path(url: str) -> Path:
    # late: importing datasets costs about 0.5 s, and only url sources need it
    from datasets import config
    from datasets.utils.file_utils import hash_url_to_filename  # late: as above
    return Path(config.DOWNLOADED_DATASETS_PATH) / hash_url_to_filename(url)


def cached(remote: Remote, key: str) -> Path | None:
    """The cached copy of file `key` of `remote`, found without any network access; None if
    it was never fetched."""
    if remote.kind == "hub":
        found = try_to_load_from_cache(remote.location, remote.files[key], revision=remote.revision,
                                       repo_type="dataset")
        return Path(found) if isinstance(found, str) and os.path.isfile(found) else None
    path = _url_cache_path(remote.address(key))
    return path if path.is_file() else None


def cached_files(card: TaskCard) -> tuple[Remote, dict[str, Path]] | None:
    """The first of the card's remote sources whose every file is cached, with the paths."""
    for remote in card.remotes:
        paths = {key: cached(remote, key) for key in card.files}
        if all(paths.values()):
            return remote, paths
    return None


class DigestMismatch(BenchError):
    """A file whose sha256 differs from the card's pin: always an error, never skipped over."""


def verify(task: str, remote: Remote, key: str, path: Path) -> str:
    """The sha256 of `path`, the copy of `remote`'s file `key`; DigestMismatch when the card
    pins another digest (a corrupted or substituted file is never scored)."""
    digest = file_sha256(path)
    pinned = remote.sha256.get(key)
    if pinned is not None and digest != pinned:
        raise DigestMismatch(f"task {task!r}: {remote.address(key)} (at {path}) has sha256 {digest}, "
                             f"the card pins {pinned}: not the published file; download it again "
                             f"(bench data fetch --force {task}) or check the source and the pin")
    return digest


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def _download_hub(remote: Remote, key: str, force: bool) -> Path:
    global _hub_unreachable
    where = f"{remote.files[key]} of dataset {remote.location} at {remote.revision}"
    if _hub_unreachable:
        raise BenchError(f"cannot reach the Hugging Face hub to download {where} (it could not be "
                         f"reached earlier in this process)")
    # One request, no retry, HUB_TIMEOUT_S at most: a hub that does not answer is one line, once.
    url = hf_hub_url(remote.location, remote.files[key], revision=remote.revision, repo_type="dataset")
    try:
        get_hf_file_metadata(url, timeout=HUB_TIMEOUT_S, retry_on_errors=False)
    except hub_errors.HfHubHTTPError:
        pass  # the hub answered (a missing file, a gated repository): the download below says what
    except Exception as exc:  # noqa: BLE001 - no connection, a timeout, offline mode
        _hub_unreachable = True
        raise BenchError(f"cannot reach the Hugging Face hub to download {where}: no answer within "
                         f"{HUB_TIMEOUT_S:g} s ({_one_line(exc)}); HF_HUB_OFFLINE=1 skips the hub, "
                         "--data-dir names local data") from None
    try:
        return Path(hf_hub_download(remote.location, remote.files[key], revision=remote.revision,
                                    repo_type="dataset", force_download=force,
                                    etag_timeout=HUB_TIMEOUT_S))
    except hub_errors.LocalEntryNotFoundError:  # no connection; before EntryNotFoundError, its base
        _hub_unreachable = True
        raise BenchError(f"cannot reach the Hugging Face hub to download {where}") from None
    except hub_errors.EntryNotFoundError:
        raise BenchError(f"{where}: no such file in the repository") from None
    except hub_errors.RevisionNotFoundError:
        raise BenchError(f"dataset {remote.location} has no revision {remote.revision}") from None
    except hub_errors.RepositoryNotFoundError:  # also gated or private repositories
        raise BenchError(f"dataset {remote.location} not found on the hub (or not accessible)") from None
    except Exception as exc:  # noqa: BLE001 - network stacks raise many types; one line says which
        raise BenchError(f"cannot download {where}: {_one_line(exc)}") from None


def _download_url(remote: Remote, key: str, force: bool) -> Path:
    # late: importing datasets costs about 0.5 s, and only url sources need it
    from datasets import DownloadConfig
    from datasets.utils.file_utils import cached_path  # late: as above
    url = remote.address(key)
    config = DownloadConfig(use_etag=False, force_download=force, download_desc=remote.files[key])
    try:
        return Path(cached_path(url, download_config=config))
    except FileNotFoundError:  # fsspec says so of a missing file and of an unreachable host alike
        raise BenchError(f"cannot download {url}: not found, or the host cannot be reached") from None
    except Exception as exc:  # noqa: BLE001 - as above
        raise BenchError(f"cannot download {url}: {_one_line(exc)}") from None


def download(remote: Remote, key: str, force: bool = False) -> Path:
    """Download file `key` of `remote` into its cache (a progress bar on stderr) and return the
    cached path; BenchError (one line) when it cannot. The caller checks the digest."""
    return (_download_hub if remote.kind == "hub" else _download_url)(remote, key, force)


__all__ = ["OFFLINE_VARIABLES", "DigestMismatch", "offline", "cached", "cached_files", "verify",
           "download"]
