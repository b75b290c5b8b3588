"""Model specs, devices, loading from a local directory, and the structural module map."""

from __future__ import annotations

import hashlib
import shutil

import pytest
import torch
from torch import nn

from bench.cli import main
from bench.core.errors import BenchError
from bench.core.layout import find_layout, is_transposed, output_logits, weight_out_in
from bench.core.models import embeddings_tied, load_model, resolve_device, resolve_dtype, resolve_model
from tests.helpers import finish, start_bench
from bench.core.tiny import ARCHS, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

# arch -> (blocks, qualified MLP output projection of block 0, its MLP-input projections, final norm)
EXPECTED = {
    "llama": ("model.layers", "model.layers.0.mlp.down_proj", ["gate_proj", "up_proj"], "model.norm"),
    "gpt2": ("transformer.h", "transformer.h.0.mlp.c_proj", ["c_fc"], "transformer.ln_f"),
    "gpt_neox": ("gpt_neox.layers", "gpt_neox.layers.0.mlp.dense_4h_to_h", ["dense_h_to_4h"],
                 "gpt_neox.final_layer_norm"),
}


@pytest.mark.parametrize("arch", ARCHS)
def test_find_layout(arch):
    lm = tiny_model(arch)
    model, layout = lm.model, lm.layout
    blocks_name, out_name, in_names, norm_name = EXPECTED[arch]
    intermediate = 128 if arch == "gpt2" else 64  # GPT-2: n_inner None -> 4 * hidden
    assert (layout.hidden_size, layout.intermediate_size, layout.num_layers) == (32, intermediate, 4)
    assert layout.blocks_name == blocks_name and layout.blocks is model.get_submodule(blocks_name)
    modules = dict(model.named_modules())
    for i, layer in enumerate(layout.layers):
        name = out_name.replace(".0.", f".{i}.")
        assert layer.mlp_out_name == name and layer.mlp_out is modules[name]
        assert layer.block is layout.blocks[i]
        assert layer.mlp is modules[name.rpartition(".")[0]]
        # mlp_out maps intermediate -> hidden, the mlp_in projections hidden -> intermediate
        assert tuple(weight_out_in(layer.mlp_out).shape) == (32, intermediate)
        assert [m for m in layer.mlp_in] == [getattr(layer.mlp, n) for n in in_names]
        assert all(tuple(weight_out_in(m).shape) == (intermediate, 32) for m in layer.mlp_in)
    assert layout.final_norm is model.get_submodule(norm_name)
    assert layout.lm_head is model.get_output_embeddings()
    assert layout.embeddings is model.get_input_embeddings()
    assert layout.decoder is model.base_model
    # the decoder's output is the final-normed hidden state that the lm head reads
    ids = torch.tensor([lm.tokenizer("The Eiffel Tower is located in")["input_ids"]])
    with torch.no_grad():
        hidden = layout.decoder(input_ids=ids).last_hidden_state
        torch.testing.assert_close(output_logits(model, hidden), model(ids).logits)


def test_tied_embeddings():
    assert embeddings_tied(tiny_model("llama").model)  # tie_word_embeddings=True
    assert not embeddings_tied(tiny_model("gpt_neox").model)


def test_weight_out_in_for_conv1d_and_linear():
    lm = tiny_model("gpt2")
    conv = lm.layout.layers[0].mlp_out  # GPT-2 Conv1D stores (in, out)
    assert type(conv).__name__ == "Conv1D" and is_transposed(conv)
    assert tuple(conv.weight.shape) == (128, 32)
    w = weight_out_in(conv)
    assert tuple(w.shape) == (32, 128)
    assert w.data_ptr() == conv.weight.data_ptr()  # a view: editing it edits the model
    x = torch.randn(5, 128)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), x @ w.T + conv.bias)
    linear = tiny_model("llama").layout.layers[0].mlp_out
    assert isinstance(linear, nn.Linear) and not is_transposed(linear)
    assert weight_out_in(linear) is linear.weight


def test_find_layout_error_on_unknown_structure():
    model = tiny_model("llama").model
    model.config.num_hidden_layers = 5  # no ModuleList of 5 blocks
    with pytest.raises(BenchError, match="cannot find the 5 transformer blocks"):
        find_layout(model)


# --------------------------------------------------------------------------------------------
# Specs, devices, dtypes
# --------------------------------------------------------------------------------------------


def test_resolve_model_errors(tmp_path):
    with pytest.raises(BenchError, match="GGUF file not found: .*missing.gguf"):
        resolve_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(BenchError, match=r"unknown model 'not-a-model': use smollm2-135m, a local "
                                         r"directory, a \.gguf file or a hub id"):
        resolve_model("not-a-model")
    with pytest.raises(BenchError, match="unknown model"):
        resolve_model("a/b/c")
    some_file = tmp_path / "weights.bin.txt"
    some_file.write_text("x")
    with pytest.raises(BenchError, match="neither a directory nor a .gguf file"):
        resolve_model(str(some_file))
    hub = resolve_model("someone/some-model")  # resolving touches nothing
    assert hub.hub and hub.source_hash == "" and str(hub.path) == "someone/some-model"


