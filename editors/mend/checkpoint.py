"""Checkpoints of a trained editor network: safetensors (tensors) + JSON (everything else);
loading never unpickles. The cache key names exactly what training produced a network from."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from safetensors.torch import load_file, save_file

from bench.core.errors import BenchError
from editors.mend.networks import EditorNetwork

CHECKPOINT_FORMAT = "instructedit-bench/meta-editor/v1"


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


def load_checkpoint(stem: Path, network: EditorNetwork) -> dict:
    """Fill `network` from `<stem>.safetensors`; return the JSON meta. No pickle involved."""
    stem = Path(stem)
    st_path, js_path = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    if not st_path.is_file() or not js_path.is_file():
        raise BenchError(f"checkpoint not found: {st_path} and {js_path} are both needed")
    meta = json.loads(js_path.read_text())
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise BenchError(f"{js_path}: not a {CHECKPOINT_FORMAT} checkpoint")
    tensors = load_file(str(st_path))
    own = network.state_dict()
    if set(tensors) != set(own) or any(tensors[k].shape != own[k].shape for k in own):
        raise BenchError(f"checkpoint {st_path} does not fit this model / these hyperparameters "
                         "(different edited weights or network shape)")
    device = network.edit_lrs.device
    network.load_state_dict({k: v.to(device) for k, v in tensors.items()})
    return meta
