"""Long-context tasks generated locally from a seed, at token-exact lengths, scored like RULER.

Every sample is a ``context`` (what a compressor gets to compress) and a ``question`` (the query and the start of
the answer). Where the question goes is the runner's choice: after the compressed context (the compressor cannot
see it; the honest default) or inside the prompt that is compressed. The context-shift tasks add a ``turn``: a
second document of another kind that arrives after the context, in chunks, as a chat's next turn would.
"""

from __future__ import annotations

import functools
import random
import re
import string
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from ..data import ANSWER_START, NEEDLE, QUESTION, essay_text, haystack_prompt, passkey_prompt
from ..errors import OjaKVError


DEPTH_GRID = (0.1, 0.3, 0.5, 0.7, 0.9)  # single-needle depths, by sample index
NEEDLE_GRID = tuple(i / 10 for i in range(11))  # the needle-grid task's depths, 0 to 1


@dataclass
class Query:
    """One question about a sample's context (the question and the start of the answer) and what it must name."""

    question: str
    answers: list[str]


@dataclass
class Sample:
    """A context and the questions asked about it. Tasks that plant several needles but ask for one ask for each
    of them in turn: every query is scored as a sample of its own, and a runner that compresses the context once
    spends one prefill on all of them. ``turn``, when there is one, arrives after the context and before any
    question, fed through the cache in decode-mode chunks (the context-shift tasks). ``length`` counts the
    context, the turn and the first query."""

    task: str
    length: int
    index: int
    context: str
    queries: list[Query]
    meta: dict = field(default_factory=dict)
    turn: str = ""

    @property
    def question(self) -> str:
        return self.queries[0].question

    @property
    def answers(self) -> list[str]:
        return self.queries[0].answers


def string_match_all(completion: str, answers: list[str]) -> float:
    """RULER's metric: the fraction of reference strings found (case-insensitive) in the completion."""
    text = completion.lower()
    return sum(answer.lower() in text for answer in answers) / len(answers)


def _passkey(tokenizer, length: int, index: int, seed: int) -> Sample:
    depth = DEPTH_GRID[index % len(DEPTH_GRID)]
    prompt, key = passkey_prompt(tokenizer, length, seed=seed * 100_003 + index, depth=depth)
    suffix = f"\n\n{QUESTION} {ANSWER_START}"
    return Sample("passkey", length, index, prompt[: -len(suffix)], [Query(suffix, [key])], {"depth": depth})


_KEY_WORDS = ["amber", "basin", "cobalt", "delta", "ember", "fjord", "granite", "harbor", "indigo", "juniper",
              "kestrel", "lagoon", "meadow", "nectar", "onyx", "prairie", "quartz", "raven", "sierra", "tundra"]


def _rng(*parts) -> random.Random:
    return random.Random("-".join(str(p) for p in parts))


def _depths(count: int, rng: random.Random, index: int, grid=DEPTH_GRID) -> list[float]:
    """One needle: the depth grid by sample index; several: spread over the haystack, jittered per sample."""
    if count == 1:
        return [grid[index % len(grid)]]
    return [min(0.95, max(0.05, (i + 0.5) / count + rng.uniform(-0.4, 0.4) / count)) for i in range(count)]


def _key(rng: random.Random, kind: str) -> str:
    if kind == "uuid":
        return str(uuid.UUID(int=rng.getrandbits(128)))
    return rng.choice(_KEY_WORDS) + "-" + rng.choice(_KEY_WORDS)


def _value(rng: random.Random, kind: str) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128))) if kind == "uuid" else str(rng.randint(1_000_000, 9_999_999))


def _kv(key: str, value: str, kind: str) -> str:
    return f"One of the special magic {kind}s for {key} is: {value}."


def _niah(name: str, haystack: str, value_kind: str, *, key_kind: str = "word", needles: int = 1,
          values_per_key: int = 1, queries: int = 1, kv_filler: bool = False, grid=DEPTH_GRID):
    """RULER-style needles: key-value sentences in noise, essays, or a filler made of distractor key-values.

    ``needles`` keys are planted, each with ``values_per_key`` values; ``queries`` of the keys are asked for and
    every value of every queried key must appear in the answer (string_match_all).
    """

    def make(tokenizer, length: int, index: int, seed: int) -> Sample:
        rng = _rng(name, seed, index)
        keys = []
        while len(keys) < needles:
            key = _key(rng, key_kind)
            if key not in keys:
                keys.append(key)
        values = {key: [_value(rng, value_kind) for _ in range(values_per_key)] for key in keys}
        planted = [_kv(key, value, value_kind) for key in keys for value in values[key]]
        needle_list = list(zip(planted, _depths(len(planted), rng, index, grid)))
        # A question for ``queries`` keys at a time: the first group, then (one key asked per question) each other
        # planted key in turn, as separate queries of the same context.
        groups = [keys[:queries]] if queries > 1 else [[key] for key in keys]
        asked = [_ask(group, value_kind, values_per_key) for group in groups]
        filler = None
        if kv_filler:  # distractors: the same sentence shape with other keys and values
            filler = " ".join(_kv(_key(rng, key_kind), _value(rng, value_kind), value_kind) for _ in range(400))
        ask, answer_start = asked[0]
        prompt = haystack_prompt(tokenizer, length, needle_list, f"{ask}\n{answer_start}", haystack=haystack,
                                 filler_text=filler)
        context = prompt[: -len(f"\n\n{ask} {answer_start}")]
        found = [Query(f"\n\n{ask} {start}", [value for key in group for value in values[key]])
                 for group, (ask, start) in zip(groups, asked)]
        depths = [round(d, 3) for _, d in needle_list]
        return Sample(name, length, index, context, found, {"depths": depths})

    return make


