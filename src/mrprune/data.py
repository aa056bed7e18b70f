"""Calibration windows and evaluation text, from local files, the hub, or text embedded in every Python.

Calibration follows the Wanda/SparseGPT protocol: with documents, pick a random document longer than
``seqlen`` and a random window inside it, ``nsamples`` times (Python's ``random`` seeded with ``seed``); with
one running text, pick random windows of it. The embedded source is CPython's own documentation
(``pydoc_data.topics``): four fifths of its unique paragraphs for calibration, the other fifth for evaluation,
so the two never overlap. ``--allocation auto`` also draws held-out windows from the calibration source, disjoint
from the calibration windows (:func:`sample_with_heldout`).
"""

from __future__ import annotations

import bisect
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import DataError
from .hub import hub_reachable

log = logging.getLogger(__name__)

EMBEDDED = "embedded"
HUB_ALIASES = ("wikitext2", "c4")
EAGER_DOCUMENTS = 20000  # up to this many documents are tokenised up front, so short text fails early
MAX_DRAWS_PER_SAMPLE = 10000


@dataclass
class Corpus:
    """Either separate documents or one running text, with a name for the report."""

    name: str
    documents: list[str] | None = None
    text: str | None = None


def embedded_text(purpose: str) -> str:
    """CPython's documentation topics, split into disjoint calibration and evaluation parts.

    Topics repeat whole paragraphs, so the split is over unique paragraphs: runs of 10 in document order,
    every fifth run for evaluation, the rest for calibration.
    """
    from pydoc_data.topics import topics

    paragraphs = dict.fromkeys(p.strip() for k in sorted(topics) for p in topics[k].split("\n\n") if p.strip())
    runs = [list(paragraphs)[i : i + 10] for i in range(0, len(paragraphs), 10)]
    chosen = [run for i, run in enumerate(runs) if (i % 5 == 4) == (purpose == "evaluation")]
    return "\n\n".join(p for run in chosen for p in run)


def _read_documents(path: Path, column: str) -> list[str]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            if column not in table.column_names:
                raise DataError(f"{path} has no column '{column}'; columns: {', '.join(table.column_names)}")
            values = table.column(column).to_pylist()
        else:
            rows = _json_records(path)
            bad = next((r for r in rows if not (isinstance(r, dict) and column in r)), None)
            if bad is not None:
                fields = f" (this one has: {', '.join(map(str, bad))})" if isinstance(bad, dict) else ""
                raise DataError(f"every record of {path} must be an object with a '{column}' field{fields}; "
                                "--calib-column names another field")
            values = [r[column] for r in rows]
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    documents = [v for v in values if isinstance(v, str) and v.strip()]
    if not documents:
        raise DataError(f"{path} holds no text in '{column}': {len(values)} record(s), none a non-empty string "
                        "(--calib-column names another column)")
    return documents


def _json_records(path: Path) -> list:
    """The records of a JSON Lines file (or of one JSON array); a syntax error names its line in the file."""
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":  # one JSON document, however it is laid out
        try:
            whole = json.loads(text)
        except ValueError:
            whole = None  # JSON Lines under a .json name: read line by line below
        if isinstance(whole, list):
            return whole
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError as exc:
            raise DataError(f"cannot read {path}: line {number}: {exc.args[0] if exc.args else exc}") from None
    return rows[0] if len(rows) == 1 and isinstance(rows[0], list) else rows


def _hub_corpus(name: str, purpose: str, column: str) -> Corpus:
    if not hub_reachable():
        raise DataError(
            f"'{name}' must be downloaded from the Hugging Face hub, which is unreachable (offline?); "
            "pass a local text, JSONL or parquet file instead"
        )
    try:
        import datasets
    except ImportError:
        raise DataError(f"loading '{name}' from the hub needs the 'datasets' package: pip install 'mrprune[hub]'") from None
    calib = purpose == "calibration"
    if name == "wikitext2":
        rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="train" if calib else "test")
        return Corpus("wikitext2", text="\n\n".join(rows["text"]))
    if name == "c4":
        shard = "en/c4-train.00000-of-01024.json.gz" if calib else "en/c4-validation.00000-of-00008.json.gz"
        rows = datasets.load_dataset("allenai/c4", data_files={"data": shard}, split="data")
        if calib:
            return Corpus("c4", documents=rows["text"])
        return Corpus("c4", text=" ".join(rows[:1100]["text"]))
    rows = datasets.load_dataset(name, split="train" if calib else "test")
    if column not in rows.column_names:
        raise DataError(f"dataset {name} has no column '{column}'; columns: {', '.join(rows.column_names)}")
    return Corpus(name, documents=rows[column]) if calib else Corpus(name, text="\n\n".join(rows[column]))


