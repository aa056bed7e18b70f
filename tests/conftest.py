"""Shared fixtures: a small trained tokenizer, tiny random models of every supported family, real data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import transformers
from hypothesis import HealthCheck, settings

from mrprune.testing import train_tokenizer

# a loaded machine (parallel workers, CI) can stall input generation for seconds: timing is not behaviour
settings.register_profile("mrprune", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("mrprune")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
#: tests that take the ``device`` fixture run on every device present (the CPU, and CUDA where available)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
VOCAB = 384

# one tiny config per supported family; Gemma3 mixes sliding and full attention blocks on purpose
FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2),
    "mistral": lambda: transformers.MistralConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        sliding_window=8),
    "qwen2": lambda: transformers.Qwen2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2),
    "qwen3": lambda: transformers.Qwen3Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16),
    "gemma3": lambda: transformers.Gemma3TextConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    "opt": lambda: transformers.OPTConfig(
        hidden_size=64, ffn_dim=128, word_embed_proj_dim=64, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=128),
    "gpt2": lambda: transformers.GPT2Config(n_embd=64, n_layer=3, n_head=4, n_positions=128),
    "phi3": lambda: transformers.Phi3Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=128, pad_token_id=0),
    # ALiBi with the batch folded into the bias tensor's first dimension: its context depends on the micro-batch
    "bloom": lambda: transformers.BloomConfig(hidden_size=64, n_layer=3, n_head=4),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=128),
    # mixtures of experts (experts in 3-D tensors, transformers' experts interface): a router module, a router Linear with one output per expert
    # (PhiMoE), a shared expert with a one-output gate Linear (Qwen2-MoE), transposed experts with biases and an
    # interleaved, clamped gate (GPT-OSS)
    "mixtral": lambda: transformers.MixtralConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        num_local_experts=4, num_experts_per_tok=2),
    "phimoe": lambda: transformers.PhimoeConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=128),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
        hidden_size=64, intermediate_size=128, moe_intermediate_size=48, shared_expert_intermediate_size=80,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2),
    # Llama-4 runs every expert on every token, pre-scaled by the router's score (top-1 routing)
    "llama4": lambda: transformers.Llama4TextConfig(
        hidden_size=64, intermediate_size=96, intermediate_size_mlp=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=1),
    "gpt_oss": lambda: transformers.GptOssConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
}


def family_config(family: str):
    config = FAMILIES[family]()
    config.vocab_size = VOCAB
    config.bos_token_id, config.eos_token_id = 1, 2
    if getattr(config, "pad_token_id", None) is not None:
        config.pad_token_id = 0
    return config


def tiny_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(family_config(family), attn_implementation="eager")
    return model.eval()


@pytest.fixture(scope="session")
def tokenizer():
    """A byte-level BPE tokenizer trained on CPython's embedded docs: real text, no download."""
    return train_tokenizer(VOCAB)


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from threads, and a shared machine makes them slow: one thread, then restore."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_dir(tmp_path, tokenizer):
    """Save a tiny model of ``family`` (with the tokenizer) and return its directory."""

    def make(family: str = "llama", seed: int = 0) -> Path:
        path = tmp_path / f"tiny-{family}"
        tiny_model(family, seed).save_pretrained(path)
        tokenizer.save_pretrained(path)
        return path

    return make


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent")
    return SHARED_DATA


def need_files(folder: Path, *names: str) -> None:
    """Skip when a machine's copy of the shared data lacks a file the test reads."""
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        pytest.skip(f"{folder} lacks {', '.join(missing)}")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The embedded default model, converted from its GGUF once (cached across runs)."""
    from mrprune.models.loading import convert_gguf, embedded_default_gguf

    return convert_gguf(embedded_default_gguf())


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    yield
