import pytest
import torch

from mrprune.metrics import SparsityPattern, build_metric
from mrprune.metrics.sparsegpt import SparseGPT
from mrprune.models import get_adapter
from mrprune.runner import SequentialPruner
from tests.conftest import FAMILIES, VOCAB, tiny_model


def calibration_ids(n=3, seqlen=24, seed=0):
    return torch.randint(3, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_runner_at_sparsity_zero_reproduces_dense_logits(family, device):
    model = tiny_model(family).to(device)
    adapter = get_adapter(model)
    ids = calibration_ids().to(device)
    with torch.inference_mode():
        dense_logits = model(input_ids=ids, use_cache=False).logits

    runner = SequentialPruner(adapter, build_metric("wanda"), SparsityPattern(), device, batch_size=2,
                              progress=False)
    acts = runner.capture(ids)
    targets = {ref.name: 0.0 for ref in adapter.all_linear_layers()}
    for _ in range(adapter.num_blocks):
        records = runner.prune_block(acts, targets)
        assert all(r.zeros == 0 for r in records)

    # feed the runner's last-block outputs through the rest of the model: logits must be the dense ones
    last = adapter.blocks[-1]
    handle = last.register_forward_hook(lambda m, a, out: acts.hidden if not isinstance(out, tuple)
                                        else (acts.hidden,) + tuple(out[1:]))
    try:
        with torch.inference_mode():
            runner_logits = model(input_ids=ids, use_cache=False).logits
    finally:
        handle.remove()
    torch.testing.assert_close(runner_logits, dense_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("metric", ["wanda", "sparsegpt"])
def test_runner_prunes_every_layer_to_its_target_with_upstream_pruned_inputs(device, metric, offload):
    model = tiny_model("llama")
    adapter = get_adapter(model)
    targets = {ref.name: 0.25 + 0.25 * ref.block for ref in adapter.all_linear_layers()}
    runner = SequentialPruner(adapter, build_metric(metric), SparsityPattern(), device, offload=offload,
                              offload_activations=offload, progress=False)
    records = runner.run(calibration_ids(), targets)
    if offload:  # blocks wait on the CPU, everything else on the device
        assert all(p.device.type == "cpu" for p in adapter.blocks.parameters())
        assert model.get_input_embeddings().weight.device.type == device.type
    for record, ref in zip(records, adapter.all_linear_layers()):
        assert record.name == ref.name
        assert record.zeros == int((ref.weight == 0).sum()) == round(ref.numel * targets[ref.name])


def test_statistics_are_shared_between_layers_fed_the_same_input():
    model = tiny_model("llama")
    adapter = get_adapter(model)
    runner = SequentialPruner(adapter, build_metric("sparsegpt"), SparsityPattern(), torch.device("cpu"),
                              progress=False)
    acts = runner.capture(calibration_ids())
    stats = runner.collect_stats(acts, adapter.linear_layers(0))
    names = {ref.short_name: ref.name for ref in adapter.linear_layers(0)}
    q, k, v = (stats[names[f"self_attn.{p}_proj"]] for p in "qkv")
    assert q is k is v
    assert stats[names["mlp.gate_proj"]] is stats[names["mlp.up_proj"]]
    assert stats[names["self_attn.o_proj"]] is not q
    assert q.tokens == 3 * 24 and q.hessian.shape == (64, 64)


def test_shared_inverse_hessians_are_freed_after_their_last_layer():
    adapter = get_adapter(tiny_model("llama"))
    runner = SequentialPruner(adapter, build_metric("sparsegpt"), SparsityPattern(), torch.device("cpu"),
                              progress=False)
    layers = adapter.linear_layers(0)
    stats = runner.collect_stats(runner.capture(calibration_ids()), layers)
    seen = []
    original = SparseGPT.prune

    def spy(self, weight, layer_stats, *args, **kwargs):
        result = original(self, weight, layer_stats, *args, **kwargs)
        seen.append(len(layer_stats.derived))
        return result

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SparseGPT, "prune", spy)
        runner.prune_layers(layers, {ref.name: 0.5 for ref in layers}, stats)
    assert seen == [1] * len(layers)  # each shared inverse existed while its layers were pruned
    assert all(not s.derived for s in stats.values())  # and none outlives the block


def test_nested_phases_are_charged_to_the_innermost_only():
    import time

    from mrprune.runtime import PhaseTimer

    timer = PhaseTimer()
    start = time.perf_counter()
    with timer.phase("outer"):
        time.sleep(0.05)
        with timer.phase("inner"):
            time.sleep(0.1)
        time.sleep(0.05)
    wall = time.perf_counter() - start
    inner, outer = timer.seconds["inner"], timer.seconds["outer"]
    assert inner >= 0.1 and outer >= 0.1
    assert outer < wall - 0.09  # the inner 0.1 s is not charged to the outer phase as well
    assert inner + outer == pytest.approx(wall, abs=0.02)


def test_tiled_hessians_from_the_runner_equal_the_plain_ones(device, monkeypatch):
    """Wide inputs accumulate upper tiles only (in inference mode) and are mirrored when read."""
    from mrprune import calibrate

    def hessians(tiled_from):
        monkeypatch.setattr(calibrate, "GRAM_TILED_FROM", tiled_from)
        adapter = get_adapter(tiny_model("llama"))
        runner = SequentialPruner(adapter, build_metric("sparsegpt"), SparsityPattern(), device, progress=False)
        stats = runner.collect_stats(runner.capture(calibration_ids()), adapter.linear_layers(0))
        return {name: s.hessian for name, s in stats.items()}

    plain, tiled = hessians(10**9), hessians(16)
    for name in plain:
        torch.testing.assert_close(tiled[name], plain[name], rtol=1e-5, atol=1e-5)


def test_statistics_come_from_pruned_upstream_blocks():
    """Block 1's input statistics differ depending on whether block 0 was pruned first."""
    ids = calibration_ids()

    def block1_norms(sparsity):
        model = tiny_model("llama")
        adapter = get_adapter(model)
        runner = SequentialPruner(adapter, build_metric("wanda"), SparsityPattern(), torch.device("cpu"),
                                  progress=False)
        acts = runner.capture(ids)
        runner.prune_block(acts, {ref.name: sparsity for ref in adapter.all_linear_layers()})
        return runner.collect_stats(acts, adapter.linear_layers(1))[adapter.linear_layers(1)[0].name].sq_norm

    assert not torch.allclose(block1_norms(0.0), block1_norms(0.6))


def test_magnitude_needs_no_calibration_pass():
    model = tiny_model("opt")
    adapter = get_adapter(model)
    targets = {ref.name: 0.5 for ref in adapter.all_linear_layers()}
    runner = SequentialPruner(adapter, build_metric("magnitude"), SparsityPattern(), torch.device("cpu"),
                              progress=False)
    records = runner.run(None, targets)
    assert all(abs(r.sparsity - 0.5) < 1e-9 for r in records)
    assert "capture" not in runner.timer.seconds


def test_a_layer_the_model_never_calls_is_named_as_such_not_as_an_expert(caplog):
    """Mamba's dt_proj is a Linear whose weight the mixer multiplies by directly: no hook sees an input, whatever
    the calibration. It is pruned by magnitude within each row and the warning says why, once, not that more
    samples would reach it as they would an expert."""
    import transformers

    from mrprune.metrics.base import UNSEEN_NOTE

    config = transformers.MambaConfig(hidden_size=64, num_hidden_layers=3, state_size=8, vocab_size=VOCAB)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    adapter = get_adapter(model)
    pruner = SequentialPruner(adapter, build_metric("wanda"), SparsityPattern(), torch.device("cpu"), progress=False)
    ids = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with caplog.at_level("WARNING", logger="mrprune.runner"):
        records = pruner.run(ids, {ref.name: 0.5 for ref in adapter.all_linear_layers()})
    unseen = {r.name for r in records if UNSEEN_NOTE in r.notes}
    assert unseen == {f"backbone.layers.{b}.mixer.dt_proj" for b in range(3)}
    warned = [r.getMessage() for r in caplog.records if r.name == "mrprune.runner"]
    assert warned == [("mixer.dt_proj (block 0 on): never called as a module (the model's code reads the weight "
                       "directly), so no calibration statistics reach it: pruned by magnitude within each row")]
    for ref in adapter.all_linear_layers():
        assert int((ref.weight == 0).sum()) == ref.numel // 2
