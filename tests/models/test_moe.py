"""Mixture-of-experts models: every expert's matrices are layers, routers stay dense, statistics follow routing."""

import hashlib
import re

import pytest
import torch
import transformers

from mrprune import PruneConfig, prune
from mrprune.calibrate import StatsCollector, routed_inputs, run_block
from mrprune.config import merge
from mrprune.errors import UnsupportedModelError
from mrprune.metrics import build_metric
from mrprune.metrics.base import UNSEEN_NOTE
from mrprune.metrics.pattern import SparsityPattern
from mrprune.models import get_adapter
from mrprune.models.adapter import ExpertRef, restore_weights, swap_weights
from mrprune.runner import SequentialPruner
from tests.conftest import VOCAB, tiny_model

MOE = ["gpt_oss", "llama4", "mixtral", "phimoe", "qwen2_moe"]
#: the routers each family exposes as linear modules (most have a router module of their own)
ROUTERS = {"gpt_oss": [], "mixtral": [], "phimoe": ["mlp.router"], "qwen2_moe": ["mlp.shared_expert_gate"],
           "llama4": ["feed_forward.router"],
           "hunyuan_v1_moe": ["mlp.gate.wg"]}

pytestmark = pytest.mark.usefixtures("one_thread")


def experts_module(model, block=0):
    return next(m for m in model.model.layers[block].modules() if type(m).__name__.endswith("Experts"))


def first_call(module, model, ids):
    """(args, kwargs, output) of ``module``'s first call during a forward of ``model`` on ``ids``."""
    seen = {}

    def hook(mod, args, kwargs, output):
        seen.setdefault("call", (args, kwargs, output))

    handle = module.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    return seen["call"]


@pytest.mark.parametrize("family", MOE)
def test_routed_inputs_rebuild_the_experts_output(family):
    """Each expert's two inputs, pushed through its down projection and weighted by the router, sum to what the
    model's own experts module returned: the statistics see exactly what each expert computes on."""
    model = tiny_model(family)
    experts = experts_module(model)
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    args, kwargs, output = first_call(experts, model, ids)
    if family == "llama4":  # every expert on every token, inputs pre-scaled by the router (zero: not chosen)
        count, width = experts.down_proj.shape[0], output.shape[-1]
        inputs, outputs = args[0].view(count, -1, width), output.view(count, -1, width)
        seen = []
        for expert, x, mid in routed_inputs(experts, args, kwargs):
            seen.append(expert)
            rows = inputs[expert].abs().amax(dim=-1) != 0
            assert torch.equal(x, inputs[expert][rows])
            torch.testing.assert_close(mid @ experts.down_proj[expert], outputs[expert][rows], rtol=1e-5, atol=1e-6)
            assert int(outputs[expert][~rows].count_nonzero()) == 0
        assert seen == [e for e in range(count) if bool(inputs[e].any())] and len(seen) > 1
        return
    bound = dict(zip(["hidden", "chosen", "weights"], list(args) + list(kwargs.values())))
    hidden = bound["hidden"].reshape(-1, bound["hidden"].shape[-1])
    chosen, weights = bound["chosen"].reshape(hidden.shape[0], -1), bound["weights"].reshape(hidden.shape[0], -1)

    rebuilt = torch.zeros_like(hidden)
    experts_seen = []
    for expert, x, mid in routed_inputs(experts, args, kwargs):
        experts_seen.append(expert)
        tokens = (chosen == expert).any(dim=-1)
        assert torch.equal(x, hidden[tokens])
        down = experts.down_proj[expert]
        out = mid @ down if experts.is_transposed else torch.nn.functional.linear(mid, down)
        if experts.has_bias:
            out = out + experts.down_proj_bias[expert]
        gate = (weights * (chosen == expert))[tokens].sum(dim=-1, keepdim=True)
        rebuilt[tokens] += out * gate
    assert experts_seen == sorted(set(chosen.flatten().tolist()))
    torch.testing.assert_close(rebuilt, output.reshape(hidden.shape), rtol=1e-5, atol=1e-6)


