import json
import math
import shutil

import pytest
import torch

from mrprune.analyze import common, layerwise_sensitivity
from mrprune.analyze.lps import parse_blocks, ranks, spearman, sweep
from mrprune.errors import ConfigError
from mrprune.metrics import LayerStats, SparsityPattern, build_metric
from tests.analyze.helpers import EVAL_ARGS, FAST_ARGS, PNG_MAGIC, fast_config, same_state, state
from tests.conftest import tiny_model
from tests.test_cli import assert_one_line_error, run_cli


def test_ranks_average_ties():
    assert ranks([10, 20, 20, 30]) == [1, 2.5, 2.5, 4]
    assert ranks([3, 1, 2]) == [3, 1, 2]
    assert ranks([5, 5, 5]) == [2, 2, 2]


def test_spearman_against_hand_computed_values():
    # ranks of y: [1, 2, 3.5, 5, 3.5]; deviations from 3: x [-2,-1,0,1,2], y [-2,-1,.5,2,.5]
    # sum xy = 4+1+0+2+1 = 8, sum xx = 10, sum yy = 9.5  ->  8 / sqrt(95)
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / math.sqrt(95))
    assert spearman([1, 2, 3], [10, 100, 1000]) == pytest.approx(1.0)  # monotone, not linear
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # d = rank differences [0, 2, -1, -1]: 1 - 6 * 6 / (4 * 15) = 0.4
    assert spearman([1, 2, 3, 4], [1, 4, 2, 3]) == pytest.approx(0.4)
    assert spearman([1, 2, 3], [7, 7, 7]) is None
    with pytest.raises(ValueError):
        spearman([1, 2], [1, 2, 3])


def test_parse_blocks():
    assert parse_blocks(None, 3) == [0, 1, 2]
    assert parse_blocks("2,0", 3) == [0, 2]
    with pytest.raises(ConfigError, match="out of range"):
        parse_blocks("0,3", 3)
    with pytest.raises(ConfigError, match="comma-separated numbers"):
        parse_blocks("0,x", 3)


def block_weight_names(job, index):
    return {f"{ref.name}.weight" for ref in job.adapter.linear_layers(index)}


def test_only_the_measured_block_is_pruned_and_weights_come_back_bit_identical(tokenizer):
    model = tiny_model("llama")
    original = state(model)
    job = common.load_job(model, tokenizer, common.analysis_config(fast_config()))
    ids = common.calibration_ids(job.config, tokenizer)
    metrics = ["wanda", "sparsegpt", "magnitude"]
    seen = []

    def measure(index):
        now = model.state_dict()
        changed = {name for name, t in now.items() if not torch.equal(t.cpu(), original[name])}
        zeros = {name: float((now[name] == 0).float().mean()) for name in changed}
        seen.append((changed, zeros))
        return len(seen)

    values, achieved = sweep(job, metrics, 0.5, SparsityPattern(), [0, 1, 2], ids, measure, progress=False)
    assert len(seen) == 9 and values == {m: [i + 1 + k * 3 for k in range(3)] for i, m in enumerate(metrics)}
    for run, (changed, zeros) in enumerate(seen):
        block = run // len(metrics)
        assert changed == block_weight_names(job, block), f"run {run}"
        assert all(z == pytest.approx(0.5, abs=1e-3) for z in zeros.values())
    assert achieved == {m: [0.5, 0.5, 0.5] for m in metrics}
    assert same_state(model, original)


def test_block_statistics_come_from_dense_upstream_activations(tokenizer):
    """Pruning block l in the sweep gives exactly the mask Wanda gets from a full dense observe pass."""
    model = tiny_model("qwen2")
    job = common.load_job(model, tokenizer, common.analysis_config(fast_config()))
    ids = common.calibration_ids(job.config, tokenizer)
    dense_norms = job.observe(ids)
    captured = []

    def measure(index):
        captured.append({ref.name: ref.weight.clone() for ref in job.adapter.all_linear_layers()})
        return 0.0

    sweep(job, ["wanda"], 0.6, SparsityPattern(), [1, 2], ids, measure, progress=False)
    wanda = build_metric("wanda")
    for snapshot, block in zip(captured, [1, 2]):
        for ref in job.adapter.linear_layers(block):
            stats = LayerStats(sq_norm=dense_norms[ref.name])
            expected = wanda.prune(ref.weight.float(), stats, 0.6, SparsityPattern())
            assert torch.equal(snapshot[ref.name] == 0, expected.mask), ref.name


@pytest.mark.parametrize("family", ["gemma3", "gpt2"])
def test_measuring_from_the_pruned_block_on_gives_the_full_forwards_numbers(tokenizer, monkeypatch, family,
                                                                            one_thread):
    """LPS keeps the dense hidden states entering block l and runs only blocks l.. and the head: every
    perplexity must be the one a whole forward of the model gives, bit for bit on the CPU."""
    from mrprune.analyze import lps
    from mrprune.evaluate import blockwise

    config = fast_config(sparsity=0.6)
    runs = {}
    original = lps.TailPerplexity.create
    for mode in ("tail", "whole"):
        if mode == "whole":
            monkeypatch.setattr(blockwise, "CHUNK_BYTES", 0)  # no room for the kept states: whole forwards
        created: list = []
        monkeypatch.setattr(lps.TailPerplexity, "create",
                            classmethod(lambda cls, *a, made=created: made.append(original(*a)) or made[-1]))
        runs[mode] = layerwise_sensitivity(tiny_model(family), config, metrics="wanda,magnitude", blocks="0,2",
                                           tokenizer=tokenizer, progress=False)
        assert (created[0] is not None) == (mode == "tail")
    assert runs["tail"].perplexity == runs["whole"].perplexity
    assert runs["tail"].dense == runs["whole"].dense


