"""Stopping ``generate`` early on a condition of the text decoded so far (transformers' StoppingCriteria)."""

from __future__ import annotations

from typing import Callable

import torch
from transformers import StoppingCriteria, StoppingCriteriaList


class _StopWhen(StoppingCriteria):
    def __init__(self, prompt_length: int, done: Callable[[list[int]], bool]):
        self.prompt_length, self.done = prompt_length, done

    def __call__(self, input_ids, scores, **kwargs):
        return torch.tensor([self.done(row[self.prompt_length:].tolist()) for row in input_ids],
                            device=input_ids.device)


def stop_when(prompt_length: int, done: Callable[[list[int]], bool]) -> StoppingCriteriaList:
    """Criteria for ``generate(stopping_criteria=...)`` that end a sequence once ``done(new_token_ids)`` holds."""
    return StoppingCriteriaList([_StopWhen(prompt_length, done)])