def hunyuan_moe():
    """HunYuan-MoE routes through a plain Linear with one output per expert (not in FAMILIES: one test only)."""
    config = transformers.HunYuanMoEV1Config(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, num_experts=4, moe_topk=2, vocab_size=VOCAB)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("family", MOE + ["hunyuan_v1_moe"])
def test_every_expert_matrix_is_a_layer_and_routers_stay_out(family):
    model = hunyuan_moe() if family == "hunyuan_v1_moe" else tiny_model(family)
    adapter = get_adapter(model)
    experts = experts_module(model, 1)
    count = experts.down_proj.shape[0]
    refs = adapter.linear_layers(1)
    expert_refs = [r for r in refs if isinstance(r, ExpertRef)]
    assert len(expert_refs) == 2 * count  # gate_up and down of every expert
    for ref in expert_refs:
        stored = getattr(experts, ref.param)[ref.expert]
        assert ref.stored.data_ptr() == stored.data_ptr()  # a view: writes reach the model
        assert ref.weight.shape == (ref.out_features, ref.in_features) and ref.numel == stored.numel()
    down = next(r for r in expert_refs if r.param == "down_proj")
    assert down.in_features == experts.down_proj.shape[1 if down.transposed else 2]
    assert down.transposed == (family in ("gpt_oss", "llama4"))
    assert adapter.routers(1) == [f"model.layers.1.{name}" for name in ROUTERS[family]]
    assert not {r.name for r in refs} & set(adapter.routers(1))
    # every weight matrix of the block is a prunable layer or belongs to a router (a Linear or a router module)
    routers = {name.removeprefix("model.layers.1.") for name in adapter.routers(1)}
    matrices = sum(p.numel() for name, m in model.model.layers[1].named_modules()
                   if name not in routers and not type(m).__name__.endswith("Router")
                   for key, p in m.named_parameters(recurse=False) if p.ndim >= 2 and not key.endswith("_bias"))
    assert sum(r.numel for r in refs) == matrices


def test_statistics_follow_the_routing():
    model = tiny_model("mixtral")
    adapter = get_adapter(model)
    ids = torch.randint(3, VOCAB, (3, 10), generator=torch.Generator().manual_seed(2))
    runner = SequentialPruner(adapter, build_metric("wanda"), SparsityPattern(), torch.device("cpu"), batch_size=2,
                              progress=False)
    acts = runner.capture(ids)
    layers = adapter.linear_layers(0)
    with StatsCollector(layers, sq_norm=True, hessian=True) as collector:
        run_block(adapter.blocks[0], acts.calls[0], acts.hidden, 2, torch.device("cpu"), write_back=False)
    stats = collector.result()
    up = [r for r in layers if isinstance(r, ExpertRef) and r.param == "gate_up_proj"]
    # each token goes to top_k experts: their token counts and input energies add up to top_k times the block's
    top_k = model.config.num_experts_per_tok
    attention_input = stats["model.layers.0.self_attn.q_proj"]
    assert sum(stats[r.name].tokens for r in up) == top_k * ids.numel() == top_k * attention_input.tokens
    energy = sum(stats[r.name].sq_norm for r in up)
    assert energy.shape == (model.config.hidden_size,)
    for r in layers:
        s = stats[r.name]
        torch.testing.assert_close(torch.diag(s.hessian), s.sq_norm)  # the same tokens feed both statistics


def test_an_expert_no_token_reaches_is_pruned_by_magnitude(caplog):
    model = tiny_model("gpt_oss")
    for block in model.model.layers:
        block.mlp.router.bias.data[3] = -1e4  # the router never chooses expert 3
    adapter = get_adapter(model)
    ids = torch.randint(3, VOCAB, (3, 10), generator=torch.Generator().manual_seed(3))
    for metric in ("wanda", "sparsegpt"):
        pruned = tiny_model("gpt_oss")
        pruned.load_state_dict(model.state_dict())
        adapter = get_adapter(pruned)
        runner = SequentialPruner(adapter, build_metric(metric), SparsityPattern(), torch.device("cpu"),
                                  batch_size=2, progress=False)
        acts = runner.capture(ids)
        dense = {r.name: r.weight.clone() for r in adapter.linear_layers(0)}
        with caplog.at_level("WARNING", logger="mrprune.runner"):
            records = runner.prune_block(acts, {r.name: 0.5 for r in adapter.all_linear_layers()})
        assert "block 0: 2 of 12 layers (experts) got no calibration token" in caplog.text
        by_name = {rec.name: rec for rec in records}
        for ref in adapter.linear_layers(0):
            record = by_name[ref.name]
            assert record.zeros == ref.numel // 2
            unseen = isinstance(ref, ExpertRef) and ref.expert == 3
            assert (UNSEEN_NOTE in record.notes) == unseen, (metric, ref.name)
            if unseen:  # the lowest |W| of every row went
                kept = dense[ref.name].abs().masked_fill(ref.weight == 0, float("inf")).min(dim=1).values
                gone = dense[ref.name].abs().masked_fill(ref.weight != 0, float("-inf")).max(dim=1).values
                assert bool((gone <= kept).all())


