"""The shared core: errors, edit cases, model loading and layout discovery, probes and metrics,
hyperparameter parsing and validation, run-file I/O, caches, distributed helpers.

It imports nothing else of the project; `editors`, `tasks` and `reports` build on it, and the
application (`bench.session`, `bench.runner`, `bench.regression`, `bench.cli`) on all of them.
The import contract in `.importlinter` states the layers and CI checks it.
"""