def _ask(keys: list[str], value_kind: str, values_per_key: int) -> tuple[str, str]:
    """The question for ``keys`` and the start of its answer, RULER's wording."""
    ask_keys = ", ".join(keys)
    plural = "s" if len(keys) > 1 or values_per_key > 1 else ""
    ask = f"What are all the special magic {value_kind}s for {ask_keys} mentioned in the text above?" \
        if plural else f"What is the special magic {value_kind} for {ask_keys} mentioned in the text above?"
    answer_start = f"The special magic {value_kind}{plural} for {ask_keys} mentioned in the text {'are' if plural else 'is'}"
    return ask, answer_start


def _variable_tracking(tokenizer, length: int, index: int, seed: int) -> Sample:
    """A chain of 5 variables (VAR A = 12345, VAR B = VAR A, ...) hidden in noise: name every one of them."""
    rng = _rng("vt", seed, index)
    names = []
    while len(names) < 5:
        name = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        if name not in names:
            names.append(name)
    value = str(rng.randint(10000, 99999))
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[i]} = VAR {names[i - 1]}" for i in range(1, 5)]
    needles = list(zip(chain, sorted(_depths(5, rng, index))))
    ask = f"Find all variables that are assigned the value {value} in the text above."
    answer_start = f"Answer: According to the chain of variable assignments in the text above, 5 variables are " \
                   f"assigned the value {value}, they are:"
    prompt = haystack_prompt(tokenizer, length, needles, f"{ask}\n{answer_start}")
    suffix = f"\n\n{ask} {answer_start}"
    return Sample("vt", length, index, prompt[: -len(suffix)], [Query(suffix, names)], {})


@functools.lru_cache(maxsize=1)
def _vocabulary() -> tuple[str, ...]:
    """Distinct lowercase words of the eval essays (4-10 letters): natural words for the aggregation tasks."""
    return tuple(sorted({w for w in re.findall(r"[a-z]+", essay_text("eval").lower()) if 4 <= len(w) <= 10}))


def _fit(tokenizer, length: int, build, question: str) -> tuple[str, int]:
    """Largest size whose ``build(size)`` context plus question fits ``length`` tokens (binary search)."""
    def tokens(size: int) -> int:
        return len(tokenizer(build(size) + question, add_special_tokens=False).input_ids)

    low, high = 1, 8
    while tokens(high) < length:
        low, high = high, high * 2
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if tokens(middle) <= length else (low, middle - 1)
    return build(low), low


def _common_words(tokenizer, length: int, index: int, seed: int) -> Sample:
    """A numbered list where 10 words appear 30 times each and many others 3 times: name the 10 common ones."""
    rng = _rng("cwe", seed, index)
    words = rng.sample(_vocabulary(), 10 + 1500)
    common, rare = words[:10], words[10:]
    ask = "What are the 10 most common words in the above list?"
    question = f"\n\n{ask} Answer: The top 10 words that appear most often in the list are:"

    def builder(times_common: int, times_rare: int):
        def build(n_rare: int) -> str:
            items = common * times_common + rare[:n_rare] * times_rare
            random.Random(n_rare + index).shuffle(items)
            return "Below is a numbered list of words.\n" + " ".join(f"{i + 1}. {w}" for i, w in enumerate(items))
        return build

    # RULER's 30 / 3 repetitions at long lengths; fewer where 300 common items alone would not leave room.
    for times_common, times_rare in ((30, 3), (20, 3), (10, 2), (5, 1)):
        build = builder(times_common, times_rare)
        if len(tokenizer(build(0) + question, add_special_tokens=False).input_ids) <= length // 2:
            break
    context, _ = _fit(tokenizer, length, build, question)
    return Sample("cwe", length, index, context, [Query(question, common)], {"repeats": times_common})


