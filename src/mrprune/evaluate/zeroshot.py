"""Zero-shot accuracy through lm-evaluation-harness, run on the in-memory (pruned) model, online or offline.

Online, standard task names (``boolq``, ``rte``, ``hellaswag``, ...) load their data from the hub as lm-eval
always does. Offline, or whenever ``task_data`` names a folder holding a task's file, the task runs from a
config shipped in :mod:`mrprune.evaluate.tasks` (lm-eval's standard prompt, choices and metrics, local data),
written out at run time into a folder lm-eval reads with ``include_path``. Local tasks are named
``<task>_local`` so they never shadow lm-eval's own, and are reported under the standard name.

lm-eval is an optional dependency (``pip install 'mrprune[eval]'``) and is imported only when a task runs.
"""

from __future__ import annotations

import bz2
import contextlib
import copy
import dataclasses
import difflib
import hashlib
import importlib.metadata
import importlib.resources
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError, EvalError
from ..hub import hub_reachable

log = logging.getLogger(__name__)

LM_EVAL_MISSING = "zero-shot evaluation needs lm-evaluation-harness: pip install 'mrprune[eval]'"
LOCAL_SUFFIX = "_local"
UTILS_FILE = "hellaswag_local_utils.py"


@dataclass(frozen=True)
class LocalTask:
    """A standard lm-eval task that can also run from a local file found in ``--task-data``."""

    name: str
    files: tuple[str, ...]  # looked for in the task-data folder, in this order

    @property
    def local_name(self) -> str:
        return self.name + LOCAL_SUFFIX

    def find(self, folder: Path) -> Path | None:
        for name in self.files:
            if (folder / name).is_file():
                return (folder / name).resolve()
        return None


LOCAL_TASKS: dict[str, LocalTask] = {
    task.name: task
    for task in (
        LocalTask("rte", ("rte_validation.parquet", "rte_validation.jsonl")),
        # the hub's parquet/JSONL schema, rowanz/hellaswag's hellaswag_val.jsonl, or the 6-lines-per-item text
        LocalTask("hellaswag", ("hellaswag_validation.parquet", "hellaswag_validation.jsonl", "hellaswag_val.jsonl",
                                "hellaswag_val_full.txt.bz2", "hellaswag_val_full.txt")),
    )
}


# ------------------------------------------------------------------------------------------ HellaSwag text


def _split_context(ctx: str) -> tuple[str, str]:
    """(ctx_a, ctx_b) of a HellaSwag context that the text file stores joined.

    lm-eval capitalises ctx_b (the unfinished sentence the endings complete), so the split matters. ActivityNet
    items end in such a fragment after the last full stop; WikiHow items (``How to ...``) have an empty ctx_b.
    """
    if ctx.startswith("How to ") or ctx.endswith((".", "!", "?")):
        return ctx, ""
    cut = max(ctx.rfind(". "), ctx.rfind("! "), ctx.rfind("? "))
    if cut < 0:
        return ctx, ""
    return ctx[: cut + 1], ctx[cut + 2:]


def read_hellaswag_text(path: Path) -> list[dict[str, Any]]:
    """Items of a HellaSwag text file (6 lines each: ``activity_label: ctx``, gold 0-3, 4 endings), in the
    hub's schema (``activity_label``, ``ctx_a``, ``ctx_b``, ``ctx``, ``endings``, ``label`` as a string)."""
    try:
        opener = bz2.open if path.suffix == ".bz2" else open
        with opener(path, "rt", encoding="utf-8") as handle:
            lines = handle.read().split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read HellaSwag file {path}: {exc}") from None
    lines = [line.rstrip("\r") for line in lines]
    while lines and not lines[-1]:
        lines.pop()
    if not lines or len(lines) % 6:
        raise DataError(f"{path} has {len(lines)} lines; a HellaSwag text file has 6 per item")
    items = []
    for start in range(0, len(lines), 6):
        head, label, *endings = lines[start : start + 6]
        number = start // 6 + 1
        activity, sep, ctx = head.partition(": ")
        if not sep or label not in ("0", "1", "2", "3"):
            raise DataError(f"{path}: item {number} (line {start + 1}) is not 'activity_label: context' "
                            "followed by a gold label 0-3 and 4 endings")
        ctx_a, ctx_b = _split_context(ctx)
        items.append({"ind": number - 1, "activity_label": activity, "ctx_a": ctx_a, "ctx_b": ctx_b, "ctx": ctx,
                      "endings": endings, "label": label})
    return items