def test_resolve_device(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(BenchError, match="unknown device 'tpu9': use auto, cpu, cuda or cuda:N"):
        resolve_device("tpu9")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("cuda", "cuda:1"):
        with pytest.raises(BenchError, match=f"device '{name}' requested but CUDA is not available"):
            resolve_device(name)
    if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        assert resolve_device("auto") == torch.device("cpu")


def test_resolve_dtype():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("bf16", cpu) == torch.bfloat16
    assert resolve_dtype("float16", cpu) == torch.float16
    with pytest.raises(BenchError, match="unknown dtype 'int8'"):
        resolve_dtype("int8", cpu)


# --------------------------------------------------------------------------------------------
# Loading a local checkpoint directory
# --------------------------------------------------------------------------------------------


def test_load_local_directory(tiny_model_dir):
    resolved = resolve_model(str(tiny_model_dir))
    assert not resolved.hub and resolved.path == tiny_model_dir.resolve()
    weights = tiny_model_dir / "model.safetensors"
    assert resolved.source_hash == hashlib.sha256(weights.read_bytes()).hexdigest()

    lm = load_model(str(tiny_model_dir), device="cpu")
    assert lm.spec == str(tiny_model_dir) and lm.source_hash == resolved.source_hash
    assert lm.dtype == torch.float32 and lm.device == torch.device("cpu")
    assert lm.identity == f"{tiny_model_dir}@{resolved.source_hash[:16]}:float32"
    assert not lm.model.training and not any(p.requires_grad for p in lm.model.parameters())
    assert lm.tokenizer.padding_side == "right" and lm.tokenizer.pad_token_id is not None
    assert embeddings_tied(lm.model)
    assert lm.layout.layers[0].mlp_out_name == "model.layers.0.mlp.down_proj"
    ref = tiny_model("llama")  # the same weights as the saved checkpoint
    ids = torch.tensor([ref.tokenizer("The mother tongue of Danielle Darrieux is")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids).logits, ref.model(ids).logits)
    half = load_model(str(tiny_model_dir), device="cpu", dtype="bfloat16")
    assert next(half.model.parameters()).dtype == torch.bfloat16


def test_load_errors(tmp_path, tiny_model_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BenchError, match="cannot load model from .*empty: "):
        load_model(str(empty), device="cpu")
    # tokenizer only; config but no weights; corrupt weights
    broken = {}
    for name, remove, garbage in [("tok-only", ["config.json", "model.safetensors"], None),
                                  ("no-weights", ["model.safetensors"], None),
                                  ("bad-weights", [], "model.safetensors")]:
        path = tmp_path / name
        shutil.copytree(tiny_model_dir, path)
        for f in remove:
            (path / f).unlink()
        if garbage:
            (path / garbage).write_bytes(b"not a safetensors file")
        broken[name] = path
    for name, path in broken.items():
        with pytest.raises(BenchError, match=f"cannot load model from .*{name}: "):
            load_model(str(path), device="cpu")
    with pytest.raises(BenchError, match="unknown device"):
        load_model(str(tiny_model_dir), device="tpu9")
    with pytest.raises(BenchError, match="unknown dtype"):
        load_model(str(tiny_model_dir), device="cpu", dtype="int3")


def test_bench_model_command(tiny_model_dir, capsys):
    assert main(["model", "--model", str(tiny_model_dir), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "layers: 4  hidden: 32  MLP out: model.layers.0.mlp.down_proj  tied embeddings: True" in out
    assert "'The Eiffel Tower is located in the city of' -> " in out


def test_unreachable_hub_id_is_one_line_error(tmp_path):
    """Offline (HF_HUB_OFFLINE=1, empty HF_HOME): nothing touches the network."""
    res = finish(start_bench(["model", "--model", "no-such-owner/no-such-model", "--device", "cpu"],
                             tmp_path, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                             HF_HOME=str(tmp_path / "hf-home"), HF_HUB_DISABLE_PROGRESS_BARS="1"))
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and res.stderr.count("\n") == 1, res.stderr
    assert res.stderr.startswith("bench: error: cannot reach the Hugging Face hub for "
                                 "'no-such-owner/no-such-model' and it is not in the local cache")


@pytest.mark.parametrize("config_name", ["Gemma2Config", "Gemma3TextConfig"])
def test_gemma_layout_and_softcapped_logits(config_name):
    """Gemma (Llama-style, with final-logit softcapping) is mapped from its structure, and logits
    computed only where read equal the model's own."""
    import transformers
    from transformers import AutoModelForCausalLM

    from bench.core.layout import find_layout, output_logits
    from bench.core.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    config = getattr(transformers, config_name)(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
        pad_token_id=0, bos_token_id=0, eos_token_id=0, final_logit_softcapping=5.0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    layout = find_layout(model)
    assert layout.num_layers == 4
    assert [b.mlp_out_name for b in layout.layers] == [f"model.layers.{i}.mlp.down_proj" for i in range(4)]
    assert len(layout.layers[0].mlp_in) == 2 and layout.final_norm is model.model.norm
    ids = tok("The Eiffel Tower is located in", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        full = model(ids).logits[0]
        hidden = model.base_model(input_ids=ids).last_hidden_state[0]
        torch.testing.assert_close(output_logits(model, hidden), full, rtol=1e-5, atol=1e-5)
