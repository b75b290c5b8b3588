"""Defaults shared by the command line, the run set-up and the library."""

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_LIMIT = 100  # cases per task for `bench run`; 0 on the command line means all
RUN_MODES = ("single", "sequential")  # each edit alone and restored, or every edit kept
PROTOCOLS = ("teacher_forced", "wild")  # evaluation: the answer fed, or generated
DEFAULT_LM_LIMIT = 200  # docs per lm-eval task in regression runs; 0 on the command line means all
DEFAULT_EVAL_EVERY = 50  # sequential mode: edits between checkpoint evaluations
DEFAULT_LOCALITY_PROBES = 100  # sequential mode: fixed locality probes per task
# --seed reaches torch, Python's random and, through lm-eval, numpy (which takes 0 .. 2**32 - 1)
SEED_MAX = 2**32 - 1
# the longest generation an option may ask for (--max-new-tokens, --fluency): far above any
# answer or fluency sample, far below a generation that runs for hours
MAX_GENERATED = 1024
# bench holdout-matrix: early stopping and the time budget off, so every learned editor trains
# exactly max_steps steps (bench.holdout, docs/holdout.md)
EQUAL_STEPS = {"patience": 0, "time_budget_s": 0}
