import functools
import importlib
import math

import pytest
import torch
import transformers

from mrprune.data import Corpus, embedded_text
from mrprune.evaluate.perplexity import block_major_nlls, eval_windows, perplexity, tokenizer_adds_bos, window_nll
from mrprune.models.adapter import get_adapter
from tests.conftest import FAMILIES, VOCAB, family_config, tiny_model


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
    assert result.protocol.endswith("3 non-overlapping windows of 48 tokens, float32")
    half = perplexity(model.to(torch.bfloat16), tokenizer, corpus, seqlen=48, max_windows=1, bos="never",
                      progress=False)
    assert half.protocol.endswith(": 1 non-overlapping window of 48 tokens, bfloat16")  # the dtype moves it


def test_auto_bos_for_an_architecture_that_needs_it_even_if_its_tokenizer_adds_none(tokenizer):
    text = "one two three four five six seven eight nine ten " * 40
    assert tokenizer.bos_token_id is not None and not tokenizer_adds_bos(tokenizer)
    windows, bos = eval_windows(tokenizer, text, 64, 2, "auto", "gemma3_text")
    assert bos and bool((windows[:, 0] == tokenizer.bos_token_id).all())
    assert not eval_windows(tokenizer, text, 64, 2, "auto", "llama")[1]
    assert not eval_windows(tokenizer, text, 64, 2, "never", "gemma3_text")[1]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_block_by_block_order_gives_the_window_by_window_numbers(tokenizer, family, one_thread):
    """The order offloaded runs use (every block over a chunk of windows, then the head) must compute exactly
    what a forward per window does, for every family: each block gets the context its parent passes it and
    the head is the model's own (Gemma's logit soft-capping included)."""
    config = family_config(family)
    if family == "gemma3":
        config.final_logit_softcapping = 3.0  # the head's post-processing must come from the model's code
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    windows, _ = eval_windows(tokenizer, embedded_text("evaluation"), 40, 5, "always")
    device = torch.device("cpu")
    expected = [window_nll(model, w, device) for w in windows]
    per_window = 40 * config.hidden_size * 4
    got = block_major_nlls(model, windows, device, progress=False, budget=2 * per_window)  # chunks of 2, 2, 1
    assert got == expected
    if family == "gemma3":
        config.final_logit_softcapping = None
        assert block_major_nlls(model, windows, device, progress=False) != expected
    # the model is left runnable as it was: no block keeps a replaced forward
    assert all("forward" not in vars(block) for block in get_adapter(model).blocks)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_in_slices_of_positions_give_the_whole_windows_numbers(tokenizer, family, one_thread):
    """A window whose logits would pass the budget has its head run on slices of positions: the same NLL as
    all logits at once, for every family (Gemma's logit soft-capping is the model's own code here too), with
    no slice holding more positions than the budget allows, in the resident and the block-by-block order."""
    config = family_config(family)
    if family == "gemma3":
        config.final_logit_softcapping = 3.0
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    windows, _ = eval_windows(tokenizer, embedded_text("evaluation"), 40, 3, "always")
    device = torch.device("cpu")
    whole = [window_nll(model, w, device) for w in windows]
    budget = 7 * VOCAB * 4  # seven positions' float32 logits: slices of 7, 7, ..., 4 over 39 predictions
    seen: list[int] = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, args, out: seen.append(out.shape[1]))
    try:
        sliced = [window_nll(model, w, device, logit_bytes=budget) for w in windows]
    finally:
        hook.remove()
    # per window: the forward that yields the last block's output (one position), then the slices
    assert seen == [1, 7, 7, 7, 7, 7, 4] * 3
    assert sliced == pytest.approx(whole, rel=1e-5)
    assert block_major_nlls(model, windows, device, progress=False, logit_bytes=budget) == sliced
    assert all("forward" not in vars(block) for block in get_adapter(model).blocks)
    if family == "gemma3":  # the head's post-processing is applied to each slice
        model.config.final_logit_softcapping = None
        assert [window_nll(model, w, device, logit_bytes=budget) for w in windows] != pytest.approx(whole, rel=1e-5)


def test_logits_in_slices_keep_what_the_model_and_its_user_set_up(tokenizer, one_thread, monkeypatch):
    """Slices leave a model as they found it and compute its own numbers: a mixture of experts that returns its
    routers' balancing loss, a forward a block has of its own (accelerate's device hooks set one), a forward hook
    on the last block (applied once, not again to the output it already made); the budget is read at call time;
    custom model code and one-token windows get all logits at once."""
    module = importlib.import_module("mrprune.evaluate.perplexity")  # the package exports a function of that name

    config = family_config("mixtral")
    config.output_router_logits = True
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    blocks = get_adapter(model).blocks
    own = [functools.partial(type(block).forward, block) for block in blocks]
    for block, forward in zip(blocks, own):
        block.forward = forward
    shift = blocks[2].register_forward_hook(lambda m, args, out: out + 0.25)
    windows, _ = eval_windows(tokenizer, embedded_text("evaluation"), 40, 2, "never")
    device = torch.device("cpu")
    whole = [window_nll(model, w, device) for w in windows]
    hooks = list(blocks[2]._forward_hooks)  # ours, and the one transformers puts at the first forward (routers)
    budget = 9 * VOCAB * 4
    sliced = [window_nll(model, w, device, logit_bytes=budget) for w in windows]
    assert sliced == pytest.approx(whole, rel=1e-5)
    assert block_major_nlls(model, windows, device, progress=False, logit_bytes=budget) == sliced
    assert all(vars(block)["forward"] is forward for block, forward in zip(blocks, own))
    assert list(blocks[2]._forward_hooks) == hooks
    shift.remove()
    assert [window_nll(model, w, device, logit_bytes=budget) for w in windows] != pytest.approx(whole, rel=1e-5)

    calls: list[int] = []
    model.get_output_embeddings().register_forward_hook(lambda m, args, out: calls.append(out.shape[1]))
    monkeypatch.setattr(module, "LOGIT_BYTES", budget)
    window_nll(model, windows[0], device)
    assert calls == [1, 9, 9, 9, 9, 3]  # the budget given to the module is the one used
    assert module.head_slice(model, 1, 1) is None  # one token: nothing to predict, nothing to slice

    class CustomCode(transformers.LlamaForCausalLM):  # a class of custom code may take only a count of positions
        pass

    custom = CustomCode(family_config("llama")).eval()
    assert module.head_slice(custom, 40, budget) is None
    assert module.head_slice(transformers.LlamaForCausalLM(family_config("llama")), 40, budget) == 9


def test_offloaded_evaluation_through_the_api_gives_the_resident_number(tokenizer, one_thread, monkeypatch):
    import mrprune
    from mrprune.evaluate import blockwise

    model = tiny_model("llama")
    resident = mrprune.evaluate_perplexity(model, tokenizer, text="embedded", seqlen=48, max_windows=4, device="cpu",
                                           progress=False)
    monkeypatch.setattr(blockwise, "CHUNK_BYTES", 3 * 48 * 64 * 4)  # chunks of 3 and 1 windows
    runs = []
    original = blockwise.run_blocks
    monkeypatch.setattr(blockwise, "run_blocks", lambda *a, **k: runs.append(len(a[1])) or original(*a, **k))
    offloaded = mrprune.evaluate_perplexity(model, tokenizer, text="embedded", seqlen=48, max_windows=4, device="cpu",
                                            offload=True, progress=False)
    assert runs == [3, 1] and offloaded.perplexity == resident.perplexity
    assert offloaded.windows == resident.windows == 4
