"""`ft`: constrained fine-tuning of MLP output projections (FT-L, and FT-M with
`--hparam objective=target_masked`).

FT-L (Zhu et al. 2020, as used by ROME and EasyEdit) fine-tunes one MLP output projection with
Adam on the target given the prompt, keeping every weight within an L-inf ball of radius
`norm_constraint` around its original value. Its loss reads only the last prompt position: the
mean negative log-probability, at that position, of each target token ("prompt_last").
FT-M instead teacher-forces the whole target and averages the NLL over target tokens
("target_masked").
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from bench.core.cases import EditCase
from bench.core.hparams import check_hparams, param
from bench.core.layout import find_layout, is_transposed, text_config
from bench.core.probes import encode_probe
from editors.base import EditHandle, Editor, param_name
from editors.frozen_prefix import frozen_prefix
from editors.vocab_loss import token_nll

OBJECTIVES = ("prompt_last", "target_masked")


@dataclass
class FTHparams:
    """layers: blocks whose MLP output projection is tuned (default: 70% of the depth, which is
    layer 21 of 30 as in EasyEdit's Llama setting); steps, lr, weight_decay: Adam;
    norm_constraint: L-inf radius around the original weights (None or 0 = unconstrained).
    The default 5e-3 was measured on SmolLM2-135M (10 CounterFact edits: reliability 80, locality
    70; 5e-4 left reliability at 0; 2e-2 gave 100 / 50); EasyEdit's Llama setting is 5e-5;
    objective: "prompt_last" (FT-L) or "target_masked" (FT-M); min_loss: stop early once the loss
    falls below it (EasyEdit's 1e-2); frozen_prefix: reuse the unchanged lower blocks' outputs
    across steps (same numbers, less compute; off = the plain path, for benchmarks);
    fused_vocab_loss: compute the loss and its gradient in one pass over the vocabulary matrix
    on CPU (editors/vocab_loss.py; equal up to float rounding; off = the plain path);
    parallel_edits: how many of a run's cases are optimised together, as one batch with a
    separate change per case (each case is still applied, evaluated and restored alone, and
    gets the gradients, optimizer state and stopping it gets alone: equal up to float rounding).
    A step costs about as much for 8 short prompts as for 1 on CPU, since reading the weights
    dominates (docs/speed.md). Upper bounds (steps <= 100000, parallel_edits <= 1024) refuse a
    typo that would run without end."""

    layers: list[int] | None = param(None, layer="index", nonempty=True)
    steps: int = param(25, ge=0, le=100_000)
    lr: float = param(5e-4, gt=0)
    weight_decay: float = param(0.0, ge=0)
    norm_constraint: float | None = param(5e-3, ge=0)
    objective: str = param("prompt_last", choices=OBJECTIVES)
    min_loss: float = param(1e-2, ge=0)
    frozen_prefix: bool = True  # compute blocks below the lowest tuned layer once per edit
    fused_vocab_loss: bool = True  # on CPU: loss and its gradient in one read of the vocabulary
    parallel_edits: int = param(1, ge=1, le=1024)  # independent edits optimised together in one batch


class FineTune(Editor):
    name = "ft"
    Hparams = FTHparams

    @classmethod
    def default_hparams(cls, config) -> FTHparams:
        tc = text_config(config)
        n_layers = tc.num_hidden_layers
        # A case optimised in parallel holds its change, the change's gradient and Adam's two
        # moments (4 copies of the projection, float32): as many cases as fit in 256 MiB, at most 8.
        intermediate = getattr(tc, "intermediate_size", None) or 4 * tc.hidden_size
        per_case = 4 * 4 * tc.hidden_size * intermediate
        return FTHparams(layers=[min(n_layers - 1, round(0.7 * n_layers))],
                         parallel_edits=max(1, min(8, (256 << 20) // per_case)))

    def _layers(self, n_layers: int) -> list[int]:
        """The tuned layers, after checking every hyperparameter against this model."""
        check_hparams(self.hparams, n_layers, where=self.name)
        hp = self.hparams
        return hp.layers if hp.layers is not None else [min(n_layers - 1, round(0.7 * n_layers))]

    @property
    def edits_per_call(self) -> int:
        return max(1, self.hparams.parallel_edits)

    def apply(self, model, tokenizer, case: EditCase) -> EditHandle:
        return next(self.apply_many(model, tokenizer, [case]))

    def apply_many(self, model, tokenizer, cases: list[EditCase]) -> Iterator[EditHandle]:
        """Optimise the cases' changes together (one batch, a separate change per case), then
        yield them one at a time applied to the model."""
        layout = find_layout(model)
        layers = self._layers(layout.num_layers)
        modules = [layout.layers[i].mlp_out for i in layers]
        names = [param_name(model, m) for m in modules]
        deltas, steps = self._optimise(model, layout, layers, [self._example(tokenizer, c) for c in cases])
        for case_deltas, case_steps in zip(deltas, steps):
            handle = EditHandle(model, names, info={"steps": case_steps})
            with torch.no_grad():
                for module, delta in zip(modules, case_deltas):
                    module.weight.add_(delta)
            yield handle

    def _example(self, tokenizer, case: EditCase) -> tuple[list[int], list[tuple[int, int]]]:
        """The ids fed for one case and the (position, target token) pairs its loss reads."""
        prompt_ids, target_ids = encode_probe(tokenizer, case.prompt, case.target_new)
        last = len(prompt_ids) - 1
        if self.hparams.objective == "prompt_last":
            # Only the last prompt position is read, and (causal attention) it does not depend
            # on the target tokens: feed the prompt alone.
            return prompt_ids, [(last, t) for t in target_ids]
        # target_masked reads positions up to the second-to-last target token: the last is not fed.
        return prompt_ids + target_ids[:-1], [(last + j, t) for j, t in enumerate(target_ids)]

    def _optimise(self, model, layout, layers: list[int], examples) -> tuple[list[list[torch.Tensor]], list[int]]:
        """Adam on one additive change per (case, tuned projection), all cases in one batch;
        returns the changes and each case's number of optimizer steps.

        Each case's loss depends only on its own changes, so the batch's summed loss gives every
        change exactly the gradient it would get alone; every case has its own optimizer state
        and stops on its own (a stopped case's changes get no gradient, so Adam leaves them)."""
        hp = self.hparams
        modules = [layout.layers[i].mlp_out for i in layers]
        device = modules[0].weight.device
        n = len(examples)
        width = max(len(ids) for ids, _ in examples)
        ids = torch.zeros((n, width), dtype=torch.long, device=device)
        mask = torch.zeros((n, width), dtype=torch.long, device=device)
        for b, (fed, _) in enumerate(examples):
            ids[b, :len(fed)] = torch.tensor(fed, device=device)
            mask[b, :len(fed)] = 1  # right padding: real tokens keep their unbatched positions
        # (case, position, target token) for every token any loss reads
        rows_t, cols_t, targets_t = torch.tensor(
            [(b, pos, tok) for b, (_, reads) in enumerate(examples) for pos, tok in reads], device=device).T
        reads_per_case = torch.bincount(rows_t, minlength=n).to(torch.float32)

        originals = [m.weight.detach() for m in modules]
        deltas = [[torch.zeros_like(w, requires_grad=True) for w in originals] for _ in range(n)]
        opt = torch.optim.Adam([d for case_deltas in deltas for d in case_deltas], lr=hp.lr,
                               weight_decay=hp.weight_decay)
        active = [True] * n
        steps = [0] * n
        hooks = [m.register_forward_hook(_add_per_case(m, [case_deltas[k] for case_deltas in deltas]))
                 for k, m in enumerate(modules)]
        inputs = {"input_ids": ids, "attention_mask": mask}
        prefix = (frozen_prefix(model, layout, min(layers), **inputs) if hp.frozen_prefix
                  else nullcontext())
        try:
            with prefix, torch.enable_grad():
                for _ in range(hp.steps):
                    opt.zero_grad(set_to_none=True)
                    hidden = model.base_model(**inputs).last_hidden_state
                    nll = token_nll(model, hidden[rows_t, cols_t], targets_t, fused=hp.fused_vocab_loss)
                    per_case = torch.zeros(n, device=device, dtype=nll.dtype).index_add(0, rows_t, nll)
                    per_case = per_case / reads_per_case.to(nll.dtype)
                    # The stopping rule of one case alone: stop before updating once below min_loss.
                    for b, value in enumerate(per_case.tolist()):
                        active[b] = active[b] and value >= hp.min_loss
                    if not any(active):
                        break
                    steps = [k + a for k, a in zip(steps, active)]
                    per_case[torch.tensor(active, device=device)].sum().backward()
                    for b, case_deltas in enumerate(deltas):
                        for d, w0 in zip(case_deltas, originals):
                            if not active[b]:
                                d.grad = None  # Adam skips it: the case has stopped
                            elif hp.weight_decay:
                                d.grad.add_(w0, alpha=hp.weight_decay)  # decay acts on w0 + d
                    opt.step()
                    if hp.norm_constraint:
                        with torch.no_grad():
                            for b in range(n):
                                if active[b]:
                                    for d in deltas[b]:
                                        d.clamp_(-hp.norm_constraint, hp.norm_constraint)
        finally:
            for h in hooks:
                h.remove()
        return [[d.detach() for d in case_deltas] for case_deltas in deltas], steps


def _add_per_case(module, deltas: list[torch.Tensor]):
    """A forward hook adding x @ delta_b^T to row b of the projection's output."""
    spec = "bti,bio->bto" if is_transposed(module) else "bti,boi->bto"

    def hook(_module, args, output):
        return output + torch.einsum(spec, args[0], torch.stack(deltas))

    return hook
