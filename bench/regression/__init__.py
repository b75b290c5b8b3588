"""General-capability regression: lm-evaluation-harness before and after editing.

`bench regress` (and `bench run --regression TASKS`) evaluates the unedited model once with
lm-eval, then measures again while edits are applied, and reports, per lm-eval task and metric,
the score before, after and the difference with its standard error. It is a hook of the run's
case loop (hook.py), not a loop of its own.

  options.py   what is asked (tasks, mode, limits), checked before any model loads;
  docs.py      the offline fact_retention docs (locality facts as multiple choice);
  corpus.py    the offline perplexity corpus sampled from the unedited model;
  suite.py     lm-eval plumbing (task manager with lm_tasks/ on its include path, LMSuite);
  stats.py     the before/after comparison and its standard errors;
  hook.py      the hook the runner calls.

See docs/regression.md for the statistics and the files written.
"""

from __future__ import annotations

from bench.regression.options import DEFAULT_SAMPLE, DEFAULT_SUITE, RegressionOptions
from bench.regression.suite import check_lm_tasks, lm_eval_version, set_offline_defaults


def check_regression(reg: RegressionOptions) -> None:
    """Every regression option, lm-eval task names included, before anything loads."""
    reg.check()
    check_lm_tasks(list(reg.lm_tasks))


__all__ = ["RegressionOptions", "DEFAULT_SUITE", "DEFAULT_SAMPLE", "check_regression",
           "lm_eval_version", "set_offline_defaults"]