def read_corpus(source: str | None, purpose: str, column: str = "text") -> Corpus:
    """Resolve a --calib / --text value. None: the hub's default corpus when online, else the embedded text."""
    if source is None:
        source = ("c4" if purpose == "calibration" else "wikitext2") if hub_reachable() else EMBEDDED
        log.info("no %s text given: using %s", purpose, source)
    if source == EMBEDDED:
        return Corpus(f"embedded:pydoc_data.topics[{purpose}]", text=embedded_text(purpose))
    path = Path(source).expanduser()
    try:
        is_file, exists = path.is_file(), path.exists()
    except OSError:  # e.g. a name too long for the filesystem: raw text where a source's name belongs
        is_file = exists = False
    if "\n" in source or (not exists and len(source) > 255):
        raise DataError(f"{purpose} text source {source[:40]!r}... looks like text, not a source: give a file, "
                        "'embedded', or a hub dataset name (write the text to a file)")
    if is_file:
        if path.suffix.lower() in (".parquet", ".jsonl", ".json"):
            return Corpus(str(path), documents=_read_documents(path, column))
        try:
            return Corpus(str(path), text=path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"cannot read text file {path}: {exc}") from None
    if exists:
        raise DataError(f"{source} is not a file")
    if source in HUB_ALIASES or (source.count("/") == 1 and not source.startswith((".", "/"))):
        return _hub_corpus(source, purpose, column)
    raise DataError(f"text source {source} does not exist (give a file, 'embedded', or a hub dataset name)")


