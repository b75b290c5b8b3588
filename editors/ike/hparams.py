"""IKE's hyperparameters (one dataclass; every value checked before the model loads)."""

from __future__ import annotations

from dataclasses import dataclass

from bench.core.hparams import param

SELECTIONS = ("proportional", "retrieved")
ORDERS = ("similar_last", "similar_first", "random")
OVERFLOW = ("drop", "error")
WITHOUT_TRAIN = ("error", "ice")


@dataclass
class IkeHparams:
    """Hyperparameters of IKE (and of ICE, its zero-demonstration form: k = 0).

    k: number of demonstrations drawn from the train split of the case's task; 0 = ICE (only
        the new fact in front of the prompt, no demonstration, no train split needed).
        Default 16 (EasyEdit's dataclass default; the paper and EasyEdit's YAML files use 32,
        preset `easyedit`): a CPU run of 300 cases stays affordable.
    retriever: how demonstrations are ranked by similarity to the new fact: "tfidf" (word
        uni- and bigram TF-IDF, cosine), "embedding" (cosine of the edited model's own mean-
        pooled input embeddings); any name registered in editors.ike.retrievers.RETRIEVERS.
    selection: "proportional" (the paper): the k train cases most similar to the new fact, one
        demonstration each, of the types copy / update / retain in the proportions
        copy_ratio : update_ratio : retain_ratio, types assigned in a seeded shuffle.
        "retrieved" (EasyEdit): every train case gives one demonstration of each type it can
        and the k demonstrations most similar to the query are taken, whatever their types.
    copy_ratio, update_ratio, retain_ratio: the proportions of "proportional" (paper: 1:3:4).
        A type no train case of the task can give (no rephrase, no locality prompt) is left out
        and its share goes to the others (recorded in the case's `edit` facts).
    order: where demonstrations go: "similar_last" (the paper: the most similar one closest
        to the new fact), "similar_first" (EasyEdit: in retrieval order), "random" (seeded).
    echo_fact: also put the new fact itself as a copy demonstration right before the new-fact
        line (the IKE authors' code does; EasyEdit does not).
    seed: seeds the choice of rephrase / locality prompt of each demonstration, the shuffle of
        the types and the "random" order.
    max_context_tokens: cap on the context's length in tokens; 0 = only the model's own limit
        (max_position_embeddings - the probe reserve).
    probe_reserve: tokens kept free after the context for the probe prompt and its answer (at
        least the longest probe of the case being edited is always kept free).
    overflow: what happens when the context would not fit: "drop" removes the oldest facts
        first (sequential memory; the newest is kept), then the least similar demonstrations,
        and records every removal in the handle's facts; "error" fails the edit (BenchError).
    without_train: a case whose task has no train split, with k > 0: "error" fails the edit
        with one line; "ice" edits it with no demonstration and records the fallback.
    """

    k: int = param(16, ge=0, le=512)
    retriever: str = "tfidf"
    selection: str = param("proportional", choices=SELECTIONS)
    copy_ratio: float = param(1.0, ge=0)
    update_ratio: float = param(3.0, ge=0)
    retain_ratio: float = param(4.0, ge=0)
    order: str = param("similar_last", choices=ORDERS)
    echo_fact: bool = False
    seed: int = param(0, ge=0, le=4294967295)
    max_context_tokens: int = param(0, ge=0, le=10000000)
    probe_reserve: int = param(128, ge=0, le=10000000)
    overflow: str = param("drop", choices=OVERFLOW)
    without_train: str = param("error", choices=WITHOUT_TRAIN)

    def ratios(self) -> dict[str, float]:
        return {"copy": self.copy_ratio, "update": self.update_ratio, "retain": self.retain_ratio}
