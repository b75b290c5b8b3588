"""The structural map of a model that editors need, found from its module tree and its config
(never from its name): the transformer blocks, each block's MLP input and output projections, the
embeddings, the final norm and the LM head; plus the helpers that read weights and logits in one
way whatever the architecture (GPT-2's Conv1D stores its weights transposed; Gemma caps logits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bench.core.errors import BenchError


def _linear_dims(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) for nn.Linear and GPT-2's transposed Conv1D, else None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nx") and hasattr(module, "nf"):
        return module.nx, module.nf
    return None


def is_transposed(module: nn.Module) -> bool:
    """GPT-2's Conv1D stores its weight as (in, out) where nn.Linear stores (out, in)."""
    return not isinstance(module, nn.Linear)


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The projection's weight as an (out, in) view, whatever the storage layout."""
    return module.weight.T if is_transposed(module) else module.weight


@dataclass
class BlockModules:
    block: nn.Module
    mlp: nn.Module
    mlp_in: list[nn.Module]  # hidden -> intermediate projections (up, gate / c_fc / h_to_4h)
    mlp_out: nn.Module  # intermediate -> hidden projection (down_proj / c_proj / 4h_to_h)
    mlp_out_name: str  # qualified parameter-module name in the model


@dataclass
class ModelLayout:
    """Where the pieces editors touch live, found from the module tree and the config."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    blocks_name: str
    blocks: nn.ModuleList
    layers: list[BlockModules]
    embeddings: nn.Module
    final_norm: nn.Module | None
    lm_head: nn.Module
    decoder: nn.Module  # the base model: input ids -> final (normed) hidden states


def text_config(config):
    """The language model's part of a config (multimodal configs nest it)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def logit_softcapping(model: nn.Module) -> float | None:
    """Gemma-2 style cap c of the output logits (c * tanh(logits / c)); None when uncapped."""
    return getattr(text_config(model.config), "final_logit_softcapping", None) or None


def find_layout(model: nn.Module) -> ModelLayout:
    config = text_config(model.config)
    hidden = config.hidden_size
    n_layers = config.num_hidden_layers
    intermediate = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) \
        or 4 * hidden

    blocks_name, blocks = None, None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            blocks_name, blocks = name, module
            break
    if blocks is None:
        raise BenchError(f"cannot find the {n_layers} transformer blocks in {type(model).__name__}")

    layers = []
    for i, block in enumerate(blocks):
        outs, ins = [], []
        for name, module in block.named_modules():
            dims = _linear_dims(module)
            if dims == (intermediate, hidden):
                outs.append((name, module))
            elif dims == (hidden, intermediate):
                ins.append((name, module))
        if len(outs) != 1:
            raise BenchError(f"block {i} of {type(model).__name__}: expected one MLP output "
                             f"projection {intermediate}->{hidden}, found {len(outs)}")
        out_name, out_mod = outs[0]
        parent_name = out_name.rpartition(".")[0]
        mlp = block.get_submodule(parent_name) if parent_name else block
        layers.append(BlockModules(block=block, mlp=mlp, mlp_in=[m for _, m in ins],
                                   mlp_out=out_mod, mlp_out_name=f"{blocks_name}.{i}.{out_name}"))

    decoder = model.base_model
    final_norm = None
    # The final norm is the last normalisation module of the decoder that is not inside a block.
    block_ids = {id(m) for b in blocks for m in b.modules()}
    for _, module in decoder.named_modules():
        if id(module) in block_ids:
            continue
        if "norm" in type(module).__name__.lower():
            final_norm = module
    return ModelLayout(hidden_size=hidden, intermediate_size=intermediate, num_layers=n_layers,
                       blocks_name=blocks_name, blocks=blocks, layers=layers,
                       embeddings=model.get_input_embeddings(), final_norm=final_norm,
                       lm_head=model.get_output_embeddings(), decoder=decoder)


def output_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Vocabulary logits for final hidden states (only where a caller needs them)."""
    logits = model.get_output_embeddings()(hidden)
    cap = logit_softcapping(model)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


@torch.no_grad()
def find_post_mlp_norms(model: nn.Module, layout: ModelLayout) -> list[nn.Module | None]:
    """Per block, the module that transforms the MLP's output before it joins the residual
    stream (Gemma-2/3's post-feed-forward norm), or None where the MLP output is added as it is
    (Llama, GPT-2, GPT-NeoX). Found from the data flow of one short forward pass, not from
    module names: the first module of the block that receives the very tensor the MLP returned
    and returns something else (an identity in eval mode, such as a dropout, is followed)."""
    tracked: dict[int, int] = {}  # block -> id of the tensor carrying the MLP output
    found: dict[int, nn.Module] = {}
    hooks = []
    for i, bm in enumerate(layout.layers):
        inside = {id(m) for m in bm.mlp.modules()}

        def on_mlp(_m, _a, out, i=i):
            tracked[i] = id(out[0] if isinstance(out, tuple) else out)
        hooks.append(bm.mlp.register_forward_hook(on_mlp))
        for module in bm.block.modules():
            if module is bm.block or id(module) in inside or list(module.children()):
                continue

            def on_leaf(m, args, out, i=i):
                if i in found or i not in tracked or not args or id(args[0]) != tracked[i]:
                    return
                if isinstance(out, torch.Tensor) and torch.equal(out, args[0]):
                    tracked[i] = id(out)  # passes the output on unchanged
                else:
                    found[i] = m
            hooks.append(module.register_forward_hook(on_leaf))
    device = next(model.parameters()).device
    try:
        layout.decoder(input_ids=torch.tensor([[1, 2]], device=device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return [found.get(i) for i in range(len(layout.layers))]