def _frequent_words(tokenizer, length: int, index: int, seed: int) -> Sample:
    """Coded text of words drawn from a Zipf law (alpha 2): name the 3 most frequent."""
    rng = _rng("fwe", seed, index)
    vocab = rng.sample(_vocabulary(), 200)
    weights = [1 / (rank + 1) ** 2 for rank in range(len(vocab))]
    stream = rng.choices(vocab, weights=weights, k=20_000)

    def build(n_words: int) -> str:
        return "Read the following coded text and track the frequency of each coded word.\n" + \
            " ".join(f"{w} ...." for w in stream[:n_words])

    ask = "What are the 3 most frequently appeared coded words in the above coded text?"
    question = f"\n\n{ask} Answer: The top 3 words that appear most often in the coded text are:"
    context, size = _fit(tokenizer, length, build, question)
    counts = Counter(stream[:size])
    return Sample("fwe", length, index, context, [Query(question, [w for w, _ in counts.most_common(3)])], {})


def _code_filler(rng: random.Random) -> str:
    """Small Python functions with names from the essays' words: source code, a document of another kind."""
    words = _vocabulary()
    blocks = []
    for _ in range(60):
        name, arg = rng.choice(words), rng.choice(words)
        factor, offset = rng.randint(2, 97), rng.randint(1, 999)
        blocks.append(f"def {name}_{factor}({arg}s):\n    total = {offset}\n    for {arg} in {arg}s:\n"
                      f"        total += {arg} * {factor}\n    return total\n")
    return "\n".join(blocks)


def _number_filler(rng: random.Random) -> str:
    """Rows of four-digit numbers: a table, a document of another kind."""
    return "\n".join(f"row {i + 1}: " + " ".join(str(rng.randint(1000, 9999)) for _ in range(8)) for i in range(200))


SHIFT_FILLERS = {"noise": None, "code": _code_filler, "numbers": _number_filler}
SHIFT_SPLIT = 0.5  # the first document's share of the sample's tokens; the turn (and the question) get the rest


def _shift(kind: str):
    """Context shift: essays are the context; the next turn is a document of another ``kind`` (the pass-key noise,
    source code, rows of numbers) holding the pass key, fed after the context; the question asks for the key. What
    a basis fitted on the context meets when the conversation moves on (the claim online updates make)."""

    def make(tokenizer, length: int, index: int, seed: int) -> Sample:
        rng = _rng("shift", kind, seed, index)
        first = int(length * SHIFT_SPLIT)
        text = essay_text("eval")
        start = text.find(". ", rng.randrange(len(text) - 10 * first)) + 2  # from a sentence start
        context = tokenizer.decode(tokenizer(text[start : start + 10 * first], add_special_tokens=False)
                                   .input_ids[:first]).strip()
        depth = DEPTH_GRID[index % len(DEPTH_GRID)]
        key = str(rng.randint(10000, 99999))
        filler = SHIFT_FILLERS[kind]
        suffix = f"\n\n{QUESTION} {ANSWER_START}"
        prompt = haystack_prompt(tokenizer, length - first, NEEDLE.format(passkey=key), f"{QUESTION}\n{ANSWER_START}",
                                 depth=depth, haystack="noise", filler_text=filler and filler(rng))
        turn = "\n\n" + prompt[: -len(suffix)]
        return Sample(f"shift_{kind}", length, index, context, [Query(suffix, [key])], {"depth": depth}, turn)

    return make


# name -> generator(tokenizer, length, index, seed) -> Sample. RULER names map to their closest local form.
TASKS: dict[str, Callable] = {
    "passkey": _passkey,
    "niah_single_1": _niah("niah_single_1", "noise", "number"),
    "niah_single_2": _niah("niah_single_2", "essays", "number"),
    "niah_single_3": _niah("niah_single_3", "essays", "uuid"),
    "niah_multikey_1": _niah("niah_multikey_1", "essays", "number", needles=4),
    "niah_multikey_2": _niah("niah_multikey_2", "noise", "number", kv_filler=True),
    "niah_multikey_3": _niah("niah_multikey_3", "noise", "uuid", key_kind="uuid", kv_filler=True),
    "niah_multivalue": _niah("niah_multivalue", "essays", "number", values_per_key=4),
    "niah_multiquery": _niah("niah_multiquery", "essays", "number", needles=4, queries=4),
    "vt": _variable_tracking,
    # The needle grid: sample i puts one essay needle at depth NEEDLE_GRID[i % 11]; use --samples 11 (or 22...)
    # and several --lengths, and the report draws accuracy as a length x depth heatmap per method.
    "needle": _niah("needle", "essays", "number", grid=NEEDLE_GRID),
    "cwe": _common_words,
    "fwe": _frequent_words,
    **{f"shift_{kind}": _shift(kind) for kind in SHIFT_FILLERS},
}
RULER = ["niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
         "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe"]
SUITES = {"ruler": RULER, "shift": [f"shift_{kind}" for kind in SHIFT_FILLERS]}


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
