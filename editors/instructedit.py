"""`instructedit`: MEND trained on instruction-wrapped edits (InstructEdit, Zhang et al., 2024).

The editor network, its training and the edit itself are MEND's (editors/mend.py). The difference
is the input: every training edit prompt and rephrase is wrapped in its task's instruction
(tasks/instructions.py: "Task: ... / Description: ... / Input: ..."), with a *seen* description
chosen per record from the seed; locality prompts are never wrapped. At evaluation the runner
wraps each case the same way (uses_instructions = True), with a seen or an unseen description.
Training on several tasks with their instructions is meant to let one editor serve many tasks,
including a task it never trained on (--holdout).
"""

from __future__ import annotations

from bench.cases import EditCase
from editors.mend import Mend


class InstructEdit(Mend):
    name = "instructedit"
    uses_instructions = True

    def training_case(self, case: EditCase, seed: int) -> EditCase:
        from tasks.instructions import pick_description, wrap_case
        from tasks.registry import get_card

        card = get_card(case.task)
        return wrap_case(case, card, pick_description(card, "seen", key=case.case_id, seed=seed))
