"""Memory preflight: estimate a run's peak memory before the weights load, and refuse one that cannot fit.

A 70B run that dies of out-of-memory at block 60 has wasted hours; most such runs can be seen not to fit from
the model's shape and the options alone. The estimate is deliberately simple (order of magnitude, erring a
little high), built from named parts so the refusal can say what dominates:

* the model: all weights on the device, or with ``--offload`` only the parts outside the blocks plus two of
  the largest block (the one at work and the next, copied in meanwhile; all wait on the host); the host holds
  the whole model while it loads, unless its weights load mapped from safetensors in the run's dtype (page
  cache, not process memory, until a pruned block is written over them); with ``--offload-dir`` as well, the
  blocks stay page cache throughout (written to the scratch files) and the host counts only the parts outside
  them;
* exact MRP's copy of the dense block weights, on the host (in the scratch files with ``--offload-dir``);
* cached calibration activations, n x seqlen x hidden x dtype size, twice while they are captured (the
  captured batches and their concatenation); on the host with ``--offload-activations``; exact MRP adds its
  cached block inputs (``allocate.mrp.auto_stride``: one per ``stride`` blocks, at most a quarter of the free
  memory) and a working copy;
* one block's forward on a micro-batch: eager attention scores and probabilities (not with SDPA), the MLP's
  wide tensors;
* statistics: SparseGPT's float32 Hessians, in^2 for each distinct input of the largest block (layers fed
  the same tensor share one), plus the Gram product and float32 input copy while accumulating;
* pruning temporaries of the largest layer: float32 copies, sort indices, SparseGPT's inverse factors;
* on the host, a fixed allowance for code paths first used after the preflight and allocator slack; on
  CUDA, 10% for the caching allocator's fragmentation.

Checked against measured peaks: tests/test_preflight.py (CPU) and ``scripts/preflight_check.py`` (CUDA: on an
H200, 0.8-1.2 x the reserved peak for random 0.4B/0.9B Llamas with Wanda, SparseGPT, offloading, fast MRP).

Phases do not overlap, so each pool's peak is the model plus the largest phase. Free memory is
``torch.cuda.mem_get_info`` on CUDA, and on the host the smaller of ``MemAvailable`` and the cgroup's limit.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from .errors import ResourceError
from .evaluate.blockwise import CHUNK_BYTES
from .evaluate.perplexity import logit_budget
from .models.adapter import ExpertRef, ModelAdapter

if TYPE_CHECKING:
    from transformers import PreTrainedConfig

log = logging.getLogger(__name__)

GIB = 2**30
#: fraction of the free memory exact MRP's cached block inputs may take (allocate/mrp.py)
MRP_CACHE_FRACTION = 0.25
#: working elements of SparseGPT's batched triangular solve (metrics/sparsegpt.py), bytes = 4 x this
SPARSEGPT_SOLVE_ELEMENTS = 1 << 26
#: host memory beyond the named parts once the preflight has run: code paths first used while loading and
#: pruning, allocator slack (measured with tiny models on the CPU: 27-39 MiB above the live set, which
#: glibc's malloc with a fixed mmap threshold shows; tests/test_preflight.py)
HOST_OVERHEAD = 48 * 2**20
#: CUDA caching allocator's reserve beyond the allocated peak, as a fraction (measured on an H200 with random
#: Llamas of 0.4B and 0.9B parameters: the estimate without it was 0.73-1.07 x the reserved peak)
DEVICE_SLACK = 0.10


# ------------------------------------------------------------------------------------------------- the inputs


@dataclass
class ModelShape:
    """What the estimate needs to know about a model; read from a loaded model or a weightless (meta) one."""

    parameters: int  # unique parameters
    total_bytes: int  # parameters and buffers, in the run's dtype
    outside_bytes: int  # the part outside the decoder blocks (embeddings, final norm, LM head)
    block_bytes: int  # the largest block
    hidden: int
    heads: int
    vocab: int
    mlp_width: int  # the widest linear dimension inside a block
    hessian_inputs: list[int]  # in_features of each distinct input of the largest block
    largest_layer: tuple[int, int]  # (out, in) of the largest linear layer
    num_blocks: int
    dtype_size: int
    eager_attention: bool = True  # attention scores materialised (eager); SDPA/flash kernels keep them tiled
    expert_bytes: int = 0  # the fused experts tensors of the largest block (swapping them in builds a new tensor)

    @classmethod
    def from_model(cls, model: nn.Module, adapter: ModelAdapter, dtype: torch.dtype | None = None) -> ModelShape:
        """Shape of ``model`` in ``dtype`` (default: its own); works on the meta device."""

        def size(t: torch.Tensor) -> int:
            element = torch.empty((), dtype=dtype).element_size() if dtype and t.is_floating_point() else \
                t.element_size()
            return t.numel() * element

        params = {id(p): p for p in model.parameters()}
        buffers = {id(b): b for b in model.buffers()}
        total = sum(size(t) for t in params.values()) + sum(size(t) for t in buffers.values())
        block_sizes = []
        for block in adapter.blocks:
            block_sizes.append(sum(size(p) for p in block.parameters()) + sum(size(b) for b in block.buffers()))
        in_blocks = sum(block_sizes)
        config = cast("PreTrainedConfig", model.config)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        refs = adapter.all_linear_layers()
        largest_block = max(range(adapter.num_blocks), key=lambda i: block_sizes[i])
        groups: dict[tuple[str, int], int] = {}
        for ref in adapter.linear_layers(largest_block):
            parent = ref.short_name.rpartition(".")[0]
            groups[(parent, ref.in_features)] = ref.in_features
        largest = max(refs, key=lambda r: r.numel)
        fused = {(id(r.module), r.param): getattr(r.module, r.param)
                 for r in adapter.linear_layers(largest_block) if isinstance(r, ExpertRef)}
        hidden = int(getattr(text, "hidden_size", 0) or adapter.linear_layers(0)[0].in_features)
        dtype_size = torch.empty((), dtype=dtype).element_size() if dtype else next(model.parameters()).element_size()
        return cls(
            parameters=sum(p.numel() for p in params.values()),
            total_bytes=total,
            outside_bytes=max(total - in_blocks, 0),
            block_bytes=max(block_sizes),
            hidden=hidden,
            heads=int(getattr(text, "num_attention_heads", 0) or 1),
            vocab=int(getattr(text, "vocab_size", 0) or 0),
            mlp_width=max(max(r.in_features, r.out_features) for r in refs),
            hessian_inputs=sorted(groups.values()),
            largest_layer=(largest.out_features, largest.in_features),
            num_blocks=adapter.num_blocks,
            dtype_size=dtype_size,
            eager_attention=getattr(model.config, "_attn_implementation", "eager") in (None, "eager"),
            expert_bytes=sum(size(t) for t in fused.values()),
        )


@dataclass
class RunPlan:
    """The options that decide how much memory a run takes."""

    device: torch.device
    nsamples: int
    seqlen: int
    batch_size: int
    offload: bool = False
    offload_activations: bool = False
    calibrate: bool = True  # the metric or the allocator needs calibration activations
    hessian: bool = False  # SparseGPT
    mrp_stride: int | None = None  # exact MRP: its --mrp-checkpoint-stride (0: automatic); None: not MRP
    eval_seqlen: int | None = None
    eval_windows: int | None = None  # --max-windows (None: as many as the text holds)
    zeroshot: bool = False  # --tasks
    resident: str | None = None  # where loaded weights are now ('host' or 'device'; counted as used), None: to load
    checkpoint: bool = False  # --checkpoint-dir: activations are copied to the host to be saved
    #: host copies of every block's dense weights: exact MRP (dense-block) keeps one, ``auto`` one between its
    #: candidates (and one more with an exact MRP candidate)
    mrp_dense: int = 0
    block_swaps: bool = False  # MRP runs a block with other weights swapped in (exact: dense, fast: its pilot's)
    spill: bool = False  # --offload-dir: pruned blocks and MRP's dense copy live in files, not in RAM
    mapped: bool = False  # loading maps the weights from safetensors files (no copy in process memory)


@dataclass
class Estimate:
    """Peak bytes per pool ('device' on CUDA, 'host' always), each with its named parts."""

    pools: dict[str, dict[str, int]] = field(default_factory=dict)

    def total(self, pool: str) -> int:
        return sum(self.pools.get(pool, {}).values())

    def describe(self, pool: str) -> str:
        parts = sorted(self.pools.get(pool, {}).items(), key=lambda kv: -kv[1])
        return ", ".join(f"{name} {gib(value)}" for name, value in parts if value >= 2**20) or "little"


def gib(n: float) -> str:
    """A byte count for people: MiB below 1 GiB, else GiB."""
    if n < GIB:
        return f"{n / 2**20:.0f} MiB"
    return f"{n / GIB:.2f} GiB" if n < 10 * GIB else f"{n / GIB:.1f} GiB"


# ----------------------------------------------------------------------------------------------- the estimate


def activation_bytes(shape: ModelShape, plan: RunPlan) -> int:
    return plan.nsamples * plan.seqlen * shape.hidden * shape.dtype_size


def forward_bytes(shape: ModelShape, plan: RunPlan, rows: int, seqlen: int) -> int:
    """Temporaries of one block's forward over ``rows`` windows: eager attention scores and probabilities
    (fused attention kernels keep them tiled), the MLP's wide tensors, a few hidden-sized ones."""
    s = shape.dtype_size
    tokens = rows * seqlen
    attention = 2 * rows * shape.heads * seqlen * seqlen * s if shape.eager_attention else 0
    return attention + 3 * tokens * shape.mlp_width * s + 6 * tokens * shape.hidden * s


