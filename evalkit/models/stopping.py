"""Stop sequences for generation: end early once every row has produced one, then cut the text.

Text is cut at the first stop sequence after decoding, so whether generation ended early never
changes the answer; stopping only saves steps.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import transformers


class StopOnSequences(transformers.StoppingCriteria):
    """Stops a batch when every row has produced a stop sequence.

    With a tensor-parallel ``group`` the decision is agreed across the group (a row counts as
    done only when it is done on every rank), so all ranks take the same number of steps.
    """

    def __init__(self, tokenizer, stops: list[str], prompt_len: int, batch_size: int, group: Any = None) -> None:
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.prompt_len = prompt_len
        # A stop sequence that just appeared lies in the newest tokens: a token carries at least one
        # byte and a character at most 4, so decoding this many is enough, instead of the whole
        # continuation at every step (quadratic in its length). A window starting mid-character can
        # only add a replacement character, which never completes a stop, and the text is cut at the
        # first stop after decoding anyway, so the answer never depends on when generation stopped.
        self.window = 4 * max((len(s) for s in self.stops), default=0) + 4
        self.group = group
        self.done = torch.zeros(batch_size, dtype=torch.bool)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        start = max(self.prompt_len, input_ids.shape[1] - self.window)
        texts = self.tokenizer.batch_decode(input_ids[:, start:])
        for row, text in enumerate(texts):
            if not self.done[row]:
                self.done[row] = any(stop in text for stop in self.stops)
        if self.group is not None:
            agreed = self.done.to(dtype=torch.int32, device=input_ids.device)
            dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=self.group)
            self.done = agreed.to("cpu", dtype=torch.bool)
        return self.done.all().expand(input_ids.shape[0]).to(input_ids.device)


def cut_at_stop(text: str, stops: list[str]) -> str:
    for stop in stops:
        if stop:
            text = text.split(stop)[0]
    return text


def drop_thinking(text: str, think_end: str | None) -> str:
    """lm-eval's ``think_end_token``: the answer is what follows the last ``think_end`` (leading
    whitespace dropped); a generation without it is kept whole. Applied to text already cut at its
    first stop sequence, so the answer never depends on how long the batch went on generating."""
    if not think_end:
        return text
    return text.split(think_end)[-1].lstrip()
