"""`instructedit`: MEND trained on instruction-wrapped edits (InstructEdit, Zhang et al., 2024).

The editor network, its training and the edit itself are MEND's (editors/mend/). The difference
is the input: every training edit prompt and rephrase is wrapped in its task's instruction
("Task: ... / Description: ... / Input: ..."), with a *seen* description chosen per record from
the seed; locality prompts are never wrapped. The run hands over the wrapper (`ctx.instruct`)
and, at evaluation, wraps each case the same way (uses_instructions = True), with a seen or an
unseen description. Training on several tasks with their instructions is meant to let one
editor serve many tasks, including a task it never trained on (--holdout).
"""

from __future__ import annotations

from bench.core.cases import EditCase
from editors.base import EditContext
from editors.mend import Mend


class InstructEdit(Mend):
    name = "instructedit"
    uses_instructions = True

    def training_case(self, case: EditCase, ctx: EditContext) -> EditCase:
        return ctx.instruct(case, "seen")
