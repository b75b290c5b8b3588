"""The normalised edit case that every task loader produces and every editor consumes."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class PromptAnswer:
    """A prompt and the answer expected after it (locality or portability probe)."""

    prompt: str
    answer: str


@dataclass(frozen=True)
class EditCase:
    """One edit request with its evaluation probes.

    `prompt` contains `subject`; the edit asks the model to continue `prompt` with `target_new`
    instead of `ground_truth`. `instruction` names the instruction description the prompts were
    wrapped in (None for raw prompts): wrapping never touches `locality`.
    """

    case_id: str
    task: str
    prompt: str
    subject: str
    target_new: str
    ground_truth: str | None = None
    rephrase_prompts: tuple[str, ...] = ()
    locality: tuple[PromptAnswer, ...] = ()
    portability: tuple[PromptAnswer, ...] = ()
    instruction: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SkippedRecord:
    """A source record a loader refused, with the reason (counted in the run summary)."""

    task: str
    source: str
    index: int
    reason: str


@dataclass
class TaskSplit:
    """The cases of one task split plus the records that were skipped while loading it."""

    task: str
    split: str
    cases: list[EditCase] = field(default_factory=list)
    skipped: list[SkippedRecord] = field(default_factory=list)
