"""One small adapter between mrprune and a Hugging Face decoder-only model.

The generic adapter finds the decoder block list (the ModuleList of ``num_hidden_layers`` identical blocks)
and the linear sub-layers of each block (``nn.Linear`` and GPT-2's transposed ``Conv1D``), so Llama, Mistral,
Qwen2/3, Gemma3, OPT, GPT-2, Phi-3 and GPT-NeoX need no code of their own. Mixture-of-experts blocks store
their experts as 3-D tensors, one matrix per expert (conventions: ``experts.py``); each expert's matrix is a
layer of its own (:class:`ExpertRef`), and the routers that choose the experts stay dense. A family that needs
more registers a subclass in ``ADAPTERS`` under its ``model_type``. Everything else in mrprune reaches the
model through here.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import ConfigError, UnsupportedModelError
from .experts import ExpertsKind, experts_kind

if TYPE_CHECKING:
    from transformers import PreTrainedConfig, PreTrainedModel

log = logging.getLogger(__name__)

LINEAR_TYPES = (nn.Linear, Conv1D)


def _weight(module: nn.Module) -> nn.Parameter:
    return cast(nn.Parameter, module.weight)


@dataclass
class LinearRef:
    """A prunable linear sub-layer, seen as an (out_features x in_features) matrix whatever its storage."""

    name: str  # qualified module name in the model, e.g. "model.layers.3.mlp.down_proj"
    short_name: str  # name inside its block, e.g. "mlp.down_proj"
    block: int
    module: nn.Module

    @property
    def transposed(self) -> bool:
        return isinstance(self.module, Conv1D)

    @property
    def weight(self) -> torch.Tensor:
        """The weight as (out, in); for Conv1D a transposed view, so in-place edits reach the module."""
        w = _weight(self.module).data
        return w.t() if self.transposed else w

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def numel(self) -> int:
        return _weight(self.module).numel()

    def set_weight(self, new: torch.Tensor) -> None:
        """Write an (out, in) matrix back into the module, in the module's dtype and device."""
        self.weight.copy_(new.to(self.weight.dtype))

    def swap_weight(self, new: torch.Tensor) -> torch.Tensor:
        """Give the module the (out, in) matrix ``new`` (in its dtype and device) as a tensor of its own, without
        writing into the current one; returns the current storage tensor, for :func:`restore_weights`."""
        old = _weight(self.module).data
        new = new.to(old.dtype).to(old.device, non_blocking=True)
        _weight(self.module).data = new.t().contiguous() if self.transposed else new
        return old

    @property
    def stored(self) -> torch.Tensor:
        """The weight as the model stores it (what a checkpoint saves and restores)."""
        return _weight(self.module).data


@dataclass
class ExpertRef(LinearRef):
    """One expert's matrix inside a fused experts module's 3-D parameter ``param`` (experts x out x in, or
    experts x in x out when its ``kind`` says the module stores them transposed). Named
    ``...experts.<expert>.<param>``, the way per-expert modules are named, so that layers fed the same input
    group by their parent's name. (``kind`` is keyword-only: the fields before it have defaults.)"""

    param: str = "down_proj"
    expert: int = 0
    kind: ExpertsKind = field(kw_only=True)

    @property
    def transposed(self) -> bool:
        return self.kind.transposed(self.module)

    @property
    def stored(self) -> torch.Tensor:
        return getattr(self.module, self.param).data[self.expert]

    @property
    def weight(self) -> torch.Tensor:
        w = self.stored
        return w.t() if self.transposed else w

    @property
    def numel(self) -> int:
        return self.stored.numel()

    def swap_weight(self, new: torch.Tensor) -> torch.Tensor:
        raise TypeError("an expert's matrix is a slice of its module's tensor; swap it with swap_weights()")


def swap_weights(refs: list[LinearRef], weights: dict[str, torch.Tensor]) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """Give each layer of ``refs`` the (out, in) matrix ``weights[ref.name]`` as storage of its own, without
    writing into the current tensors; returns what :func:`restore_weights` puts back. The experts of one 3-D
    parameter share one new tensor, built once (every expert of it must be in ``refs``)."""
    swapped: list[tuple[nn.Parameter, torch.Tensor]] = []
    fused: dict[tuple[int, str], list[ExpertRef]] = {}
    for ref in refs:
        if isinstance(ref, ExpertRef):
            fused.setdefault((id(ref.module), ref.param), []).append(ref)
        else:
            swapped.append((_weight(ref.module), ref.swap_weight(weights[ref.name])))
    for experts in fused.values():
        param = getattr(experts[0].module, experts[0].param)
        old = param.data
        if len(experts) != old.shape[0]:
            raise ValueError(f"swap_weights needs every expert of {experts[0].param}, got {len(experts)}")
        new = torch.empty_like(old)
        for ref in experts:
            w = weights[ref.name].to(old.dtype).to(old.device, non_blocking=True)
            new[ref.expert].copy_(w.t() if ref.transposed else w)
        param.data = new
        swapped.append((param, old))
    return swapped


def restore_weights(swapped: list[tuple[nn.Parameter, torch.Tensor]]) -> None:
    for param, old in swapped:
        param.data = old


