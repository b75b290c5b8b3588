"""The per-case rows of the drill-down pages (cases-<run>-<task>.html) and the failure rule."""

from __future__ import annotations

from bench.core.metrics import ALL_METRICS
from reports.groups import LOCALITY_TYPE, METRIC_ABBR
from reports.runs import Run, finite_or_none

FAILURE_RULE = ("a case fails when its edit raised an error, when post-edit reliability is below 1, "
                "or when a locality-type score (locality, wild locality, neighborhood) is lower after "
                "the edit than before it")


def _as_list(x) -> list:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _probes(rec: dict, case: dict) -> list[dict]:
    """One row per probe of the case (prompt, rephrases, locality, portability) with the
    expected answer and the pre- and post-edit predictions."""
    preds = rec.get("predictions") if isinstance(rec.get("predictions"), dict) else {}
    pre = preds.get("pre") if isinstance(preds.get("pre"), dict) else {}
    post = preds.get("post") if isinstance(preds.get("post"), dict) else {}
    wild = rec.get("wild") if isinstance(rec.get("wild"), dict) else {}
    gens = wild.get("generations") if isinstance(wild.get("generations"), dict) else {}
    gen_pre = gens.get("pre") if isinstance(gens.get("pre"), dict) else {}
    gen_post = gens.get("post") if isinstance(gens.get("post"), dict) else {}

    def pick(d, key, i):
        v = d.get(key)
        if isinstance(v, list):
            v = v[i] if i < len(v) else None
        elif i != 0:
            v = None
        return v.get("text") if isinstance(v, dict) else v  # a generation: its text

    def row(kind, slot, i, prompt, expected):
        return {"kind": kind, "prompt": prompt, "expected": expected, "pre": pick(pre, slot, i),
                "post": pick(post, slot, i), "gen_pre": pick(gen_pre, slot, i),
                "gen_post": pick(gen_post, slot, i)}

    n = {slot: max(len(_as_list(pre.get(slot))), len(_as_list(post.get(slot))),
                   len(_as_list(gen_post.get(slot)))) for slot in ("rephrase", "locality", "portability")}
    out = [row("prompt", "prompt", 0, case.get("prompt"), case.get("target_new"))]
    rephrases = _as_list(case.get("rephrase_prompts"))
    for i in range(max(len(rephrases), n["rephrase"])):
        out.append(row("rephrase", "rephrase", i, rephrases[i] if i < len(rephrases) else None, case.get("target_new")))
    for kind in ("locality", "portability"):
        qs = _as_list(case.get(kind))
        for i in range(max(len(qs), n[kind])):
            q = qs[i] if i < len(qs) else {}
            q = q if isinstance(q, dict) else {"prompt": q, "answer": None}
            out.append(row(kind, kind, i, q.get("prompt"), q.get("answer")))
    return out


def failure_reasons(rec: dict) -> list[tuple[str, str]]:
    """Why a case fails (FAILURE_RULE): [(kind, text)], kind 'error', 'edit' or 'broke'; empty
    when it passes."""
    if rec.get("error"):
        return [("error", "error")]
    post = rec.get("post") if isinstance(rec.get("post"), dict) else None
    if post is None:
        return [("error", "no post-edit result")]
    pre = rec.get("pre") if isinstance(rec.get("pre"), dict) else {}
    out = []
    rel_key = "reliability" if "reliability" in post else "wild_reliability"
    rel = finite_or_none(post.get(rel_key))
    if rel is not None and rel < 1:
        out.append(("edit", f"{METRIC_ABBR[rel_key]} {rel:.3g} < 1"))
    for m in LOCALITY_TYPE:
        a, b = finite_or_none(pre.get(m)), finite_or_none(post.get(m))
        if a is not None and b is not None and b < a - 1e-9:
            out.append(("broke", f"{METRIC_ABBR[m]} dropped {a:.3g} → {b:.3g}"))
    return out


def _score_row(m: str, pre: dict, post: dict | None, dropped: bool) -> tuple:
    """(metric, pre, post, flagged): flagged when the value makes the case fail (FAILURE_RULE)."""
    a, b = finite_or_none(pre.get(m)), finite_or_none((post or {}).get(m))
    rel_key = "reliability" if "reliability" in (post or {}) else "wild_reliability"
    missed = m == rel_key and b is not None and b < 1
    return m, a, b, dropped or missed


def case_rows(run: Run, task: str, case_text: bool = True) -> list[dict]:
    """Per-case rows of the drill-down. case_text=False leaves out everything that comes from
    the data records (prompts, targets, ground truths, probe texts), keeping case ids, the
    model's predictions and the scores: for leaderboards published without the data."""
    rows = []
    for rec in run.cases:
        if str(rec.get("task")) != task:
            continue
        case = rec.get("case") if case_text and isinstance(rec.get("case"), dict) else {}
        pre = rec.get("pre") if isinstance(rec.get("pre"), dict) else {}
        post = rec.get("post") if isinstance(rec.get("post"), dict) else None
        reasons = failure_reasons(rec)
        metrics = [m for m in ALL_METRICS if m in pre or (post and m in post)]
        metrics += [m for m in list(pre) + list(post or {}) if m not in metrics]
        metrics = list(dict.fromkeys(metrics))
        dropped = {m for m in LOCALITY_TYPE if any(k == "broke" and t.startswith(METRIC_ABBR[m] + " ")
                                                   for k, t in reasons)}
        rows.append({"case_id": rec.get("case_id"), "case": case, "error": rec.get("error"),
                     "failed": bool(reasons), "reasons": reasons,
                     "kinds": sorted({k for k, _ in reasons}),
                     "scores": [_score_row(m, pre, post, m in dropped) for m in metrics],
                     "probes": _probes(rec, case)})
    return rows
