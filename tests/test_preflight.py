"""Memory preflight: the estimate is the right order of magnitude, and a run that cannot fit is refused in one
line naming the numbers and the options that fix it (before the weights load)."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers

import mrprune.api
import mrprune.preflight as pf
from mrprune import PruneConfig, prune
from mrprune.config import merge
from mrprune.errors import ResourceError
from mrprune.metrics import build_metric
from mrprune.models import get_adapter
from tests.conftest import VOCAB, tiny_model

GIB = 2**30


def job(model_dir, **overrides):
    base = {"model": str(model_dir), "calibration.source": "embedded", "calibration.nsamples": 4,
            "calibration.seqlen": 32, "runtime.device": "cpu"}
    return merge(PruneConfig(), {**base, **overrides})


def shape_of(family="llama"):
    model = tiny_model(family)
    return pf.ModelShape.from_model(model, get_adapter(model))


def test_model_shape_of_a_weightless_skeleton_matches_the_loaded_model(tiny_dir):
    from mrprune.models.loading import load_weights, open_source, skeleton

    source = open_source(str(tiny_dir("llama")))
    meta = skeleton(source, torch.bfloat16)
    loaded = load_weights(source, torch.bfloat16)
    assert next(meta.parameters()).device.type == "meta"
    assert pf.ModelShape.from_model(meta, get_adapter(meta)) == pf.ModelShape.from_model(loaded, get_adapter(loaded))
    shape = pf.ModelShape.from_model(meta, get_adapter(meta), torch.float32)
    assert shape.dtype_size == 4 and shape.hidden == 64 and shape.num_blocks == 3
    assert shape.hessian_inputs == [64, 64, 128]  # attention input, MLP input, down_proj input
    assert shape.parameters == sum(p.numel() for p in loaded.parameters())


def test_estimate_grows_with_the_options_that_should_grow_it():
    shape = shape_of()
    cuda = torch.device("cuda")  # a plan, not a placement: no GPU needed
    base = pf.RunPlan(device=cuda, nsamples=128, seqlen=2048, batch_size=8)
    est = pf.estimate(shape, base)
    acts = 128 * 2048 * 64 * 4
    assert est.pools["device"]["activations"] == acts
    assert pf.estimate(shape, pf.RunPlan(device=cuda, nsamples=256, seqlen=2048, batch_size=8)).total("device") > \
        est.total("device")
    offloaded = pf.estimate(shape, pf.RunPlan(device=cuda, nsamples=128, seqlen=2048, batch_size=8, offload=True,
                                              offload_activations=True))
    assert offloaded.total("device") < est.total("device") and "activations" not in offloaded.pools["device"]
    assert offloaded.pools["host"]["activations (capture: batches + concatenation)"] == 3 * acts
    hessian = pf.estimate(shape, pf.RunPlan(device=cuda, nsamples=128, seqlen=2048, batch_size=8, hessian=True))
    assert hessian.pools["device"]["statistics"] == 4 * (64 * 64 * 2 + 128 * 128)
    mrp = pf.estimate(shape, pf.RunPlan(device=cuda, nsamples=128, seqlen=2048, batch_size=8, mrp_stride=1))
    assert mrp.pools["device"]["MRP cached block inputs"] == (3 + 1) * acts
    cpu = pf.estimate(shape, pf.RunPlan(device=torch.device("cpu"), nsamples=128, seqlen=2048, batch_size=8))
    assert set(cpu.pools) == {"host"} and cpu.pools["host"]["activations"] == acts


def test_mixture_of_experts_shape_counts_every_expert_and_mrp_swaps():
    """Each expert has its own Hessians; MRP's swapped-in block (and the stacked copy of fused experts) is
    counted on the device (it was missing: fast MRP measured 1.4x its estimate on a Mixtral shape)."""
    shape, dense = shape_of("mixtral"), shape_of("llama")
    experts, width, hidden = 4, 96, 64
    assert shape.expert_bytes == experts * (2 * width * hidden + hidden * width) * 4 and dense.expert_bytes == 0
    assert shape.hessian_inputs == [64] + [64] * experts + [width] * experts  # attention, each expert's two
    cuda = torch.device("cuda")
    plan = {"device": cuda, "nsamples": 128, "seqlen": 2048, "batch_size": 8}
    swaps = pf.estimate(shape, pf.RunPlan(**plan, block_swaps=True)).pools["device"]
    assert swaps["MRP swapped block weights"] == shape.block_bytes + shape.expert_bytes
    assert "MRP swapped block weights" not in pf.estimate(shape, pf.RunPlan(**plan)).pools["device"]


def test_mrp_plans_count_their_block_swaps(tiny_dir):
    from mrprune.api import _run_plan

    def plan(**overrides):
        return _run_plan(job(tiny_dir("llama"), **overrides), torch.device("cpu"), build_metric("wanda"), True,
                         None, None)

    assert not plan().block_swaps
    assert plan(**{"allocation.method": "mrp-fast"}).block_swaps
    assert not plan(**{"allocation.method": "mrp-fast", "allocation.mrp.pilot": "dense"}).block_swaps
    assert plan(**{"allocation.method": "mrp"}).block_swaps
    assert not plan(**{"allocation.method": "mrp", "allocation.mrp.activations": "pruned-block"}).block_swaps


def test_offloaded_evaluation_counts_the_chunk_of_windows_that_goes_through_the_blocks_together():
    shape = shape_of()
    cuda = torch.device("cuda")

    def evaluation(**options):
        plan = pf.RunPlan(device=cuda, nsamples=128, seqlen=2048, batch_size=8, calibrate=False, eval_seqlen=2048,
                          **options)
        return pf.estimate(shape, plan).pools["device"]

    window = 2048 * 64 * 4
    assert "evaluation windows" not in evaluation()  # one window at a time when the blocks stay on the device
    assert evaluation(offload=True, eval_windows=3)["evaluation windows"] == 3 * window
    assert evaluation(offload=True)["evaluation windows"] == pf.CHUNK_BYTES // window * window <= 2 * GIB
    zeroshot = pf.estimate(shape, pf.RunPlan(device=cuda, nsamples=128, seqlen=2048, batch_size=8, calibrate=False,
                                             offload=True, zeroshot=True)).pools["device"]
    assert zeroshot["zero-shot requests"] == pf.CHUNK_BYTES


def test_evaluation_counts_a_windows_logits_up_to_the_slice_the_head_runs_on():
    cuda = torch.device("cuda")
    plan = pf.RunPlan(device=cuda, nsamples=128, seqlen=2048, batch_size=8, calibrate=False, eval_seqlen=2048)
    small, large = shape_of(), dataclasses.replace(shape_of(), vocab=262_144)
    window = pf.estimate(small, plan).pools["device"]["evaluation"]
    assert pf.estimate(large, plan).pools["device"]["evaluation"] - window == 2 * (pf.logit_budget() - 2048 * VOCAB * 4)
    half = dataclasses.replace(large, dtype_size=2)  # bfloat16 logits come first, then their float32 copy
    assert (pf.estimate(half, plan).pools["device"]["evaluation"] - pf.estimate(large, plan).pools["device"]["evaluation"]
            == pf.logit_budget() // 2 + pf.forward_bytes(half, plan, 1, 2048) - pf.forward_bytes(large, plan, 1, 2048))


MEASURE = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    import mrprune.preflight as pf
    from mrprune import PruneConfig, prune
    from mrprune.config import merge

    def peak():  # VmHWM: the peak resident set since the last reset
        return int([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]) * 1024

    def rss():
        return int([l for l in open("/proc/self/status") if l.startswith("VmRSS")][0].split()[1]) * 1024

    seen = {}
    check = pf.check

    def spy(est, free, plan):  # the preflight's moment: text sampled, weights not loaded; start measuring here
        open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
        seen.update(est=est.total("host"), base=rss())
        return check(est, free, plan)

    pf.check = spy

    def job(n, seqlen):
        return merge(PruneConfig(), {"model": sys.argv[1], "metric": sys.argv[2], "calibration.source": "embedded",
                                     "calibration.nsamples": n, "calibration.seqlen": seqlen,
                                     "runtime.device": "cpu", "runtime.batch_size": 8})

    # no warm-up run: its freed memory would be reused unseen by the measured run
    prune(config=job(int(sys.argv[3]), int(sys.argv[4])), progress=False)
    print(json.dumps({"estimate": seen["est"], "measured": peak() - seen["base"]}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("metric,nsamples,seqlen", [("wanda", 64, 512), ("sparsegpt", 32, 512)])
def test_estimate_is_the_measured_peak_to_within_a_factor_of_two(tmp_path, tokenizer, metric, nsamples, seqlen):
    """A fresh process measures how far its resident memory rises above what it held at the preflight (text
    sampled, weights not loaded): the number the preflight compares with the free memory. Activations, MLP
    temporaries and (SparseGPT) the batched solve dominate (hidden 128, MLP 512)."""
    config = transformers.LlamaConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=384,
                                      bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    path = tmp_path / "model"
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    script = tmp_path / "measure.py"
    script.write_text(MEASURE)
    result = subprocess.run([sys.executable, str(script), str(path), metric, str(nsamples), str(seqlen)],
                            capture_output=True, text=True, timeout=300, check=False,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    numbers = json.loads(result.stdout.strip().splitlines()[-1])
    ratio = numbers["estimate"] / numbers["measured"]
    assert 0.5 <= ratio <= 2.0, numbers


# ------------------------------------------------------------------------------------------------ refusal


def test_refusal_is_one_line_with_numbers_and_fixes(tiny_dir, monkeypatch):
    def no_weights(*args, **kwargs):
        raise AssertionError("the weights loaded before the preflight")

    monkeypatch.setattr(mrprune.api, "load_weights", no_weights)
    monkeypatch.setattr(pf, "host_available_bytes", lambda: 10 * 2**20)
    with pytest.raises(ResourceError) as exc:
        prune(config=job(tiny_dir("llama")), progress=False)
    message = str(exc.value)
    assert message.startswith("not enough memory on the host: this run needs about 49 MiB (libraries and "
                              "buffers 48 MiB) but 10 MiB is free")  # parts under 1 MiB are not listed
    assert "fewer --nsamples" in message and "a shorter --seqlen" in message and "--no-preflight" in message
    assert "--offload" not in message  # offloading does not help a CPU run
    assert "\n" not in message


def test_device_refusal_suggests_offloading():
    shape = shape_of()
    plan = pf.RunPlan(device=torch.device("cuda:0"), nsamples=128, seqlen=2048, batch_size=8)
    est = pf.estimate(shape, plan)
    with pytest.raises(ResourceError) as exc:
        pf.check(est, {"device": est.total("device") - 1, "host": None}, plan)
    message = str(exc.value)
    assert message.startswith("not enough memory on cuda:0") and "activations" in message
    assert "try --offload, --offload-activations, fewer --nsamples, a shorter --seqlen" in message
    plan = pf.RunPlan(device=torch.device("cuda:0"), nsamples=128, seqlen=2048, batch_size=8, offload=True,
                      offload_activations=True)
    est = pf.estimate(shape, plan)
    with pytest.raises(ResourceError, match=r"try fewer --nsamples") as exc:
        pf.check(est, {"device": 1, "host": None}, plan)
    pf.check(est, {"device": est.total("device"), "host": est.total("host")}, plan)  # fits exactly: no error


def test_no_preflight_runs_anyway(tiny_dir, monkeypatch):
    monkeypatch.setattr(pf, "host_available_bytes", lambda: 1)
    outcome = prune(config=job(tiny_dir("llama"), **{"runtime.preflight": False}), progress=False)
    assert outcome.report.sparsity["target_met"]


def test_free_memory_readers_degrade_gracefully(monkeypatch):
    available = pf.host_available_bytes()
    assert available is None or available > 0
    assert pf.device_free_bytes(torch.device("cpu")) is None
    monkeypatch.setattr(pf, "Path", lambda *a: (_ for _ in ()).throw(OSError("no /proc")))
    fallback = pf.host_available_bytes()  # sysconf
    assert fallback is None or fallback > 0


def test_the_host_room_is_the_least_of_the_process_cgroup_and_its_ancestors(tmp_path):
    """A batch job's limit sits on its own group (v1: memory:/job/step), not on the mount's root."""
    def group(path, limit, usage, v1=True):
        folder = tmp_path / ("memory" if v1 else "") / path
        folder.mkdir(parents=True, exist_ok=True)
        (folder / ("memory.limit_in_bytes" if v1 else "memory.max")).write_text(str(limit))
        (folder / ("memory.usage_in_bytes" if v1 else "memory.current")).write_text(str(usage))

    proc = tmp_path / "cgroup"
    proc.write_text("5:cpu,cpuacct:/elsewhere\n4:memory:/job/step\n0::/\n")
    group("job/step", 8 << 30, 1 << 30)
    group("job", 4 << 30, 3 << 30)
    group("", 9223372036854771712, 5 << 30)  # the root: v1's "no limit"
    assert pf._cgroup_room(str(proc), str(tmp_path)) == 1 << 30
    proc.write_text("0::/user/app\n")
    group("user/app", "max", 1, v1=False)
    group("user", 6 << 30, 2 << 30, v1=False)
    assert pf._cgroup_room(str(proc), str(tmp_path)) == 4 << 30
    proc.write_text("0::/free\n")
    group("free", "max", 1, v1=False)
    assert pf._cgroup_room(str(proc), str(tmp_path / "none")) is None
