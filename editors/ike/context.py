"""The context IKE puts in front of every prompt, and the memory of facts behind it.

    <demonstration 1>...<demonstration n>[<echo>]New Fact: p1 t1\\n...New Fact: pm tm\\nPrompt: <probe>

One edit (single mode) has one fact; in sequential mode the memory holds every fact edited so
far, oldest first, and the context shows the newest ones that fit (`start`: how many of the
oldest were dropped, never silently: every handle records it). The demonstrations are those
retrieved for the newest fact. With a single fact the context is exactly EasyEdit's
(`"".join(icl_examples) + f"New Fact: {prompt} {target_new}\\nPrompt: "`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Callable

from bench.core.cases import EditCase
from bench.core.errors import BenchError
from editors.ike.demos import Demo


@dataclass(frozen=True)
class Fact:
    case_id: str
    task: str
    subject: str
    prompt: str
    target_new: str

    @classmethod
    def of(cls, case: EditCase) -> Fact:
        return cls(case.case_id, case.task, case.subject, case.prompt, case.target_new)

    @property
    def line(self) -> str:
        return f"New Fact: {self.prompt} {self.target_new}\n"


@dataclass(frozen=True)
class Memory:
    """An immutable snapshot: every edit replaces the editor's memory with a new one, and its
    handle's restore puts the previous one back."""

    facts: tuple[Fact, ...] = ()  # every fact edited so far, oldest first
    start: int = 0  # facts[:start] no longer fit and were dropped from the context
    demos: tuple[Demo, ...] = ()  # the demonstrations in the context, in context order
    echo: str = ""  # the newest fact as a copy demonstration (hparam echo_fact), or ""

    @property
    def in_context(self) -> tuple[Fact, ...]:
        return self.facts[self.start:]

    def context(self) -> str:
        return ("".join(d.text for d in self.demos) + self.echo
                + "".join(f.line for f in self.in_context) + "Prompt: ")

    def to_state(self) -> dict[str, Any]:
        return {"facts": [asdict(f) for f in self.facts], "start": self.start,
                "demos": [asdict(d) for d in self.demos], "echo": self.echo}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Memory:
        """The memory `to_state` gave; ValueError naming what is malformed."""
        unknown = set(state) - {"facts", "start", "demos", "echo"}
        if unknown:
            raise ValueError(f"ike: unexpected sequential state entries {sorted(unknown)}")
        facts = tuple(_record(Fact, r, "fact") for r in state.get("facts", []))
        demos = tuple(_record(Demo, r, "demonstration") for r in state.get("demos", []))
        start, echo = state.get("start", 0), state.get("echo", "")
        if not isinstance(start, int) or isinstance(start, bool) or not 0 <= start <= len(facts):
            raise ValueError(f"ike: sequential state start={start!r} is not within 0..{len(facts)}")
        if not isinstance(echo, str):
            raise ValueError("ike: sequential state echo must be text")
        return cls(facts, start, demos, echo)


def _record(cls, value: Any, what: str):
    names = [f.name for f in fields(cls)]
    if not isinstance(value, dict) or sorted(value) != sorted(names):
        raise ValueError(f"ike: sequential state has a malformed {what}: {value!r} (expected keys {names})")
    return cls(**value)


def fit(memory: Memory, count: Callable[[str], int], limit: int | None,
        policy: str) -> tuple[Memory, dict[str, Any]]:
    """`memory` cut until its context has at most `limit` tokens: the oldest facts first (the
    newest is always kept), then the least similar demonstrations, then the echo. With policy
    "error" any cut is a BenchError instead. Returns the memory and what was cut."""
    cut: dict[str, Any] = {"facts_dropped_now": [], "demos_dropped": []}
    n = count(memory.context())
    while limit is not None and n > limit:
        if policy == "error":
            raise BenchError(f"ike: the context ({n} tokens) is longer than its limit of {limit} tokens "
                             "(overflow=error; lower k or raise max_context_tokens)")
        if len(memory.in_context) > 1:
            cut["facts_dropped_now"].append(memory.facts[memory.start].case_id)
            memory = replace(memory, start=memory.start + 1)
        elif memory.demos:
            demos = list(memory.demos)
            least = min(range(len(demos)), key=lambda i: demos[i].score)
            cut["demos_dropped"].append({"case_id": demos[least].case_id, "type": demos[least].type})
            memory = replace(memory, demos=tuple(demos[:least] + demos[least + 1:]))
        elif memory.echo:
            cut["echo_dropped"] = True
            memory = replace(memory, echo="")
        else:
            raise BenchError(f"ike: the new fact alone ({n} tokens of context) does not fit the limit of "
                             f"{limit} tokens (max_context_tokens / probe_reserve / the model's context)")
        n = count(memory.context())
    cut["context_tokens"] = n
    return memory, cut
