"""The unedited model's answers, kept across runs.

A run that evaluates in the wild first generates the unedited model's answer to every probe of
every case (the pre-edit side of the wild_* metrics). Those answers are the same for every editor
run on the same model, cases and settings: a leaderboard of eleven editors generated them eleven
times, a third or more of its wild evaluation. `AnswerCache` keeps them in one SQLite file in the
cache directory (`answers.sqlite`), one entry per case, under a key made of everything the
answers depend on:

* the model's weights and dtype (LoadedModel.identity), the device type, the tokenizer's class,
  size and special tokens;
* the prompts as the model is given them (formatted; an instruction in front for editors that
  use one), in order, and the fluency prompts when fluency is measured;
* the stop rules (cap, stop strings, newline), the prompt format, the fluency length and the
  decoding batch;
* the torch and transformers versions and the source of the modules that generate
  (`CODE_MODULES`): a change to decoding or stopping invalidates every entry.

Cached answers were decoded in the batches of the run that made them; a fresh run decodes the
same prompts in batches of its own window, which can differ only at a near-tie of two logits
(float rounding; as for bench.core.generation.regenerate). A cache that cannot be opened, read or
written is reported once (`warn`) and the run goes on generating, as without it.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import sqlite3
import sys
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch
import transformers

from bench.core.cases import EditCase
from bench.core.generation import Generation
from bench.core.prompts import format_prompt
from bench.core.wild import WildSettings, wild_probes

FILE = "answers.sqlite"
SCHEMA = 1  # the entry format; part of every key
# The modules whose code decides a generated answer (decoding, stopping, prompt formatting).
CODE_MODULES = ("bench.core.decoding", "bench.core.generation", "bench.core.kvcache", "bench.core.prompts",
                "bench.core.wild", "bench.core.layout")


@lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """A hash of the generating code's source and the library versions it runs on."""
    h = hashlib.sha256(f"torch {torch.__version__} transformers {transformers.__version__}".encode())
    for name in CODE_MODULES:
        h.update(Path(importlib.import_module(name).__file__).read_bytes())
    return h.hexdigest()


def _warn(message: str) -> None:
    print(message, file=sys.stderr)


def _encode(gens: list[Generation] | None) -> list | None:
    return None if gens is None else [[g.text, g.stop, g.n_tokens, list(g.token_ids)] for g in gens]


def _decode(rows: list | None) -> list[Generation] | None:
    return None if rows is None else [Generation(t, s, int(n), tuple(int(i) for i in ids)) for t, s, n, ids in rows]


class AnswerCache:
    """The unedited model's generations per case (see the module docstring). `get` and `put`
    take the loaded model, the case as it is evaluated and its WildSettings."""

    def __init__(self, path: str | Path, warn: Callable[[str], None] = _warn):
        self.path = Path(path)
        self.warn = warn
        self.problem: str | None = None  # set once the cache failed; it is then left alone
        self._db: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection | None:
        if self.problem is None and self._db is None:
            try:
                db = sqlite3.connect(self.path, timeout=60)
                db.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
                self._db = db
            except sqlite3.Error as exc:
                self._fail(exc)
        return self._db

    def _fail(self, exc: Exception) -> None:
        self.problem = f"{type(exc).__name__}: {exc}"
        self.warn(f"warning: the answer cache {self.path} cannot be used ({self.problem}); "
                  "the unedited model's answers are generated instead")
        self._db = None

    def key(self, lm, case: EditCase, settings: WildSettings) -> str:
        tok = lm.tokenizer
        fmt = settings.prompt_format
        prompts = [format_prompt(tok, p.prompt, fmt) for p in wild_probes(case)]
        fluency = ([format_prompt(tok, p, fmt) for p in (case.prompt, *case.rephrase_prompts)]
                   if settings.fluency_tokens else [])
        rules = settings.rules
        parts = [SCHEMA, code_fingerprint(), lm.identity, lm.device.type,
                 [type(tok).__name__, len(tok), tok.eos_token_id, tok.pad_token_id, tok.bos_token_id],
                 [rules.max_new_tokens, list(rules.stop_strings), rules.at_newline],
                 fmt, settings.fluency_tokens, settings.decode_batch, prompts, fluency]
        return hashlib.sha256(json.dumps(parts, ensure_ascii=True).encode()).hexdigest()

    def get(self, lm, case: EditCase, settings: WildSettings) -> tuple[list[Generation], list[Generation] | None] | None:
        """(the answers, the fluency texts or None) kept for this case, or None."""
        db = self._connect()
        if db is None:
            return None
        try:
            row = db.execute("SELECT value FROM answers WHERE key = ?", (self.key(lm, case, settings),)).fetchone()
        except sqlite3.Error as exc:
            self._fail(exc)
            return None
        if row is None:
            return None
        try:
            value = json.loads(row[0])
            gens, fluency = _decode(value["answers"]), _decode(value["fluency"])
        except (ValueError, KeyError, TypeError):
            return None  # an entry this code cannot read: generated again (and replaced)
        if len(gens) != len(wild_probes(case)):  # one answer per probe, in wild_probes order
            return None
        if (fluency is None) != (not settings.fluency_tokens):
            return None
        return gens, fluency

    def put(self, lm, case: EditCase, settings: WildSettings, gens: list[Generation],
            fluency: list[Generation] | None) -> None:
        db = self._connect()
        if db is None:
            return
        value = json.dumps({"answers": _encode(gens), "fluency": _encode(fluency)})
        try:
            with db:
                db.execute("INSERT OR REPLACE INTO answers (key, value) VALUES (?, ?)",
                           (self.key(lm, case, settings), value))
        except sqlite3.Error as exc:
            self._fail(exc)