def sample_calibration(corpus: Corpus, tokenizer, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """(nsamples, seqlen) token ids drawn with the reference protocol; DataError when the text is too short."""
    return _draw(corpus, tokenizer, nsamples, seqlen, seed).ids


def sample_with_heldout(corpus: Corpus, tokenizer, nsamples: int, seqlen: int, seed: int,
                        heldout: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The calibration windows of :func:`sample_calibration` (the same ones) and ``heldout`` windows of
    ``seqlen`` tokens from the same source that share no token with them: with documents, one window in each
    of ``heldout`` documents calibration did not draw from; with one running text, non-overlapping windows on a
    grid of ``seqlen`` that overlap no calibration window. DataError when the source has too little left."""
    draw = _draw(corpus, tokenizer, nsamples, seqlen, seed)
    rng = random.Random(f"heldout-{seed}")
    if draw.documents is None:
        return draw.ids, _heldout_of_text(draw, rng, seqlen, heldout)
    return draw.ids, _heldout_of_documents(draw, rng, seqlen, heldout, corpus.name)


@dataclass
class _Draw:
    ids: torch.Tensor
    used: set[int]  # document indices, or window starts in ``text_ids``
    documents: Any = None  # token ids per document (a list or a lazy encoding)
    text_ids: list[int] | None = None


def _draw(corpus: Corpus, tokenizer, nsamples: int, seqlen: int, seed: int) -> _Draw:
    rng = random.Random(seed)
    needed = nsamples * seqlen
    if corpus.documents is None:
        ids = tokenizer(corpus.text or "").input_ids
        if len(ids) <= seqlen or len(ids) < needed:
            raise DataError(
                f"{corpus.name} has {len(ids)} tokens, too few for {nsamples} x {seqlen} calibration tokens; "
                "use a longer text, fewer samples or a shorter seqlen"
            )
        starts = [rng.randint(0, len(ids) - seqlen - 1) for _ in range(nsamples)]
        return _Draw(torch.tensor([ids[s : s + seqlen] for s in starts], dtype=torch.long), set(starts),
                     text_ids=ids)

    documents = corpus.documents
    if len(documents) > EAGER_DOCUMENTS:
        # a hub shard: tokenise lazily, as the reference does, and bound the search instead of pre-checking
        lazy = _LazyEncoding(tokenizer, documents)
        samples, used = _sample_documents(rng, lazy, nsamples, seqlen)
        return _Draw(samples, used, lazy)
    encoded = tokenizer(documents).input_ids
    total = sum(len(e) for e in encoded)
    eligible = [i for i, e in enumerate(encoded) if len(e) > seqlen]
    if not eligible or total < needed:
        raise DataError(
            f"{corpus.name} has {total} tokens in {len(encoded)} documents, {len(eligible)} of them longer than "
            f"seqlen {seqlen}: too little for {nsamples} x {seqlen} calibration tokens; "
            "use more text, fewer samples or a shorter seqlen"
        )
    if sum(len(encoded[i]) for i in eligible) < needed:
        log.warning(
            "only %d documents of %s are longer than %d tokens: calibration windows will overlap",
            len(eligible), corpus.name, seqlen,
        )
    samples, used = _sample_documents(rng, encoded, nsamples, seqlen)
    return _Draw(samples, used, encoded)


def _heldout_of_text(draw: _Draw, rng: random.Random, seqlen: int, count: int) -> torch.Tensor:
    ids = draw.text_ids or []
    starts = sorted(draw.used)
    free = []
    for k in range(len(ids) // seqlen):
        a = k * seqlen
        i = bisect.bisect_left(starts, a - seqlen + 1)  # the first calibration window that could overlap
        if i == len(starts) or starts[i] >= a + seqlen:
            free.append(a)
    if len(free) < count:
        raise DataError(
            f"the calibration text has {len(free)} windows of {seqlen} tokens that calibration does not touch, "
            f"fewer than the {count} held-out windows --allocation auto needs; use a longer text, fewer "
            "calibration samples or fewer --auto-windows"
        )
    return torch.tensor([ids[a : a + seqlen] for a in sorted(rng.sample(free, count))], dtype=torch.long)


def _heldout_of_documents(draw: _Draw, rng: random.Random, seqlen: int, count: int, name: str) -> torch.Tensor:
    documents = draw.documents
    order = [i for i in range(len(documents)) if i not in draw.used]
    rng.shuffle(order)
    windows: list[list[int]] = []
    for doc in order[: MAX_DRAWS_PER_SAMPLE * count]:
        if len(windows) == count:
            break
        if len(documents[doc]) > seqlen:
            start = rng.randint(0, len(documents[doc]) - seqlen - 1)
            windows.append(documents[doc][start : start + seqlen])
    if len(windows) < count:
        raise DataError(
            f"{name} has {len(windows)} documents longer than seqlen {seqlen} that calibration did not use, "
            f"fewer than the {count} held-out windows --allocation auto needs; use more documents, fewer "
            "calibration samples or fewer --auto-windows"
        )
    return torch.tensor(windows, dtype=torch.long)


class _LazyEncoding:
    def __init__(self, tokenizer, documents: list[str]):
        self.tokenizer, self.documents = tokenizer, documents
        self.cache: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return len(self.documents)

    def __getitem__(self, i: int) -> list[int]:
        if i not in self.cache:
            self.cache[i] = self.tokenizer(self.documents[i]).input_ids
        return self.cache[i]


def _sample_documents(rng: random.Random, encoded, nsamples: int, seqlen: int) -> tuple[torch.Tensor, set[int]]:
    """The reference loop: random document until one is longer than seqlen, then a random window in it."""
    samples = []
    used = set()
    attempts = 0
    for _ in range(nsamples):
        while True:
            attempts += 1
            if attempts > MAX_DRAWS_PER_SAMPLE * nsamples:
                raise DataError(f"found too few documents longer than seqlen {seqlen}; use a shorter seqlen")
            doc = rng.randint(0, len(encoded) - 1)
            if len(encoded[doc]) > seqlen:
                break
        start = rng.randint(0, len(encoded[doc]) - seqlen - 1)
        samples.append(encoded[doc][start : start + seqlen])
        used.add(doc)
    return torch.tensor(samples, dtype=torch.long), used


def load_eval_text(source: str | None, column: str = "text") -> Corpus:
    """Evaluation text as one running string (documents joined with blank lines)."""
    corpus = read_corpus(source, "evaluation", column)
    text = corpus.text
    if text is None:
        text = "\n\n".join(corpus.documents or [])
        corpus = Corpus(corpus.name, text=text)
    if not text.strip():
        raise DataError(f"evaluation text {corpus.name} is empty")
    return corpus
