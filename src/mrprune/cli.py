"""Command line: ``mrprune prune|eval|info|analyze|compare``, a thin layer over :mod:`mrprune.api` and
:mod:`mrprune.analyze`.

Every prune option maps to one PruneConfig field (the table below is the single source of both), so each can
also be set from a YAML/JSON file with ``--config``; flags given on the command line win over the file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__
from .allocate import ALLOCATORS, COMPARED_BY_DEFAULT
from .config import CHOICES, PruneConfig, check_positive, dump_config, load_config, merge
from .errors import ConfigError, Interrupted, MrpruneError
from .metrics import METRICS


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake in one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        """A subcommand's parser reports its own unknown arguments, so the message names the subcommand (the
        top-level parser would report them as 'mrprune: error: unrecognized arguments')."""
        namespace, extras = super().parse_known_args(args, namespace)
        if extras and " " in self.prog:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras


@dataclass(frozen=True)
class Option:
    flag: str
    path: str  # dotted PruneConfig field
    help: str
    type: Any = str
    choices: Any = None  # default: the config's own choices for ``path`` (config.CHOICES), if any
    flag_only: bool = False  # a switch: present means ``const``
    const: Any = True


PRUNE_OPTIONS = [
    Option("--model", "model", "local HF directory, .gguf file (or a directory holding one), or hub id; "
           "default: the embedded SmolLM2-135M-Instruct"),
    Option("--metric", "metric", "how weights are ranked (default wanda)", choices=sorted(METRICS)),
    Option("--sparsity", "sparsity", "global target sparsity in [0, 1) over decoder linear weights "
           "(default 0.5; implied by an N:M pattern)", type=float),
    Option("--pattern", "pattern", "'unstructured' (default) or N:M: N of every M consecutive weights pruned"),
    Option("--allocation", "allocation.method", "how much each block is pruned (default uniform)",
           choices=sorted(ALLOCATORS)),
    Option("--ratios", "allocation.ratios", "JSON/YAML ratios for --allocation file"),
    Option("--auto-candidates", "allocation.auto.candidates", "allocations --allocation auto prunes with and "
           "chooses from by held-out perplexity (default uniform,owl,alphapruning,mrp-fast)"),
    Option("--auto-windows", "allocation.auto.windows", "held-out windows of the calibration source (not used "
           "for calibration) that --allocation auto measures each candidate on (default 16)", type=int),
    Option("--granularity", "allocation.granularity", "allocate per block (default) or per linear layer"),
    Option("--owl-m", "allocation.owl.m", "OWL outlier threshold, multiple of the block mean score (default 5)",
           type=float),
    Option("--owl-lambda", "allocation.owl.lam", "OWL spread of block ratios around the target (default 0.08)",
           type=float),
    Option("--alpha-eps", "allocation.alpha.eps", "AlphaPruning spread, ratios in target x [1-eps, 1+eps] "
           "(default 0.3)", type=float),
    Option("--mrp-m", "allocation.mrp.m", "MRP outlier threshold, multiple of the dense block mean (default 10)",
           type=float),
    Option("--mrp-s0", "allocation.mrp.s0", "MRP uniform start sparsity (default: target - --mrp-s0-gap)",
           type=float),
    Option("--mrp-s0-gap", "allocation.mrp.s0_gap", "MRP start below the target (default 0.1)", type=float),
    Option("--mrp-smax", "allocation.mrp.smax", "MRP ceiling on any block's sparsity (default 0.95)", type=float),
    Option("--mrp-step", "allocation.mrp.step", "exact MRP: first step (default 0.05)", type=float),
    Option("--mrp-min-step", "allocation.mrp.min_step", "exact MRP: smallest step (default 0.005)", type=float),
    Option("--mrp-gamma", "allocation.mrp.gamma", "exact MRP: step decay per iteration (default 0.95)", type=float),
    Option("--mrp-activations", "allocation.mrp.activations", "activations inside a block for its outlier "
           "ratio: from its dense weights (default, as Wanda collects statistics) or its current pruned weights"),
    Option("--mrp-pilot", "allocation.mrp.pilot", "fast MRP plans from the curves of an extra pass over the "
           "model pruned uniformly to the start s0, as the exact loop begins (default), pruned to the dense plan, "
           "or from the dense pass alone (cheapest)"),
    Option("--mrp-masks", "allocation.mrp.masks", "fast MRP prunes each block first to s0 (with the start "
           "pilot's statistics: the exact loop's own start), then to its share (default, nested like the exact "
           "loop's masks; Wanda), or straight to its share"),
    Option("--mrp-drift", "allocation.mrp.drift", "fast MRP forecasts how pruning upstream moves each later "
           "block's redundancy from that block's own move in the pilot and the pruning planned upstream of it "
           "(default), from its own move alone, or by one mean for all"),
    Option("--mrp-checkpoint-stride", "allocation.mrp.checkpoint_stride", "exact MRP: cache every k-th block's "
           "inputs to re-run MRP from the changed block (0: as memory allows)", type=int),
    Option("--calib", "calibration.source", "calibration text: a .txt/.jsonl/.parquet file, a hub dataset "
           "(c4, wikitext2) or 'embedded'; default c4 when online, else embedded"),
    Option("--calib-column", "calibration.column", "text column of a JSONL/parquet file (default text)"),
    Option("--nsamples", "calibration.nsamples", "calibration windows (default 128)", type=int),
    Option("--seqlen", "calibration.seqlen", "tokens per calibration window (default 2048)", type=int),
    Option("--seed", "calibration.seed", "seed of the calibration sampling (default 0)", type=int),
    Option("--device", "runtime.device", "auto (default: CUDA when present), cpu, cuda, cuda:N"),
    Option("--dtype", "runtime.dtype", "auto (default: float32 on CPU, bfloat16 on GPU), float32, bfloat16, "
           "float16"),
    Option("--offload", "runtime.offload", "keep blocks on the CPU, moving one at a time to the device",
           flag_only=True),
    Option("--offload-dir", "runtime.offload_dir", "keep pruned blocks in scratch files in this directory "
           "instead of RAM (removed at the end; implies --offload on a GPU): for a model larger than the host's "
           "memory"),
    Option("--offload-activations", "runtime.offload_activations",
           "keep cached calibration activations on the CPU too", flag_only=True),
    Option("--batch-size", "runtime.batch_size", "calibration windows per block forward (default 8)", type=int),
    Option("--trust-remote-code", "runtime.trust_remote_code", "allow model code from the hub", flag_only=True),
    Option("--allow-pickle", "runtime.allow_pickle", "allow pickle (.bin) checkpoints, which can run code",
           flag_only=True),
    Option("--checkpoint-dir", "runtime.checkpoint_dir", "save progress here after every finished block "
           "(an empty or new directory; with --resume, the directory of the interrupted run)"),
    Option("--resume", "runtime.resume", "continue the run saved in --checkpoint-dir (same options; same result "
           "bit for bit on the CPU)", flag_only=True),
    Option("--remove-checkpoint", "runtime.remove_checkpoint", "delete the checkpoint's files after a successful "
           "run (default: keep them; a finished checkpoint re-exports with --resume without pruning again)",
           flag_only=True),
    Option("--no-preflight", "runtime.preflight", "skip the memory estimate that refuses runs which would not fit",
           flag_only=True, const=False),
    Option("--sparsegpt-blocksize", "sparsegpt.blocksize", "SparseGPT column block (default 128)", type=int),
    Option("--sparsegpt-damp", "sparsegpt.percdamp", "SparseGPT dampening, fraction of mean diag H "
           "(default 0.01)", type=float),
    Option("--eval", "evaluate", "measure perplexity before and after pruning", flag_only=True),
    Option("--eval-text", "evaluation.text", "evaluation text (file, wikitext2, c4, embedded); default "
           "wikitext2 when online, else embedded"),
    Option("--eval-seqlen", "evaluation.seqlen", "tokens per evaluation window (default 2048)", type=int),
    Option("--max-windows", "evaluation.max_windows", "evaluate at most this many windows", type=int),
    Option("--bos", "evaluation.bos", "BOS at the start of every window: auto (if the tokenizer adds one), "
           "always, never"),
    Option("--tasks", "evaluation.tasks", "zero-shot lm-eval tasks run on the pruned model, comma-separated "
           "(e.g. rte,hellaswag); needs pip install 'mrprune[eval]'"),
    Option("--limit", "evaluation.limit", "zero-shot: at most this many items per task (default all)", type=int),
    Option("--num-fewshot", "evaluation.num_fewshot", "zero-shot: examples in each prompt (default 0)", type=int),
    Option("--task-data", "evaluation.task_data", "zero-shot: folder of local task data, used instead of the hub "
           "(rte_validation.parquet, hellaswag_val_full.txt.bz2, ...)"),
    Option("--zs-batch-size", "evaluation.batch_size", "zero-shot: sequences per forward (default 1)", type=int),
    Option("--output", "output", "write the pruned model and mrprune_report.json to this directory"),
    Option("--overwrite", "overwrite", "replace an existing --output directory", flag_only=True),
]


def _add_option(parser: argparse.ArgumentParser, option: Option) -> None:
    dest = option.path.replace(".", "__")
    if option.flag_only:
        parser.add_argument(option.flag, dest=dest, action="store_const", const=option.const, default=None,
                            help=option.help)
    else:
        choices = option.choices or CHOICES.get(option.path)
        parser.add_argument(option.flag, dest=dest, type=option.type, choices=choices, default=None,
                            help=option.help, metavar=None if choices else option.flag.lstrip("-").upper())


def config_from_args(args: argparse.Namespace) -> PruneConfig:
    """Defaults, then the --config file, then flags given on the command line."""
    config = load_config(args.config) if args.config else PruneConfig()
    # a command may declare only some of the options (analyze, compare): the others stay as the file says
    overrides = {o.path: getattr(args, o.path.replace(".", "__"), None) for o in PRUNE_OPTIONS}
    return merge(config, {k: v for k, v in overrides.items() if v is not None})


#: flags that only some allocations read (dotted path prefix -> those allocations; the longest match applies)
_ALLOCATION_FLAGS = {"allocation.ratios": ("file",), "allocation.owl.": ("owl",),
                     "allocation.alpha.": ("alphapruning",), "allocation.mrp.": ("mrp", "mrp-fast"),
                     "allocation.mrp.step": ("mrp",), "allocation.mrp.min_step": ("mrp",),
                     "allocation.mrp.gamma": ("mrp",), "allocation.mrp.checkpoint_stride": ("mrp",),
                     "allocation.mrp.pilot": ("mrp-fast",), "allocation.mrp.masks": ("mrp-fast",),
                     "allocation.mrp.drift": ("mrp-fast",),
                     "allocation.auto.": ("auto",)}
_PERPLEXITY_FLAGS = ("evaluation.text", "evaluation.seqlen", "evaluation.max_windows", "evaluation.bos")


def refuse_unread_flags(args: argparse.Namespace, config: PruneConfig) -> None:
    """A flag typed on the command line that this job would not read is a mistake (a forgotten --allocation or
    --eval), not something to ignore silently. Values from a --config file are not checked: a team's file may
    hold settings for several kinds of run."""
    typed = [o for o in PRUNE_OPTIONS if getattr(args, o.path.replace(".", "__"), None) is not None]
    method = config.allocation.method
    running = {method, *config.allocation.methods_used()}  # auto reads its candidates' flags
    for option in typed:
        prefixes = [prefix for prefix in _ALLOCATION_FLAGS if option.path.startswith(prefix)]
        methods = _ALLOCATION_FLAGS[max(prefixes, key=len)] if prefixes else None  # the most specific entry
        if methods is not None and not running.intersection(methods):
            shown = method if method != "auto" else f"auto with candidates {config.allocation.auto.candidates}"
            raise ConfigError(f"{option.flag} is read only with --allocation {' or '.join(methods)}, "
                              f"not {shown}: add the allocation or drop the flag")
        if option.path in _PERPLEXITY_FLAGS and not config.evaluate:
            raise ConfigError(f"{option.flag} sets the perplexity evaluation, which runs only with --eval: add --eval")


def cmd_prune(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    refuse_unread_flags(args, config)
    if args.dump_config:
        sys.stdout.write(dump_config(config.validate()))
        return 0
    from .api import prune

    outcome = prune(config=config, progress=not args.quiet)
    print(outcome.report.format_text())
    if outcome.output is not None:
        print(f"saved to {outcome.output}")
    return 0


#: ``mrprune eval``'s options (argparse dest) and the PruneConfig fields a --config file gives them
EVAL_SETTINGS = {
    "text": "evaluation.text", "seqlen": "evaluation.seqlen", "max_windows": "evaluation.max_windows",
    "bos": "evaluation.bos", "tasks": "evaluation.tasks", "limit": "evaluation.limit",
    "num_fewshot": "evaluation.num_fewshot", "task_data": "evaluation.task_data",
    "zs_batch_size": "evaluation.batch_size", "device": "runtime.device", "dtype": "runtime.dtype",
    "offload": "runtime.offload", "trust_remote_code": "runtime.trust_remote_code",
    "allow_pickle": "runtime.allow_pickle",
}


def fill_eval_settings(args: argparse.Namespace) -> set[str]:
    """Options not typed take their value from the --config file, else from PruneConfig's defaults (the same
    protocol as ``prune --eval``); returns the options that were typed."""
    typed = {dest for dest in EVAL_SETTINGS if getattr(args, dest) is not None}
    config = load_config(args.config) if args.config else PruneConfig()
    for dest, path in EVAL_SETTINGS.items():
        if dest not in typed:
            value = config
            for part in path.split("."):
                value = getattr(value, part)
            setattr(args, dest, value)
    return typed


def cmd_eval(args: argparse.Namespace) -> int:
    from .api import evaluate_perplexity

    typed = fill_eval_settings(args)
    check_positive("--seqlen", args.seqlen)
    if args.max_windows is not None:
        check_positive("--max-windows", args.max_windows)
    if args.tasks is not None:
        if args.text is None and typed & {"seqlen", "max_windows", "bos"}:
            raise ConfigError("--seqlen, --max-windows and --bos set the perplexity, which 'eval --tasks' measures "
                              "only with --text: add --text")
        return eval_zeroshot(args)
    if typed & {"limit", "task_data", "num_fewshot"}:
        raise ConfigError("--limit, --num-fewshot and --task-data apply to zero-shot tasks: add --tasks")
    result = evaluate_perplexity(
        args.model, text=args.text, seqlen=args.seqlen, max_windows=args.max_windows, bos=args.bos,
        device=args.device, dtype=args.dtype, offload=args.offload, progress=not args.quiet,
        allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code,
    )
    print(json.dumps({"perplexity": result.to_dict()}, indent=2) if args.json else str(result))
    return 0


def eval_zeroshot(args: argparse.Namespace) -> int:
    """``mrprune eval --tasks``: zero-shot tasks, plus perplexity on the same loaded model when --text is given."""
    from .api import evaluate_perplexity, evaluate_zeroshot
    from .data import load_eval_text
    from .evaluate.zeroshot import prepare_tasks
    from .models.loading import load_model

    if args.limit is not None:
        check_positive("--limit", args.limit)
    check_positive("--zs-batch-size", args.zs_batch_size)
    if args.num_fewshot < 0:
        raise ConfigError(f"--num-fewshot must be a non-negative integer, got {args.num_fewshot}")
    tasks = prepare_tasks(args.tasks, args.task_data)  # fails before the model is loaded
    loading = {"device": args.device, "dtype": args.dtype, "offload": args.offload}
    model, tokenizer, ppl = args.model, None, None
    if args.text is not None:
        load_eval_text(args.text)  # a missing text fails before the weights load
        loaded = load_model(args.model, args.dtype, args.device, args.trust_remote_code, args.allow_pickle)
        model, tokenizer = loaded.model, loaded.tokenizer
        ppl = evaluate_perplexity(model, tokenizer, text=args.text, seqlen=args.seqlen, max_windows=args.max_windows,
                                  bos=args.bos, progress=not args.quiet, **loading)
    result = evaluate_zeroshot(model, tokenizer, tasks=tasks, limit=args.limit, num_fewshot=args.num_fewshot,
                               batch_size=args.zs_batch_size, allow_pickle=args.allow_pickle,
                               trust_remote_code=args.trust_remote_code, **loading)
    if args.json:  # the sections measured, as the report names them
        out = {"zeroshot": result.to_dict()} if ppl is None else {"perplexity": ppl.to_dict(),
                                                                  "zeroshot": result.to_dict()}
        print(json.dumps(out, indent=2))
    else:
        print(result.to_markdown() if ppl is None else f"{ppl}\n\n{result.to_markdown()}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .describe import model_info

    info = model_info(args.model, trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def format_info(info: dict) -> str:
    lines = [f"{k:<24}{v}" for k, v in info.items() if k not in ("layers", "blocks", "routers")]
    lines.append(f"linear layers of block 0 (out x in; block N's are {info['blocks_path']}.N.*, the names a "
                 "ratios file's 'layers' uses):")
    rows: dict[str, list] = {}  # one row per expert tensor, not per expert: name -> [shape, experts]
    for layer in info["layers"]:
        match = re.fullmatch(r"(.*\.experts\.)\d+(\.\w+)", layer["path"])
        rows.setdefault(f"{match[1]}<expert>{match[2]}" if match else layer["path"], [layer["shape"], 0])[1] += 1
    width = max(40, *(len(name) + 2 for name in rows))
    lines += [f"  {name:<{width}}{shape[0]} x {shape[1]}" + (f"  ({count} experts)" if "<expert>" in name else "")
              for name, (shape, count) in rows.items()]
    if info.get("routers"):
        lines.append("routers of block 0 (kept dense): " + ", ".join(info["routers"]))
    lines.append("block sparsity: " + " ".join(f"{b:.3f}" for b in info["blocks"]))
    return "\n".join(lines)


def _add_loading_flags(parser: argparse.ArgumentParser, default: bool | None = False) -> None:
    """``default=None`` lets a command tell a typed switch from one left to its --config file."""
    parser.add_argument("--trust-remote-code", action="store_const", const=True, default=default,
                        help="allow model code from the hub")
    parser.add_argument("--allow-pickle", action="store_const", const=True, default=default,
                        help="allow pickle (.bin) checkpoints")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mrprune", description="Prune Hugging Face causal LMs with layerwise sparsity allocation.")
    parser.add_argument("--version", action="version", version=f"mrprune {__version__}")
    common = _Parser(add_help=False)
    loudness = common.add_mutually_exclusive_group()
    loudness.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    loudness.add_argument("-q", "--quiet", action="store_true", help="only warnings; no progress bars")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("prune", parents=[common], help="prune a model", description="Prune a model.")
    p.add_argument("--config", help="YAML/JSON file of options (keys as in --dump-config)")
    p.add_argument("--dump-config", action="store_true", help="print the effective config as YAML and exit")
    for option in PRUNE_OPTIONS:
        _add_option(p, option)
    p.set_defaults(handler=cmd_prune)

    e = sub.add_parser("eval", parents=[common], help="perplexity of a model", description="Measure perplexity.")
    e.add_argument("model", nargs="?", default=None, help="model directory, .gguf or hub id (default: embedded)")
    e.add_argument("--text", default=None, help="text file, wikitext2, c4 or embedded (default: wikitext2 when "
                   "online, else embedded)")
    e.add_argument("--seqlen", type=int, default=None, help="tokens per window (default 2048)")
    e.add_argument("--max-windows", type=int, default=None, help="evaluate at most this many windows")
    e.add_argument("--bos", choices=CHOICES["evaluation.bos"], default=None, help="BOS per window (default auto)")
    e.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N")
    e.add_argument("--dtype", default=None, help="auto (default), float32, bfloat16, float16")
    e.add_argument("--offload", action="store_const", const=True, default=None,
                   help="stream blocks to the device one at a time")
    e.add_argument("--tasks", default=None, help="zero-shot lm-eval tasks, comma-separated (e.g. rte,hellaswag), "
                   "instead of perplexity (both with --text); needs pip install 'mrprune[eval]'")
    e.add_argument("--limit", type=int, default=None, help="zero-shot: at most this many items per task")
    e.add_argument("--num-fewshot", type=int, default=None, help="zero-shot: examples in each prompt (default 0)")
    e.add_argument("--zs-batch-size", type=int, default=None, help="zero-shot: sequences per forward (default 1)")
    e.add_argument("--task-data", default=None, help="zero-shot: folder of local task data, used instead of the "
                   "hub (rte_validation.parquet, hellaswag_val_full.txt.bz2, ...)")
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    e.add_argument("--config", default=None, help="a prune config file (YAML/JSON, e.g. from prune --dump-config):"
                   " its evaluation.* and runtime loading settings are this command's defaults; flags given here win")
    _add_loading_flags(e, default=None)
    e.set_defaults(handler=cmd_eval)

    i = sub.add_parser("info", parents=[common], help="describe a model", description="Describe a model.")
    i.add_argument("model", nargs="?", default=None, help="model directory, .gguf or hub id (default: embedded)")
    i.add_argument("--json", action="store_true", help="print as JSON")
    _add_loading_flags(i)
    i.set_defaults(handler=cmd_info)
    add_analysis_commands(sub, common)
    return parser


# ------------------------------------------------------------------------------------ analyze and compare

_SHARED = ("model", "calibration.", "runtime.", "sparsegpt.")
_EVAL = ("evaluation.text", "evaluation.seqlen", "evaluation.max_windows", "evaluation.bos")
_ALLOCATORS = ("allocation.ratios", "allocation.granularity", "allocation.owl.", "allocation.alpha.",
               "allocation.mrp.")
_ZEROSHOT = ("evaluation.tasks", "evaluation.limit", "evaluation.num_fewshot", "evaluation.task_data",
             "evaluation.batch_size")

#: prune options no analysis takes (an analysis is not resumable, runs no preflight and restores its dense
#: weights between runs, which scratch files of pruned blocks cannot hold)
_PRUNE_ONLY = ("runtime.checkpoint_dir", "runtime.resume", "runtime.remove_checkpoint", "runtime.preflight",
               "runtime.offload_dir")

#: the prune options each analysis takes (PruneConfig paths; a trailing dot takes the whole section)
ANALYSIS_OPTIONS = {
    "lps": _SHARED + _EVAL + ("sparsity", "pattern"),
    "redundancy": ("calibration.", "runtime.", "allocation.mrp.m"),
    "allocation": _SHARED + _EVAL + _ALLOCATORS + ("metric", "sparsity"),
    "compare": _SHARED + _EVAL + _ALLOCATORS + _ZEROSHOT,
}


def _analysis_parser(sub, name: str, common: argparse.ArgumentParser, help: str, description: str,
                     options: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, parents=[common], help=help, description=description)
    p.add_argument("--config", help="YAML/JSON file of options (keys as in mrprune prune --dump-config)")
    for option in PRUNE_OPTIONS:
        if option.path in _PRUNE_ONLY:
            continue
        if any(option.path == k or (k.endswith(".") and option.path.startswith(k)) for k in ANALYSIS_OPTIONS[options]):
            _add_option(p, option)
    return p


def _add_analysis_output(p: argparse.ArgumentParser, default: str | None, what: str) -> None:
    p.add_argument("--output", dest="analysis_output", default=default, metavar="DIR" if default else "FILE.md",
                   help=what)
    p.add_argument("--overwrite", dest="analysis_overwrite", action="store_true", help="replace existing output")
    p.add_argument("--no-plot", action="store_true", help="write no PNG (matplotlib not needed)")


def _analysis_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"progress": not args.quiet, "output": args.analysis_output, "overwrite": args.analysis_overwrite,
            "plot": not args.no_plot}


def cmd_analyze(args: argparse.Namespace) -> int:
    from . import analyze

    config = config_from_args(args)
    kwargs = _analysis_kwargs(args)
    if args.analysis == "lps":
        result = analyze.layerwise_sensitivity(config=config, metrics=args.metrics, blocks=args.blocks, **kwargs)
    elif args.analysis == "redundancy":
        result = analyze.redundancy_profile(config=config, dense=args.dense, **kwargs)
    else:
        result = analyze.allocation_analysis(config=config, allocations=args.allocations, **kwargs)
    print(result.to_markdown())
    print(f"\nwrote {Path(args.analysis_output).expanduser().resolve()}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .analyze import compare

    result = compare(config=config_from_args(args), allocations=args.allocations, metrics=args.metrics,
                     sparsities=args.sparsities, redundancy=args.redundancy, **_analysis_kwargs(args))
    print(result.to_markdown())
    if args.analysis_output is not None:
        siblings = ".json" if args.no_plot else ".json, .png"
        print(f"\nwrote {Path(args.analysis_output).expanduser().resolve()} (and its {siblings})")
    return 0


def _add_compare_parser(sub, common: argparse.ArgumentParser) -> None:
    c = _analysis_parser(sub, "compare", common, "grid of allocation x metric x sparsity on one model",
                         "Prune one model once per allocation x metric x sparsity from the same dense weights "
                         "and calibration; print a Markdown table of perplexities.", "compare")
    c.add_argument("--allocations", default=",".join(COMPARED_BY_DEFAULT),
                   help=f"comma-separated allocations (default {','.join(COMPARED_BY_DEFAULT)}; the exact loop: mrp)")
    c.add_argument("--metrics", default="wanda", help="comma-separated metrics (default wanda)")
    c.add_argument("--sparsities", default="0.5", help="comma-separated target sparsities (default 0.5)")
    c.add_argument("--redundancy", action="store_true",
                   help="also report each cell's redundancy spread (one more calibration pass per cell)")
    _add_analysis_output(c, None, "write the table to this Markdown file, the rows to FILE.json and the plot to "
                                  "FILE.png beside it")
    c.set_defaults(handler=cmd_compare)


def add_analysis_commands(sub, common: argparse.ArgumentParser) -> None:
    """``mrprune analyze lps|redundancy|allocation|compare`` and ``mrprune compare``."""
    a = sub.add_parser("analyze", help="the paper's observations: lps, redundancy, allocation, compare",
                       description="Analyses behind MRP's observations; each writes JSON, a PNG plot and Markdown.")
    asub = a.add_subparsers(dest="analysis", required=True, parser_class=_Parser)

    lps = _analysis_parser(asub, "lps", common, "layerwise pruning sensitivity",
                           "Prune one block at --sparsity (others dense) with each metric; record the perplexity "
                           "increase over dense, for every block.", "lps")
    lps.add_argument("--metrics", default=None, help="comma-separated metrics, e.g. wanda,magnitude,sparsegpt "
                     "(default wanda)")
    lps.add_argument("--blocks", default=None, help="comma-separated block indices (default all)")
    _add_analysis_output(lps, "mrprune-lps", "write lps.json, lps.png and lps.md to this directory "
                                             "(default mrprune-lps)")
    lps.set_defaults(handler=cmd_analyze)

    red = _analysis_parser(asub, "redundancy", common, "per-block non-outlier ratio of a model",
                           "Per-block non-outlier ratio (MRP's redundancy) of a dense or pruned model.", "redundancy")
    red.add_argument("model", nargs="?", default=None, help="model directory, .gguf or hub id (default: embedded)")
    red.add_argument("--dense", default=None, help="dense model of the same architecture: thresholds from it "
                     "(MRP's definition); default: from the analysed model's surviving weights")
    _add_analysis_output(red, "mrprune-redundancy", "write redundancy.json, .png and .md to this directory "
                                                    "(default mrprune-redundancy)")
    red.set_defaults(handler=cmd_analyze)

    alloc = _analysis_parser(asub, "allocation", common, "per-block sparsity of each allocator",
                             "Per-block sparsity each allocator gives for one model, target and metric, and the "
                             "redundancy spread each leaves after pruning.", "allocation")
    alloc.add_argument("--allocations", default=",".join(COMPARED_BY_DEFAULT),
                       help=f"comma-separated allocations (default {','.join(COMPARED_BY_DEFAULT)}; the exact loop: "
                            "mrp)")
    alloc.add_argument("--eval", dest="evaluate", action="store_const", const=True, default=None,
                       help="also measure each allocation's perplexity")
    _add_analysis_output(alloc, "mrprune-allocation", "write allocation.json, .png and .md to this directory "
                                                      "(default mrprune-allocation)")
    alloc.set_defaults(handler=cmd_analyze)

    _add_compare_parser(asub, common)
    _add_compare_parser(sub, common)


def setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("transformers", "huggingface_hub", "urllib3", "filelock", "lm_eval", "datasets"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    if quiet:  # transformers' own loading/saving bars too
        with contextlib.suppress(ImportError, AttributeError):
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()


def _terminate(signum: int, frame) -> None:
    """SIGTERM handler: unwind like Ctrl-C, so atomic writes clean up and the exit code is 143."""
    raise Interrupted(signum, signal.Signals(signum).name)


@contextlib.contextmanager
def _sigterm_unwinds():
    """While active (main thread only), SIGTERM raises :class:`Interrupted` instead of killing the process."""
    try:
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def interrupted_message(exc: KeyboardInterrupt) -> tuple[str, int]:
    """The one line printed for an interruption, and the exit code (130 SIGINT, 143 SIGTERM)."""
    name, code = (exc.name, exc.exit_code) if isinstance(exc, Interrupted) else ("SIGINT", 130)
    saved = getattr(exc, "checkpoint_dir", None)
    written = getattr(exc, "output_written", None)  # it came while the finished output was being moved in
    tail = f"; the output had been written completely to {written}" if written else "; no output was written"
    if saved:
        tail += f"; progress is saved in {saved}: rerun the same command with --resume to continue"
    return f"mrprune: interrupted by {name}{tail}", code


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # whoever read stdout stopped reading (`mrprune prune ... | head`): the rest of the output has nowhere to
        # go, and Python's own flush at exit must not fail on it again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return SIGPIPE_EXIT


#: the status a shell reports for a program ended by SIGPIPE (128 + 13), as other tools end in a closed pipe
SIGPIPE_EXIT = 141


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose, args.quiet)
    with _sigterm_unwinds():
        try:
            return args.handler(args)
        except MrpruneError as exc:
            print(f"mrprune: error: {exc}", file=sys.stderr)
            return exc.exit_code
        except KeyboardInterrupt as exc:
            message, code = interrupted_message(exc)
            print(message, file=sys.stderr)
            return code


if __name__ == "__main__":
    sys.exit(main())
