"""lm-eval's HFLM with its loglikelihood requests run block by block, for offloaded models.

HFLM calls the model once per batch of requests, and with offloaded blocks every call would copy the whole
model to the device (HellaSwag alone is 40,000 requests). The subclass made here answers a part of the
requests (as many as ``blockwise.CHUNK_BYTES`` of hidden states) in two passes of HFLM's own
``_loglikelihood_tokens`` over it: the first only records the inputs HFLM would give the model (its model
call returns zeros), then those inputs go through the blocks together (:func:`blockwise.run_blocks`), and the
second pass gets each input's logits from its last hidden state. Tokenisation, truncation, batching, grouping
of one-token continuations and scoring all stay HFLM's. Generation (``generate_until``) streams the blocks as
before.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch
from tqdm.auto import tqdm

from ..models.adapter import get_adapter
from ..runtime import streamed_blocks
from . import blockwise

Request = tuple[tuple[str, str], list[int], list[int]]


def request_parts(requests: list[Request], max_length: int, budget_tokens: int) -> Iterator[list[Request]]:
    """Consecutive parts of ``requests`` whose model inputs (context + continuation, truncated as HFLM does)
    hold at most ``budget_tokens`` tokens together (at least one request each)."""
    part: list[Request] = []
    tokens = 0
    for request in requests:
        length = min(len(request[1]) + len(request[2]), max_length + 1) - 1
        if part and tokens + length > budget_tokens:
            yield part
            part, tokens = [], 0
        part.append(request)
        tokens += length
    if part:
        yield part


@contextlib.contextmanager
def _model_call(lm, call: Callable[..., torch.Tensor]):
    lm._model_call = call
    try:
        yield
    finally:
        del lm._model_call


@contextlib.contextmanager
def _no_cache(lm):
    """The recording pass's answers are placeholders: keep them out of any lm-eval cache."""
    from lm_eval.api.model import CacheHook

    hook, lm.cache_hook = lm.cache_hook, CacheHook(None)
    try:
        yield
    finally:
        lm.cache_hook = hook


@functools.cache
def block_major_lm(hflm: type) -> type:
    """The subclass of lm-eval's ``HFLM`` class ``hflm`` that runs loglikelihood requests block by block."""

    class BlockMajorLM(hflm):
        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            model = self.model
            adapter = get_adapter(model)
            device = adapter.input_device()
            vocab = model.get_output_embeddings().weight.shape[0]
            budget = max(1, blockwise.CHUNK_BYTES // blockwise.hidden_bytes(model, 1))
            parts = list(request_parts(requests, self.max_length, budget))
            results = []
            with tqdm(total=len(parts) * adapter.num_blocks, desc="loglikelihood (block by block)", unit="step",
                      disable=disable_tqdm) as bar:
                for part in parts:
                    inputs: list[torch.Tensor] = []

                    def record(inps, attn_mask=None, labels=None, seen=inputs):
                        seen.append(inps)
                        return torch.zeros((*inps.shape, vocab), device=inps.device)

                    with _model_call(self, record), _no_cache(self):
                        super()._loglikelihood_tokens(part, True, override_bs)
                    finals = iter(zip(inputs, blockwise.run_blocks(model, inputs, device, bar)))

                    def answer(inps, attn_mask=None, labels=None, finals=finals):
                        recorded, final = next(finals)
                        if not torch.equal(inps, recorded):
                            raise RuntimeError("lm-eval's second pass over a part of the requests asked for "
                                               "other inputs than its first")
                        return blockwise.head_logits(model, inps, final)

                    with _model_call(self, answer):
                        results += super()._loglikelihood_tokens(part, True, override_bs)
            return results

        def generate_until(self, requests, disable_tqdm: bool = False):
            adapter = get_adapter(self.model)
            with streamed_blocks(adapter.blocks, adapter.input_device(), True):
                return super().generate_until(requests, disable_tqdm)

    return BlockMajorLM
