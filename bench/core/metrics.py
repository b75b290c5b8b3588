"""Metric definitions, compatible with EasyEdit's, and their aggregation: the one metric list.

Every metric is computed from teacher-forced probes: a prompt followed by an answer. For each
probe we read, at the answer's positions only, the argmax token and the log-probability of the
answer token. From those:

* reliability  - token accuracy of `target_new` after the edit prompt: mean over target tokens of
                 [argmax == target token];
* generality   - the same on each rephrase prompt (mean over rephrases);
* locality     - agreement between post-edit and pre-edit argmax tokens over the locality
                 answer's positions (agreement, not correctness); 1.0 before the edit by definition;
* portability  - token accuracy of the portability answer after its prompt;
* efficacy / paraphrase / neighborhood (CounterFact, ROME's probability comparison) - the fraction
                 of prompts where P(target_new) > P(ground_truth) on the prompt / on rephrases, and
                 where P(true answer) > P(target_new) on locality (neighbourhood) prompts. P is the
                 mean per-token log-probability, as in ROME.

Case scores are fractions in [0, 1]; summaries report percent with a bootstrap 95% interval.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # reports read the metrics without torch (bench.core.probes imports it)
    from bench.core.probes import CaseEval

METRIC_DEFINITIONS = "easyedit-token-accuracy/v1"
N_BOOTSTRAP = 2000  # resamples of every bootstrap interval the harness reports


@dataclass(frozen=True)
class Metric:
    name: str
    abbr: str  # column label in tables
    family: str  # "token" (teacher-forced token accuracy), "counterfact" (probability comparison),
    # "wild" (generated answers) or "generation" (properties of generated text)
    text: str
    percent: bool = True  # a fraction in [0, 1] per case, reported in percent


METRICS = (
    Metric("reliability", "Rel", "token", "token accuracy of target_new after the edit prompt"),
    Metric("generality", "Gen", "token", "the same on the rephrased prompts"),
    Metric("locality", "Loc", "token", "post- vs pre-edit argmax agreement on unrelated prompts"),
    Metric("portability", "Port", "token", "token accuracy of the portability answers"),
    Metric("efficacy", "Eff", "counterfact", "P(target_new) > P(ground_truth) on the prompt"),
    Metric("paraphrase", "Para", "counterfact", "the same on the rephrased prompts"),
    Metric("neighborhood", "Nbr", "counterfact", "P(true answer) > P(target_new) on unrelated prompts"),
    Metric("wild_reliability", "W-Rel", "wild", "generated answer to the edit prompt judged correct"),
    Metric("wild_generality", "W-Gen", "wild", "the same on the rephrased prompts"),
    Metric("wild_locality", "W-Loc", "wild", "generated answer to unrelated prompts unchanged by the edit"),
    Metric("wild_locality_correct", "W-LocC", "wild", "generated answer to unrelated prompts correct"),
    Metric("wild_portability", "W-Port", "wild", "generated portability answers judged correct"),
    Metric("fluency", "Flu", "generation", "weighted bi-/tri-gram entropy of longer generations (ROME), bits",
           percent=False),
)
METRIC_BY_NAME = {m.name: m for m in METRICS}
TOKEN_METRICS = tuple(m.name for m in METRICS if m.family == "token")
COUNTERFACT_METRICS = tuple(m.name for m in METRICS if m.family == "counterfact")
WILD_METRICS = tuple(m.name for m in METRICS if m.family == "wild")
ALL_METRICS = tuple(m.name for m in METRICS)
# the teacher-forced metric each wild metric stands beside (the gap the report shows)
WILD_COUNTERPART = {"wild_reliability": "reliability", "wild_generality": "generality",
                    "wild_locality": "locality", "wild_portability": "portability"}


def _mean(values) -> float:
    return float(np.mean(values))


def case_scores(ev: CaseEval, pre: CaseEval | None = None) -> dict[str, float]:
    """Scores in [0, 1] for one case. `pre` is the pre-edit evaluation of the same case (needed
    for locality); without it `ev` is itself the pre-edit state and locality is 1 by definition."""
    scores = {"reliability": ev.reliability.accuracy}
    if ev.generality:
        scores["generality"] = _mean([r.accuracy for r in ev.generality])
    if ev.locality:
        if pre is None:
            scores["locality"] = 1.0
        else:
            per_prompt = []
            for now, before in zip(ev.locality, pre.locality):
                per_prompt.append(_mean([a == b for a, b in zip(now.pred_ids, before.pred_ids)]))
            scores["locality"] = _mean(per_prompt)
    if ev.portability:
        scores["portability"] = _mean([r.accuracy for r in ev.portability])
    if ev.truth_prompt is not None:
        scores["efficacy"] = float(ev.reliability.mean_logprob > ev.truth_prompt.mean_logprob)
        if ev.generality:
            scores["paraphrase"] = _mean([n.mean_logprob > t.mean_logprob
                                          for n, t in zip(ev.generality, ev.truth_rephrase)])
        if ev.locality:
            scores["neighborhood"] = _mean([t.mean_logprob > n.mean_logprob
                                            for t, n in zip(ev.locality, ev.new_on_locality)])
    return scores


# --------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------


def bootstrap_means(values, n_resamples: int = N_BOOTSTRAP, seed: int = 0) -> np.ndarray:
    """Means of `n_resamples` resamples (with replacement) of `values`, drawn in chunks so that
    large inputs stay within a few tens of MB."""
    arr = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_resamples, 4_000_000 // max(arr.size, 1)))
    means, done = [], 0
    while done < n_resamples:
        k = min(chunk, n_resamples - done)
        means.append(arr[rng.integers(0, arr.size, size=(k, arr.size))].mean(axis=1))
        done += k
    return np.concatenate(means)


def bootstrap_ci(values, n_resamples: int = N_BOOTSTRAP, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (same units as `values`); the one interval
    every summary and report uses."""
    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        return (float("nan"), float("nan"))
    if arr.size == 1 or np.all(arr == arr[0]):
        return (float(arr.mean()), float(arr.mean()))
    means = bootstrap_means(arr, n_resamples, seed)
    alpha = (1 - level) / 2
    return (float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha)))


def summarize_task(records: list[dict]) -> dict[str, dict]:
    """Per metric {"pre", "post", "ci", "n"} over the finished, error-free records, in percent
    (fluency in its own unit, bits)."""
    ok = [r for r in records if not r.get("error") and r.get("post")]
    out: dict[str, dict] = {}
    for metric in ALL_METRICS:
        post = [r["post"][metric] for r in ok if metric in r["post"]]
        if not post:
            continue
        scale = 100 if METRIC_BY_NAME[metric].percent else 1
        pre = [r["pre"][metric] for r in ok if metric in r.get("pre", {})]
        lo, hi = bootstrap_ci(np.asarray(post) * scale)
        out[metric] = {"pre": round(float(np.mean(pre)) * scale, 4) if pre else None,
                       "post": round(float(np.mean(post)) * scale, 4),
                       "ci": [round(lo, 4), round(hi, 4)], "n": len(post)}
    return out
