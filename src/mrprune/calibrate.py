"""Calibration activations: capture what enters the blocks, run blocks on cached inputs, collect statistics.

The parent model calls each block with the hidden states plus context (masks, position embeddings, position
ids, ...) that may differ per block: Gemma3 and Qwen2 pass sliding-window masks to some blocks and full masks
to others. So the context of EVERY block is recorded once, by forward pre-hooks (all args and kwargs) during
one forward of a single calibration window with the blocks bypassed; calibration windows carry no padding, so
that context holds for every window (batch dimension 1 broadcasts). The hidden states entering block 0 are captured for all
windows by a pre-hook that stops the forward there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import pairwise

import torch
from torch import nn

from .errors import UnsupportedModelError
from .metrics.base import LayerStats
from .models.adapter import ExpertRef, LinearRef, ModelAdapter
from .models.experts import Routed, experts_kind
from .runtime import move_tree

#: keyword arguments through which a parent passes a KV cache; calibration never uses one
CACHE_KWARGS = ("cache", "past_key_value", "past_key_values", "layer_past")


@dataclass
class BlockCall:
    """Everything a block receives besides the hidden states: positional args after them and keyword args.

    Recorded for one window, the context broadcasts over a micro-batch of windows in almost every model, but a
    block may check its batch size (XGLM's attention checks its mask's), and BLOOM folds the batch into its
    ALiBi tensor's first dimension. So ``by_rows`` holds the context for each other micro-batch size the run
    uses: this one's tensors expanded where they broadcast (no memory of their own), the recorded ones where not."""

    args: tuple
    kwargs: dict
    by_rows: dict[int, BlockCall] = field(default_factory=dict)

    def to(self, device: torch.device) -> BlockCall:
        return BlockCall(move_tree(self.args, device), move_tree(self.kwargs, device),
                         {rows: call.to(device) for rows, call in self.by_rows.items()})

    def for_rows(self, rows: int) -> BlockCall:
        """The context for a micro-batch of ``rows`` windows."""
        if rows == 1 or not self.by_rows:
            return self
        if rows not in self.by_rows:
            raise RuntimeError(f"no block context was recorded for micro-batches of {rows} windows")
        return self.by_rows[rows]


def _sized_like(one, sized):
    """``sized`` (a context recorded for a micro-batch), with every tensor that broadcasts from its counterpart
    in ``one`` (recorded for one window) replaced by an expanded view of it: the shapes a block checks, none of
    the memory."""
    if isinstance(one, torch.Tensor) and isinstance(sized, torch.Tensor):
        if one.dim() == sized.dim() and all(i in (j, 1) for i, j in zip(one.shape, sized.shape)):
            return one.expand(sized.shape)
        return sized
    if isinstance(one, (tuple, list)) and type(one) is type(sized) and len(one) == len(sized):
        return type(one)(_sized_like(a, b) for a, b in zip(one, sized))
    if isinstance(one, dict) and isinstance(sized, dict) and one.keys() == sized.keys():
        return {key: _sized_like(one[key], sized[key]) for key in one}
    return sized


