"""lm-evaluation-harness task definitions shipped with instructedit-bench.

This directory is an lm-eval *include path*: `TaskManager(include_path=<this directory>)` (or
`lm_eval --include_path bench/lm_tasks`) registers the offline regression suite:

* `fact_retention`   - multiple choice over locality facts from the data directory;
* `bench_perplexity` - rolling log-likelihood (word/byte perplexity) of a local text corpus.

The YAML files name their dataset builders in `utils.py` (`custom_dataset: !function ...`).
See docs/regression.md for how each dataset is built.
"""

from pathlib import Path

LM_TASKS_DIR = Path(__file__).resolve().parent
OFFLINE_TASKS = ("fact_retention", "bench_perplexity")
