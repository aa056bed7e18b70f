"""Fused mixture-of-experts modules: how each stores its experts' matrices and which tokens each expert sees.

transformers keeps the experts of a block in 3-D tensors (one matrix per expert) inside one module, and two
conventions exist. Most families follow its experts interface: ``forward(hidden_states, top_k_index,
top_k_weights)``, the layout given by ``is_transposed``/``has_gate``/``has_bias``, the gate by ``_apply_gate``.
Llama-4 runs every expert on every token, with the token's router score (zero where the expert was not
chosen) multiplied into the input beforehand. A kind below knows one convention; a module of neither is not
an experts module here (and the adapter refuses blocks with 3-D weights it cannot place).
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Iterator

import torch
from torch import nn

#: (expert, its input, the input of its down projection or None)
Routed = Iterator[tuple[int, torch.Tensor, torch.Tensor | None]]


class ExpertsKind(ABC):
    """One storage and routing convention of fused experts."""

    @abstractmethod
    def matches(self, module: nn.Module) -> bool: ...

    @abstractmethod
    def transposed(self, module: nn.Module) -> bool:
        """Matrices stored (in, out) rather than (out, in)."""

    @abstractmethod
    def params(self, module: nn.Module) -> list[str]:
        """The 3-D parameters holding one matrix per expert, input side first, ``down_proj`` last."""

    @abstractmethod
    def routed_inputs(self, module: nn.Module, args: tuple, kwargs: dict, hidden_inputs: bool) -> Routed:
        """For every expert a call routes tokens to: the tokens it computes on and, with ``hidden_inputs``, the
        input of its down projection recomputed from its weights as the module computes it."""


def _has_3d(module: nn.Module, *names: str) -> bool:
    return all((p := module._parameters.get(n)) is not None and p.ndim == 3 for n in names)


class InterfaceExperts(ExpertsKind):
    """transformers' experts interface (Mixtral, Qwen-MoE, DeepSeek, GPT-OSS, ...)."""

    def matches(self, module):
        return (all(hasattr(module, a) for a in ("is_transposed", "has_gate", "has_bias"))
                and _has_3d(module, "gate_up_proj" if module.has_gate else "up_proj", "down_proj"))

    def transposed(self, module):
        return bool(module.is_transposed)

    def params(self, module):
        return ["gate_up_proj" if module.has_gate else "up_proj", "down_proj"]

    def routed_inputs(self, module, args, kwargs, hidden_inputs):
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
        hidden, chosen = list(bound.arguments.values())[:2]
        hidden = hidden.reshape(-1, hidden.shape[-1])
        chosen = chosen.reshape(hidden.shape[0], -1)
        up_name = self.params(module)[0]
        count = module.down_proj.shape[0]
        # the token of every (token, choice) pair, grouped by expert in token order: one sort and one read of
        # the group sizes per call, instead of a mask and a device-to-host wait per expert
        flat = chosen.flatten().long()
        key = torch.where((flat >= 0) & (flat < count), flat, count)  # expert-parallel sentinels last, skipped
        tokens = torch.argsort(key, stable=True) // chosen.shape[1]
        sizes = torch.bincount(key, minlength=count + 1).tolist()
        offset = 0
        for expert, size in enumerate(sizes[:count]):
            segment, offset = tokens[offset:offset + size], offset + size
            if size == 0:
                continue
            x = hidden[segment]
            if not hidden_inputs:
                yield expert, x, None
                continue
            w = getattr(module, up_name)[expert]
            up = x @ w if module.is_transposed else nn.functional.linear(x, w)
            if module.has_bias:
                up = up + getattr(module, f"{up_name}_bias")[expert]
            yield expert, x, module._apply_gate(up) if module.has_gate else module.act_fn(up)


class PrescaledExperts(ExpertsKind):
    """Llama-4: input (experts x tokens, hidden), each expert's rows its tokens scaled by their router score;
    matrices stored (in, out), gate and up concatenated. Rows of zeros (tokens the expert was not chosen for)
    add nothing to its statistics and are not counted as its tokens."""

    classes: tuple[type, ...] = ()

    def __init__(self):
        try:
            from transformers.models.llama4.modeling_llama4 import Llama4TextExperts
        except ImportError:  # a transformers without Llama-4
            return
        self.classes = (Llama4TextExperts,)

    def matches(self, module):
        return isinstance(module, self.classes) and _has_3d(module, "gate_up_proj", "down_proj")

    def transposed(self, module):
        return True

    def params(self, module):
        return ["gate_up_proj", "down_proj"]

    def routed_inputs(self, module, args, kwargs, hidden_inputs):
        hidden = args[0] if args else kwargs["hidden_states"]
        count = module.gate_up_proj.shape[0]
        per_expert = hidden.reshape(count, -1, hidden.shape[-1])
        for expert in range(count):
            x = per_expert[expert]
            x = x[x.abs().amax(dim=-1) != 0]
            if x.shape[0] == 0:
                continue
            if not hidden_inputs:
                yield expert, x, None
                continue
            gate, up = (x @ module.gate_up_proj[expert]).chunk(2, dim=-1)
            yield expert, x, up * module.act_fn(gate)


#: the conventions tried in order; register a new one by appending an instance
EXPERT_KINDS: list[ExpertsKind] = [InterfaceExperts(), PrescaledExperts()]


def experts_kind(module: nn.Module) -> ExpertsKind | None:
    return next((kind for kind in EXPERT_KINDS if kind.matches(module)), None)
