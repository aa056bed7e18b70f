"""The Python API: one call per job. The CLI is a thin wrapper over these functions."""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from . import preflight
from .allocate import AllocationContext, AutoAllocator, IterativeAllocator, build_allocator
from .allocate.select import CandidateResult, Selection, choose
from .card import hub_id
from .checkpoint import Checkpoint, fingerprint
from .config import CHOICES, PruneConfig, check_choice, check_positive, check_zeroshot_counts, merge
from .data import load_eval_text, read_corpus, sample_calibration, sample_with_heldout
from .errors import CheckpointError, ConfigError, reason
from .evaluate import zeroshot as zs
from .evaluate.perplexity import (
    PerplexityResult,
    eval_windows,
    model_windows,
    perplexity,
    windows_perplexity,
    with_bos,
)
from .export import check_disk, check_output, check_writable, existing_ancestor, export_bytes, export_model, input_paths
from .metrics import build_metric
from .metrics.pattern import SparsityPattern
from .models.adapter import ExpertRef, ModelAdapter, get_adapter
from .models.loading import (
    ModelSource,
    load_model,
    load_tokenizer,
    load_weights,
    maps_in_place,
    open_source,
    resolve_device,
    resolve_dtype,
    skeleton,
)
from .numerics import check_weights
from .report import PruneReport, sparsity_summary
from .runner import LayerRecord, SequentialPruner
from .runtime import PhaseTimer, evaluating, peak_device_memory_mib, peak_host_memory_mib, place_model
from .spill import SpillStore, host_copies, on_ram, restore

log = logging.getLogger(__name__)


@dataclass
class PruneOutcome:
    model: torch.nn.Module
    tokenizer: object
    report: PruneReport
    output: Path | None = None


def model_summary(adapter: ModelAdapter, source: str) -> dict:
    layers = adapter.all_linear_layers()
    return {
        "source": source,
        "family": adapter.family,
        "class": type(adapter.model).__name__,
        "blocks": adapter.num_blocks,
        "linear_layers_per_block": len(adapter.linear_layers(0)),
        "decoder_linear_weights": sum(ref.numel for ref in layers),
        "total_parameters": sum(p.numel() for p in adapter.model.parameters()),
        "dtype": str(next(adapter.model.parameters()).dtype).replace("torch.", ""),
    }


def resolve_target(config: PruneConfig, pattern: SparsityPattern) -> float | None:
    """The global target: explicit, implied by an N:M pattern, left to the allocator (file), or 0.5."""
    if config.sparsity is not None:
        return config.sparsity
    if pattern.is_nm:
        return pattern.sparsity
    return None if config.allocation.method == "file" else 0.5


def check_pattern(adapter: ModelAdapter, pattern: SparsityPattern) -> None:
    for ref in adapter.all_linear_layers():
        pattern.check_layer(ref.name, ref.in_features)


def _load(model, tokenizer, config: PruneConfig):
    """(model, tokenizer, description, local source dir) for a model object, a path/id, or None (default)."""
    if model is None or isinstance(model, (str, Path)):
        spec = str(model) if model is not None else config.model
        r = config.runtime
        loaded = load_model(spec, r.dtype, r.device, r.trust_remote_code, r.allow_pickle, tokenizer)
        return loaded.model, loaded.tokenizer, loaded.source, loaded.local_dir
    source = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    local = Path(source) if source and Path(source).is_dir() else None
    return model, tokenizer, source, local


@dataclass
class _Target:
    """The model of a job before its weights load: where it is, its config and tokenizer, and later its weights."""

    model: torch.nn.Module | None  # None until the weights load
    tokenizer: object
    description: str
    local_dir: Path | None
    identity: str  # resolved directory or hub id (checkpoint fingerprint)
    model_config: object
    dtype: torch.dtype
    source: ModelSource | None = None  # how to load the weights (None: an in-memory model)
    protect: list[Path] = field(default_factory=list)  # what the output may neither sit in nor contain


