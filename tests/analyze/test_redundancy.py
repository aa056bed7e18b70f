import json

import pytest
import torch
import transformers

from mrprune import prune
from mrprune.analyze import common, redundancy_profile
from mrprune.analyze.profile import SELF_RULE, surviving_thresholds
from mrprune.config import MrpConfig
from mrprune.errors import ConfigError
from mrprune.metrics import SparsityPattern, build_metric
from mrprune.models import get_adapter
from mrprune.redundancy import UnitCounts, layer_counts, thresholds
from mrprune.runner import SequentialPruner
from tests.analyze.helpers import FAST_ARGS, PNG_MAGIC, fast_config
from tests.test_cli import assert_one_line_error, run_cli


def mrp_ratios_by_hand(model, tokenizer, m=MrpConfig.m, dense_model=None):
    """MRP's definition, written out with mrprune.redundancy: thresholds from the dense model's scores over all
    weights of a block, outliers of the analysed model over its surviving weights; with a dense model, the
    activations inside each block come from its dense weights (MRP's default dense-block convention)."""
    ids = common.calibration_ids(fast_config(), tokenizer)

    def norms(mdl, dense_weights=None):
        runner = SequentialPruner(get_adapter(mdl), build_metric("wanda"), SparsityPattern(), torch.device("cpu"),
                                  progress=False)
        return {name: s.sq_norm for name, s in runner.observe(ids, dense_weights).items()}, get_adapter(mdl)

    dense_norms, dense_adapter = norms(dense_model or model)
    block_counts = []
    for b in range(dense_adapter.num_blocks):
        total = UnitCounts()
        for ref in dense_adapter.linear_layers(b):
            total = total.add(layer_counts(ref.weight, dense_norms[ref.name]))
        block_counts.append(total)
    taus = thresholds(block_counts, m)
    dense_weights = None
    if dense_model is not None:
        dense_weights = {ref.name: ref.weight.clone() for ref in dense_adapter.all_linear_layers()}
    current, adapter = norms(model, dense_weights)
    ratios = []
    for b in range(adapter.num_blocks):
        layers = adapter.linear_layers(b)
        outliers = sum(int((r.weight.abs() * current[r.name].sqrt()[None, :] > taus[b]).sum()) for r in layers)
        surviving = sum(int((r.weight != 0).sum()) for r in layers)
        ratios.append(1 - outliers / surviving)
    return taus, ratios


def test_dense_model_with_itself_as_dense_is_mrps_definition(tiny_dir, tokenizer, tmp_path, capsys):
    model_dir = tiny_dir("llama")
    out = tmp_path / "red"
    code, stdout, _ = run_cli(capsys, "analyze", "redundancy", model_dir, "--dense", model_dir, *FAST_ARGS,
                              "--device", "cpu", "--output", out)  # compared with a CPU computation to 1e-12
    assert code == 0 and "coefficient of variation" in stdout
    data = json.loads((out / "redundancy.json").read_text())
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    taus, ratios = mrp_ratios_by_hand(model, tokenizer)
    assert data["thresholds"]["source"] == "dense" and data["thresholds"]["values"] == pytest.approx(taus, rel=1e-6)
    assert [b["non_outlier_ratio"] for b in data["blocks"]] == pytest.approx(ratios, abs=1e-12)
    assert data["spread"]["cv"] >= 0 and data["spread"]["range"] == pytest.approx(max(ratios) - min(ratios))
    assert (out / "redundancy.png").read_bytes().startswith(PNG_MAGIC)
    assert "| block | non-outlier ratio |" in (out / "redundancy.md").read_text()


def test_pruned_model_against_its_dense_model_and_against_itself(tiny_dir, tokenizer, tmp_path):
    dense_dir = tiny_dir("qwen2")
    pruned = prune(config=fast_config(model=str(dense_dir), sparsity=0.6, output=str(tmp_path / "pruned")),
                   progress=False).output
    dense_model = transformers.AutoModelForCausalLM.from_pretrained(dense_dir)
    pruned_model = transformers.AutoModelForCausalLM.from_pretrained(pruned)
    # in memory with the fixture's tokenizer (AutoTokenizer may load a qwen2 directory's tokenizer differently)
    with_dense = redundancy_profile(pruned_model, fast_config(), dense=dense_model, tokenizer=tokenizer,
                                    dense_tokenizer=tokenizer, progress=False)
    taus, ratios = mrp_ratios_by_hand(pruned_model, tokenizer, dense_model=dense_model)
    assert with_dense.thresholds == pytest.approx(taus, rel=1e-6)
    assert with_dense.ratios == pytest.approx(ratios, abs=1e-12)
    assert with_dense.sparsity == pytest.approx(0.6, abs=1e-4)

    alone = redundancy_profile(pruned_model, fast_config(), tokenizer=tokenizer, progress=False)
    assert alone.to_dict()["thresholds"]["rule"] == SELF_RULE and alone.dense_model is None
    # survivors' mean is higher than the dense mean over all weights, so the self thresholds are higher
    assert all(a > d for a, d in zip(alone.thresholds, with_dense.thresholds))
    # the JSON says whose activations the scores used: inside each block the dense weights' only with a dense model
    assert "dense model's weights" in with_dense.to_dict()["definition"]
    assert "own activations" in alone.to_dict()["definition"]


def test_surviving_thresholds_by_hand():
    counts = [UnitCounts(score_sum=10.0, weights=10, surviving=4), UnitCounts(score_sum=6.0, weights=6, surviving=6),
              UnitCounts(weights=3)]
    assert surviving_thresholds(counts, 5.0) == [12.5, 5.0, 0.0]
    assert thresholds(counts[1:2], 5.0) == surviving_thresholds(counts[1:2], 5.0)  # dense: the two rules agree


def test_self_thresholds_of_a_dense_model_are_mrps(tiny_dir, tokenizer):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir("llama"))
    result = redundancy_profile(model, fast_config(), tokenizer=tokenizer, progress=False)
    taus, ratios = mrp_ratios_by_hand(model, tokenizer)
    assert result.thresholds == pytest.approx(taus, rel=1e-6) and result.ratios == pytest.approx(ratios, abs=1e-12)


def test_dense_of_another_architecture_is_refused(tiny_dir, tmp_path, capsys):
    code, _, err = run_cli(capsys, "analyze", "redundancy", tiny_dir("llama"), "--dense", tiny_dir("gpt2"),
                           *FAST_ARGS, "--output", tmp_path / "out")
    assert_one_line_error(code, err, "same architecture")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="M must be positive"):
        redundancy_profile(None, fast_config(**{"allocation.mrp.m": 0.0}))
