"""Recording the blocks' call context when the blocks return tuples, as models written for transformers 4
(remote code among them) do: their parent takes ``[0]`` of every block's output."""

import copy

import torch
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaModel

from mrprune import CalibrationConfig, PruneConfig, prune
from mrprune.calibrate import blocks_return_tuples, record_block_calls
from mrprune.data import embedded_text
from mrprune.evaluate.perplexity import block_major_nlls, eval_windows, window_nll
from mrprune.models.adapter import get_adapter
from tests.conftest import VOCAB, tiny_model


class TupleDecoderLayer(LlamaDecoderLayer):
    def forward(self, *args, **kwargs):
        return (super().forward(*args, **kwargs),)


class IndexingLlamaModel(LlamaModel):
    """A parent in the style of transformers 4: its own causal mask, ``layer(...)[0]`` for every block."""

    def forward(self, input_ids=None, **kwargs):
        hidden = self.embed_tokens(input_ids)
        length = hidden.shape[1]
        positions = torch.arange(length, device=hidden.device)[None]
        rotary = self.rotary_emb(hidden, positions)
        mask = torch.full((length, length), float("-inf"), dtype=hidden.dtype, device=hidden.device).triu(1)
        for layer in self.layers:
            hidden = layer(hidden, attention_mask=mask[None, None], position_ids=positions,
                           position_embeddings=rotary)[0]
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden))


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
    """BLOOM folds the batch into its ALiBi tensor (batch x heads, 1, seqlen); a Llama's context broadcasts."""
    ids = torch.randint(3, VOCAB, (1, 16), generator=torch.Generator().manual_seed(0))
    bloom = get_adapter(tiny_model("bloom"))
    calls = record_block_calls(bloom, ids, rows=(3, 2, 1))
    assert calls[0].kwargs["alibi"].shape == (4, 1, 16)
    assert sorted(calls[0].by_rows) == [2, 3] and calls[0].for_rows(3).kwargs["alibi"].shape == (12, 1, 16)
    assert calls[0].for_rows(1) is calls[0]
    llama = get_adapter(tiny_model("llama"))
    assert all(not call.by_rows for call in record_block_calls(llama, ids, rows=(3, 2)))