def _split_hidden(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
    kwargs = dict(kwargs)
    if args:
        hidden, rest = args[0], tuple(args[1:])
    else:
        hidden, rest = kwargs.pop("hidden_states"), ()
    for key in CACHE_KWARGS:
        if key in kwargs:
            kwargs[key] = None
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    return hidden, rest, kwargs


def pass_through(*args, **kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def pass_through_as_tuple(*args, **kwargs) -> tuple[torch.Tensor]:
    return (pass_through(*args, **kwargs),)


#: set on a model's block list when its parent takes ``[0]`` of every block's output (the blocks of models
#: written for transformers 4, remote code among them, return tuples)
_TUPLE_OUTPUTS = "_mrprune_blocks_return_tuples"


@contextlib.contextmanager
def forwards_replaced(blocks: nn.ModuleList, forward_of: Callable[[int], Callable]):
    """While active, block i runs ``forward_of(i)``; afterwards each block gets back the forward it had of its own
    (accelerate's device hooks set one on the instance), or its class's."""
    own = [vars(block).get("forward") for block in blocks]
    for index, block in enumerate(blocks):
        block.forward = forward_of(index)
    try:
        yield
    finally:
        for block, forward in zip(blocks, own):
            if forward is None:
                del block.forward
            else:
                block.forward = forward


def blocks_return_tuples(adapter: ModelAdapter) -> bool:
    """Whether a bypassed block must answer with a tuple; known once ``record_block_calls`` has run."""
    return getattr(adapter.blocks, _TUPLE_OUTPUTS, False)


class _RecordingDone(Exception):
    """Ends a recording forward where the parent shows that it indexes the blocks' outputs."""


def record_block_calls(adapter: ModelAdapter, window: torch.Tensor, rows: Iterable[int] = ()) -> list[BlockCall]:
    """Record each block's call context during one forward of ``window`` (1 x seqlen ids), and for each
    micro-batch size in ``rows`` (see :class:`BlockCall`).

    The parent computes masks and position embeddings before its block loop, not from the blocks' outputs, so
    the blocks are bypassed during this forward: it costs an embedding lookup and the final norm, and offloaded
    blocks never need to reach the device for it. A bypassed block answers with its input; if
    the next block then receives something else of another shape (the parent took ``[0]`` of it), the blocks
    return tuples, and the recording is done again with bypasses that answer so.

    mrprune runs the blocks as a chain, each block once, on what the one before returned. A model whose
    forward does otherwise (a looped model that runs blocks again, a parent that changes the hidden states
    between blocks or unpacks more than them from a block) is refused here, with one line: pruning it
    block by block would compute something other than the model.
    """
    calls, indexed = _record_block_calls(adapter, window, as_tuple=False)
    if indexed:
        object.__setattr__(adapter.blocks, _TUPLE_OUTPUTS, True)
        calls, _ = _record_block_calls(adapter, window, as_tuple=True)
    as_tuple = blocks_return_tuples(adapter)
    for size in sorted({r for r in rows if r > 1}):
        for call, sized in zip(calls, _record_block_calls(adapter, window.expand(size, -1), as_tuple)[0]):
            call.by_rows[size] = BlockCall(_sized_like(call.args, sized.args), _sized_like(call.kwargs, sized.kwargs))
    return calls


def _record_block_calls(adapter: ModelAdapter, window: torch.Tensor, as_tuple: bool) -> tuple[list[BlockCall], bool]:
    """(every block's context, whether the parent indexes the blocks' outputs: then the list is incomplete)."""
    model = type(adapter.model).__name__
    calls: list[BlockCall] = []
    returned: list[torch.Tensor] = []
    indexed = False

    def recorder(index: int):
        def hook(module, args, kwargs):
            nonlocal indexed
            hidden, rest, kw = _split_hidden(args, kwargs)
            if index != len(calls):  # the forward runs to its end, so a looped model runs block 0 again
                raise UnsupportedModelError(
                    f"{model} runs block {index} after block {len(calls) - 1} (a looped or reordered model): mrprune "
                    f"prunes models whose forward runs each block once, in order")
            if index and hidden is not returned[-1]:
                if not as_tuple and (not torch.is_tensor(hidden) or hidden.shape != returned[-1].shape):
                    indexed = True
                    raise _RecordingDone
                raise UnsupportedModelError(
                    f"{model} changes the hidden states between blocks {index - 1} and {index}: mrprune prunes "
                    f"models whose blocks each take what the one before returned")
            calls.append(BlockCall(rest, kw))

        return hook

    def answered(module, args, output):
        """What the parent receives, after any forward hook a user put on the block (run_block applies those
        too): registered last, this hook runs last."""
        returned.append(output[0] if as_tuple else output)

    handles = [block.register_forward_pre_hook(recorder(i), with_kwargs=True) for i, block in enumerate(adapter.blocks)]
    handles += [block.register_forward_hook(answered) for block in adapter.blocks]
    bypass = pass_through_as_tuple if as_tuple else pass_through
    try:
        with torch.inference_mode(), forwards_replaced(adapter.blocks, lambda index: bypass):
            adapter.base_model(input_ids=window.to(adapter.input_device()), use_cache=False)
    except _RecordingDone:
        pass
    except (ValueError, TypeError, IndexError, RuntimeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedModelError(
            f"{model}'s forward fails with its blocks bypassed ({reason}): mrprune prunes models whose blocks pass "
            f"one tensor of hidden states from each to the next") from None
    finally:
        for handle in handles:
            handle.remove()
    if len(calls) < adapter.num_blocks and not indexed:
        raise RuntimeError(f"blocks {list(range(len(calls), adapter.num_blocks))} were never called by the model's forward")
    return calls, indexed


class _FirstBlockReached(Exception):
    """Ends a capture forward at block 0: nothing after the block's inputs is needed."""


def capture_block_inputs(
    adapter: ModelAdapter, input_ids: torch.Tensor, batch_size: int, store: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, bool]:
    """(hidden states entering block 0 for every window, (n, seqlen, hidden) on ``store``; whether all are finite).

    Host storage for a CUDA run is pinned and filled with asynchronous copies, and finiteness is checked on the
    device micro-batch by micro-batch: a host-side scan of gigabytes of activations would cost seconds.
    """
    device = adapter.input_device()
    pinned = store.type == "cpu" and device.type == "cuda"
    hidden: torch.Tensor | None = None
    finite = torch.ones((), dtype=torch.bool, device=device)
    position = 0

    def hook(module, args, kwargs):
        nonlocal hidden, finite, position
        x, _, _ = _split_hidden(args, kwargs)
        x = x.detach()
        if hidden is None:
            hidden = torch.empty((input_ids.shape[0], *x.shape[1:]), dtype=dtype, device=store, pin_memory=pinned)
        finite = finite & torch.isfinite(x).all().to(device)
        hidden[position : position + x.shape[0]].copy_(x, non_blocking=pinned)
        position += x.shape[0]
        raise _FirstBlockReached

    handle = adapter.blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.inference_mode():
            for start in range(0, input_ids.shape[0], batch_size):
                try:
                    adapter.base_model(input_ids=input_ids[start : start + batch_size].to(device), use_cache=False)
                except _FirstBlockReached:
                    pass
    finally:
        handle.remove()
    if hidden is None or position != input_ids.shape[0]:
        raise RuntimeError(f"captured the inputs of {position} of {input_ids.shape[0]} calibration windows")
    return hidden, bool(finite)  # reading the flag waits for the device, so every copy has landed


def run_block(
    block: nn.Module,
    call: BlockCall,
    hidden: torch.Tensor,
    batch_size: int,
    device: torch.device,
    write_back: bool,
) -> bool:
    """Run ``block`` over ``hidden`` in micro-batches; with ``write_back`` replace ``hidden`` by the outputs and
    return whether they are all finite (checked on ``device``; without ``write_back`` always True).

    Outputs go back to pinned host activations asynchronously, in stream order with the next micro-batch, so
    the host never waits on a transfer; reading the finiteness flag at the end waits for the last one.
    """
    asynchronous = write_back and device.type == "cuda" and hidden.device.type == "cpu" and hidden.is_pinned()
    finite = torch.ones((), dtype=torch.bool, device=device)
    with torch.inference_mode():
        for start in range(0, hidden.shape[0], batch_size):
            chunk = hidden[start : start + batch_size].to(device, non_blocking=True)
            context = call.for_rows(chunk.shape[0])
            out = block(chunk, *context.args, **context.kwargs)
            if isinstance(out, (tuple, list)):  # transformers 4 style; OpenAI GPT's blocks return lists
                out = out[0]
            if write_back:
                finite &= torch.isfinite(out).all()
                hidden[start : start + batch_size].copy_(out, non_blocking=asynchronous)
        return bool(finite)


#: half-precision GEMM with float32 output (CUDA): exact products of bf16/fp16 inputs, float32 accumulation
_MM_FLOAT32_OUT = hasattr(torch.ops.aten.mm, "dtype")


def gram(x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """x^T y (y defaults to x) in float32. On CUDA, half-precision inputs go straight to a tensor-core GEMM with
    float32 output (their products are exact in float32) instead of being copied to float32 first."""
    y = x if y is None else y
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and _MM_FLOAT32_OUT:
        return torch.mm(x.t(), y, out_dtype=torch.float32)
    return x.t().to(torch.float32) @ y.to(torch.float32)


#: inputs at least this wide accumulate x^T x in GRAM_PARTS x GRAM_PARTS tiles, upper ones only
GRAM_TILED_FROM = 2048
GRAM_PARTS = 4


def _tiles(dim: int, parts: int | None) -> list[slice]:
    """The diagonal tiles' index ranges; ``parts`` None: tiled only from GRAM_TILED_FROM wide."""
    parts = parts or (GRAM_PARTS if dim >= GRAM_TILED_FROM else 1)
    edges = [dim * k // parts for k in range(parts + 1)]
    return [slice(a, b) for a, b in pairwise(edges)]


def accumulate_gram(hessian: torch.Tensor, x: torch.Tensor, parts: int | None = None) -> None:
    """hessian += x^T x, computing only the tiles on and above the diagonal (10 of 16 for 4 parts: the Hessian
    GEMMs are most of SparseGPT's statistics time); ``mirror_gram`` fills the rest once accumulation ends."""
    tiles = _tiles(x.shape[1], parts)
    for i, rows in enumerate(tiles):
        for cols in tiles[i:]:
            hessian[rows, cols] += gram(x[:, rows], x[:, cols])


def mirror_gram(hessian: torch.Tensor, parts: int | None = None) -> None:
    """Copy the upper tiles that ``accumulate_gram`` computed onto the lower ones (the same ``parts``)."""
    tiles = _tiles(hessian.shape[0], parts)
    for i, rows in enumerate(tiles):
        for cols in tiles[i + 1 :]:
            hessian[cols, rows] = hessian[rows, cols].t()


def routed_inputs(experts: nn.Module, args: tuple, kwargs: dict, hidden_inputs: bool = True) -> Routed:
    """(expert, its input, the input of its down projection) for every expert a call of a fused experts module
    routes tokens to; the second input only with ``hidden_inputs``. The call's own arguments give the tokens;
    the down projection's input is recomputed from the expert's weights with the module's own gate or
    activation (e.g. GPT-OSS's clamped SwiGLU), as the module's convention (:mod:`.models.experts`) says."""
    kind = experts_kind(experts)
    assert kind is not None
    return kind.routed_inputs(experts, args, kwargs, hidden_inputs)


class StatsCollector:
    """Forward pre-hooks on one block's linear layers accumulating input statistics in float32.

    Layers fed the very same tensor (q/k/v, gate/up) share one accumulator, so each statistic is computed once.
    A fused experts module gets one hook that splits its input by the experts its router chose
    (:func:`routed_inputs`). A layer that no token reached (an expert never chosen) gets zero statistics
    marked ``unseen``: its Wanda scores are zero, and the metrics prune it by magnitude.
    """

    def __init__(self, layers: list[LinearRef], sq_norm: bool, hessian: bool):
        self.layers = layers
        self.want_sq_norm = sq_norm
        self.want_hessian = hessian
        self.stats: dict[str, LayerStats] = {}
        self.shared_with: dict[str, str] = {}
        self._last_input: torch.Tensor | None = None
        self._last_owner: str | None = None
        self._handles: list = []

    def __enter__(self) -> StatsCollector:
        fused: dict[int, list[ExpertRef]] = {}
        for ref in self.layers:
            if isinstance(ref, ExpertRef):
                fused.setdefault(id(ref.module), []).append(ref)
            else:
                self._handles.append(ref.module.register_forward_pre_hook(self._hook(ref)))
        for refs in fused.values():
            self._handles.append(refs[0].module.register_forward_pre_hook(self._experts_hook(refs), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._last_input = None

    def _hook(self, ref: LinearRef):
        def hook(module, inputs):
            x = inputs[0]
            if x is self._last_input:
                self.shared_with[ref.name] = self._last_owner
                return
            self._last_input, self._last_owner = x, ref.name
            self._accumulate(ref, x)

        return hook

    def _experts_hook(self, refs: list[ExpertRef]):
        by_expert: dict[int, list[ExpertRef]] = {}
        for ref in refs:
            by_expert.setdefault(ref.expert, []).append(ref)
        need_hidden = any(ref.param == "down_proj" for ref in refs)

        def hook(module, args, kwargs):
            for expert, x, hidden in routed_inputs(module, args, kwargs, need_hidden):
                for ref in by_expert.get(expert, ()):
                    self._accumulate(ref, hidden if ref.param == "down_proj" else x)

        return hook

    def _accumulate(self, ref: LinearRef, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        stats = self.stats.get(ref.name)
        if stats is None:
            stats = self.stats[ref.name] = LayerStats()
            dim = x.shape[1]
            if self.want_sq_norm:
                stats.sq_norm = torch.zeros(dim, dtype=torch.float32, device=x.device)
            if self.want_hessian:
                stats.hessian = torch.zeros(dim, dim, dtype=torch.float32, device=x.device)
        stats.tokens += x.shape[0]
        if stats.sq_norm is not None:
            stats.sq_norm += torch.linalg.vector_norm(x, dim=0, dtype=torch.float32).square()
        if stats.hessian is not None:
            accumulate_gram(stats.hessian, x)

    def result(self) -> dict[str, LayerStats]:
        """Statistics for every layer that saw input (shared accumulators appear under each name)."""
        with torch.inference_mode():  # the accumulators were made by hooks running in inference mode
            for stats in self.stats.values():
                if stats.hessian is not None:
                    mirror_gram(stats.hessian)
        out = dict(self.stats)
        for name, owner in self.shared_with.items():
            out[name] = self.stats[owner]
        for ref in self.layers:
            if ref.name not in out:
                out[ref.name] = self._unseen(ref)
        return out

    def _unseen(self, ref: LinearRef) -> LayerStats:
        dim, device = ref.in_features, ref.weight.device
        return LayerStats(
            sq_norm=torch.zeros(dim, dtype=torch.float32, device=device) if self.want_sq_norm else None,
            hessian=torch.zeros(dim, dim, dtype=torch.float32, device=device) if self.want_hessian else None,
            unseen=True,
        )
