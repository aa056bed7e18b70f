import pytest
import torch
import transformers

from mrprune.errors import UnsupportedModelError
from mrprune.models import get_adapter
from mrprune.models.adapter import ExpertRef
from tests.conftest import FAMILIES, tiny_model

EXPECTED_LINEARS = {
    "llama": 7, "mistral": 7, "qwen2": 7, "qwen3": 7, "gemma3": 7, "opt": 6, "gpt2": 4, "phi3": 4, "gpt_neox": 4, "bloom": 4,
    # attention + gate_up and down of 4 experts (+ Qwen2-MoE's shared expert); routers are not layers
    "mixtral": 12, "phimoe": 12, "gpt_oss": 12, "qwen2_moe": 15, "llama4": 15,
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_adapter_finds_blocks_and_linear_layers(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    assert adapter.num_blocks == model.config.num_hidden_layers == 3
    layers = adapter.linear_layers(1)
    assert len(layers) == EXPECTED_LINEARS[family]
    assert all(ref.block == 1 and ".1." in ref.name for ref in layers)
    modules = dict(model.named_modules())
    for ref in layers:
        owner = ref.name.rsplit(".", 2)[0] if isinstance(ref, ExpertRef) else ref.name
        assert modules[owner] is ref.module
        assert ref.weight.shape == (ref.out_features, ref.in_features)
    assert sum(adapter.block_sizes()) == sum(ref.numel for ref in adapter.all_linear_layers())
    # the LM head and embeddings are never decoder linear layers
    assert not any("lm_head" in ref.name or "embed" in ref.name for ref in adapter.all_linear_layers())
    # the base model runs the blocks without the head (Llama-4's transformers prefix names no attribute)
    base_modules = list(adapter.base_model.modules())
    assert any(module is adapter.blocks for module in base_modules)
    assert not any(module is model.get_output_embeddings() for module in base_modules)


def test_gpt2_conv1d_is_seen_transposed_and_writes_through():
    model = tiny_model("gpt2")
    ref = get_adapter(model).linear_layers(0)[0]  # attn.c_attn, stored (in, out)
    assert ref.transposed
    assert ref.module.weight.shape == (64, 192) and ref.weight.shape == (192, 64)
    new = torch.zeros(192, 64)
    new[5, 7] = 3.0
    ref.set_weight(new)
    assert ref.module.weight[7, 5] == 3.0 and int((ref.module.weight != 0).sum()) == 1


def test_encoder_model_is_rejected():
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                     vocab_size=100)
    with pytest.raises(UnsupportedModelError, match="not a decoder-only"):
        get_adapter(transformers.BertForMaskedLM(config))


def test_model_without_block_list_is_rejected():
    class NotAnLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = transformers.LlamaConfig(num_hidden_layers=2)
            self.proj = torch.nn.Linear(4, 4)

    with pytest.raises(UnsupportedModelError, match="cannot find the decoder blocks"):
        get_adapter(NotAnLM())


def test_a_hybrid_of_block_classes_is_refused_naming_them():
    """Jamba interleaves attention and Mamba blocks: the blocks exist, but of two classes, and the error says so
    (it used to say there was no list of 2 blocks with linear layers)."""
    config = transformers.JambaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_experts=4, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
        mamba_d_state=8, mamba_dt_rank=8, vocab_size=384)
    with pytest.raises(UnsupportedModelError, match=r"its 2 decoder blocks \(model.layers\) are of different "
                                                    r"classes \(JambaAttentionDecoderLayer, JambaMambaDecoderLayer\)"):
        get_adapter(transformers.AutoModelForCausalLM.from_config(config))
