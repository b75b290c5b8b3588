"""Defaults shared by the CLI and the library (kept free of heavy imports so `bench --help` and
argument errors are instant)."""

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_LIMIT = 100  # cases per task for `bench run`; 0 on the command line means all
DEFAULT_LM_LIMIT = 200  # docs per lm-eval task in regression runs; 0 on the command line means all