def statistics_bytes(shape: ModelShape, plan: RunPlan) -> tuple[int, int]:
    """(accumulators kept while the block is pruned, temporaries while accumulating), float32."""
    tokens = min(plan.batch_size, plan.nsamples) * plan.seqlen
    widest = max(shape.hessian_inputs)
    if plan.hessian:
        return sum(4 * n * n for n in shape.hessian_inputs), 4 * widest * widest + 4 * tokens * widest
    return 4 * sum(shape.hessian_inputs), 4 * tokens * widest


def pruning_bytes(shape: ModelShape, plan: RunPlan) -> int:
    """Temporaries of pruning the largest layer."""
    out, cols = shape.largest_layer
    if plan.hessian:  # H copy, Cholesky factor, inverse, its factor; float32 weight copies; the batched solve
        return 4 * 4 * cols * cols + 3 * 4 * out * cols + 4 * 2 * min(out * 128 * 128, SPARSEGPT_SOLVE_ELEMENTS)
    return 25 * out * cols  # float32 weight and scores, int64 sort order, sorted scores, mask, result


def estimate(shape: ModelShape, plan: RunPlan, free: dict[str, int | None] | None = None) -> Estimate:
    """Peak memory of a run per pool; ``free`` (bytes per pool) sizes exact MRP's automatic cache."""
    free = free or {}
    cuda = plan.device.type == "cuda"
    compute = "device" if cuda else "host"
    store = "host" if plan.offload_activations or not cuda else "device"
    pools: dict[str, dict[str, int]] = {"host": {}}
    if cuda:
        pools["device"] = {}

    # the model, for the whole run: on the device all of it (with offload the outside parts, the block at work
    # and the next one on its way, all blocks on the host); weights already where they will stay are in use
    # blocks mapped from their files at load and written to --offload-dir files once pruned stay page cache,
    # which the kernel writes back and evicts as it needs: no process memory for them at any time
    blocks = shape.total_bytes - shape.outside_bytes
    held_blocks = 0 if plan.spill and plan.mapped else blocks
    loading = {"host": shape.outside_bytes + (0 if plan.mapped else blocks) if plan.resident is None else 0}
    if cuda:
        if plan.resident != "device":
            pools["device"]["model"] = (shape.outside_bytes + 2 * shape.block_bytes if plan.offload
                                          else shape.total_bytes)
        if plan.offload and plan.resident != "host" and held_blocks:
            pools["host"]["model"] = held_blocks
    elif plan.resident is None:
        pools["host"]["model"] = shape.outside_bytes + held_blocks
    if plan.mrp_dense and not plan.spill:
        pools["host"]["MRP dense weights"] = blocks * int(plan.mrp_dense)

    # the largest of the phases that follow each other: capture, a block's turn, evaluation
    phases: dict[str, dict[str, dict[str, int]]] = {}
    if plan.calibrate:
        acts = activation_bytes(shape, plan)
        rows = min(plan.batch_size, plan.nsamples)
        cache = 0
        if plan.mrp_stride is not None:
            stride = plan.mrp_stride or 1
            cache = math.ceil(shape.num_blocks / stride) * acts + acts  # cached block inputs + working copy
            if not plan.mrp_stride and (room := free.get(store)):
                cache = min(cache, int(MRP_CACHE_FRACTION * room) + acts)
        kept, accumulating = statistics_bytes(shape, plan)
        block_turn = {store: {"activations": acts}}
        if cache:
            block_turn[store]["MRP cached block inputs"] = cache
        turn = block_turn.setdefault(compute, {})
        if store != compute:
            turn["micro-batch"] = 2 * rows * plan.seqlen * shape.hidden * shape.dtype_size
        turn["statistics"] = kept
        if plan.block_swaps:  # the other weights of one block on the device, and fused experts stacked anew
            turn["MRP swapped block weights"] = shape.block_bytes + shape.expert_bytes
        turn["block forward"] = max(forward_bytes(shape, plan, rows, plan.seqlen) + accumulating,
                                    pruning_bytes(shape, plan))
        if plan.checkpoint and cuda and store == "device":
            block_turn.setdefault("host", {})["checkpoint copy"] = acts
        capture = {store: {"activations (capture: batches + concatenation)": 2 * acts}}
        if store == "host" and cuda:
            capture[store]["activations (capture: batches + concatenation)"] = 3 * acts  # + pinned copy
        phases["capture"] = capture
        phases["pruning"] = block_turn
    else:
        phases["pruning"] = {compute: {"block forward": pruning_bytes(shape, plan)}}
    if plan.eval_seqlen:
        # a window's logits in the model's dtype, in float32 and their log-softmax; beyond LOGIT_BYTES the head runs
        # on slices of positions
        sliced = min(plan.eval_seqlen * shape.vocab * 4, logit_budget())
        logits = 2 * sliced + (sliced * shape.dtype_size // 4 if shape.dtype_size < 4 else 0)
        phases["evaluation"] = {compute: {"evaluation": forward_bytes(shape, plan, 1, plan.eval_seqlen) + logits}}
        if plan.offload:  # offloaded: a chunk of windows goes through the blocks together
            window = plan.eval_seqlen * shape.hidden * shape.dtype_size
            chunk = max(1, CHUNK_BYTES // window)
            phases["evaluation"][compute]["evaluation windows"] = min(chunk, plan.eval_windows or chunk) * window
    if plan.zeroshot and plan.offload:  # lm-eval's requests go through the blocks in parts of this size
        phases["zero-shot"] = {compute: {"zero-shot requests": CHUNK_BYTES}}

    for pool, parts in pools.items():
        best: dict[str, int] = {}
        for phase in phases.values():
            candidate = phase.get(pool, {})
            if sum(candidate.values()) > sum(best.values()):
                best = candidate
        parts.update(best)
        if loading.get(pool, 0) > sum(parts.values()):
            pools[pool] = {"model (while loading)": loading[pool]}
    pools["host"]["libraries and buffers"] = HOST_OVERHEAD
    if cuda:  # the caching allocator reserves more than it hands out (fragmentation)
        pools["device"]["allocator slack"] = int(DEVICE_SLACK * sum(pools["device"].values()))
    return Estimate(pools)


# --------------------------------------------------------------------------------------------- free memory


def device_free_bytes(device: torch.device) -> int | None:
    """Free memory of a CUDA device (None for the CPU)."""
    if device.type != "cuda":
        return None
    return int(torch.cuda.mem_get_info(device)[0])


def host_available_bytes() -> int | None:
    """Memory the host can still give this process: MemAvailable, capped by a cgroup limit; None if unknown."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    limit = _cgroup_room()
    return available if limit is None else min(available, limit)


def _cgroup_room(proc_cgroup: str = "/proc/self/cgroup", mount: str = "/sys/fs/cgroup") -> int | None:
    """The least room (limit minus usage) of this process's memory cgroup and its ancestors (v2 or v1), if
    any of them has a limit: a batch job's limit is set on its own group, not on the root of the mount."""
    rooms = []
    try:
        files = _cgroup_files(proc_cgroup, Path(mount))
    except OSError:
        return None
    for limit_file, usage_file in files:
        try:
            raw = limit_file.read_text().strip()
            if raw == "max":
                continue
            limit, usage = int(raw), int(usage_file.read_text().strip())
        except (OSError, ValueError):
            continue
        if limit < 1 << 60:  # v1 writes "no limit" as a huge number
            rooms.append(max(limit - usage, 0))
    return min(rooms) if rooms else None


def _cgroup_files(proc_cgroup: str, mount: Path) -> list[tuple[Path, Path]]:
    """(limit, usage) files of the memory cgroup of this process and of each group above it."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        lines = []
    files = []
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":  # v2: one hierarchy
            root, limit, usage = mount, "memory.max", "memory.current"
        elif "memory" in controllers.split(","):
            root, limit, usage = mount / "memory", "memory.limit_in_bytes", "memory.usage_in_bytes"
        else:
            continue
        own = Path(path.strip().lstrip("/"))
        files += [(root / group / limit, root / group / usage) for group in (own, *own.parents)]
    return files or [(mount / "memory.max", mount / "memory.current"),
                     (mount / "memory" / "memory.limit_in_bytes", mount / "memory" / "memory.usage_in_bytes")]


# ---------------------------------------------------------------------------------------------- the check


def _fixes(pool: str, plan: RunPlan, est: Estimate) -> list[str]:
    parts = est.pools.get(pool, {})
    fixes = []
    if pool == "device" and not plan.offload:
        fixes.append("--offload")
    if pool == "device" and plan.calibrate and not plan.offload_activations:
        fixes.append("--offload-activations")
    weights = sum(v for k, v in parts.items() if k.startswith("model") or k == "MRP dense weights")
    if pool == "host" and not plan.spill and weights > 0.5 * est.total(pool) and (plan.mapped or plan.mrp_dense):
        fixes.append("--offload-dir DIR")
    if plan.calibrate:
        fixes += ["fewer --nsamples", "a shorter --seqlen"]
        if plan.batch_size > 1 and parts.get("block forward", 0) > 0.05 * est.total(pool):
            fixes.append("a smaller --batch-size")
        if plan.mrp_stride is not None and parts.get("MRP cached block inputs"):
            fixes.append("a larger --mrp-checkpoint-stride")
    return fixes


def check(est: Estimate, free: dict[str, int | None], plan: RunPlan) -> None:
    """Raise a one-line ResourceError when a pool's estimated peak exceeds its free memory."""
    for pool in ("device", "host"):
        available = free.get(pool)
        needed = est.total(pool)
        if available is None or pool not in est.pools or needed <= available:
            continue
        where = str(plan.device) if pool == "device" else "the host"
        fixes = _fixes(pool, plan, est)
        advice = f"try {_join(fixes)}, or" if fixes else "use a machine with more memory, or pass"
        raise ResourceError(
            f"not enough memory on {where}: this run needs about {gib(needed)} ({est.describe(pool)}) but "
            f"{gib(available)} is free; {advice} --no-preflight to run anyway"
        )
    for pool in ("device", "host"):
        if pool in est.pools and (room := free.get(pool)) is not None:
            log.info("memory preflight (%s): about %s of %s free (%s)", pool, gib(est.total(pool)),
                     gib(room), est.describe(pool))


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


def free_memory(device: torch.device) -> dict[str, int | None]:
    return {"device": device_free_bytes(device), "host": host_available_bytes()}


def preflight(shape: ModelShape, plan: RunPlan) -> Estimate:
    """Estimate the run's peak memory and refuse it (ResourceError) if it does not fit what is free now."""
    free = free_memory(plan.device)
    est = estimate(shape, plan, free)
    check(est, free, plan)
    return est
