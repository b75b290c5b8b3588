"""`none`: applies no edit. Its rows are the unedited baseline."""

from __future__ import annotations

from dataclasses import dataclass

from editors.base import EditHandle, Editor


@dataclass
class NoEditHparams:
    pass


class NoEdit(Editor):
    name = "none"
    Hparams = NoEditHparams
    kinds = ()  # changes nothing

    def apply(self, model, tokenizer, case) -> EditHandle:
        return EditHandle(model, [])
