import json

import pytest

from mrprune.analyze import allocation_analysis
from tests.analyze.helpers import EVAL_ARGS, FAST_ARGS, PNG_MAGIC, fast_config, same_state, state
from tests.conftest import tiny_model
from tests.test_cli import assert_one_line_error, run_cli


def test_every_allocator_hits_the_target_from_the_same_dense_weights(tokenizer):
    model = tiny_model("llama")
    original = state(model)
    config = fast_config(sparsity=0.6, **{"allocation.mrp.step": 0.05})
    result = allocation_analysis(model, config, tokenizer=tokenizer, progress=False,
                                 allocations=["uniform", "owl", "alphapruning", "mrp"])
    assert same_state(model, original)  # left dense
    outcomes = {o.name: o for o in result.outcomes}
    assert list(outcomes) == ["uniform", "owl", "alphapruning", "mrp"]
    assert outcomes["uniform"].block_sparsity == pytest.approx([0.6] * 3, abs=1e-4)
    for name, o in outcomes.items():
        assert o.sparsity["target_met"] and o.sparsity["achieved"] == pytest.approx(0.6, abs=1e-5), name
        assert len(o.non_outlier_ratios) == 3 and o.spread["cv"] >= 0
    for name in ("owl", "alphapruning", "mrp"):
        assert max(outcomes[name].block_sparsity) - min(outcomes[name].block_sparsity) > 1e-3, name
    # the redundancy measured here (dense thresholds, one pass on the pruned model) is MRP's own final measure
    assert outcomes["mrp"].non_outlier_ratios == pytest.approx(
        outcomes["mrp"].details["final_non_outlier_ratios"], abs=2e-6)
    assert "trace" not in outcomes["mrp"].details
    assert result.thresholds == pytest.approx(outcomes["mrp"].details["thresholds"], rel=1e-9)


def test_allocation_through_the_cli(tiny_dir, tmp_path, capsys):
    out = tmp_path / "alloc"
    code, stdout, _ = run_cli(capsys, "analyze", "allocation", "--model", tiny_dir("qwen2"), *FAST_ARGS, *EVAL_ARGS,
                              "--allocations", "uniform,owl", "--metric", "magnitude", "--sparsity", 0.5,
                              "--owl-lambda", 0.1, "--eval", "--output", out)
    assert code == 0 and "| block | uniform | owl |" in stdout
    data = json.loads((out / "allocation.json").read_text())
    assert data["metric"] == "magnitude" and data["target"] == 0.5 and list(data["allocators"]) == ["uniform", "owl"]
    assert data["settings"]["allocation"]["owl"]["lam"] == 0.1
    owl = data["allocators"]["owl"]
    assert len(owl["block_sparsity"]) == 3 and owl["perplexity"]["windows"] == 2
    assert data["dense_perplexity"]["perplexity"] > 0
    assert (out / "allocation.png").read_bytes().startswith(PNG_MAGIC)
    assert "redundancy cv" in (out / "allocation.md").read_text()


@pytest.mark.parametrize("args,fragment", [
    (("--allocations", "uniform,best"), "unknown allocation 'best'"),
    (("--sparsity", -0.1), "sparsity must be in [0, 1)"),
    (("--allocations", "file"), "needs --ratios"),
])
def test_bad_allocation_inputs(tiny_dir, tmp_path, capsys, args, fragment):
    code, _, err = run_cli(capsys, "analyze", "allocation", "--model", tiny_dir("llama"), *FAST_ARGS, *args,
                           "--output", tmp_path / "out")
    assert_one_line_error(code, err, fragment)


def test_the_default_comparison_runs_fast_mrp_not_the_hours_long_loop(tokenizer):
    result = allocation_analysis(tiny_model("llama"), fast_config(sparsity=0.6), tokenizer=tokenizer, progress=False)
    assert [o.name for o in result.outcomes] == ["uniform", "owl", "alphapruning", "mrp-fast"]
