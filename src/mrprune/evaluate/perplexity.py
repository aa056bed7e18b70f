"""Perplexity with the protocol of the SparseGPT/Wanda/OWL papers.

The text is tokenised once and cut into non-overlapping windows of ``seqlen`` tokens; PPL = exp(mean over
windows of the window's mean next-token NLL). Models whose tokenizer adds BOS (Gemma, Llama-2) get a BOS at
the start of every window (``bos='auto'``), so each window is ``seqlen`` tokens with the BOS included.

With offloaded blocks the windows run block by block (:mod:`.blockwise`): each block is copied to the
device once per chunk of windows instead of once per window, with the same numbers.

A window's logits (seqlen x vocabulary, in float32 for the loss, and as much again for its log-softmax) take
4 GiB for Gemma's 262k vocabulary at 2048 tokens, more than a small model's weights: where they would pass
``LOGIT_BYTES``, the head runs on slices of positions instead (the model's own head, with its blocks bypassed).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data import Corpus
from ..errors import DataError, UnsupportedModelError
from ..models.adapter import check_context, get_adapter
from . import blockwise


@dataclass
class PerplexityResult:
    perplexity: float
    text: str
    windows: int
    seqlen: int
    bos_per_window: bool
    #: the weights' dtype: the same model gives a (slightly) different perplexity in another one
    dtype: str | None = None

    @property
    def protocol(self) -> str:
        plural = "s" if self.windows != 1 else ""
        bos = ", BOS per window" if self.bos_per_window else ""
        dtype = f", {self.dtype}" if self.dtype else ""
        return f"{self.text}: {self.windows} non-overlapping window{plural} of {self.seqlen} tokens{bos}{dtype}"

    def to_dict(self) -> dict:
        return {**asdict(self), "protocol": self.protocol}

    def __str__(self) -> str:
        return f"perplexity {self.perplexity:.3f} ({self.protocol})"


def tokenizer_adds_bos(tokenizer) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a").input_ids
    return bool(ids) and ids[0] == bos


#: model types whose quality collapses without a BOS token at the start of the context, whatever the tokenizer
#: of a given checkpoint says (a Gemma GGUF converted by some transformers versions does not add it)
NEEDS_BOS = frozenset({"gemma", "gemma2", "gemma3", "gemma3_text"})


def wants_bos(tokenizer, model_type: str | None = None) -> bool:
    """'auto': BOS per window when the tokenizer adds one or the architecture needs one."""
    return tokenizer_adds_bos(tokenizer) or (model_type in NEEDS_BOS and tokenizer.bos_token_id is not None)


def bos_per_window(tokenizer, bos: str, model_type: str | None = None) -> bool:
    """What ``--bos`` means for this tokenizer and architecture; DataError if it asks for a BOS there is not."""
    per_window_bos = bos == "always" or (bos == "auto" and wants_bos(tokenizer, model_type))
    if per_window_bos and getattr(tokenizer, "bos_token_id", None) is None:
        raise DataError("BOS per window was asked for but the tokenizer has no BOS token")
    return per_window_bos


def eval_windows(tokenizer, text: str, seqlen: int, max_windows: int | None, bos: str,
                 model_type: str | None = None) -> tuple[torch.Tensor, bool]:
    """(windows x seqlen) token ids and whether each window starts with BOS."""
    per_window_bos = bos_per_window(tokenizer, bos, model_type)
    ids = torch.tensor(tokenizer(text, add_special_tokens=not per_window_bos).input_ids, dtype=torch.long)
    width = seqlen - 1 if per_window_bos else seqlen
    count = ids.numel() // width
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise DataError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    windows = ids[: count * width].view(count, width)
    if per_window_bos:
        windows = torch.cat([torch.full((count, 1), tokenizer.bos_token_id, dtype=torch.long), windows], dim=1)
    return windows, per_window_bos


def with_bos(windows: torch.Tensor, tokenizer, bos: str, model_type: str | None = None) -> tuple[torch.Tensor, bool]:
    """Token windows cut elsewhere (calibration's held-out windows), given a BOS as :func:`eval_windows` gives
    its own: BOS, then the window's first seqlen - 1 tokens. Returns them and whether BOS was put."""
    if not bos_per_window(tokenizer, bos, model_type):
        return windows, False
    starts = torch.full((windows.shape[0], 1), tokenizer.bos_token_id, dtype=windows.dtype)
    return torch.cat([starts, windows[:, :-1]], dim=1), True


#: float32 logits of one window beyond which the head runs on slices of positions
LOGIT_BYTES = 512 << 20


def logit_budget() -> int:
    """``LOGIT_BYTES`` as it is now (read at call time, so that a caller may change it)."""
    return LOGIT_BYTES


@torch.inference_mode()
def window_nll(model, window: torch.Tensor, device: torch.device, logit_bytes: int | None = None) -> float:
    """Mean next-token negative log-likelihood of one window."""
    ids = window[None].to(device)
    if head_slice(model, ids.shape[1], logit_bytes) is not None:
        try:
            final = blockwise.last_block_output(model, ids)
        except UnsupportedModelError:  # a forward whose blocks cannot be bypassed: all logits at once
            pass
        else:
            return head_nll(model, ids, final, logit_bytes)
    return nll_of(model(input_ids=ids, use_cache=False).logits, ids)


def nll_of(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Mean next-token NLL of one window (1 x seqlen ids) from its logits."""
    return float(F.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="mean"))


def head_slice(model, length: int, logit_bytes: int | None = None) -> int | None:
    """Positions per head call when a window's float32 logits would pass ``logit_bytes`` (default
    ``LOGIT_BYTES``) and the model can compute the logits of chosen positions only: a transformers class with
    ``logits_to_keep``, which takes a list of positions (custom code may take only a count). None: all at once."""
    budget = logit_budget() if logit_bytes is None else logit_bytes
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if weight is None or length < 2 or length * weight.shape[0] * 4 <= budget:
        return None
    if not type(model).__module__.startswith("transformers."):
        return None
    if "logits_to_keep" not in inspect.signature(model.forward).parameters:
        return None
    return max(1, budget // (weight.shape[0] * 4))


@torch.inference_mode()
def head_nll(model, ids: torch.Tensor, final: torch.Tensor, logit_bytes: int | None = None) -> float:
    """:func:`nll_of` the logits the model gives for ``ids`` from its last block's output ``final``, with the
    head run on slices of positions where all of them at once would pass ``logit_bytes``."""
    length = ids.shape[1]
    step = head_slice(model, length, logit_bytes)
    if step is None:
        logits = blockwise.head_logits(model, ids, final)
        return nll_of(logits, ids.to(logits.device))
    total = 0.0
    for start in range(0, length - 1, step):
        positions = torch.arange(start, min(start + step, length - 1))
        logits = blockwise.head_logits(model, ids, final, logits_to_keep=positions)
        targets = ids[0, positions + 1].to(logits.device)
        total += float(F.cross_entropy(logits[0].float(), targets, reduction="sum"))
    return total / (length - 1)


def block_major_nlls(model, windows: torch.Tensor, device: torch.device, progress: bool = True,
                     budget: int | None = None, logit_bytes: int | None = None) -> list[float]:
    """:func:`window_nll` of every window, computed block by block (:mod:`.blockwise`): each block moves to
    ``device`` once per chunk of windows whose hidden states fit in ``budget`` bytes."""
    chunk = max(1, (budget or blockwise.CHUNK_BYTES) // blockwise.hidden_bytes(model, windows.shape[1]))
    nlls: list[float] = []
    steps = -(-windows.shape[0] // chunk) * (get_adapter(model).num_blocks + 1)
    with tqdm(total=steps, desc="perplexity (block by block)", unit="step", disable=not progress) as bar:
        for start in range(0, windows.shape[0], chunk):
            inputs = [window[None] for window in windows[start : start + chunk]]  # each window its own forward
            finals = blockwise.run_blocks(model, inputs, device, bar)
            nlls += [head_nll(model, ids, final, logit_bytes) for ids, final in zip(inputs, finals)]
            bar.update()
    return nlls


def model_windows(model, tokenizer, corpus: Corpus, seqlen: int, max_windows: int | None,
                  bos: str) -> tuple[torch.Tensor, bool]:
    """:func:`eval_windows` for ``model`` (its architecture may need BOS; windows must fit its context)."""
    check_context(model, seqlen, "an evaluation window (--eval-seqlen; mrprune eval: --seqlen)")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return eval_windows(tokenizer, corpus.text or "", seqlen, max_windows, bos, model_type)


def perplexity(
    model,
    tokenizer,
    corpus: Corpus,
    seqlen: int = 2048,
    max_windows: int | None = None,
    bos: str = "auto",
    device: torch.device | None = None,
    progress: bool = True,
    offload: bool = False,
) -> PerplexityResult:
    """Perplexity of ``model`` (already placed for running on ``device``; with ``offload`` its blocks on the
    host) on ``corpus.text``."""
    windows, per_window_bos = model_windows(model, tokenizer, corpus, seqlen, max_windows, bos)
    return windows_perplexity(model, windows, per_window_bos, corpus.name, device, progress, offload)


def windows_perplexity(model, windows: torch.Tensor, per_window_bos: bool, text: str,
                       device: torch.device | None = None, progress: bool = True,
                       offload: bool = False) -> PerplexityResult:
    """:func:`perplexity` on windows already cut (by :func:`model_windows`): a caller measuring many times
    tokenises its text once."""
    device = device or next(model.parameters()).device
    if offload:
        nlls = block_major_nlls(model, windows, device, progress)
    else:
        nlls = [window_nll(model, w, device)
                for w in tqdm(windows, desc="perplexity", unit="window", disable=not progress)]
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return PerplexityResult(math.exp(sum(nlls) / len(nlls)), text, len(nlls), windows.shape[1], per_window_bos,
                            dtype)
