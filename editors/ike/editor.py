"""The IKE editor: an edit is a context (demonstrations + the new fact) in front of every prompt."""

from __future__ import annotations

import random
from typing import Any

from torch import nn

from bench.core.cases import EditCase
from bench.core.errors import BenchError
from bench.core.layout import text_config
from editors.base import EditContext, EditHandle, Editor, TrainingData
from editors.ike.context import Fact, Memory, fit
from editors.ike.demos import DemoPool, arrange, demo_text, question_key
from editors.ike.hparams import IkeHparams
from editors.ike.retrievers import RETRIEVERS, make_retriever

GENERATION_MARGIN = 8  # tokens kept free beyond the case's longest probe (answers generated in the wild)


def model_positions(config) -> int | None:
    """The model's context length in tokens (None when its config does not say)."""
    cfg = text_config(config)
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


class IKE(Editor):
    """In-Context Knowledge Editing (Zheng et al., EMNLP 2023); k = 0 is KnowEdit's ICE.
    See docs/ike.md."""

    name = "ike"
    Hparams = IkeHparams
    kinds = ("context",)
    reads_train_split = True

    def __init__(self, hparams=None):
        super().__init__(hparams)
        self._memory = Memory()
        self._pools: dict[str, DemoPool | None] = {}
        self._training: TrainingData | None = None
        self._log = lambda message: None

    # ---------------------------------------------------------------------------------------
    # Checks and preparation
    # ---------------------------------------------------------------------------------------

    def check(self, config) -> None:
        super().check(config)
        hp = self.hparams
        if hp.retriever not in RETRIEVERS:
            raise BenchError(f"ike: hyperparameter retriever must be one of {', '.join(sorted(RETRIEVERS))}, "
                             f"got {hp.retriever!r}")
        if hp.k > 0 and hp.selection == "proportional" and sum(hp.ratios().values()) <= 0:
            raise BenchError("ike: copy_ratio + update_ratio + retain_ratio must be > 0 with selection=proportional")
        positions = model_positions(config)
        if positions is not None and positions - hp.probe_reserve < 1:
            raise BenchError(f"ike: hyperparameter probe_reserve={hp.probe_reserve} leaves no room for a context "
                             f"in the model's {positions} positions")

    def prepare(self, lm, ctx: EditContext) -> None:
        hp = self.hparams
        self._training, self._log, self._pools = ctx.training, ctx.log, {}
        note: dict[str, Any] = {"k": hp.k, "form": "ICE (new fact only)" if hp.k == 0 else "IKE (demonstrations)",
                                "context_positions": model_positions(lm.model.config)}
        if hp.k > 0:
            training = ctx.training
            note.update(retriever=hp.retriever, retriever_settings=make_retriever(hp.retriever).settings(),
                        selection=hp.selection, order=hp.order, without_train=hp.without_train,
                        demonstration_tasks=list(training.tasks) if training else [],
                        demonstration_data={t: (training.hashes or {}).get(t) for t in training.tasks}
                        if training else {})
        ctx.notes["ike"] = note

    def _pool(self, task: str, model: nn.Module, tokenizer) -> DemoPool | None:
        """The task's train split, indexed once (None: the run has no train split for it)."""
        if task not in self._pools:
            training, hp = self._training, self.hparams
            if training is None or task not in training.tasks:
                self._pools[task] = None
            else:
                cases = training.load(task)
                self._pools[task] = DemoPool(cases, make_retriever(hp.retriever), hp.selection, hp.seed,
                                             model, tokenizer)
                self._log(f"ike: {len(cases)} train cases of {task} indexed for demonstrations "
                          f"({hp.retriever}, {hp.selection})")
        return self._pools[task]

    # ---------------------------------------------------------------------------------------
    # One edit
    # ---------------------------------------------------------------------------------------

    def _demonstrations(self, model, tokenizer, case: EditCase) -> tuple[list, dict[str, Any]]:
        """The demonstrations for `case`, in context order, and facts about them."""
        hp = self.hparams
        if hp.k == 0:
            return [], {}
        pool = self._pool(case.task, model, tokenizer)
        if pool is None:
            if hp.without_train == "error":
                raise BenchError(f"ike: task {case.task!r} has no train split to draw {hp.k} demonstrations from "
                                 "(use --hparam k=0 for ICE, or --hparam without_train=ice)")
            return [], {"fallback": f"no train split for task {case.task}: no demonstration (ICE)"}
        known = self._memory.facts + (Fact.of(case),)
        rng = random.Random(f"{hp.seed}:{case.task}:{case.case_id}")
        demos = pool.select(case, hp.k, hp.ratios(), rng, excluded={question_key(f.prompt) for f in known},
                            excluded_ids={f.case_id for f in known if f.task == case.task})
        extra = {} if len(pool.available) == 3 else {"types_available": list(pool.available)}
        return arrange(demos, hp.order, rng), extra

    def _limit(self, model, tokenizer, case: EditCase) -> int | None:
        """The most tokens the context may take, leaving room for the probes."""
        hp = self.hparams
        positions = model_positions(model.config)
        limit = hp.max_context_tokens or None
        if positions is not None:
            probes = [(case.prompt, case.target_new)] + [(p, case.target_new) for p in case.rephrase_prompts]
            probes += [(pa.prompt, pa.answer) for pa in case.locality + case.portability]
            longest = max(len(tokenizer(f"{p} {a}", add_special_tokens=False)["input_ids"]) for p, a in probes)
            room = positions - max(hp.probe_reserve, longest + GENERATION_MARGIN)
            limit = room if limit is None else min(limit, room)
        if limit is not None and limit < 1:
            raise BenchError(f"ike: case {case.case_id}: its probes leave no room for a context in the model's "
                             f"{positions} positions")
        return limit

    def apply(self, model: nn.Module, tokenizer, case: EditCase) -> EditHandle:
        hp, before = self.hparams, self._memory
        demos, extra = self._demonstrations(model, tokenizer, case)
        echo = demo_text(case, "copy", hp.seed) if hp.echo_fact else ""
        limit = self._limit(model, tokenizer, case)
        memory, cut = fit(Memory(before.facts + (Fact.of(case),), before.start, tuple(demos), echo),
                          lambda text: len(tokenizer(text)["input_ids"]), limit, hp.overflow)
        info = {"k": hp.k, "retriever": hp.retriever if hp.k else None,
                **self._window(memory), "context_tokens": cut.pop("context_tokens"), "context_limit": limit,
                **{key: v for key, v in cut.items() if v}, **extra}
        handle = EditHandle(model, [], info, context=memory.context(), restore_fn=lambda: self._set(before))
        self._memory = memory
        return handle

    def _set(self, memory: Memory) -> None:
        self._memory = memory

    @staticmethod
    def _window(memory: Memory) -> dict[str, Any]:
        """What a handle's facts say about its context: demonstrations and the window of facts."""
        return {"demonstrations": [{"case_id": d.case_id, "type": d.type, "score": d.score} for d in memory.demos],
                "facts_in_context": len(memory.in_context), "facts_dropped": memory.start}

    # ---------------------------------------------------------------------------------------
    # Sequential mode: the memory of every fact so far
    # ---------------------------------------------------------------------------------------

    def sequential_state(self) -> dict[str, Any]:
        return self._memory.to_state()

    def load_sequential_state(self, state: dict[str, Any]) -> None:
        self._memory = Memory.from_state(dict(state)) if state else Memory()

    def reattach(self, model: nn.Module, tokenizer) -> EditHandle | None:
        memory = self._memory
        if not memory.facts:
            return None
        text = memory.context()
        info = {"reattached": True, **self._window(memory), "context_tokens": len(tokenizer(text)["input_ids"])}
        return EditHandle(model, [], info, context=text, restore_fn=lambda: self._set(Memory()))
