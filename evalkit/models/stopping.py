"""Stop sequences for generation: end early once every row has produced one, then cut the text.

Text is cut at the first stop sequence after decoding, so whether generation ended early never
changes the answer; stopping only saves steps.
"""

from __future__ import annotations

import torch
import transformers


class StopOnSequences(transformers.StoppingCriteria):
    def __init__(self, tokenizer, stops: list[str], prompt_len: int, batch_size: int) -> None:
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.prompt_len = prompt_len
        self.done = torch.zeros(batch_size, dtype=torch.bool)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_len :])
        for row, text in enumerate(texts):
            if not self.done[row]:
                self.done[row] = any(stop in text for stop in self.stops)
        return self.done.all().expand(input_ids.shape[0]).to(input_ids.device)


def cut_at_stop(text: str, stops: list[str]) -> str:
    for stop in stops:
        if stop:
            text = text.split(stop)[0]
    return text