def test_lps_through_the_cli_writes_json_png_markdown(tiny_dir, tmp_path, capsys):
    out = tmp_path / "lps"
    code, stdout, _ = run_cli(capsys, "analyze", "lps", "--model", tiny_dir("llama"), *FAST_ARGS, *EVAL_ARGS,
                              "--metrics", "wanda,magnitude", "--blocks", "0,2", "--sparsity", 0.6, "--output", out)
    assert code == 0 and "Spearman rank correlation" in stdout
    data = json.loads((out / "lps.json").read_text())
    assert data["blocks"] == [0, 2] and set(data["metrics"]) == {"wanda", "magnitude"} and data["sparsity"] == 0.6
    dense = data["dense"]["perplexity"]
    for row in data["metrics"].values():
        assert len(row["perplexity"]) == 2
        assert row["increase"] == pytest.approx([p - dense for p in row["perplexity"]])
    assert data["spearman"][0]["a"] == "wanda" and "2 non-overlapping windows of 64 tokens" in data["protocol"]
    assert (out / "lps.png").read_bytes().startswith(PNG_MAGIC)
    md = (out / "lps.md").read_text()
    assert "| block | wanda ppl | wanda increase | magnitude ppl | magnitude increase |" in md
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lps", "tiny-llama"]  # no temporary directory left


def test_lps_api_leaves_the_model_intact(tokenizer):
    model = tiny_model("gpt2")  # Conv1D layers: transposed weights
    original = state(model)
    result = layerwise_sensitivity(model, fast_config(sparsity=0.5), metrics="sparsegpt,wanda", tokenizer=tokenizer,
                                   progress=False)
    assert same_state(model, original)
    assert result.blocks == [0, 1, 2] and result.metrics == ["sparsegpt", "wanda"]
    assert result.dense_ppl == pytest.approx(result.perplexity["wanda"][0] - result.increase("wanda")[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="offloads blocks to a CUDA device")
def test_offloaded_lps_measures_what_a_resident_one_does_and_leaves_the_model_on_the_host(tokenizer):
    results = []
    for offload in (False, True):
        model = tiny_model("llama")
        original = state(model)
        config = fast_config(sparsity=0.5, **{"runtime.device": "cuda", "runtime.offload": offload})
        results.append(layerwise_sensitivity(model, config, metrics="sparsegpt,wanda", tokenizer=tokenizer,
                                             progress=False))
        assert same_state(model, original)
        assert all(p.device.type == "cpu" for p in model.parameters())  # where the caller had it
    for metric in ("sparsegpt", "wanda"):
        assert results[1].perplexity[metric] == pytest.approx(results[0].perplexity[metric], rel=1e-4)


@pytest.mark.parametrize("args,fragment", [
    (("--metrics", "wanda,random"), "unknown metric 'random'"),
    (("--sparsity", 1.5), "sparsity must be in [0, 1)"),
    (("--blocks", "0,9"), "blocks [9] out of range"),
])
def test_bad_lps_inputs_are_one_line_errors(tiny_dir, tmp_path, capsys, args, fragment):
    code, _, err = run_cli(capsys, "analyze", "lps", "--model", tiny_dir("llama"), *FAST_ARGS, *EVAL_ARGS, *args,
                           "--output", tmp_path / "out")
    assert_one_line_error(code, err, fragment)


def test_existing_output_needs_overwrite(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    args = ("analyze", "lps", "--model", tiny_dir("llama"), *FAST_ARGS, *EVAL_ARGS, "--metrics", "magnitude",
            "--blocks", "1", "--output", out)
    code, _, err = run_cli(capsys, *args)
    assert_one_line_error(code, err, "pass --overwrite")
    code, _, err = run_cli(capsys, *args, "--overwrite")  # not an earlier analysis: never deleted
    assert_one_line_error(code, err, "did not write")
    assert (out / "keep.txt").exists()
    (out / "lps.json").write_text("{}")  # now it is one
    code, _, _ = run_cli(capsys, *args, "--overwrite", "--no-plot")
    assert code == 0 and sorted(p.name for p in out.iterdir()) == ["lps.json", "lps.md"]


@pytest.mark.parametrize("command", [("analyze", "lps", "--blocks", "1", "--metrics", "magnitude"),
                                     ("analyze", "allocation", "--allocations", "uniform"),
                                     ("compare", "--allocations", "uniform")])
def test_analyses_never_write_in_or_over_the_input_model(tiny_dir, tmp_path, capsys, command):
    model = tmp_path / "work" / "model"
    shutil.copytree(tiny_dir("llama"), model)
    before = sorted(p.name for p in model.iterdir())
    if command[0] == "compare":  # writes files, never replaces a directory
        places = ((model / "t.md", ()), (model / "sub" / "t.md", ("--overwrite",)))
    else:
        places = ((model / "out", ()), (model.parent, ("--overwrite",)), (model, ("--overwrite",)))
    for out, flags in places:
        code, _, err = run_cli(capsys, *command, "--model", model, *FAST_ARGS, *EVAL_ARGS, "--output", out, *flags)
        assert_one_line_error(code, err, "input model")
    assert sorted(p.name for p in model.iterdir()) == before
