"""Which assumption of teacher-forced evaluation inflates which number ("The Mirage of Model
Editing", Yang et al., 2025, their controlled analysis), for one editor on one task.

While each edit is applied (a hook of the run's case loop), the edit prompt and the rephrases are
scored under every combination of the protocol's switches, one at a time away from teacher
forcing, in each prompt format:

  answer fed or generated     teacher forcing reads the argmax with the gold prefix fed; the
                              generated variants decode greedily from the prompt alone;
  stop at the target's length generate exactly as many tokens as the target has, or stop
                              naturally (EOS, newline, the task's stop strings, the cap);
  token or whole answer       the fraction of target tokens right, or all of them (whole answer);
                              natural stops are judged whole (exact match / answer first / judge);
  plain or chat               the prompt as the data gives it, or in the model's chat template.

Each case record gets an `ablation` entry; summary.json an `ablation` block with the means; and
`format_matrix` prints the matrix (post-edit reliability and generality in percent).
"""

from __future__ import annotations

from bench.core.cases import EditCase
from bench.core.generation import StopRules, generate
from bench.core.judge import JudgeItem
from bench.core.probes import encode_probe, score_probes
from bench.core.prompts import check_prompt_format, format_prompt
from bench.core.runfiles import RunDir
from bench.core.scorers import answer_first, exact_match
from bench.core.wild import WildSettings
from bench.runner import RunHook

# (variant name, what the answer is, where it stops, how it is scored)
VARIANTS = (
    ("forced_token", "fed", "target length", "token accuracy"),
    ("forced_whole", "fed", "target length", "whole answer"),
    ("generated_length_token", "generated", "target length", "token accuracy"),
    ("generated_length_whole", "generated", "target length", "whole answer"),
    ("generated_natural_exact", "generated", "natural", "exact match"),
    ("generated_natural_first", "generated", "natural", "answer first"),
    ("generated_natural_judge", "generated", "natural", "judge"),
)
SLOTS = ("reliability", "generality")


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


class AblationHook(RunHook):
    """Scores each applied edit under every switch combination (see the module docstring)."""

    name = "ablation"

    def __init__(self, lm, settings: WildSettings, formats: tuple[str, ...], run: RunDir):
        self.lm, self.settings, self.formats, self.run = lm, settings, formats, run
        self.results: dict[tuple[str, str], dict] = {}

    def _variants(self, case: EditCase, fmt: str) -> dict[str, dict[str, float | None]]:
        model, tok = self.lm.model, self.lm.tokenizer
        plain = [case.prompt, *case.rephrase_prompts]
        prompts = [format_prompt(tok, p, fmt) for p in plain]
        target = case.target_new
        answers = [encode_probe(tok, p, target)[1] for p in prompts]
        forced = score_probes(model, tok, [(p, target) for p in prompts])
        scores: dict[str, list[float | None]] = {name: [] for name, *_ in VARIANTS}
        natural = generate(model, tok, prompts, self.settings.rules)
        verdicts = (self.settings.judge.judge([JudgeItem(p, g.text, target) for p, g in zip(plain, natural)])
                    if self.settings.judge is not None else [None] * len(prompts))
        for prompt, ids, f, nat, verdict in zip(prompts, answers, forced, natural, verdicts):
            (fixed,) = generate(model, tok, [prompt], StopRules(max_new_tokens=len(ids), at_newline=False))
            hits = [a == b for a, b in zip(fixed.token_ids, ids)] + [False] * (len(ids) - len(fixed.token_ids))
            scores["forced_token"].append(f.accuracy)
            scores["forced_whole"].append(float(f.accuracy == 1.0))
            scores["generated_length_token"].append(sum(hits) / len(ids))
            scores["generated_length_whole"].append(float(all(hits)))
            scores["generated_natural_exact"].append(exact_match(nat.text, target))
            scores["generated_natural_first"].append(answer_first(nat.text, target))
            scores["generated_natural_judge"].append(
                None if verdict is None or verdict.correct is None else float(verdict.correct))
        out = {}
        for name, values in scores.items():
            rel, gen = values[0], _mean(values[1:])
            entry = {k: v for k, v in (("reliability", rel), ("generality", gen)) if v is not None}
            if entry:
                out[name] = entry
        return out

    def before_cases(self, todo: list[EditCase]) -> None:
        for fmt in self.formats:
            check_prompt_format(self.lm.tokenizer, fmt)

    def while_edited(self, case: EditCase, view) -> None:
        key = (case.task, case.case_id)
        case = view.view_case(case) if view is not None else case  # what the edited model is given
        self.results[key] = {fmt: self._variants(case, fmt) for fmt in self.formats}

    def on_record(self, record: dict) -> None:
        result = self.results.pop((record["task"], record["case_id"]), None)
        if result is not None:
            record["ablation"] = result

    def finish(self) -> dict:
        """The means over every case of the run with ablation scores (finished ones included)."""
        return matrix([r for r in self.run.read_cases() if r.get("ablation")], self.formats)


def matrix(records: list[dict], formats: tuple[str, ...]) -> dict:
    """{format: {variant: {slot: {"mean": percent, "n": cases}}}}."""
    out: dict = {}
    for fmt in formats:
        for name, *_ in VARIANTS:
            for slot in SLOTS:
                values = [r["ablation"][fmt][name][slot] for r in records
                          if slot in r["ablation"].get(fmt, {}).get(name, {})]
                if values:
                    out.setdefault(fmt, {}).setdefault(name, {})[slot] = {
                        "mean": round(100 * sum(values) / len(values), 2), "n": len(values)}
    return out


def format_matrix(block: dict) -> str:
    """The matrix as a Markdown table: one row per switch combination, a column per prompt
    format and metric."""
    formats = list(block)
    head = ["answer", "stops at", "scored as"] + [f"{fmt} {slot}" for fmt in formats for slot in SLOTS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * (len(head) - 3)]
    for name, answer, stop, scored in VARIANTS:
        cells = []
        for fmt in formats:
            for slot in SLOTS:
                v = block[fmt].get(name, {}).get(slot)
                cells.append("–" if v is None else f"{v['mean']:.1f}")
        if any(c != "–" for c in cells):
            lines.append(f"| {answer} | {stop} | {scored} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