def test_swapped_expert_weights_run_and_come_back():
    model = tiny_model("qwen2_moe")
    adapter = get_adapter(model)
    refs = adapter.linear_layers(0)
    before = {r.name: r.weight.clone() for r in refs}
    zeros = {r.name: torch.zeros_like(r.weight) for r in refs}
    block_output = model.model.layers[0].mlp.experts.down_proj
    swapped = swap_weights(refs, zeros)
    assert all(int(r.weight.count_nonzero()) == 0 for r in refs)
    restore_weights(swapped)
    assert model.model.layers[0].mlp.experts.down_proj.data_ptr() == block_output.data_ptr()
    assert all(torch.equal(r.weight, before[r.name]) for r in refs)
    with pytest.raises(ValueError, match="every expert"):
        swap_weights([r for r in refs if isinstance(r, ExpertRef)][:1], zeros)


def test_unknown_stacks_of_matrices_are_refused_small_ones_warned_convolutions_accepted(caplog):
    model = tiny_model("llama")
    model.model.layers[0].mlp.extra = torch.nn.Parameter(torch.zeros(8, 64, 64))  # 32k weights: most of the block
    with pytest.raises(UnsupportedModelError, match=r"block 0 stores \d+% of its weights in 3-D tensors \(mlp.extra\)"):
        get_adapter(model).linear_layers(0)
    model.model.layers[0].mlp.extra = torch.nn.Parameter(torch.zeros(2, 3, 4))  # a small stack: left dense, said
    with caplog.at_level("WARNING", logger="mrprune.models.adapter"):
        refs = get_adapter(model).linear_layers(0)
    assert len(refs) == 7 and "mlp.extra: 0.1% of each block's weights" in caplog.text
    # a linear-attention block (Qwen3-Next) holds a conv1d kernel: not a stack of matrices, no refusal
    config = transformers.Qwen3NextConfig(
        hidden_size=64, intermediate_size=96, moe_intermediate_size=48, shared_expert_intermediate_size=48,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4,
        num_experts_per_tok=2, vocab_size=VOCAB, linear_num_value_heads=4, linear_num_key_heads=2)
    with torch.device("meta"):
        qwen = transformers.AutoModelForCausalLM.from_config(config)
    adapter = get_adapter(qwen)
    names = [r.short_name for i in range(adapter.num_blocks) for r in adapter.linear_layers(i)]
    assert any("linear_attn.in_proj" in n for n in names) and not any("conv1d" in n for n in names)
    assert any(".experts.3.down_proj" in n for n in names)


def file_digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def moe_job(model_dir, out, **overrides):
    return merge(PruneConfig(), {
        "model": str(model_dir), "sparsity": 0.6, "calibration.source": "embedded", "calibration.nsamples": 4,
        "calibration.seqlen": 32, "runtime.device": "cpu", "runtime.dtype": "float32", "output": str(out),
        **overrides})


@pytest.mark.parametrize("allocation, metric", [("uniform", "wanda"), ("uniform", "sparsegpt"), ("owl", "wanda"),
                                                ("mrp-fast", "wanda"), ("mrp", "wanda"),
                                                ("alphapruning", "magnitude")])