def _cache_root() -> Path:
    from ..models.loading import cache_root

    return cache_root()


def _atomic_write(target: Path, write) -> None:
    """Build ``target`` (file or folder) beside it and rename it into place, so readers never see half of it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        built = write(tmp)
        os.replace(built, target)
    except OSError:
        if not target.exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def hellaswag_jsonl(source: Path) -> Path:
    """The HellaSwag text file ``source`` as JSONL in the hub's schema, converted once into the cache."""
    stat = source.stat()
    key = hashlib.sha1(f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = _cache_root() / "task_data" / f"hellaswag-{key}.jsonl"
    if target.is_file():
        return target
    items = read_hellaswag_text(source)

    def write(tmp: Path) -> Path:
        out = tmp / target.name
        with out.open("w", encoding="utf-8") as handle:
            for item in items:
                handle.write(json.dumps(item, ensure_ascii=False) + "\n")
        return out

    try:
        _atomic_write(target, write)
    except OSError as exc:
        raise EvalError(f"cannot write converted HellaSwag data to {target}: {exc.strerror or exc}") from None
    log.info("converted %s (%d items) to %s", source.name, len(items), target)
    return target


# -------------------------------------------------------------------------------------------- task plans


@dataclass(frozen=True)
class TaskPlan:
    """One requested task: the name it is reported under, what lm-eval runs, and where its data comes from."""

    name: str
    lm_eval_task: str
    source: Path | None = None  # the user's local file; None: the hub
    data: Path | None = None  # the file lm-eval reads (``source``, or its conversion)


def parse_tasks(tasks: str | Sequence[str]) -> list[str]:
    """Task names from ``"rte,hellaswag"`` or a list; empty names are an error, repeats are dropped."""
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names = [str(n).strip() for n in names]
    if not names or any(not n for n in names):
        raise EvalError(f"--tasks needs comma-separated task names, got {tasks!r}")
    return list(dict.fromkeys(names))


def _local_file_hint() -> str:
    return "; ".join(f"{t.name}: {' or '.join(t.files)}" for t in LOCAL_TASKS.values())


def plan_tasks(tasks: str | Sequence[str], task_data: str | Path | None = None) -> list[TaskPlan]:
    """Decide for every task whether it runs from local data or the hub; fail before any heavy work when a
    task cannot run (the hub is unreachable and there is no local data for it)."""
    folder = None
    if task_data is not None:
        folder = Path(task_data).expanduser()
        if not folder.is_dir():
            raise DataError(f"--task-data {task_data} is not a folder")
    plans: list[TaskPlan] = []
    hub_only: list[str] = []
    for name in parse_tasks(tasks):
        base = name.removesuffix(LOCAL_SUFFIX)
        local = LOCAL_TASKS.get(base)
        source = local.find(folder) if local is not None and folder is not None else None
        if local is not None and source is not None:
            if all(p.lm_eval_task != local.local_name for p in plans):  # rte and rte_local: one run
                plans.append(TaskPlan(base, local.local_name, source))
        elif local is not None and name != base:
            where = f"in {folder}" if folder is not None else "without --task-data DIR"
            raise EvalError(f"task {name} needs local data: found none {where} (looked for {', '.join(local.files)})")
        else:
            plans.append(TaskPlan(name, name))
            hub_only.append(name)
    if hub_only and not hub_reachable():
        for name in hub_only:  # most often a typo of a task with local data: say so first
            close = difflib.get_close_matches(name, list(LOCAL_TASKS), n=1)
            if close and name not in LOCAL_TASKS:
                raise EvalError(f"unknown task '{name}'; did you mean '{close[0]}'? (no local data has that name, "
                                "and the Hugging Face hub, where lm-eval's other tasks live, is unreachable)")
        which = f"task {hub_only[0]} needs" if len(hub_only) == 1 else f"tasks {', '.join(hub_only)} need"
        looked = f" ({folder} has no data for {'it' if len(hub_only) == 1 else 'them'})" if folder else ""
        raise EvalError(f"{which} the Hugging Face hub, which is unreachable{looked}; pass --task-data DIR with "
                        f"local data for: {', '.join(LOCAL_TASKS)} ({_local_file_hint()})")
    return plans


def _task_template(name: str) -> str:
    return importlib.resources.files("mrprune.evaluate.tasks").joinpath(name).read_text(encoding="utf-8")


def _dataset_kind(path: Path) -> str:
    """The `datasets` builder lm-eval should read ``path`` with."""
    return "parquet" if path.suffix == ".parquet" else "json"


def write_task_dir(plans: list[TaskPlan]) -> tuple[list[TaskPlan], Path | None]:
    """Convert local data where needed and write the task YAMLs lm-eval reads (``include_path``) into the cache.

    The folder is named by a hash of its contents, so it is written once per set of tasks and data files and
    can be passed to the ``lm_eval`` command line to reproduce a run.
    """
    resolved = []
    for plan in plans:
        if plan.source is None:
            resolved.append(plan)
            continue
        data = plan.source
        if plan.name == "hellaswag" and ".txt" in data.suffixes:
            data = hellaswag_jsonl(data)
        resolved.append(dataclasses.replace(plan, data=data))
    files: dict[str, str] = {}
    for plan in resolved:
        if plan.data is None:
            continue
        text = _task_template(f"{plan.lm_eval_task}.yaml")
        files[f"{plan.lm_eval_task}.yaml"] = (text.replace("__DATASET_PATH__", _dataset_kind(plan.data))
                                              .replace("__DATA_FILE__", json.dumps(str(plan.data))))
        if "!function" in text:
            files[UTILS_FILE] = _task_template(UTILS_FILE)
    if not files:
        return resolved, None
    key = hashlib.sha1(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]
    target = _cache_root() / "lm_eval_tasks" / key
    if not target.is_dir():
        def write(tmp: Path) -> Path:
            out = tmp / key
            out.mkdir()
            for name, text in files.items():
                (out / name).write_text(text, encoding="utf-8")
            return out

        try:
            _atomic_write(target, write)
        except OSError as exc:
            raise EvalError(f"cannot write task configs to {target}: {exc.strerror or exc}") from None
    return resolved, target


# --------------------------------------------------------------------------------------------- lm-eval


def require_lm_eval() -> None:
    """Raise the one-line install hint when lm-eval is absent (checked without importing it)."""
    try:
        found = importlib.util.find_spec("lm_eval") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise EvalError(LM_EVAL_MISSING)


def _import_lm_eval():
    if not hub_reachable():
        # nothing local needs the network; never wait for connection retries (read when `datasets` is imported)
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise EvalError(f"{LM_EVAL_MISSING} ({exc})") from None
    return lm_eval, HFLM, TaskManager


@dataclass
class ZeroShotTasks:
    """Tasks checked and ready to run: their plans, the generated task folder and lm-eval's task index."""

    plans: list[TaskPlan]
    task_dir: Path | None
    manager: Any = field(repr=False)


def prepare_tasks(tasks: str | Sequence[str], task_data: str | Path | None = None) -> ZeroShotTasks:
    """Everything that can fail before the model is touched: lm-eval installed, data reachable, names known."""
    require_lm_eval()
    plans, task_dir = write_task_dir(plan_tasks(tasks, task_data))
    _, _, TaskManager = _import_lm_eval()
    on_hub = any(p.data is None for p in plans)
    # indexing lm-eval's own ~15k task configs takes seconds: only when a task needs them
    manager = TaskManager(include_path=str(task_dir) if task_dir else None, include_defaults=on_hub)
    known = set(manager.all_tasks)
    for plan in plans:
        if plan.lm_eval_task not in known:
            close = difflib.get_close_matches(plan.lm_eval_task, sorted(known), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise EvalError(f"unknown lm-eval task '{plan.lm_eval_task}'{hint}")
    for plan in plans:
        log.info("zero-shot task %s: %s", plan.name,
                 f"{plan.lm_eval_task} from {plan.source}" if plan.source else "data from the Hugging Face hub")
    return ZeroShotTasks(plans, task_dir, manager)


class _DropMessages(logging.Filter):
    """Drop a library's log records that contain any of ``fragments``: notes that are expected here."""

    def __init__(self, *fragments: str) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


#: HFLM warns on every in-memory model that other arguments are ignored; passing one is the point here
_INSTANCE_WARNINGS = ("`pretrained` model kwarg is not of type", "Passed an already-initialized")
#: lm-eval warns, for its own rte and for our copy of it, that a metric's aggregation is left to its default
#: (the mean): that default is the task's definition, not a problem to report on every run
_DEFAULT_METRIC_WARNINGS = ("is defined, but aggregation is not", "is defined, but higher_is_better is not")


# --------------------------------------------------------------------------------------------- results


@dataclass
class TaskScore:
    """lm-eval's metrics for one task (``acc``, ``acc_stderr``, ``acc_norm``, ... with filter ``none``)."""

    task: str
    lm_eval_task: str
    items: int | None
    total: int | None
    data: str  # "hub" or the local file
    metrics: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {"lm_eval_task": self.lm_eval_task, "items": self.items, "total": self.total, "data": self.data,
                **self.metrics}


@dataclass
class ZeroShotResult:
    scores: list[TaskScore]
    num_fewshot: int
    limit: int | None
    batch_size: int
    harness: str = field(default_factory=lambda: f"lm-evaluation-harness {_lm_eval_version()}")
    task_dir: str | None = None

    @property
    def protocol(self) -> str:
        items = f"first {self.limit} items per task" if self.limit else "all items"
        return f"{self.harness}, {self.num_fewshot}-shot, {items}, model in memory"

    def __getitem__(self, task: str) -> TaskScore:
        for score in self.scores:
            if task in (score.task, score.lm_eval_task):
                return score
        raise KeyError(task)

    def to_dict(self) -> dict[str, Any]:
        return {
            "protocol": self.protocol,
            "harness": self.harness,
            "num_fewshot": self.num_fewshot,
            "limit": self.limit,
            "batch_size": self.batch_size,
            "task_dir": self.task_dir,
            "tasks": {s.task: s.to_dict() for s in self.scores},
        }

    def to_markdown(self) -> str:
        return zeroshot_markdown(self.to_dict())

    def __str__(self) -> str:
        return self.to_markdown()


def _lm_eval_version() -> str:
    try:
        return importlib.metadata.version("lm_eval")
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _cell(row: dict[str, Any], metric: str) -> str:
    value = row.get(metric)
    if not isinstance(value, (int, float)):
        return "-"
    err = row.get(f"{metric}_stderr")
    return f"{value:.4f} ± {err:.4f}" if isinstance(err, (int, float)) else f"{value:.4f}"


def zeroshot_markdown(result: dict[str, Any]) -> str:
    """A Markdown table of a zero-shot result (as :meth:`ZeroShotResult.to_dict` writes it) with its protocol."""
    lines = ["| task | items | acc ± stderr | acc_norm ± stderr | lm-eval task | data |",
             "|---|---:|---:|---:|---|---|"]
    for name, row in result.get("tasks", {}).items():
        items = row.get("items")
        data = row.get("data", "")
        lines.append(f"| {name} | {items if items is not None else '-'} | {_cell(row, 'acc')} | "
                     f"{_cell(row, 'acc_norm')} | {row.get('lm_eval_task', name)} | "
                     f"{'hub' if data == 'hub' else Path(data).name} |")
    lines.append(f"\nzero-shot: {result.get('protocol', '')}")
    return "\n".join(lines)


def _scores(output: dict[str, Any], plans: list[TaskPlan]) -> list[TaskScore]:
    """lm-eval's results (``"acc,none": ...``) per task, under the requested names."""
    by_name = {p.lm_eval_task: p for p in plans}
    counts = output.get("n-samples", {})
    scores = []
    for key, row in output.get("results", {}).items():
        metrics = {}
        for name, value in row.items():
            metric, sep, filt = name.partition(",")
            if sep and isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics[metric if filt == "none" else name] = float(value)
        plan = by_name.get(key)
        count = counts.get(key, {})
        scores.append(TaskScore(
            task=plan.name if plan else key, lm_eval_task=key, items=count.get("effective"),
            total=count.get("original"), data=str(plan.source) if plan and plan.source else "hub", metrics=metrics,
        ))
    order = {p.lm_eval_task: i for i, p in enumerate(plans)}
    return sorted(scores, key=lambda s: order.get(s.lm_eval_task, len(order)))  # as asked; group members last


@contextlib.contextmanager
def _without_run_stamps():
    """lm-eval stamps its results with the git hash of the working directory (running git, whose "fatal: not a
    git repository" reaches the user's terminal outside a repository) and torch's environment report (about
    4 s of subprocesses per call); mrprune reads neither, so both are skipped while it evaluates."""
    from lm_eval import evaluator

    stamps = {"get_git_commit_hash": lambda: None, "add_env_info": lambda storage: None}
    saved = {name: getattr(evaluator, name) for name in stamps if hasattr(evaluator, name)}
    for name in saved:
        setattr(evaluator, name, stamps[name])
    try:
        yield
    finally:
        for name, original in saved.items():
            setattr(evaluator, name, original)


def evaluate_zeroshot(
    model,
    tokenizer,
    tasks: str | Sequence[str] | ZeroShotTasks,
    limit: int | None = None,
    num_fewshot: int = 0,
    batch_size: int = 1,
    task_data: str | Path | None = None,
    device: str | None = None,
    offload: bool = False,
) -> ZeroShotResult:
    """Run lm-eval ``tasks`` on the in-memory ``model`` (left where it is unless ``device`` is given; with
    ``offload`` its blocks wait on the host and loglikelihood requests run block by block, see
    :mod:`.lm_blockwise`).

    ``tasks`` is a comma-separated string, a list, or the result of :func:`prepare_tasks` (which lets a caller
    fail early, before pruning). ``limit`` keeps the first items of each task; ``task_data`` is a folder of
    local task data (see ``LOCAL_TASKS``). lm-eval reseeds Python's, NumPy's and torch's global RNGs.
    """
    if tokenizer is None:
        raise EvalError("zero-shot evaluation needs the model's tokenizer")
    prepared = tasks if isinstance(tasks, ZeroShotTasks) else prepare_tasks(tasks, task_data)
    lm_eval, HFLM, _ = _import_lm_eval()
    if device is not None:
        model.to(device)
    if num_fewshot and any(p.data is not None for p in prepared.plans):
        log.warning("local tasks have only a validation split: few-shot examples come from it (lm-eval leaves "
                    "out the item being asked)")
    hf_logger = logging.getLogger("lm_eval.models.huggingface")
    quiet = _DropMessages(*_INSTANCE_WARNINGS)
    hf_logger.addFilter(quiet)
    try:
        # lm-eval may add a pad token to the tokenizer it is given: give it a copy, keep the caller's as it was
        lm_class = HFLM
        if offload:
            from .lm_blockwise import block_major_lm

            lm_class = block_major_lm(HFLM)
        lm = lm_class(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)
    finally:
        hf_logger.removeFilter(quiet)
    task_logger, defaults = logging.getLogger("lm_eval.api.task"), _DropMessages(*_DEFAULT_METRIC_WARNINGS)
    task_logger.addFilter(defaults)
    try:
        with _without_run_stamps():
            output = lm_eval.simple_evaluate(
                model=lm, tasks=[p.lm_eval_task for p in prepared.plans], num_fewshot=num_fewshot, limit=limit,
                task_manager=prepared.manager, log_samples=False,
            )
    finally:
        task_logger.removeFilter(defaults)
    result = ZeroShotResult(_scores(output, prepared.plans), num_fewshot, limit, batch_size,
                            task_dir=str(prepared.task_dir) if prepared.task_dir else None)
    log.info("zero-shot: %s", "; ".join(
        f"{s.task} acc {s.metrics.get('acc', float('nan')):.4f}" for s in result.scores))
    return result
