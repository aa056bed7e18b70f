"""Offloaded blocks: the BlockMover's copies must never change a result, only where weights wait."""

import pytest
import torch

from mrprune import PruneConfig, prune, runtime
from mrprune.config import merge
from mrprune.data import Corpus, embedded_text
from mrprune.metrics import SparsityPattern, build_metric
from mrprune.models import get_adapter
from mrprune.runner import SequentialPruner
from mrprune.runtime import BlockMover, PhaseTimer, place_model, streamed_blocks
from tests.conftest import VOCAB, tiny_model

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="moves blocks to a CUDA device")


@pytest.fixture
def cuda() -> torch.device:
    return torch.device("cuda")


def calibration_ids(n=4, seqlen=24):
    return torch.randint(3, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(0))


def host_pointers(block):
    return [t.data_ptr() for t in block.state_dict().values()]


def test_mover_without_offloading_or_on_the_cpu_moves_nothing():
    blocks = get_adapter(tiny_model("llama")).blocks
    before = host_pointers(blocks[0])
    for mover in (BlockMover(blocks, torch.device("cpu")), BlockMover(blocks, torch.device("cuda"), enabled=False)):
        assert mover.fetch(0) is blocks[0]
        mover.release(0)
        mover.close()
    assert host_pointers(blocks[0]) == before


def test_the_timer_charges_a_phase_on_the_cpu():
    timer = PhaseTimer()
    with timer.phase("outer"), timer.phase("inner"):
        torch.ones(10).sum()
    assert set(timer.as_dict()) == {"outer", "inner"}


@needs_cuda
def test_a_block_only_read_goes_back_to_its_own_host_tensors_without_a_copy(cuda):
    blocks = get_adapter(tiny_model("llama")).blocks
    before = host_pointers(blocks[0])
    saved = {k: v.clone() for k, v in blocks[0].state_dict().items()}
    mover = BlockMover(blocks, cuda)
    block = mover.fetch(0)
    assert all(t.device.type == "cuda" for t in block.state_dict().values())
    mover.release(0, changed=False)
    assert host_pointers(blocks[0]) == before  # the same host storage, untouched
    for key, value in blocks[0].state_dict().items():
        assert value.device.type == "cpu" and torch.equal(value, saved[key])
    mover.close()


@needs_cuda
def test_a_changed_block_is_copied_back_into_its_host_tensors(cuda):
    adapter = get_adapter(tiny_model("llama"))
    before = host_pointers(adapter.blocks[1])
    mover = BlockMover(adapter.blocks, cuda)
    mover.fetch(1)
    ref = adapter.linear_layers(1)[0]
    pruned = ref.weight.clone()
    pruned[:, ::2] = 0
    ref.set_weight(pruned)  # writes through .data, as pruning does
    mover.release(1)
    assert host_pointers(adapter.blocks[1]) == before
    assert ref.weight.device.type == "cpu" and torch.equal(ref.weight, pruned.cpu())
    mover.close()


@needs_cuda
def test_a_prefetch_serves_only_the_fetch_that_follows_it(cuda):
    adapter = get_adapter(tiny_model("llama"))
    mover = BlockMover(adapter.blocks, cuda)
    mover.fetch(0)
    assert mover._pending is not None and mover._pending.index == 1  # block 1 is on its way
    mover.release(0)
    mover.fetch(0)  # not block 1 (the MRP loop revisits blocks out of order): the prefetch is dropped
    assert all(t.device.type == "cpu" for t in adapter.blocks[1].state_dict().values())
    mover.release(0)
    mover.close()  # what a checkpoint's restore does before it writes host weights
    assert mover._pending is None
    ref = adapter.linear_layers(1)[0]
    ref.weight.zero_()
    mover.fetch(1)
    assert ref.weight.device.type == "cuda" and int(torch.count_nonzero(ref.weight)) == 0
    mover.release(1)
    mover.close()


