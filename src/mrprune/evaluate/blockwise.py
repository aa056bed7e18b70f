"""Evaluation forwards in block-major order, for models whose blocks wait on the host (``--offload``).

A forward per window (or per lm-eval batch) would copy every block to the device once per forward: a 70B model
in bf16 (130 GiB) for each of WikiText-2's ~160 windows, or for each of HellaSwag's 40,000 requests. Here a
set of inputs goes through the blocks together: their hidden states stay on the device, each block is copied
in once and runs every input in turn, and the model's own forward then turns each input's last hidden state
into logits with its blocks bypassed (final norm, head and any post-processing such as Gemma's logit
soft-capping are the model's code). Each input is still its own forward over its own shape, so the numbers are
those of the per-input order.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from ..calibrate import (
    blocks_return_tuples,
    capture_block_inputs,
    forwards_replaced,
    pass_through,
    pass_through_as_tuple,
    record_block_calls,
    run_block,
)
from ..models.adapter import ModelAdapter, get_adapter
from ..runtime import BlockMover

if TYPE_CHECKING:
    from transformers import PreTrainedConfig

#: device memory for the hidden states of the inputs that go through the blocks together
CHUNK_BYTES = 2 << 30


def hidden_size(model: nn.Module) -> int:
    config = cast("PreTrainedConfig", model.config)
    return (config.get_text_config() if hasattr(config, "get_text_config") else config).hidden_size


def hidden_bytes(model: nn.Module, tokens: int) -> int:
    """Bytes of the hidden states of ``tokens`` tokens entering a block."""
    return tokens * hidden_size(model) * next(get_adapter(model).blocks.parameters()).dtype.itemsize


def run_blocks(model: nn.Module, inputs: list[torch.Tensor], device: torch.device, bar=None) -> list[torch.Tensor]:
    """The last block's output for each input (batch x length token ids), with every block on ``device`` once.

    Each input's blocks get the context the model's forward gives them for that input's shape (recorded once
    per shape). ``bar`` (tqdm) advances once per block."""
    adapter = get_adapter(model)
    dtype = next(adapter.blocks.parameters()).dtype
    calls: dict[tuple[int, ...], list] = {}
    hidden = []
    for ids in inputs:
        shape = tuple(ids.shape)
        if shape not in calls:
            calls[shape] = [call.to(device) for call in record_block_calls(adapter, ids)]
        hidden.append(capture_block_inputs(adapter, ids, ids.shape[0], device, dtype)[0])
    mover = BlockMover(adapter.blocks, device, wrap=True)
    try:
        for index, block in enumerate(adapter.blocks):
            mover.fetch(index)
            for ids, states in zip(inputs, hidden):
                run_block(block, calls[tuple(ids.shape)][index], states, ids.shape[0], device, write_back=True)
            mover.release(index, changed=False)
            if bar is not None:
                bar.update()
    finally:
        mover.close()
    return hidden


@contextlib.contextmanager
def last_block_answers(adapter: ModelAdapter, final: torch.Tensor):
    """While active, the model's forward skips its blocks and takes ``final`` as the last block's output (which
    went through the last block's forward hooks already: they are held back meanwhile, not applied twice)."""
    blocks = adapter.blocks
    last = len(blocks) - 1
    bypass = pass_through_as_tuple if blocks_return_tuples(adapter) else pass_through
    answer = (final,) if bypass is pass_through_as_tuple else final
    hooks = blocks[last]._forward_hooks
    blocks[last]._forward_hooks = type(hooks)()
    try:
        with forwards_replaced(blocks, lambda index: (lambda *args, **kwargs: answer) if index == last else bypass):
            yield
    finally:
        blocks[last]._forward_hooks = hooks


@torch.inference_mode()
def head_logits(model: nn.Module, ids: torch.Tensor, final: torch.Tensor, **kwargs) -> torch.Tensor:
    """The logits ``model(ids, **kwargs)`` gives, from the last block's output ``final`` for ``ids``."""
    adapter = get_adapter(model)
    if "output_router_logits" in inspect.signature(model.forward).parameters:
        kwargs.setdefault("output_router_logits", False)  # the bypassed blocks route nothing to balance
    with last_block_answers(adapter, final):
        return model(input_ids=ids.to(adapter.input_device()), use_cache=False, **kwargs).logits


def last_block_output(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The last block's output for ``ids``, from the model's own forward (asked for the last position's logits
    only; as a list of positions, since an integer lets some models drop the other positions early: Gemma-4).
    Records the block calls first, as :func:`run_blocks` does, so that :func:`head_logits` knows how a bypassed
    block must answer."""
    adapter = get_adapter(model)
    record_block_calls(adapter, ids)
    seen: list[torch.Tensor] = []

    def keep(module, args, output):
        seen.append(output[0] if isinstance(output, tuple) else output)

    handle = adapter.blocks[len(adapter.blocks) - 1].register_forward_hook(keep)
    try:
        model(input_ids=ids.to(adapter.input_device()), use_cache=False,
              logits_to_keep=torch.tensor([ids.shape[1] - 1]))
    finally:
        handle.remove()
    return seen[-1]