def test_moe_model_prunes_exports_and_reloads(tiny_dir, tmp_path, allocation, metric):
    model_dir = tiny_dir("mixtral")
    before = file_digest(model_dir / "model.safetensors")
    out = tmp_path / "pruned"
    config = moe_job(model_dir, out, metric=metric, **{"allocation.method": allocation})
    if allocation == "mrp":  # a short loop: the point is that it runs on experts, not its schedule
        config = merge(config, {"allocation.mrp.step": 0.1, "allocation.mrp.min_step": 0.05})
    outcome = prune(config=config, progress=False)
    assert file_digest(model_dir / "model.safetensors") == before
    assert outcome.report.sparsity["target_met"]
    coverage = outcome.report.extra.get("experts")
    if metric == "magnitude":
        assert coverage is None  # no calibration: nothing to say
    else:  # 4 windows of 32 tokens, each routed to 2 of 4 experts, in each of 3 blocks
        assert coverage["experts"] == 12 and coverage["blocks"] == 3 and coverage["without_tokens"] == 0
        t = coverage["calibration_tokens"]
        assert 0 < t["min"] <= t["median"] <= t["max"] <= 4 * 32
        assert "experts    12 in 3 blocks; calibration tokens per expert" in outcome.report.format_text()
    names = {layer["name"] for layer in outcome.report.layers}
    assert "model.layers.2.mlp.experts.3.down_proj" in names

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(3, VOCAB, (2, 16))
    with torch.inference_mode():
        assert torch.equal(reloaded(ids).logits, outcome.model(ids).logits)
    layers = reloaded.model.layers
    expert_zeros = sum(int((b.mlp.experts.gate_up_proj == 0).sum() + (b.mlp.experts.down_proj == 0).sum())
                       for b in layers)
    recorded = sum(layer["zeros"] for layer in outcome.report.layers if ".experts." in layer["name"])
    assert expert_zeros == recorded > 0
    # on disk transformers writes the checkpoint layout (Mixtral: per-expert w1/w2/w3, as vLLM and older
    # transformers read it), and the zeros are there
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as tensors:
        names = [k for k in tensors.keys() if ".experts." in k]  # noqa: SIM118 (a safetensors handle, no __iter__)
        on_disk = {k: int((tensors.get_tensor(k) == 0).sum()) for k in names}
    assert any(k.endswith("experts.0.w1.weight") for k in on_disk) and sum(on_disk.values()) == recorded
    dense = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    for b_pruned, b_dense in zip(layers, dense.model.layers):  # the router is untouched
        assert torch.equal(b_pruned.mlp.gate.weight, b_dense.mlp.gate.weight)


@pytest.mark.parametrize("family", ["qwen2_moe", "llama4"])
def test_moe_pruning_on_every_device_matches_the_records(tiny_dir, tmp_path, device, family):
    """On a GPU the blocks are offloaded (moved in and out one at a time); the exported experts hold exactly
    the zeros the report counts, and the routers none."""
    model_dir = tiny_dir(family)
    out = tmp_path / "pruned"
    outcome = prune(config=moe_job(model_dir, out, metric="sparsegpt", **{
        "runtime.device": device.type, "runtime.offload": device.type == "cuda"}), progress=False)
    assert outcome.report.sparsity["target_met"]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    for layer in outcome.report.layers:
        owner, _, rest = layer["name"].partition(".experts.")
        if rest:
            expert, param = rest.split(".")
            weight = getattr(reloaded.get_submodule(owner + ".experts"), param)[int(expert)]
        else:
            weight = reloaded.get_submodule(layer["name"]).weight
        assert int((weight == 0).sum()) == layer["zeros"]
    routers = [f"model.layers.{i}.{name}" for i in (0, 2) for name in ROUTERS[family]]
    assert routers and all(int((reloaded.get_submodule(name).weight == 0).sum()) == 0 for name in routers)