@needs_cuda
def test_a_failed_prefetch_is_copied_again_when_it_ran_out_of_memory_and_ignored_when_unused(cuda, monkeypatch):
    adapter = get_adapter(tiny_model("llama"))
    error = torch.cuda.OutOfMemoryError("simulated")

    def fail(self, hosts, device, stream):
        self._error = error

    monkeypatch.setattr(runtime._Prefetch, "_run", fail)
    mover = BlockMover(adapter.blocks, cuda)
    mover.fetch(0)
    mover.release(0, changed=False)
    mover.fetch(1)  # its prefetch ran out of memory: copied now instead
    assert all(t.device.type == "cuda" for t in adapter.blocks[1].state_dict().values())
    mover.release(1, changed=False)
    mover.close()  # block 2's failed copy was never needed: no error
    error = RuntimeError("not a memory shortage")
    mover.fetch(0)
    mover.release(0, changed=False)
    with pytest.raises(RuntimeError, match="not a memory shortage"):
        mover.fetch(1)
    mover.close()


@needs_cuda
@pytest.mark.parametrize("metric", ["wanda", "sparsegpt"])
def test_offloaded_pruning_gives_exactly_the_weights_of_a_resident_run(cuda, metric):
    targets = None
    results = []
    for offload in (False, True):
        model = tiny_model("llama")
        adapter = get_adapter(model)
        targets = targets or {ref.name: 0.3 + 0.2 * ref.block for ref in adapter.all_linear_layers()}
        runner = SequentialPruner(adapter, build_metric(metric), SparsityPattern(), cuda, batch_size=2,
                                  offload=offload, progress=False)
        runner.run(calibration_ids(), targets)
        runner.close()
        if offload:
            assert all(p.device.type == "cpu" for p in adapter.blocks.parameters())
            assert runner.mover._pending is None
        results.append({ref.name: ref.weight.detach().cpu() for ref in adapter.all_linear_layers()})
    for name, weight in results[0].items():
        torch.testing.assert_close(results[1][name], weight, rtol=0, atol=0)


@needs_cuda
def test_streamed_evaluation_matches_a_resident_one_and_leaves_the_blocks_as_they_were(cuda):
    model = tiny_model("llama")
    adapter = get_adapter(model)
    windows = calibration_ids(n=3)

    resident = []
    model.to(cuda)
    with torch.inference_mode():
        for window in windows:
            resident.append(model(input_ids=window[None].to(cuda), use_cache=False).logits.cpu())
    model.to("cpu")
    place_model(model, adapter.blocks_name, cuda, offload=True)
    before = host_pointers(adapter.blocks[0])
    streamed = []
    with streamed_blocks(adapter.blocks, cuda, offload=True), torch.inference_mode():
        for window in windows:  # the second forward starts on block 0, prefetched after the last block
            on_device: list[int] = []

            def count(module, args, seen=on_device):  # runs after the mover's own pre-hook
                seen.append(sum(t.device.type == "cuda" for t in adapter.blocks.state_dict().values()))

            handles = [b.register_forward_pre_hook(count) for b in adapter.blocks]
            streamed.append(model(input_ids=window[None].to(cuda), use_cache=False).logits.cpu())
            for h in handles:
                h.remove()
            per_block = len(adapter.blocks[0].state_dict())
            assert on_device == [per_block] * len(adapter.blocks)  # one block at a time (the next waits aside)
    for a, b in zip(resident, streamed):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert host_pointers(adapter.blocks[0]) == before
    weight = adapter.linear_layers(0)[0].weight
    assert weight.device.type == "cpu" and not weight.is_inference()
    with torch.no_grad():
        weight.mul_(1.0)  # still an ordinary tensor a later pruning step may change in place


