"""Long-context tasks generated locally from a seed, at token-exact lengths, scored like RULER.

Every sample is a ``context`` (what a compressor gets to compress) and a ``question`` (the query and the start of
the answer). Where the question goes is the runner's choice: after the compressed context (the compressor cannot
see it; the honest default) or inside the prompt that is compressed.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass, field
from typing import Callable

from ..data import ANSWER_START, QUESTION, haystack_prompt, passkey_prompt
from ..errors import OjaKVError


@dataclass
class Sample:
    task: str
    length: int
    index: int
    context: str
    question: str
    answers: list[str]
    meta: dict = field(default_factory=dict)


def string_match_all(completion: str, answers: list[str]) -> float:
    """RULER's metric: the fraction of reference strings found (case-insensitive) in the completion."""
    text = completion.lower()
    return sum(answer.lower() in text for answer in answers) / len(answers)


def _passkey(tokenizer, length: int, index: int, seed: int) -> Sample:
    depth = (0.1, 0.3, 0.5, 0.7, 0.9)[index % 5]
    prompt, key = passkey_prompt(tokenizer, length, seed=seed * 100_003 + index, depth=depth)
    suffix = f"\n\n{QUESTION} {ANSWER_START}"
    return Sample("passkey", length, index, prompt[: -len(suffix)], suffix, [key], {"depth": depth})


def _niah(name: str, haystack: str, value_kind: str):
    """RULER-style single needle: a key-value sentence in noise or essays; the value is a number or a UUID."""

    def make(tokenizer, length: int, index: int, seed: int) -> Sample:
        rng = random.Random(f"niah-{haystack}-{value_kind}-{seed}-{index}")
        depth = (0.1, 0.3, 0.5, 0.7, 0.9)[index % 5]
        word = rng.choice(_KEY_WORDS) + "-" + rng.choice(_KEY_WORDS)
        value = str(rng.randint(1_000_000, 9_999_999)) if value_kind == "number" else str(uuid.UUID(int=rng.getrandbits(128)))
        needle = f"One of the special magic {value_kind}s for {word} is: {value}."
        ask = f"What is the special magic {value_kind} for {word} mentioned in the text above?"
        answer_start = f"The special magic {value_kind} for {word} mentioned in the text is"
        prompt = haystack_prompt(tokenizer, length, needle, f"{ask}\n{answer_start}", depth=depth,
                                 haystack=haystack)
        suffix = f"\n\n{ask} {answer_start}"
        return Sample(name, length, index, prompt[: -len(suffix)], suffix, [value], {"depth": depth})

    return make


_KEY_WORDS = ["amber", "basin", "cobalt", "delta", "ember", "fjord", "granite", "harbor", "indigo", "juniper",
              "kestrel", "lagoon", "meadow", "nectar", "onyx", "prairie", "quartz", "raven", "sierra", "tundra"]

# name -> generator(tokenizer, length, index, seed) -> Sample. RULER names map to their closest local form.
TASKS: dict[str, Callable] = {
    "passkey": _passkey,
    "niah_single_1": _niah("niah_single_1", "noise", "number"),
    "niah_single_2": _niah("niah_single_2", "essays", "number"),
    "niah_single_3": _niah("niah_single_3", "essays", "uuid"),
}
SUITES = {"ruler": ["niah_single_1", "niah_single_2", "niah_single_3"]}


def expand_tasks(names: list[str]) -> list[str]:
    tasks: list[str] = []
    for name in names:
        for task in SUITES.get(name, [name]):
            if task not in TASKS and task != "ppl":
                raise OjaKVError(f"unknown task {task!r}: choose from {', '.join([*TASKS, 'ppl', *SUITES])}")
            if task not in tasks:
                tasks.append(task)
    return tasks


def make_sample(task: str, tokenizer, length: int, index: int, seed: int = 0) -> Sample:
    return TASKS[task](tokenizer, length, index, seed)
