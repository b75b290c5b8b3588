"""Before/after comparison of lm-eval results: per task and metric, the difference and its
standard error (paired over docs where lm-eval gives per-doc values). See docs/regression.md."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from bench.core.metrics import N_BOOTSTRAP


def _ppl(metric: str, ll: np.ndarray, count: np.ndarray) -> np.ndarray:
    """lm-eval's corpus-level aggregation of (loglikelihood, count) pairs along the last axis."""
    rate = -ll.sum(axis=-1) / count.sum(axis=-1)
    return rate / math.log(2) if metric == "bits_per_byte" else np.exp(rate)


def _sd(x: np.ndarray) -> float | None:
    return float(np.std(x, ddof=1)) if x.size > 1 else None


def compare(before: dict, afters: list[dict], seed: int = 0) -> dict:
    """Per task and metric: before, after (mean over `afters`), diff = after - before and their
    standard errors; values that overflow (perplexities of a broken model) become None.
    See docs/regression.md ("Statistics")."""
    with np.errstate(over="ignore", invalid="ignore"):
        return _compare(before, afters, seed)


def _compare(before: dict, afters: list[dict], seed: int) -> dict:
    out: dict[str, dict] = {}
    for task, b in before.items():
        rows = {}
        for metric, bm in b["metrics"].items():
            ams = [a[task]["metrics"][metric] for a in afters
                   if task in a and metric in a[task]["metrics"]]
            if not ams:
                continue
            values = [m["value"] for m in ams]
            after = float(np.mean(values))
            se_b = bm["stderr"]
            ses_a = [m["stderr"] for m in ams]
            se_a = (math.sqrt(float(np.mean(np.square(ses_a)))) if all(s is not None for s in ses_a)
                    else None)
            row = {"before": bm["value"], "after": after, "diff": after - bm["value"],
                   "rel_diff": (after - bm["value"]) / bm["value"] if bm["value"] else None,
                   "stderr_before": se_b, "stderr_after": se_a, "diff_stderr": None,
                   "diff_stderr_unpaired": None, "stderr_method": "lm-eval",
                   "higher_is_better": b["higher_is_better"].get(metric), "n": b.get("n")}
            if len(values) > 1:
                row["after_per_edit"] = values
                row["after_sd_over_edits"] = _sd(np.asarray(values))
            bd = b["per_doc"].get(metric) or {}
            ads = [a[task]["per_doc"].get(metric) or {} for a in afters if task in a]
            common = sorted(set(bd).intersection(*[set(ad) for ad in ads])) if ads else []
            if common and all(isinstance(bd[i], float) for i in common):
                # mean metrics (acc, acc_norm, ...): paired per-doc differences
                bv = np.array([bd[i] for i in common])
                av = np.array([[ad[i] for i in common] for ad in ads]).mean(axis=0)
                n = len(common)
                if n > 1:
                    row["diff_stderr"] = _sd(av - bv) / math.sqrt(n)
                    if len(ads) > 1 or se_a is None:
                        row["stderr_after"] = _sd(av) / math.sqrt(n)
                    if se_b is None:
                        row["stderr_before"] = _sd(bv) / math.sqrt(n)
                row["stderr_method"] = "paired per-doc differences"
                row["n"] = n
            elif common and all(isinstance(bd[i], tuple) for i in common):
                # corpus-level perplexities: paired bootstrap over docs
                ll_b = np.array([bd[i][0] for i in common])
                cnt = np.array([bd[i][1] for i in common])
                ll_a = np.array([[ad[i][0] for i in common] for ad in ads])
                n = len(common)
                idx = np.random.default_rng(seed).integers(0, n, size=(N_BOOTSTRAP, n))
                boot_b = _ppl(metric, ll_b[idx], cnt[idx])
                boot_a = np.mean([_ppl(metric, la[idx], cnt[idx]) for la in ll_a], axis=0)
                if n > 1:
                    row["stderr_before"] = se_b if se_b is not None else _sd(boot_b)
                    row["stderr_after"] = se_a if (se_a is not None and len(ads) == 1) else _sd(boot_a)
                    row["diff_stderr"] = _sd(boot_a - boot_b)
                row["stderr_method"] = f"paired bootstrap over docs ({N_BOOTSTRAP} resamples)"
                row["n"] = n
            if row["stderr_before"] is not None and row["stderr_after"] is not None:
                row["diff_stderr_unpaired"] = math.hypot(row["stderr_before"], row["stderr_after"])
            if row["diff_stderr"] is None:
                row["diff_stderr"] = row["diff_stderr_unpaired"]
                if row["diff_stderr"] is not None:
                    row["stderr_method"] = "unpaired sqrt(se_before^2 + se_after^2)"
            rows[metric] = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                            for k, v in row.items()}
        out[task] = rows
    return out


def format_table(block: dict) -> str:
    def num(v, fmt=".4g"):
        return "inf" if v is None else format(v, fmt)

    rows = []
    for task, metrics in block["results"].items():
        for metric, r in metrics.items():
            z = (f"{r['diff'] / r['diff_stderr']:+.1f}"
                 if r["diff"] is not None and r["diff_stderr"] else "")
            rows.append({"lm task": task, "metric": metric, "before": num(r["before"]),
                         "after": num(r["after"]), "diff": num(r["diff"], "+.4g"),
                         "diff se": "" if r["diff_stderr"] is None else num(r["diff_stderr"]),
                         "z": z, "n": r["n"]})
    if not rows:
        return "no regression results"
    head = (f"regression ({block['mode']}: {block['n_edits_applied']} edits applied, suite run on "
            f"{block['n_evaluated']} {'edit' if block['mode'] == 'single' else 'edited model'}"
            f"{'s' if block['n_evaluated'] != 1 else ''})")
    return head + "\n" + pd.DataFrame(rows).to_string(index=False)