def declared_num_layers(config) -> int | None:
    """``num_hidden_layers`` of a (possibly multimodal) config; None if it does not say."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text_config, "num_hidden_layers", None)


def _is_encoder_family(config) -> bool:
    """True for encoder models (BERT-like) loaded through a causal-LM head without is_decoder."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False)


class ModelAdapter:
    """Generic access to a decoder-only HF model: its blocks, their linear layers, the module to call."""

    def __init__(self, model: nn.Module):
        config = getattr(model, "config", None)
        if config is None:
            raise UnsupportedModelError(f"{type(model).__name__} has no Hugging Face config; not a transformers model")
        if getattr(config, "is_encoder_decoder", False) or _is_encoder_family(config):
            raise UnsupportedModelError(
                f"{type(model).__name__} ({config.model_type}) is not a decoder-only causal language model"
            )
        self.model = model
        self.blocks_name, self.blocks = self._find_blocks(model, declared_num_layers(config))
        self._layers: dict[int, list[LinearRef]] = {}

    @staticmethod
    def _find_blocks(model: nn.Module, expected: int | None) -> tuple[str, nn.ModuleList]:
        candidates: list[tuple[str, nn.ModuleList]] = []
        mixed: list[tuple[str, nn.ModuleList]] = []
        for name, module in model.named_modules():
            if not isinstance(module, nn.ModuleList) or len(module) == 0:
                continue
            if not any(isinstance(m, LINEAR_TYPES) for child in module for m in child.modules()):
                continue
            if expected is not None and len(module) != expected:
                continue
            (candidates if len({type(child) for child in module}) == 1 else mixed).append((name, module))
        if not candidates:
            what = f"{expected} " if expected is not None else ""
            if mixed:  # a hybrid (Jamba: attention and Mamba blocks): the blocks are there, but of several kinds
                name, module = max(mixed, key=lambda c: len(c[1]))
                kinds = ", ".join(sorted({type(child).__name__ for child in module}))
                raise UnsupportedModelError(
                    f"cannot prune {type(model).__name__}: its {len(module)} decoder blocks ({name}) are of "
                    f"different classes ({kinds}); mrprune needs blocks of one class")
            raise UnsupportedModelError(
                f"cannot find the decoder blocks of {type(model).__name__}: no list of {what}identical blocks "
                f"with linear layers")
        return max(candidates, key=lambda c: len(c[1]))

    # ----------------------------------------------------------------------------------------------- access
    @property
    def family(self) -> str:
        return cast("PreTrainedConfig", self.model.config).model_type

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def base_model(self) -> nn.Module:
        """The module whose forward runs embeddings, blocks and final norm, without the LM head: transformers'
        ``base_model``, or where that holds the head too (its prefix names no attribute, as Llama-4's text model's
        does, or it is a causal LM inside a multimodal model), the outermost module on the way to the blocks
        that does not."""
        model = cast("PreTrainedModel", self.model)
        base = model.base_model
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is None or not any(module is head for module in base.modules()):
            return base
        parts = self.blocks_name.split(".")
        for depth in range(1, len(parts)):
            candidate = model.get_submodule(".".join(parts[:depth]))
            if not any(module is head for module in candidate.modules()):
                return candidate
        return base

    def linear_layers(self, index: int) -> list[LinearRef]:
        """The prunable layers of block ``index`` in module order: its linear modules, except the routers of
        mixture-of-experts blocks, and every expert's matrices. (Found once per block: the refs read their
        weights through the modules, so they stay valid when tensors move or are swapped.)"""
        if index not in self._layers:
            self._layers[index] = self._find_layers(index)
        return list(self._layers[index])

    def _find_layers(self, index: int) -> list[LinearRef]:
        block = self.blocks[index]
        prefix = f"{self.blocks_name}.{index}"
        experts = _experts_modules(block)
        _refuse_unknown_tensors(block, experts, index)
        routers = _routers(block, experts)
        refs: list[LinearRef] = []
        for name, module in block.named_modules():
            if isinstance(module, LINEAR_TYPES) and name not in routers:
                refs.append(LinearRef(f"{prefix}.{name}", name, index, module))
            elif name in experts:
                kind = experts_kind(module)
                assert kind is not None
                for e in range(_expert_count(module)):
                    refs += [ExpertRef(f"{prefix}.{name}.{e}.{p}", f"{name}.{e}.{p}", index, module, p, e, kind=kind)
                             for p in kind.params(module)]
        return refs

    def routers(self, index: int) -> list[str]:
        """Qualified names of block ``index``'s router layers (kept dense, not counted as prunable)."""
        block = self.blocks[index]
        experts = _experts_modules(block)
        return sorted(f"{self.blocks_name}.{index}.{name}" for name in _routers(block, experts))

    def all_linear_layers(self) -> list[LinearRef]:
        return [ref for i in range(self.num_blocks) for ref in self.linear_layers(i)]

    def block_sizes(self) -> list[int]:
        """Number of prunable weights in each block (N_l in methods.md)."""
        return [sum(ref.numel for ref in self.linear_layers(i)) for i in range(self.num_blocks)]

    def input_device(self) -> torch.device:
        return embedding_table(self.model).device


