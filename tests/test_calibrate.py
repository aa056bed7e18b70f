"""Recording the blocks' call context when the blocks return tuples, as models written for transformers 4
(remote code among them) do: their parent takes ``[0]`` of every block's output."""

import copy

import pytest
import torch
import transformers
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaModel

from mrprune import CalibrationConfig, PruneConfig, prune
from mrprune.calibrate import blocks_return_tuples, record_block_calls
from mrprune.data import embedded_text
from mrprune.errors import UnsupportedModelError
from mrprune.evaluate.perplexity import block_major_nlls, eval_windows, window_nll
from mrprune.models.adapter import get_adapter
from tests.conftest import VOCAB, tiny_model


class TupleDecoderLayer(LlamaDecoderLayer):
    def forward(self, *args, **kwargs):
        return (super().forward(*args, **kwargs),)


class OwnParentLlamaModel(LlamaModel):
    """A parent written by hand: its own causal mask, its order of blocks (``repeats``) and what it does with each
    block's output (``link``). The subclasses below vary only those."""

    repeats = 1

    def link(self, output):
        return output

    def forward(self, input_ids=None, **kwargs):
        hidden = self.embed_tokens(input_ids)
        length = hidden.shape[1]
        positions = torch.arange(length, device=hidden.device)[None]
        rotary = self.rotary_emb(hidden, positions)
        mask = torch.full((length, length), float("-inf"), dtype=hidden.dtype, device=hidden.device).triu(1)
        for layer in [*self.layers] * self.repeats:
            hidden = self.link(layer(hidden, attention_mask=mask[None, None], position_ids=positions,
                                     position_embeddings=rotary))
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden))


class IndexingLlamaModel(OwnParentLlamaModel):
    """In the style of transformers 4: ``layer(...)[0]`` for every block."""

    def link(self, output):
        return output[0]


def tuple_twin(model):
    twin = copy.deepcopy(model)
    twin.model.__class__ = IndexingLlamaModel
    for layer in twin.model.layers:
        layer.__class__ = TupleDecoderLayer
    return twin


