import math

import torch

from mrprune.data import Corpus, embedded_text
from mrprune.evaluate.perplexity import eval_windows, perplexity, tokenizer_adds_bos
from tests.conftest import tiny_model


def test_windows_are_non_overlapping_and_bos_is_optional(tokenizer):
    text = embedded_text("evaluation")
    plain, bos = eval_windows(tokenizer, text, 64, None, "never")
    stream = tokenizer(text).input_ids
    assert not bos and plain.shape == (len(stream) // 64, 64)
    assert plain.flatten().tolist() == stream[: plain.numel()]
    with_bos, bos = eval_windows(tokenizer, text, 64, 5, "always")
    assert bos and with_bos.shape == (5, 64)
    assert (with_bos[:, 0] == tokenizer.bos_token_id).all()
    assert with_bos[:, 1:].flatten().tolist() == stream[: 5 * 63]
    assert not tokenizer_adds_bos(tokenizer)  # so 'auto' adds none for this tokenizer
    assert eval_windows(tokenizer, text, 64, 5, "auto")[0].equal(plain[:5])


def test_perplexity_is_exp_of_mean_window_nll(tokenizer):
    model = tiny_model("qwen3")
    corpus = Corpus("eval", text=embedded_text("evaluation"))
    result = perplexity(model, tokenizer, corpus, seqlen=48, max_windows=3, bos="never", progress=False)
    windows, _ = eval_windows(tokenizer, corpus.text, 48, 3, "never")
    with torch.inference_mode():
        losses = [float(model(input_ids=w[None], labels=w[None]).loss) for w in windows]
    assert result.windows == 3
    assert math.isclose(result.perplexity, math.exp(sum(losses) / 3), rel_tol=1e-5)
    assert "3 non-overlapping windows of 48 tokens" in result.protocol


def test_auto_bos_for_an_architecture_that_needs_it_even_if_its_tokenizer_adds_none(tokenizer):
    text = "one two three four five six seven eight nine ten " * 40
    assert tokenizer.bos_token_id is not None and not tokenizer_adds_bos(tokenizer)
    windows, bos = eval_windows(tokenizer, text, 64, 2, "auto", "gemma3_text")
    assert bos and bool((windows[:, 0] == tokenizer.bos_token_id).all())
    assert not eval_windows(tokenizer, text, 64, 2, "auto", "llama")[1]
    assert not eval_windows(tokenizer, text, 64, 2, "never", "gemma3_text")[1]
