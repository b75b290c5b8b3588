"""instructedit-bench: an evaluation harness for knowledge editing of language models."""

__version__ = "0.1.0"