@needs_cuda
def test_offloaded_perplexity_moves_each_block_once_per_chunk_of_windows_and_matches_a_resident_one(
        cuda, tokenizer, monkeypatch):
    from mrprune.evaluate import blockwise
    from mrprune.evaluate.perplexity import perplexity

    model = tiny_model("gemma3")
    adapter = get_adapter(model)
    corpus = Corpus("eval", text=embedded_text("evaluation"))
    model.to(cuda)
    resident = perplexity(model, tokenizer, corpus, 40, 5, "always", cuda, progress=False)
    model.to("cpu")
    place_model(model, adapter.blocks_name, cuda, offload=True)
    before = host_pointers(adapter.blocks[1])
    monkeypatch.setattr(blockwise, "CHUNK_BYTES", 2 * 40 * 64 * 4)  # chunks of 2, 2 and 1 windows
    fetched: list[int] = []
    original = BlockMover.fetch
    monkeypatch.setattr(BlockMover, "fetch", lambda self, index: fetched.append(index) or original(self, index))
    offloaded = perplexity(model, tokenizer, corpus, 40, 5, "always", cuda, progress=False, offload=True)
    assert offloaded.perplexity == pytest.approx(resident.perplexity, rel=1e-6)
    assert fetched == [0, 1, 2] * 3
    assert all(p.device.type == "cpu" for p in adapter.blocks.parameters())
    assert host_pointers(adapter.blocks[1]) == before  # read only: no copy back


@needs_cuda
def test_offloaded_zeroshot_loglikelihoods_are_a_resident_models(cuda, tokenizer, monkeypatch):
    pytest.importorskip("lm_eval")
    import copy

    from lm_eval.models.huggingface import HFLM

    from mrprune.evaluate import blockwise
    from mrprune.evaluate.lm_blockwise import block_major_lm
    from tests.evaluate.test_zeroshot import loglikelihood_requests

    model = tiny_model("qwen2")
    adapter = get_adapter(model)
    requests = loglikelihood_requests(tokenizer)
    model.to(cuda)
    expected = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=2).loglikelihood(
        requests, disable_tqdm=True)
    model.to("cpu")
    place_model(model, adapter.blocks_name, cuda, offload=True)
    monkeypatch.setattr(blockwise, "CHUNK_BYTES", 60 * 64 * 4)
    fetched: list[int] = []
    original = BlockMover.fetch
    monkeypatch.setattr(BlockMover, "fetch", lambda self, index: fetched.append(index) or original(self, index))
    lm = block_major_lm(HFLM)(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=2)
    got = lm.loglikelihood(requests, disable_tqdm=True)
    assert [g[1] for g in got] == [e[1] for e in expected]
    assert [g[0] for g in got] == pytest.approx([e[0] for e in expected], rel=1e-5, abs=1e-5)
    parts = len(fetched) // 3
    assert parts > 2 and fetched == [0, 1, 2] * parts  # every block once per part of the requests
    assert all(p.device.type == "cpu" for p in adapter.blocks.parameters())


@needs_cuda
@pytest.mark.parametrize("allocation", ["uniform", "mrp", "mrp-fast"])
def test_an_offloaded_job_prunes_and_evaluates_exactly_as_a_resident_one(cuda, tiny_dir, allocation):
    """Through the API, with evaluation before and after: the MRP loop fetches blocks out of order and fast MRP
    runs pilot passes that only read, both paths where a wrong prefetch or a skipped copy would show."""
    outcomes = []
    for offload in (False, True):
        config = merge(PruneConfig(), {
            "model": str(tiny_dir("llama")), "metric": "wanda", "sparsity": 0.6, "allocation.method": allocation,
            "allocation.mrp.step": 0.05, "calibration.source": "embedded", "calibration.nsamples": 4,
            "calibration.seqlen": 32, "evaluate": True, "evaluation.seqlen": 32, "evaluation.max_windows": 3,
            "runtime.device": "cuda", "runtime.offload": offload,
        })
        outcome = prune(config=config, progress=False)
        model = outcome.model
        if offload:
            assert all(p.device.type == "cpu" for p in get_adapter(model).blocks.parameters())
        outcomes.append((outcome.report, {k: v.detach().cpu() for k, v in model.state_dict().items()}))
    (resident, resident_weights), (offloaded, offloaded_weights) = outcomes
    for name, weight in resident_weights.items():
        assert torch.equal(offloaded_weights[name], weight), name
    assert offloaded.allocation["block_targets"] == resident.allocation["block_targets"]
    for when in ("before", "after"):
        assert offloaded.perplexity[when]["perplexity"] == pytest.approx(resident.perplexity[when]["perplexity"],
                                                                         rel=1e-5)