def _locate(model, tokenizer, config: PruneConfig, device: torch.device) -> _Target:
    """Find the model and read its config and tokenizer, without touching its weights (GGUF is converted once
    and cached: that cannot be avoided)."""
    r = config.runtime
    if model is None or isinstance(model, (str, Path)):
        spec = str(model) if model is not None else config.model
        dtype = resolve_dtype(r.dtype, device)
        source = open_source(spec, r.trust_remote_code, r.allow_pickle)
        tok = tokenizer if tokenizer is not None else load_tokenizer(source, r.trust_remote_code)
        protect = [p for p in (source.local_dir, *input_paths(spec)) if p is not None]
        _say_if_wider(r.dtype, dtype, source.config, config.output)
        return _Target(None, tok, source.description, source.local_dir, source.identity, source.config, dtype, source,
                       protect)
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    local = Path(name) if name and Path(name).is_dir() else None
    identity = str(local.resolve()) if local is not None else name
    dtype = next(model.parameters()).dtype
    if r.dtype != "auto" and resolve_dtype(r.dtype, device) != dtype:
        log.warning("runtime.dtype %s does not apply to a model object: it is pruned in its own %s (convert it "
                    "first with model.to(...))", r.dtype, str(dtype).removeprefix("torch."))
    return _Target(model, tokenizer, name, local, identity, getattr(model, "config", {}), dtype,
                   protect=input_paths(model))


