"""`python -m bench ...` (also what `accelerate launch -m bench run ...` executes)."""

from bench.cli import entry

entry()
