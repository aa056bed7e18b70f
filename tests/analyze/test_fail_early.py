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