def _say_if_wider(requested: str, dtype: torch.dtype, model_config, output: str | None) -> None:
    """``--dtype auto`` on the CPU prunes a bf16 checkpoint in float32 and saves it so: twice the input's size,
    which nobody expects of a pruned model unless told."""
    stored = getattr(model_config, "dtype", None) or getattr(model_config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    if output is None or requested != "auto" or not isinstance(stored, torch.dtype):
        return
    if stored.is_floating_point and stored.itemsize < dtype.itemsize:
        name = str(stored).removeprefix("torch.")
        log.warning("the model's weights are %s but --dtype auto prunes and saves them in %s here, %dx the size; "
                    "--dtype %s keeps them %s", name, str(dtype).removeprefix("torch."), dtype.itemsize // stored.itemsize,
                    name, name)


def check_allocation_shape(allocator, adapter: ModelAdapter, config: PruneConfig, pattern: SparsityPattern) -> None:
    """What the allocation can check on the model's shape alone (a ratios file against its blocks, MRP's start
    against the target) is checked on the weightless skeleton, before the weights load."""
    target = resolve_target(config, pattern)
    allocator.check_shape(AllocationContext(adapter, target, config.allocation.granularity, config))


def _run_plan(config: PruneConfig, device: torch.device, metric, needs_calibration: bool,
              calib_ids: torch.Tensor | None, resident: str | None, mapped: bool = False) -> preflight.RunPlan:
    r, c = config.runtime, config.calibration
    n, seqlen = (calib_ids.shape[0], calib_ids.shape[1]) if calib_ids is not None else (c.nsamples, c.seqlen)
    return preflight.RunPlan(
        device=device, nsamples=n, seqlen=seqlen, batch_size=r.batch_size, offload=r.offloads,
        offload_activations=r.offload_activations, calibrate=needs_calibration, hessian=metric.needs_hessian,
        mrp_stride=config.allocation.mrp.checkpoint_stride if "mrp" in config.allocation.methods_used() else None,
        eval_seqlen=config.evaluation.seqlen if config.evaluate else None,
        eval_windows=config.evaluation.max_windows, zeroshot=bool(config.evaluation.tasks), resident=resident,
        checkpoint=bool(r.checkpoint_dir),
        mrp_dense=_dense_copies(config),
        block_swaps=bool(_dense_copies(config)) or ("mrp-fast" in config.allocation.methods_used()
                                                     and config.allocation.mrp.pilot != "dense"),
        spill=r.offload_dir is not None and not on_ram(r.offload_dir), mapped=mapped,
    )


def _dense_copies(config: PruneConfig) -> int:
    """Host copies of every decoder linear layer's dense weights the job keeps: one for exact MRP with
    dense-block statistics, one for ``auto`` between its candidates (plus exact MRP's among them)."""
    a = config.allocation
    exact = int("mrp" in a.methods_used() and a.mrp.activations == "dense-block")
    return exact + int(a.method == "auto")


def _check_places(config: PruneConfig, local_dir: Path | None) -> None:
    """The checkpoint directory may not be the output's, inside it, around it, or inside the input model; the
    offload directory may not be inside any of them."""
    out = Path(config.output).expanduser().resolve() if config.output is not None else None
    if config.runtime.offload_dir is not None:
        _check_offload_dir(Path(config.runtime.offload_dir).expanduser().resolve(), {
            "--output": out, "the input model": local_dir,
            "--checkpoint-dir": config.runtime.checkpoint_dir})
    if not config.runtime.checkpoint_dir:
        return
    ckpt = Path(config.runtime.checkpoint_dir).expanduser().resolve()
    if out is not None and (ckpt == out or out in ckpt.parents or ckpt in out.parents):
        raise ConfigError(f"--checkpoint-dir {ckpt} and --output {out} must be separate directories "
                          "(the export replaces the output directory)")
    if local_dir is not None:
        src = Path(local_dir).resolve()
        if ckpt == src or src in ckpt.parents or ckpt in src.parents:
            raise ConfigError(f"--checkpoint-dir {ckpt} may not be inside (or contain) the input model {src}")


def _check_offload_dir(scratch: Path, others: dict[str, Path | str | None]) -> None:
    """--offload-dir: a directory that can be created and written to, not inside the job's other places (the
    input is never written, the output is replaced, the checkpoint holds its own files); it may hold them, as
    its scratch files go into a subdirectory of their own."""
    for what, place in others.items():
        if place is None:
            continue
        place = Path(place).expanduser().resolve()
        if scratch == place or place in scratch.parents:
            raise ConfigError(f"--offload-dir {scratch} may not be inside {what} {place}")
    try:
        if scratch.exists() and not scratch.is_dir():
            raise ConfigError(f"--offload-dir {scratch} is a file, not a directory")
        parent = existing_ancestor(scratch)
        if not parent.is_dir():
            raise ConfigError(f"--offload-dir {scratch} cannot be created: {parent} is a file, not a directory")
    except OSError as exc:
        raise ConfigError(f"--offload-dir {scratch}: {reason(exc)}") from None
    check_writable(parent)
    if on_ram(scratch):
        log.warning("--offload-dir %s is on a RAM-backed filesystem (tmpfs): its files take the memory they "
                    "would save; choose a directory on disk", scratch)


def prune(model=None, config: PruneConfig | None = None, *, tokenizer=None, progress: bool = True,
          calibration_ids: torch.Tensor | None = None) -> PruneOutcome:
    """Prune ``model`` (a loaded HF model, a path or hub id, or None for ``config.model``) as ``config`` says.

    An in-memory model is pruned in place; files it was loaded from are never written. ``tokenizer``, when
    given, is used instead of the one stored with a model given as a path. With
    ``config.output`` the result is exported there, report included. ``calibration_ids`` (n x seqlen token
    ids) replaces the sampling of ``config.calibration`` when given.

    Everything that can be checked without the weights is checked before they load: the model's config and
    tokenizer, the calibration and evaluation text, the output (writable, room on disk), the checkpoint, the
    allocation where it needs only shapes, and the memory the run will take (``runtime.preflight``).
    """
    if isinstance(model, PruneConfig):
        raise ConfigError("prune() got a PruneConfig where the model goes: call prune(config=...) or "
                          "prune(model, config)")
    if config is not None and not isinstance(config, PruneConfig):
        raise ConfigError(f"config must be a PruneConfig, got {type(config).__name__}; build one with "
                          "PruneConfig(...) or mrprune.config.merge(PruneConfig(), {'sparsity': 0.7, ...})")
    _check_model_and_tokenizer(model, tokenizer)
    config = (config or PruneConfig()).validate()
    r = config.runtime
    device = resolve_device(r.device)
    timer = PhaseTimer(device)
    pattern = SparsityPattern.parse(config.pattern)
    metric = build_metric(config.metric, config)
    allocator = build_allocator(config.allocation.method, config)
    needs_calibration = metric.needs_calibration or allocator.needs_calibration
    zeroshot_tasks = None
    if config.evaluation.tasks:
        with timer.phase("zeroshot"):  # a missing lm-eval, task or task data fails here, before any heavy work
            zeroshot_tasks = zs.prepare_tasks(config.evaluation.tasks, config.evaluation.task_data)

    # 1. the model's config and tokenizer, not its weights
    with timer.phase("load"):
        target = _locate(model, tokenizer, config, device)
    tokenizer = target.tokenizer
    if (needs_calibration and calibration_ids is None or config.evaluate or zeroshot_tasks) and tokenizer is None:
        raise ConfigError("a tokenizer is needed for calibration and evaluation; pass tokenizer=...")
    _check_places(config, target.local_dir)

    # 2. the text: too little of it is an error before the weights load
    model_type = getattr(target.model_config, "model_type", None)  # where BOS goes (Gemma needs it)
    calib_ids = None
    heldout = None  # --allocation auto: (windows, whether each starts with BOS, source name)
    eval_corpus = None
    with timer.phase("data"):
        if needs_calibration and calibration_ids is not None:
            if isinstance(allocator, AutoAllocator):
                raise ConfigError("--allocation auto measures windows of the calibration source that calibration "
                                  "did not use: give config.calibration instead of calibration_ids")
            calib_ids = _checked_calibration_ids(calibration_ids, target.model_config)
        elif needs_calibration:
            corpus = read_corpus(config.calibration.source, "calibration", config.calibration.column)
            c = config.calibration
            if isinstance(allocator, AutoAllocator):
                calib_ids, held = sample_with_heldout(corpus, tokenizer, c.nsamples, c.seqlen, c.seed,
                                                      config.allocation.auto.windows)
                heldout = (*with_bos(held, tokenizer, config.evaluation.bos, model_type), corpus.name)
            else:
                calib_ids = sample_calibration(corpus, tokenizer, c.nsamples, c.seqlen, c.seed)
            log.info("calibration: %d x %d tokens from %s (seed %d)", c.nsamples, c.seqlen, corpus.name, c.seed)
        if config.evaluate:
            e = config.evaluation
            eval_corpus = load_eval_text(e.text)
            eval_windows(tokenizer, eval_corpus.text or "", e.seqlen, e.max_windows, e.bos,  # too short: fail now
                         model_type)

    # 3. what the model's shape decides: pattern, allocation, output and checkpoint room, memory
    shaped = target.model
    if shaped is None:
        assert target.source is not None
        with timer.phase("load"):
            shaped = skeleton(target.source, target.dtype, r.trust_remote_code)
    checkpoint = None
    try:
        if shaped is not None:
            checkpoint = _preflight(config, target, shaped, allocator, pattern, metric, needs_calibration, calib_ids,
                                    device)

        # 4. the weights
        if target.model is None:
            assert target.source is not None
            with timer.phase("load"):
                target.model = load_weights(target.source, target.dtype, r.trust_remote_code, r.allow_pickle)
        model = target.model
        adapter = get_adapter(model)
        with timer.phase("load"):
            check_weights(model, adapter.blocks_name)
        if shaped is None:  # no skeleton: the same checks, now on the loaded model
            checkpoint = _preflight(config, target, model, allocator, pattern, metric, needs_calibration, calib_ids,
                                    device)

        try:
            with evaluating(model):
                outcome = _prune_loaded(config, target, adapter, metric, allocator, pattern, calib_ids, heldout,
                                        eval_corpus, zeroshot_tasks, device, timer, progress, checkpoint)
        except KeyboardInterrupt as exc:
            if checkpoint is not None and checkpoint.saved:
                exc.checkpoint_dir = str(checkpoint.directory)  # type: ignore[attr-defined]
            raise
        if checkpoint is not None and r.remove_checkpoint:
            checkpoint.remove()
        return outcome
    finally:
        if checkpoint is not None:
            checkpoint.close()  # its lock: another run may use the directory now


def _preflight(config: PruneConfig, target: _Target, shaped: torch.nn.Module, allocator, pattern, metric,
               needs_calibration: bool, calib_ids, device: torch.device) -> Checkpoint | None:
    """Checks on the model's shape (``shaped``: the loaded model or its weightless skeleton); opens the
    checkpoint. Raises a one-line MrpruneError on the first problem."""
    r = config.runtime
    adapter = get_adapter(shaped)
    check_pattern(adapter, pattern)
    check_allocation_shape(allocator, adapter, config, pattern)
    shape = preflight.ModelShape.from_model(shaped, adapter, target.dtype)
    if config.output is not None:
        detail = f"{shape.parameters:,} parameters x {shape.dtype_size} bytes + 10%"
        check_output(config.output, config.overwrite, target.protect,
                     export_bytes(shape.parameters, shape.dtype_size), detail)
    checkpoint = None
    checkpoint_bytes = 0
    linear_bytes = sum(shape.dtype_size * ref.numel for ref in adapter.all_linear_layers())
    if r.checkpoint_dir:
        effective = replace(config, sparsity=resolve_target(config, pattern))  # a default typed out is no change
        fp = fingerprint(effective, target.identity, target.model_config, calib_ids, device, target.dtype,
                         adapter.num_blocks)
        checkpoint = Checkpoint.open(r.checkpoint_dir, fp, r.resume)
    try:
        if checkpoint is not None and not checkpoint.resuming:
            acts = 0 if calib_ids is None else 2 * calib_ids.numel() * shape.hidden * shape.dtype_size
            checkpoint_bytes = int(linear_bytes * 1.1) + acts
            check_disk(checkpoint.directory, checkpoint_bytes, "the checkpoint",
                       "the pruned decoder weights + 10%, and the activations twice")
        if r.offload_dir is not None:
            _check_offload_room(config, r.offload_dir, shape, linear_bytes, checkpoint_bytes)
        if r.preflight:
            resident = None
            if target.model is not None:
                resident = "device" if next(target.model.parameters()).device.type == "cuda" else "host"
            mapped = resident is None and maps_in_place(target.source, target.dtype)
            preflight.preflight(shape, _run_plan(config, device, metric, needs_calibration, calib_ids, resident,
                                                 mapped))
    except BaseException:
        if checkpoint is not None:
            checkpoint.close()
        raise
    return checkpoint


def _check_model_and_tokenizer(model, tokenizer) -> None:
    """The public entry points' first check: what goes where, in one line each."""
    if model is not None and not isinstance(model, (str, Path, torch.nn.Module)):
        raise ConfigError(f"model must be a transformers model object, a path, a hub id or None, "
                          f"got {type(model).__name__}")
    if isinstance(tokenizer, (str, Path)):
        raise ConfigError("tokenizer= takes a tokenizer object (AutoTokenizer.from_pretrained(...)), not a path; "
                          "a model given as a path brings its own")
    if tokenizer is not None and not callable(tokenizer):
        raise ConfigError(f"tokenizer= takes a tokenizer object (AutoTokenizer.from_pretrained(...)), "
                          f"got {type(tokenizer).__name__}")


def _checked_calibration_ids(ids, model_config=None) -> torch.Tensor:
    """Token ids given instead of a calibration source: n x seqlen integers, at least one window of two, each
    a row of the model's embedding."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ConfigError(f"calibration_ids must be an n x seqlen tensor of token ids, got {shape}")
    if ids.shape[0] < 1 or ids.shape[1] < 2:
        raise ConfigError(f"calibration_ids must hold at least one window of 2 tokens, got {tuple(ids.shape)}")
    text_config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    vocab = getattr(text_config, "vocab_size", None)
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or (isinstance(vocab, int) and high >= vocab):
        bound = f"[0, {vocab})" if isinstance(vocab, int) else "non-negative"
        raise ConfigError(f"calibration_ids must be token ids in {bound}, got values from {low} to {high}")
    return ids


def _check_offload_room(config: PruneConfig, offload_dir: str, shape: preflight.ModelShape, linear_bytes: int,
                        checkpoint_bytes: int) -> None:
    """--offload-dir holds every block once pruned, and exact MRP's dense copy of the linear layers; the export
    and a new checkpoint are written while the scratch files live, so on a shared filesystem it needs room for
    them too."""
    blocks = shape.total_bytes - shape.outside_bytes
    detail = "the decoder blocks"
    if _dense_copies(config):
        blocks += linear_bytes * _dense_copies(config)
        detail += " and the dense copy of them MRP or --allocation auto keeps"
    needed = int(blocks * 1.02)
    scratch = existing_ancestor(Path(offload_dir).expanduser().resolve())
    others = {"the export": (config.output, export_bytes(shape.parameters, shape.dtype_size)),
              "the checkpoint": (config.runtime.checkpoint_dir, checkpoint_bytes)}
    try:
        for what, (place, size) in others.items():
            if place is not None and size and \
                    os.stat(existing_ancestor(Path(place).expanduser().resolve())).st_dev == os.stat(scratch).st_dev:
                needed += size
                detail += f", and {what} on the same filesystem"
    except OSError as exc:
        raise ConfigError(f"--offload-dir {scratch}: {reason(exc)}") from None
    check_disk(scratch, needed, "--offload-dir", detail)


def _prune_loaded(config: PruneConfig, target: _Target, adapter: ModelAdapter, metric, allocator, pattern,
                  calib_ids, heldout, eval_corpus, zeroshot_tasks, device: torch.device, timer: PhaseTimer, progress: bool,
                  checkpoint: Checkpoint | None) -> PruneOutcome:
    """The heavy part: dense statistics, allocation, the sequential pass, evaluation and export; with
    ``--offload-dir`` in a scratch directory there, removed whatever happens."""
    r = config.runtime
    spill = SpillStore(r.offload_dir) if r.offload_dir is not None else None
    try:
        return _prune_with(config, target, adapter, metric, allocator, pattern, calib_ids, heldout, eval_corpus,
                           zeroshot_tasks, device, timer, progress, checkpoint, spill)
    finally:
        if spill is not None:
            spill.close()


def target_miss_reason(records: list[LayerRecord]) -> str:
    """Why the global target was missed: masks only ever add zeros, so a layer that already had more zeros than
    its share keeps them (the other layers are not pruned less to make up for it)."""
    over = [r for r in records if r.zeros > round(r.target * r.numel)]
    if not over:
        return "masks only add zeros, and the model already had more"
    worst = max(over, key=lambda r: r.zeros / r.numel - r.target)
    return (f"{len(over)} layer(s) already had more zeros than their share before pruning and keep them, e.g. "
            f"{worst.name} ({worst.sparsity:.1%} zeros, share {worst.target:.1%}); masks only add zeros")


def expert_coverage(adapter: ModelAdapter, layer_tokens: dict[str, int]) -> dict[str, Any] | None:
    """How many calibration tokens each expert got (from its first matrix), over the blocks pruned in this run;
    None for a model without experts or a metric without calibration."""
    firsts = [r for r in adapter.all_linear_layers()
              if isinstance(r, ExpertRef) and r.param == r.kind.params(r.module)[0] and r.name in layer_tokens]
    if not firsts:
        return None
    counts = sorted(layer_tokens[r.name] for r in firsts)
    return {"experts": len(counts), "blocks": len({r.block for r in firsts}),
            "calibration_tokens": {"min": counts[0], "median": counts[len(counts) // 2], "max": counts[-1]},
            "without_tokens": sum(c == 0 for c in counts)}


def _prune_with(config: PruneConfig, target: _Target, adapter: ModelAdapter, metric, allocator, pattern,
                calib_ids, heldout, eval_corpus, zeroshot_tasks, device: torch.device, timer: PhaseTimer, progress: bool,
                checkpoint: Checkpoint | None, spill: SpillStore | None) -> PruneOutcome:
    model, tokenizer = target.model, target.tokenizer
    assert model is not None
    offload = config.runtime.offloads
    place_model(model, adapter.blocks_name, device, offload)  # where it will be pruned: measured there before too

    def measure() -> PerplexityResult:
        e = config.evaluation
        with timer.phase("evaluation"):
            return perplexity(model, tokenizer, eval_corpus, e.seqlen, e.max_windows, e.bos, device, progress,
                              offload)

    ppl = {}
    if config.evaluate:
        ppl["before"] = measure().to_dict()
    resumed = checkpoint is not None and checkpoint.resuming  # auto may restart it for the winner's pass
    selection, run_config, dense_stats = None, config, None
    if isinstance(allocator, AutoAllocator):
        selection, run_config, dense_stats = _select_allocation(config, adapter, metric, pattern, calib_ids,
                                                                heldout, device, timer, progress, spill, checkpoint)
        allocator = build_allocator(run_config.allocation.method, run_config)
    allocation, records, runner, _ = _allocate_and_prune(run_config, adapter, metric, allocator, pattern,
                                                         calib_ids, device, timer, progress, checkpoint, spill,
                                                         dense_stats)
    if config.evaluate:
        ppl["after"] = measure().to_dict()
    zeroshot = {}
    if zeroshot_tasks is not None:
        e = config.evaluation
        with timer.phase("zeroshot"):
            zeroshot = zs.evaluate_zeroshot(model, tokenizer, zeroshot_tasks, e.limit, e.num_fewshot,
                                            e.batch_size, offload=offload).to_dict()

    report = PruneReport.build(
        model_summary(adapter, target.description), config.to_dict(), allocation, records,
        perplexity=ppl,
        zeroshot=zeroshot,
        memory_mib={"peak_host": round(peak_host_memory_mib(), 1), "peak_device": peak_device_memory_mib(device)},
    )
    if resumed and checkpoint is not None:
        report.extra["resumed_from"] = str(checkpoint.directory)
    if selection is not None:
        report.extra["allocation_selection"] = selection.to_dict()
    experts = expert_coverage(adapter, runner.layer_tokens)
    if experts:
        report.extra["experts"] = experts
    s = report.sparsity
    if not s["target_met"]:
        log.warning("global sparsity %.4f misses the target %.4f: %s", s["achieved"], s["target"],
                    target_miss_reason(records))
    report.timings_s = timer.as_dict()
    output = None
    if config.output is not None:
        written = report.to_dict()
        output = export_model(model, tokenizer, config.output, written, config.overwrite, target.protect,
                              base_model=hub_id(target.identity) if target.local_dir is None else None)
        report.timings_s = written["timings_s"]
    return PruneOutcome(model, tokenizer, report, output)


def _allocate_and_prune(config: PruneConfig, adapter: ModelAdapter, metric, allocator, pattern, calib_ids,
                        device: torch.device, timer: PhaseTimer, progress: bool, checkpoint: Checkpoint | None,
                        spill: SpillStore | None, dense_stats: dict | None = None):
    """One allocation and the sequential pass it drives: (allocation, per-layer records, the closed runner, the
    dense model's statistics if the allocation needed them). ``dense_stats`` given saves the pass that measures
    them."""
    r = config.runtime
    runner = SequentialPruner(adapter, metric, pattern, device, r.batch_size, r.offloads, r.offload_activations,
                              timer, progress, checkpoint=checkpoint, spill=spill)
    try:  # closed whatever happens: no block copy may stay on the device
        if allocator.needs_calibration and dense_stats is None:
            dense_stats = runner.observe(calib_ids)
        stats = dense_stats
        ctx = AllocationContext(adapter, resolve_target(config, runner.pattern), config.allocation.granularity,
                                config, dense_stats=None if stats is None else lambda: stats, device=device)
        if isinstance(allocator, IterativeAllocator):
            allocation, records = allocator.prune(ctx, runner, calib_ids)
        else:
            with timer.phase("allocation"):
                allocation = allocator.allocate(ctx)
            records = runner.run(calib_ids, allocation.whole_weight_targets(adapter))
    finally:
        runner.close()
    return allocation, records, runner, dense_stats


def _select_allocation(config: PruneConfig, adapter: ModelAdapter, metric, pattern, calib_ids, heldout,
                       device: torch.device, timer: PhaseTimer, progress: bool, spill: SpillStore | None,
                       checkpoint: Checkpoint | None):
    """``--allocation auto``: every candidate prunes the same dense weights (kept on the host, or in the
    ``--offload-dir`` files) and is measured on the held-out windows. Returns the selection, the winner's config
    and the dense model's statistics (measured once for all; None if no candidate ran), and leaves the model
    dense. With a checkpoint, each candidate's result is saved as it comes; a resumed run measures only the
    candidates not yet measured, or none if the winner's pass had begun (it then resumes that pass)."""
    names = config.allocation.candidate_names()
    windows, per_window_bos, source = heldout
    protocol = (f"{windows.shape[0]} windows of {windows.shape[1]} tokens of {source} that calibration did not "
                f"use{', each starting with BOS' if per_window_bos else ''}")
    digest = hashlib.sha256(windows.numpy().tobytes()).hexdigest()[:16]
    saved = None
    if checkpoint is not None and checkpoint.resuming:  # measuring: in progress.json; the winner's pass: beside it
        auto_stage = checkpoint.stage() == "auto"
        saved = (checkpoint.progress or {}).get("state", {}).get("auto") if auto_stage else checkpoint.load_json("auto")
    if checkpoint is not None and saved is not None and saved.get("heldout") != digest:
        raise CheckpointError(f"checkpoint in {checkpoint.directory} measured its candidates on other held-out "
                              "windows; resume with the original calibration options")
    done = [CandidateResult(**c) for c in saved["candidates"]] if saved else []
    if saved and saved.get("chosen") and checkpoint is not None and checkpoint.stage() != "auto":
        selection = Selection(saved["chosen"], done, protocol)  # the winner's own pass had begun: it resumes
        return selection, merge(config, {"allocation.method": selection.chosen}), None

    layers = adapter.all_linear_layers()
    dense = host_copies(layers, spill, pin=device.type == "cuda")
    shared: dict[str, Any] = {}

    def prune_with(name: str) -> float:
        candidate = merge(config, {"allocation.method": name})
        allocation, records, _, stats = _allocate_and_prune(candidate, adapter, metric,
                                                            build_allocator(name, candidate), pattern, calib_ids,
                                                            device, timer, progress, None, spill,
                                                            shared.get("stats"))
        if stats is not None:
            shared["stats"] = stats
        return sparsity_summary(records, allocation.target)["achieved"]

    def measure() -> float:
        with timer.phase("allocation selection"):
            return windows_perplexity(adapter.model, windows, per_window_bos, source, device, False,
                                      config.runtime.offloads).perplexity

    def save(results: list[CandidateResult], chosen: str | None = None) -> None:
        if checkpoint is not None:
            data = {"heldout": digest, "chosen": chosen, "candidates": [asdict(r) for r in results]}
            checkpoint.commit("auto", [], state={"auto": data})  # one atomic write: what a resume reads
            checkpoint.save_json("auto", data)  # kept once the winner's pass overwrites progress.json

    selection = choose(names, prune_with, measure, lambda: restore(layers, dense), protocol, done, save)
    log.info("auto: %s chosen (%s)", selection.chosen, protocol)
    if checkpoint is not None:
        save(selection.candidates, selection.chosen)
        checkpoint.restart()  # the winner's pass starts from block 0 and saves its own progress
    return selection, merge(config, {"allocation.method": selection.chosen}), shared.get("stats")


def evaluate_perplexity(
    model,
    tokenizer=None,
    text: str | None = None,
    seqlen: int = 2048,
    max_windows: int | None = None,
    bos: str = "auto",
    device: str = "auto",
    dtype: str = "auto",
    offload: bool = False,
    progress: bool = True,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> PerplexityResult:
    """Perplexity of a model object or of the model at a path / hub id, on ``text`` (file, dataset or None)."""
    _check_model_and_tokenizer(model, tokenizer)
    check_positive("seqlen", seqlen)
    if max_windows is not None:
        check_positive("max_windows", max_windows)
    check_choice("bos", bos, CHOICES["evaluation.bos"])
    if model is not None and not isinstance(model, (str, Path)) and tokenizer is None:
        raise ConfigError("evaluating a model object needs its tokenizer: pass tokenizer=...")
    # the text, the windows' length against the model's context and the text's length against the windows are
    # checked before the weights load (a weightless skeleton): a mistake must not cost minutes of loading
    corpus = load_eval_text(text)
    torch_device = resolve_device(device)
    windows = None
    if model is None or isinstance(model, (str, Path)):
        source = open_source(None if model is None else str(model), trust_remote_code, allow_pickle)
        if tokenizer is None:  # one given is used instead of the model's own, as prune() does
            tokenizer = load_tokenizer(source, trust_remote_code)
        torch_dtype = resolve_dtype(dtype, torch_device)
        shaped = skeleton(source, torch_dtype, trust_remote_code)
        if shaped is not None:
            windows = model_windows(shaped, tokenizer, corpus, seqlen, max_windows, bos)
        model = load_weights(source, torch_dtype, trust_remote_code, allow_pickle)
    if windows is None:
        windows = model_windows(model, tokenizer, corpus, seqlen, max_windows, bos)
    adapter = get_adapter(model)
    place_model(model, adapter.blocks_name, torch_device, offload)
    with evaluating(model):
        return windows_perplexity(model, *windows, corpus.name, torch_device, progress, offload)


def evaluate_zeroshot(
    model,
    tokenizer=None,
    *,
    tasks: str | list[str] | zs.ZeroShotTasks,
    limit: int | None = None,
    num_fewshot: int = 0,
    batch_size: int = 1,
    task_data: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    offload: bool = False,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> zs.ZeroShotResult:
    """Zero-shot accuracy (lm-evaluation-harness) of a model object or of the model at a path / hub id.

    Tasks, lm-eval and task data are checked before the model is loaded; ``task_data`` is a folder of local
    task files, used instead of the hub (see ``mrprune.evaluate.zeroshot.LOCAL_TASKS``).
    """
    _check_model_and_tokenizer(model, tokenizer)
    check_zeroshot_counts(limit, num_fewshot, batch_size)
    prepared = tasks if isinstance(tasks, zs.ZeroShotTasks) else zs.prepare_tasks(tasks, task_data)
    if model is None or isinstance(model, (str, Path)):
        loaded = load_model(None if model is None else str(model), dtype, device, trust_remote_code, allow_pickle,
                            tokenizer)
        model, tokenizer = loaded.model, loaded.tokenizer
    torch_device = resolve_device(device)
    adapter = get_adapter(model)
    place_model(model, adapter.blocks_name, torch_device, offload)
    with evaluating(model):
        return zs.evaluate_zeroshot(model, tokenizer, prepared, limit, num_fewshot, batch_size, offload=offload)
