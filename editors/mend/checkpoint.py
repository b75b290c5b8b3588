"""Checkpoints of a trained editor network: safetensors (tensors) + JSON (everything else);
loading never unpickles. The cache key names exactly what training produced a network from.

Training in progress keeps its state (networks, optimizer, RNGs, validation history, data order)
in one file beside the final checkpoint, `<stem>.partial.safetensors` (the JSON part rides in the
safetensors header), replaced atomically each time; it is removed once the final one is written."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from bench.core.debris import remove_stale_temporaries
from bench.core.errors import BenchError
from bench.core.io import read_json
from editors.mend.networks import EditorNetwork

CHECKPOINT_FORMAT = "instructedit-bench/meta-editor/v1"
TRAINING_FORMAT = "instructedit-bench/meta-editor-training/v1"


def cache_key(identity: str, editor: str, hparams: dict, tasks: list[str], seed: int,
              data_hashes: dict | None = None) -> str:
    blob = json.dumps({"format": CHECKPOINT_FORMAT, "model": identity, "editor": editor,
                       "hparams": hparams, "tasks": sorted(tasks), "seed": seed,
                       "data": data_hashes or {}}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def save_checkpoint(stem: Path, network: EditorNetwork, meta: dict) -> tuple[Path, Path]:
    """`<stem>.safetensors` (tensors) and `<stem>.json` (meta); written atomically."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(stem.parent)  # what killed processes left (their .<pid>.tmp files)
    tensors = {k: v.detach().contiguous().cpu() for k, v in network.state_dict().items()}
    meta = dict(meta, format=CHECKPOINT_FORMAT, tensor_names=sorted(tensors))
    st_path, js_path = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    tmp_st = st_path.with_name(f"{st_path.name}.{os.getpid()}.tmp")
    tmp_js = js_path.with_name(f"{js_path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp_st), metadata={"format": CHECKPOINT_FORMAT})
    tmp_js.write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
    os.replace(tmp_st, st_path)
    os.replace(tmp_js, js_path)
    return st_path, js_path


def read_meta(stem: Path) -> dict:
    """The JSON meta of the checkpoint `stem`, checked without loading its tensors: both files
    present, the meta a JSON object of this format, the tensor file a readable safetensors file
    holding the tensors the meta names. BenchError (one line) otherwise: a truncated or foreign
    file is refused before any model loads."""
    stem = Path(stem)
    st_path, js_path = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    if not st_path.is_file() or not js_path.is_file():
        raise BenchError(f"checkpoint not found: {st_path} and {js_path} are both needed")
    meta = read_json(js_path, "checkpoint meta")
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise BenchError(f"{js_path}: not a {CHECKPOINT_FORMAT} checkpoint")
    if not isinstance(meta.get("hparams", {}), dict):
        raise BenchError(f"{js_path}: `hparams` is not a mapping; not a {CHECKPOINT_FORMAT} checkpoint")
    try:
        with safe_open(str(st_path), framework="pt") as f:
            names = sorted(f.keys())
    except (SafetensorError, OSError, ValueError) as exc:
        raise BenchError(f"{st_path} is not a readable safetensors file "
                         f"({' '.join(str(exc).split())[:200]})") from None
    named = meta.get("tensor_names")
    if isinstance(named, list) and sorted(map(str, named)) != names:
        raise BenchError(f"{st_path} does not hold the tensors its meta {js_path.name} names "
                         "(files of two different checkpoints?)")
    return meta


def load_checkpoint(stem: Path, network: EditorNetwork) -> dict:
    """Fill `network` from `<stem>.safetensors`; return the JSON meta. No pickle involved."""
    stem = Path(stem)
    st_path = stem.with_suffix(".safetensors")
    meta = read_meta(stem)
    try:
        tensors = load_file(str(st_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise BenchError(f"{st_path} is not a readable safetensors file "
                         f"({' '.join(str(exc).split())[:200]})") from None
    own = network.state_dict()
    if set(tensors) != set(own) or any(tensors[k].shape != own[k].shape for k in own):
        raise BenchError(f"checkpoint {st_path} does not fit this model / these hyperparameters "
                         "(different edited weights or network shape)")
    device = network.edit_lrs.device
    network.load_state_dict({k: v.to(device) for k, v in tensors.items()})
    return meta


def partial_path(stem: Path) -> Path:
    """The training state of the checkpoint `stem` while it is being trained (same cache key)."""
    stem = Path(stem)
    return stem.with_name(f"{stem.name}.partial.safetensors")


def save_training_state(path: Path, tensors: dict, state: dict) -> Path:
    """`tensors` and the JSON-able `state` in one safetensors file, written to a temporary file,
    flushed to disk and renamed over `path`: a kill at any moment leaves the previous state."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                  metadata={"format": TRAINING_FORMAT, "state": json.dumps(state)})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # Ctrl-C or a full disk mid-write: the previous state stays, no debris
        tmp.unlink(missing_ok=True)
        raise
    return path


def load_training_state(path: Path) -> tuple[dict, dict]:
    """(tensors, state) from a file written by save_training_state. No pickle involved."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != TRAINING_FORMAT or "state" not in meta:
        raise BenchError(f"{path}: not a {TRAINING_FORMAT} file")
    return load_file(str(path)), json.loads(meta["state"])
