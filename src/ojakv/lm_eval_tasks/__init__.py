"""Offline lm-evaluation-harness tasks shipped with ojakv: three small data sets written for this project.

- ``ojakv_recall`` (loglikelihood, multiple choice): where did someone leave something, among distractor facts
  in filler text (about 300 tokens of context, so a compressed cache holds more than its full-precision anchors).
- ``ojakv_passkey`` (generate_until): a five-digit pass key hidden at depths 0.1 to 0.9 of 430-450 tokens.
- ``ojakv_rolling`` (loglikelihood_rolling): three paragraphs of 120-160 tokens, scored as perplexity.
- ``ojakv_local``: the group of all three.

Pass this folder to lm-eval with ``--include_path`` (``python -m ojakv.lm_eval`` adds it for you).
"""

from __future__ import annotations

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent


def load(data_file: str, **_metadata):
    """The ``custom_dataset`` of every task here: the JSONL file next to this module, as a ``test`` split.

    lm-eval would resolve a relative ``data_files`` against the working directory; resolving it here makes the
    tasks work from any directory and from an installed package. Extra keyword arguments are lm-eval's metadata.
    """
    import datasets

    return datasets.load_dataset("json", data_files={"test": str(TASKS_DIR / data_file)})