def embedding_table(model: nn.Module) -> torch.Tensor:
    """The weight of the model's input embeddings (vocabulary x hidden)."""
    return _weight(cast("PreTrainedModel", model).get_input_embeddings())


def _experts_modules(block: nn.Module) -> dict[str, nn.Module]:
    return {name: module for name, module in block.named_modules() if experts_kind(module) is not None}


def _expert_count(experts: nn.Module) -> int:
    return cast(nn.Parameter, experts._parameters["down_proj"]).shape[0]


def _routers(block: nn.Module, experts: dict[str, nn.Module]) -> set[str]:
    """Linear modules that route tokens to experts: beside an experts module (under the same parent, not
    inside it) with one output per expert (a router) or a single output (a shared expert's gate). Pruning
    them changes which experts run, not what they compute; every MoE pruning recipe keeps them dense."""
    found = set()
    for path, module in experts.items():
        parent = path.rpartition(".")[0]
        count = _expert_count(module)
        for name, sub in block.named_modules():
            inside_parent = not parent or name.startswith(parent + ".")
            if (isinstance(sub, LINEAR_TYPES) and inside_parent and not name.startswith(path + ".")
                    and sub.weight.shape[0 if isinstance(sub, nn.Linear) else 1] in (count, 1)):
                found.add(name)
    return found


#: stacks of matrices no known layout covers may hold at most this share of a block's weights (then: a warning)
UNKNOWN_STACKS_TOLERATED = 0.05


def _refuse_unknown_tensors(block: nn.Module, experts: dict[str, nn.Module], index: int) -> None:
    """A stack of matrices (experts x rows x columns) that is not a known experts module would stay dense.
    When such stacks hold more than a few percent of the block (JetMoE's experts), the model is refused rather
    than pruned short of its target in silence; a small share (RecurrentGemma's per-head gates) is left dense
    with a warning. Convolution kernels (Mamba's, linear attention's conv1d) and coefficients shaped (1, 1, n)
    are not such stacks: they stay dense, as every pruning recipe leaves them."""
    stacks, matrices = {}, 0
    for name, module in block.named_modules():
        for key, param in module._parameters.items():
            if param is None or param.ndim < 2:
                continue
            matrices += param.numel()
            if (name not in experts and not isinstance(module, nn.modules.conv._ConvNd) and param.ndim >= 3
                    and sum(d > 1 for d in param.shape) >= 3):
                stacks[f"{name}.{key}"] = param.numel()
    share = sum(stacks.values()) / max(matrices, 1)
    if share > UNKNOWN_STACKS_TOLERATED:
        first = next(iter(stacks))
        raise UnsupportedModelError(
            f"block {index} stores {share:.0%} of its weights in 3-D tensors ({first}{', ...' if len(stacks) > 1 else ''}) "
            "of a layout mrprune does not know (not transformers' experts interface nor Llama-4's experts); it "
            "cannot prune them")
    if stacks and index == 0:
        log.warning("weights in 3-D tensors of an unknown layout stay dense (%s: %.1f%% of each block's weights)",
                    ", ".join(stacks), 100 * share)


#: model_type -> adapter class for families that need more than the generic adapter
ADAPTERS: dict[str, Callable[[nn.Module], ModelAdapter]] = {}


def get_adapter(model: nn.Module) -> ModelAdapter:
    config = getattr(model, "config", None)
    factory = ADAPTERS.get(getattr(config, "model_type", ""), ModelAdapter)
    return factory(model)


# ---------------------------------------------------------------------------------------------- context


def context_limit(model: nn.Module) -> tuple[int | None, bool]:
    """(the context length the model was built for, whether it has a learned position table of that size).

    Past a learned table (GPT-2's wpe, OPT's embed_positions) a position cannot be embedded at all; rotary and
    ALiBi models run there but were not trained there."""
    config = getattr(model, "config", None)
    length = next((value for name in ("max_position_embeddings", "n_positions", "n_ctx")
                   if isinstance(value := getattr(config, name, None), int)), None)
    if length is None:
        return None, False
    inputs = cast("PreTrainedModel", model).get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    learned = any(isinstance(m, nn.Embedding) and m is not inputs and length <= m.num_embeddings <= length + 2
                  for m in model.modules())
    return length, learned


def check_context(model: nn.Module, seqlen: int, what: str) -> None:
    """Refuse windows longer than a learned position table (an index error deep in the model otherwise); warn
    past the context of any other model. ``what``: the window and the option that sets it."""
    length, learned = context_limit(model)
    if length is None or seqlen <= length:
        return
    if learned:
        raise ConfigError(f"{what} of {seqlen} tokens is longer than the model's context of {length} (its position "
                          f"table has no row past that); use at most {length}")
    _warn_beyond_context(what, seqlen, length)


@functools.cache
def _warn_beyond_context(what: str, seqlen: int, length: int) -> None:
    """Once per kind of window: an analysis measures perplexity once per block and metric."""
    log.warning("%s of %d tokens is beyond the model's context of %d; figures past it may mean little", what, seqlen,
                length)