def test_moe_resume_matches_an_uninterrupted_run(tiny_dir, tmp_path, monkeypatch):
    model_dir = tiny_dir("mixtral")
    reference = prune(config=moe_job(model_dir, tmp_path / "ref"), progress=False)
    calls = {"n": 0}
    original = SequentialPruner.save_progress

    def interrupted(self, *args, **kwargs):
        original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    ckpt = {"runtime.checkpoint_dir": str(tmp_path / "ckpt")}
    with monkeypatch.context() as patch:
        patch.setattr(SequentialPruner, "save_progress", interrupted)
        with pytest.raises(KeyboardInterrupt):
            prune(config=moe_job(model_dir, tmp_path / "out", **ckpt), progress=False)
    resumed = prune(config=moe_job(model_dir, tmp_path / "out", **ckpt, **{"runtime.resume": True}), progress=False)
    assert file_digest(tmp_path / "out" / "model.safetensors") == file_digest(tmp_path / "ref" / "model.safetensors")
    assert resumed.report.layers == reference.report.layers


@pytest.mark.parametrize("overrides", [{"runtime.offload_dir": "scratch"}, {"pattern": "2:4"}],
                         ids=["offload-dir", "2:4"])
def test_moe_with_an_offload_dir_is_bit_for_bit_and_n_m_holds_in_every_expert(tiny_dir, tmp_path, overrides):
    model_dir = tiny_dir("mixtral")
    if "runtime.offload_dir" in overrides:
        overrides = {"runtime.offload_dir": str(tmp_path / "scratch")}
        (tmp_path / "scratch").mkdir()
    else:
        overrides = {**overrides, "sparsity": None}
    run = prune(config=moe_job(model_dir, tmp_path / "out", metric="sparsegpt", **overrides), progress=False)
    if "pattern" not in overrides:
        plain = prune(config=moe_job(model_dir, tmp_path / "plain", metric="sparsegpt"), progress=False)
        assert file_digest(tmp_path / "out" / "model.safetensors") == \
            file_digest(tmp_path / "plain" / "model.safetensors")
        assert run.report.layers == plain.report.layers
        return
    for ref in get_adapter(run.model).all_linear_layers():  # 2 zeros in every group of 4 inputs of every row
        groups = (ref.weight == 0).reshape(ref.out_features, -1, 4).sum(dim=-1)
        assert bool((groups == 2).all()), ref.name


@pytest.mark.parametrize("allocation", ["uniform", "mrp", "mrp-fast"])
def test_an_unchosen_expert_falls_back_to_magnitude_in_every_allocation(tmp_path, tokenizer, allocation, caplog):
    """Exact MRP re-prunes from statistics it keeps itself: they must still say that no token came (and the
    warning comes once per block, not once per re-pruning)."""
    model = tiny_model("gpt_oss")
    for block in model.model.layers:
        block.mlp.router.bias.data[3] = -1e4
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    config = moe_job(tmp_path / "model", tmp_path / "out", **{"allocation.method": allocation,
                                                              "allocation.mrp.step": 0.1, "allocation.mrp.min_step": 0.05})
    with caplog.at_level("WARNING", logger="mrprune.runner"):
        outcome = prune(config=config, progress=False)
    warned = [r.getMessage() for r in caplog.records if "got no calibration token" in r.getMessage()]
    assert sorted(warned) == [f"block {b}: 2 of 12 layers (experts) got no calibration token and were pruned by "
                              "magnitude; more --nsamples reach more experts" for b in range(3)]
    unseen = {layer["name"] for layer in outcome.report.layers if UNSEEN_NOTE in layer.get("notes", [])}
    assert unseen == {f"model.layers.{b}.mlp.experts.3.{p}" for b in range(3) for p in ("gate_up_proj", "down_proj")}
    assert outcome.report.extra["experts"]["without_tokens"] == 3


def test_info_shows_one_line_per_expert_tensor_and_the_routers(tiny_dir, capsys):
    from mrprune.cli import main

    assert main(["info", "-q", str(tiny_dir("qwen2_moe"))]) == 0
    out = capsys.readouterr().out
    assert re.search(r"\n  model\.layers\.0\.mlp\.experts\.<expert>\.gate_up_proj +96 x 64  \(4 experts\)", out)
    assert re.search(r"\n  model\.layers\.0\.mlp\.experts\.<expert>\.down_proj +64 x 48  \(4 experts\)", out)
    assert out.count("experts.<expert>") == 2 and "model.layers.0.mlp.shared_expert.down_proj" in out
    assert "routers of block 0 (kept dense): mlp.shared_expert_gate" in out
