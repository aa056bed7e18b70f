"""Analyses and evaluation check what they can without the weights before loading them: on a 70B model a
mistyped path or block index must not cost minutes of loading first."""

import pytest

import mrprune
from mrprune.analyze import allocation_analysis, common, compare, layerwise_sensitivity, redundancy_profile
from mrprune.errors import ConfigError, DataError
from tests.analyze.helpers import fast_config


@pytest.fixture
def no_loading(monkeypatch):
    """Any attempt to load a model's weights fails the test."""
    import mrprune.api

    def refuse(*args, **kwargs):
        raise AssertionError("the weights were loaded before the mistake was found")

    monkeypatch.setattr(common, "load_job", refuse)
    monkeypatch.setattr(mrprune.api, "load_model", refuse)
    monkeypatch.setattr(mrprune.api, "load_weights", refuse)


@pytest.mark.parametrize("run", [
    lambda model, missing: layerwise_sensitivity(model, fast_config(**{"evaluation.text": missing})),
    lambda model, missing: layerwise_sensitivity(model, fast_config(**{"calibration.source": missing}),
                                                 metrics="wanda"),
    lambda model, missing: redundancy_profile(model, fast_config(**{"calibration.source": missing})),
    lambda model, missing: compare(model, fast_config(**{"evaluation.text": missing}), allocations="uniform"),
    lambda model, missing: allocation_analysis(model, fast_config(**{"calibration.source": missing}),
                                               allocations="uniform"),
    lambda model, missing: mrprune.evaluate_perplexity(model, text=missing),
], ids=["lps eval text", "lps calibration", "redundancy", "compare", "allocation", "evaluate_perplexity"])
def test_a_missing_text_is_found_before_the_weights_load(tiny_dir, tmp_path, no_loading, run):
    with pytest.raises(DataError, match="does not exist"):
        run(str(tiny_dir("llama")), str(tmp_path / "typo.txt"))


def test_lps_blocks_out_of_range_are_found_before_the_weights_load(tiny_dir, no_loading):
    with pytest.raises(ConfigError, match=r"blocks \[7\] out of range: the model has blocks 0..2"):
        layerwise_sensitivity(str(tiny_dir("llama")), fast_config(), blocks="0,7")


def test_evaluation_windows_past_a_learned_position_table_are_refused_before_the_weights_load(tiny_dir, no_loading):
    with pytest.raises(ConfigError, match="longer than the model's context of 128"):
        mrprune.evaluate_perplexity(str(tiny_dir("opt")), text="embedded", seqlen=256)


def test_eval_with_tasks_and_a_missing_text_fails_before_loading(tiny_dir, shared_data, monkeypatch, capsys):
    pytest.importorskip("lm_eval")
    import mrprune.models.loading
    from tests.test_cli import assert_one_line_error, run_cli

    monkeypatch.setattr(mrprune.models.loading, "load_weights", lambda *a, **k: pytest.fail("weights loaded"))
    code, _, err = run_cli(capsys, "eval", tiny_dir("llama"), "--tasks", "rte", "--task-data", shared_data,
                           "--text", "typo.txt")
    assert_one_line_error(code, err, "text source typo.txt does not exist")


@pytest.mark.parametrize("run", [
    lambda model, options, levels: compare(model, fast_config(**options), allocations="uniform,owl,mrp",
                                           sparsities=levels),
    lambda model, options, levels: allocation_analysis(model, fast_config(sparsity=float(levels.split(",")[-1]),
                                                                          **options), allocations="uniform,owl,mrp"),
], ids=["compare", "allocation"])
def test_an_allocator_option_of_a_later_cell_is_refused_before_the_weights_load(tiny_dir, no_loading, run):
    model = str(tiny_dir("llama"))
    with pytest.raises(ConfigError, match=r"^owl, wanda, sparsity 0.5: allocation.owl.lam must be non-negative"):
        run(model, {"allocation.owl.lam": -1.0}, "0.5")
    with pytest.raises(ConfigError, match=r"^mrp, wanda, sparsity 0.5: MRP needs 0 < min_step"):
        run(model, {"allocation.mrp.gamma": 0.0}, "0.5")
    with pytest.raises(ConfigError, match=r"^mrp, wanda, sparsity 0.97: MRP s_max=0.95 must lie in"):
        run(model, {}, "0.5,0.97")


@pytest.mark.parametrize("run", [
    lambda model, ratios: compare(model, fast_config(**{"allocation.ratios": ratios}), allocations="uniform,file"),
    lambda model, ratios: allocation_analysis(model, fast_config(**{"allocation.ratios": ratios}),
                                              allocations="uniform,file"),
], ids=["compare", "allocation"])
def test_what_a_cell_checks_on_the_model_fails_before_the_first_cell_runs(tiny_dir, tmp_path, monkeypatch, run):
    """A ratios file against the model's blocks needs the model: checked after loading, before the dense
    perplexity and the first cell (hours on a 7B model)."""
    from mrprune.analyze.allocation import DenseReference

    ratios = tmp_path / "ratios.json"
    ratios.write_text("[0.5, 0.5]")
    monkeypatch.setattr(DenseReference, "prune", lambda *a, **k: pytest.fail("a cell ran before the check"))
    monkeypatch.setattr(common.Job, "perplexity", lambda *a, **k: pytest.fail("evaluated before the check"))
    with pytest.raises(ConfigError, match=r"^file, wanda, sparsity 0.5: ratios file .* has 2 block ratios but the "
                                          r"model has 3 blocks"):
        run(str(tiny_dir("llama")), str(ratios))