def test_blocks_returning_tuples_are_recorded_evaluated_and_pruned_as_their_tensor_twin(tokenizer, one_thread):
    model = tiny_model("llama")
    twin = tuple_twin(model)
    ids = torch.randint(3, VOCAB, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(twin(ids).logits, model(ids).logits)  # the twin computes the same model

    calls = record_block_calls(get_adapter(twin), ids)
    assert blocks_return_tuples(get_adapter(twin)) and not blocks_return_tuples(get_adapter(model))
    assert len(calls) == 3 and all(call.kwargs["attention_mask"].shape == (1, 1, 24, 24) for call in calls)

    windows, _ = eval_windows(tokenizer, embedded_text("evaluation"), 32, 3, "always")
    device = torch.device("cpu")
    assert block_major_nlls(twin, windows, device, progress=False) == [window_nll(twin, w, device) for w in windows]

    config = PruneConfig(model=None, metric="wanda", sparsity=0.5,
                         calibration=CalibrationConfig(source="embedded", nsamples=4, seqlen=32))
    prune(model, config, tokenizer=tokenizer, progress=False)
    prune(twin, config, tokenizer=tokenizer, progress=False)
    for name, weight in model.named_parameters():
        assert torch.equal(weight, twin.get_parameter(name)), name
    assert all("forward" not in vars(block) for block in get_adapter(twin).blocks)


def test_a_context_that_depends_on_the_micro_batch_is_recorded_for_each_size():
    """BLOOM folds the batch into its ALiBi tensor (batch x heads, 1, seqlen); XGLM checks its mask's batch size."""
    ids = torch.randint(3, VOCAB, (1, 16), generator=torch.Generator().manual_seed(0))
    bloom = get_adapter(tiny_model("bloom"))
    calls = record_block_calls(bloom, ids, rows=(3, 2, 1))
    assert calls[0].kwargs["alibi"].shape == (4, 1, 16)
    assert sorted(calls[0].by_rows) == [2, 3] and calls[0].for_rows(3).kwargs["alibi"].shape == (12, 1, 16)
    assert calls[0].for_rows(1) is calls[0]
    # a Llama's context broadcasts: for 3 windows it is the one window's tensors, expanded (no memory of its own)
    llama = get_adapter(tiny_model("llama"))
    call = record_block_calls(llama, ids, rows=(3,))[0]
    mask, sized = call.kwargs["attention_mask"], call.for_rows(3).kwargs["attention_mask"]
    assert mask.shape == (1, 1, 16, 16) and sized.shape == (3, 1, 16, 16) and sized.data_ptr() == mask.data_ptr()
    one, three = call.kwargs["position_embeddings"], call.for_rows(3).kwargs["position_embeddings"]
    assert [t.data_ptr() for t in one] == [t.data_ptr() for t in three]


class LoopedLlamaModel(OwnParentLlamaModel):
    """Runs its blocks twice, as looped (recurrent-depth) models do."""

    repeats = 2


class RescalingLlamaModel(OwnParentLlamaModel):
    """Changes the hidden states between blocks: running the blocks as a chain would compute another model."""

    def link(self, output):
        return 0.5 * output


@pytest.mark.parametrize(("parent", "message"), [(LoopedLlamaModel, "runs block 0 after block 2"),
                                                  (RescalingLlamaModel, "changes the hidden states between blocks 0 and 1")])
def test_a_forward_that_is_not_a_chain_of_blocks_is_refused(tokenizer, parent, message):
    model = tiny_model("llama")
    model.model.__class__ = parent
    config = PruneConfig(model=None, metric="wanda", sparsity=0.5,
                         calibration=CalibrationConfig(source="embedded", nsamples=2, seqlen=16))
    with pytest.raises(UnsupportedModelError, match=message):
        prune(model, config, tokenizer=tokenizer, progress=False)
    assert all(float((p == 0).float().mean()) < 0.1 for p in model.parameters())  # nothing was pruned


@pytest.mark.parametrize("parent", [LoopedLlamaModel, RescalingLlamaModel, IndexingLlamaModel])
def test_perplexity_of_any_forward_with_the_head_on_slices(tokenizer, parent):
    """The head on slices of positions bypasses the blocks; a forward that is not a chain of blocks still gets its
    own numbers (all logits at once), one whose parent indexes the blocks' outputs the same as all at once."""
    model = tiny_model("llama")
    if parent is IndexingLlamaModel:
        model = tuple_twin(model)
    else:
        model.model.__class__ = parent
    windows, _ = eval_windows(tokenizer, embedded_text("evaluation"), 32, 2, "never")
    device = torch.device("cpu")
    whole = [window_nll(model, w, device) for w in windows]
    sliced = [window_nll(model, w, device, logit_bytes=5 * VOCAB * 4) for w in windows]
    assert sliced == (pytest.approx(whole, rel=1e-5) if parent is IndexingLlamaModel else whole)
    assert all("forward" not in vars(block) for block in model.model.layers)


@pytest.mark.parametrize("family", ["bloom", "xglm"])
def test_models_whose_context_depends_on_the_micro_batch_prune_and_evaluate(family, tokenizer):
    """BLOOM's ALiBi folds the batch into its first dimension; XGLM's attention checks its mask's batch size."""
    torch.manual_seed(0)
    config = {"bloom": lambda: transformers.BloomConfig(hidden_size=64, n_layer=3, n_head=4),
              "xglm": lambda: transformers.XGLMConfig(d_model=64, ffn_dim=128, num_layers=3, attention_heads=4)}[family]()
    config.vocab_size = VOCAB
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    job = PruneConfig(model=None, metric="sparsegpt", sparsity=0.5,
                      calibration=CalibrationConfig(source="embedded", nsamples=3, seqlen=16))
    job.runtime.batch_size = 2  # micro-batches of 2 and 1 windows
    outcome = prune(model, job, tokenizer=tokenizer, progress=False)
    assert outcome.report.sparsity["target_met"]
    windows, _ = eval_windows(tokenizer, embedded_text("evaluation"), 32, 2, "always")
    device = next(model.parameters()).device  # where the pruning left it (the accelerator, where there is one)
    assert block_major_nlls(model, windows, device, progress=False) == [window_nll(model, w, device) for w in windows]
