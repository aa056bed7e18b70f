"""--offload-dir: pruned blocks live in scratch files, not in process memory, and nothing else changes."""

import dataclasses
import errno
import os
import shutil
from pathlib import Path

import pytest
import torch

from mrprune import PruneConfig, preflight, prune
from mrprune.config import merge
from mrprune.errors import ResourceError
from mrprune.models import get_adapter
from mrprune.models.loading import maps_in_place, open_source, skeleton
from mrprune.spill import SpillStore, on_ram
from tests.test_cli import assert_one_line_error, run_cli


def mapped_files() -> dict[str, int]:
    """Every file mapped into this process, with the anonymous (copied-on-write) kB of its mappings."""
    files: dict[str, int] = {}
    path = None
    with open("/proc/self/smaps", encoding="utf-8", errors="replace") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and ":" not in fields[0]:
                path = " ".join(fields[5:]) if len(fields) > 5 else None
                if path:
                    files.setdefault(path, 0)
            elif fields[0] == "Anonymous:" and path:
                files[path] += int(fields[1])
    return files


def job(model_dir: Path, allocation: str = "uniform", metric: str = "wanda", **runtime) -> PruneConfig:
    return merge(PruneConfig(), {
        "model": str(model_dir), "metric": metric, "sparsity": 0.6, "allocation.method": allocation,
        "allocation.mrp.step": 0.05, "calibration.source": "embedded", "calibration.nsamples": 4,
        "calibration.seqlen": 32, "runtime.device": "cpu", **{f"runtime.{k}": v for k, v in runtime.items()},
    })


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def test_a_spilled_tensor_lives_in_a_file_of_its_store_and_stays_valid_after_the_store_closes(tmp_path):
    store = SpillStore(tmp_path / "scratch")
    source = torch.randn(5, 7)
    copy = store.adopt(source)
    assert torch.equal(copy, source) and copy.data_ptr() != source.data_ptr()
    assert store.holds(copy) and not store.holds(source)
    assert store.bytes == source.numel() * 4
    assert not any(store.directory.iterdir())  # unlinked at once: a killed run leaves no weights behind
    (mapping,) = [path for path in mapped_files() if path.startswith(str(store.directory))]
    assert mapping.endswith("(deleted)")
    copy.mul_(2)
    store.close()
    assert not store.directory.exists() and (tmp_path / "scratch").is_dir()
    assert torch.equal(copy, source * 2)  # still mapped


def test_a_full_disk_is_refused_when_a_file_is_reserved_not_by_a_crash_at_a_later_write(tmp_path, monkeypatch):
    store = SpillStore(tmp_path)

    def full(fd, offset, size):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(ResourceError, match="cannot reserve 16 bytes .*no space left on device"):
        store.adopt(torch.zeros(4))
    store.close()


@pytest.mark.parametrize("family,allocation,metric", [
    ("llama", "uniform", "wanda"), ("llama", "uniform", "sparsegpt"), ("llama", "mrp", "wanda"),
    ("llama", "mrp-fast", "wanda"), ("gpt2", "mrp", "wanda")])  # GPT-2: transposed (Conv1D) weights swapped in
def test_an_offload_dir_changes_no_weight_keeps_the_blocks_in_its_files_and_leaves_nothing(
        tiny_dir, tmp_path, family, allocation, metric, device, one_thread):
    """On the CPU blocks move into the files before they are pruned in place; on CUDA (offload implied) when
    they come back from the device, pruned."""
    model_dir = tiny_dir(family)
    plain = prune(config=job(model_dir, allocation, metric, device=device.type), progress=False)
    scratch = tmp_path / "scratch"
    spilled = prune(config=job(model_dir, allocation, metric, device=device.type, offload_dir=str(scratch)),
                    progress=False)
    assert all(p.device.type == "cpu" for p in get_adapter(spilled.model).blocks.parameters())
    expected, got = weights(plain.model), weights(spilled.model)
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    assert spilled.report.allocation["block_targets"] == plain.report.allocation["block_targets"]
    assert scratch.is_dir() and not any(scratch.iterdir())  # its scratch directory is gone
    files = [path for path in mapped_files() if path.startswith(str(scratch))]
    blocks = get_adapter(spilled.model).blocks
    assert len(files) == sum(1 for _ in blocks.parameters())  # every block tensor: one (deleted) file
    assert all(path.endswith("(deleted)") for path in files)


def test_pruned_blocks_copy_no_page_of_the_mapped_model_file_with_an_offload_dir(tiny_dir, tmp_path, one_thread):
    """Without it, pruning in place writes into the private mapping of model.safetensors and every written
    page becomes process memory: the reason the option exists."""
    first = tiny_dir("llama")
    second = Path(shutil.copytree(first, tmp_path / "copy"))
    assert maps_in_place(open_source(str(first)), torch.float32)
    kept = prune(config=job(first), progress=False)
    spilled = prune(config=job(second, offload_dir=str(tmp_path / "scratch")), progress=False)
    anonymous = mapped_files()
    copied = anonymous[str(first.resolve() / "model.safetensors")]
    assert copied * 1024 >= 0.5 * sum(p.numel() * 4 for p in get_adapter(kept.model).blocks.parameters())
    assert anonymous[str(second.resolve() / "model.safetensors")] == 0
    assert spilled.model is not kept.model


@pytest.mark.parametrize("allocation", ["uniform", "mrp"])
def test_a_resumed_run_restores_its_blocks_into_the_offload_dir(tiny_dir, tmp_path, allocation, one_thread):
    """A finished checkpoint re-exports: every block is restored, through the sequential pass's restore or
    exact MRP's own."""
    model_dir = tiny_dir("llama")
    ckpt = tmp_path / "ckpt"
    done = prune(config=job(model_dir, allocation, checkpoint_dir=str(ckpt)), progress=False)
    scratch = tmp_path / "scratch"
    again = prune(config=job(model_dir, allocation, checkpoint_dir=str(ckpt), resume=True,
                             offload_dir=str(scratch)), progress=False)
    expected = weights(done.model)
    for name, weight in weights(again.model).items():
        assert torch.equal(weight, expected[name]), name
    restored = [path for path in mapped_files() if path.startswith(str(scratch))]
    assert len(restored) == sum(1 for _ in get_adapter(again.model).blocks.parameters())


def test_weights_map_in_place_only_from_safetensors_in_the_run_dtype(tiny_dir, tmp_path):
    source = open_source(str(tiny_dir("llama")))
    assert maps_in_place(source, torch.float32)
    assert not maps_in_place(source, torch.bfloat16)
    assert not maps_in_place(None, torch.float32)


def test_the_preflight_counts_no_process_memory_for_blocks_mapped_in_and_spilled_out(tiny_dir):
    model = skeleton(open_source(str(tiny_dir("llama"))), torch.float32, False)
    adapter = get_adapter(model)
    shape = preflight.ModelShape.from_model(model, adapter, torch.float32)
    blocks = shape.total_bytes - shape.outside_bytes

    def host(**plan):
        return preflight.estimate(shape, preflight.RunPlan(torch.device("cpu"), 4, 32, 4, **plan)).pools["host"]

    assert host()["model"] == shape.total_bytes
    assert host(spill=True)["model"] == shape.total_bytes  # copied at load (another dtype): still memory
    assert host(spill=True, mapped=True)["model"] == shape.outside_bytes
    assert host(mapped=True)["model"] == shape.total_bytes  # pruned in place: every page copied
    assert host(mrp_dense=True)["MRP dense weights"] == blocks
    assert "MRP dense weights" not in host(mrp_dense=True, spill=True)


def test_offload_dir_mistakes_are_one_line_errors_before_any_work(tiny_dir, tmp_path, capsys):
    model_dir = tiny_dir("llama")
    base = ["prune", "--model", model_dir, "--device", "cpu", "--calib", "embedded", "--nsamples", "2",
            "--seqlen", "16"]
    code, _, err = run_cli(capsys, *base, "--offload-dir", model_dir / "scratch")
    assert_one_line_error(code, err, "may not be inside the input model")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    code, _, err = run_cli(capsys, *base, "--offload-dir", a_file)
    assert_one_line_error(code, err, "is a file, not a directory")
    code, _, err = run_cli(capsys, *base, "--offload-dir", tmp_path / "out" / "scratch", "--output", tmp_path / "out")
    assert_one_line_error(code, err, "may not be inside --output")
    code, _, err = run_cli(capsys, *base, "--offload-dir", a_file / "below")
    assert_one_line_error(code, err, "cannot be created: " + str(a_file) + " is a file")
    code, _, err = run_cli(capsys, *base, "--offload-dir", "/proc/scratch")
    assert_one_line_error(code, err, "cannot write to /proc")
    with pytest.raises(SystemExit) as exc:  # analyses do not offer the flag
        run_cli(capsys, "analyze", "lps", "--model", model_dir, "--device", "cpu", "--offload-dir", tmp_path / "s")
    assert exc.value.code == 2 and "unrecognized arguments: --offload-dir" in capsys.readouterr().err
    job = tmp_path / "job.yaml"  # nor take it from a config file
    job.write_text(f"runtime:\n  offload_dir: {tmp_path / 's'}\n")
    code, _, err = run_cli(capsys, "analyze", "lps", "--model", model_dir, "--device", "cpu", "--config", job,
                           "--calib", "embedded", "--nsamples", "2", "--seqlen", "16")
    assert_one_line_error(code, err, "runtime.offload_dir applies to 'mrprune prune' only")
    assert not (model_dir / "scratch").exists() and not (tmp_path / "s").exists()


def test_a_host_refusal_suggests_the_offload_dir_when_the_blocks_are_what_does_not_fit(tiny_dir):
    model = skeleton(open_source(str(tiny_dir("llama"))), torch.float32, False)
    shape = preflight.ModelShape.from_model(model, get_adapter(model), torch.float32)
    shape = dataclasses.replace(shape, total_bytes=10 * 2**30, outside_bytes=2**30)  # a model of 10 GiB
    plan = preflight.RunPlan(torch.device("cpu"), 1, 8, 1, calibrate=False, mapped=True)
    est = preflight.estimate(shape, plan)
    with pytest.raises(ResourceError, match="--offload-dir DIR"):
        preflight.check(est, {"host": est.total("host") - 1}, plan)
    plan.spill = True
    est = preflight.estimate(shape, plan)
    assert est.total("host") < 2 * 2**30
    # an offloaded GPU run of weights that load mapped: every pruned block coming back is copied on write
    gpu = preflight.RunPlan(torch.device("cuda"), 1, 8, 1, calibrate=False, offload=True, mapped=True)
    est = preflight.estimate(shape, gpu)
    assert est.pools["host"]["model"] == 9 * 2**30
    with pytest.raises(ResourceError, match="--offload-dir DIR"):
        preflight.check(est, {"host": est.total("host") - 1}, gpu)


def test_an_offload_dir_may_hold_the_output_and_the_checkpoint(tiny_dir, tmp_path, one_thread):
    """Its scratch files go to a subdirectory of their own, removed at the end; the others are left alone."""
    done = prune(config=merge(job(tiny_dir("llama"), offload_dir=str(tmp_path), checkpoint_dir=str(tmp_path / "c")),
                              {"output": str(tmp_path / "out")}), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "out", "tiny-llama"]
    assert done.output is not None and (tmp_path / "out" / "model.safetensors").is_file()


def test_a_ram_backed_offload_dir_is_known_as_such(tmp_path):
    mounts = tmp_path / "mountinfo"
    mounts.write_text("22 1 0:21 / / rw - ext4 /dev/vda rw\n"
                      "25 22 0:23 / /dev/shm rw,nosuid - tmpfs tmpfs rw\n"
                      "26 22 0:24 / /data/ram rw - ramfs none rw\n")
    assert on_ram("/dev/shm/scratch", str(mounts))
    assert on_ram("/data/ram", str(mounts))
    assert not on_ram("/data/ramdisk", str(mounts)) and not on_ram("/tmp/x", str(mounts))
    assert not on_ram("/tmp/x", str(tmp_path / "none"))


def test_weights_that_load_mapped_cost_no_memory_while_loading(tiny_dir):
    model = skeleton(open_source(str(tiny_dir("llama"))), torch.float32, False)
    shape = preflight.ModelShape.from_model(model, get_adapter(model), torch.float32)
    shape = dataclasses.replace(shape, total_bytes=10 * 2**30, outside_bytes=2**30)
    resident_gpu = preflight.RunPlan(torch.device("cuda"), 1, 8, 1, calibrate=False, mapped=True)
    assert preflight.estimate(shape, resident_gpu).total("host") < 2 * 2**30  # moved to the GPU, never written
    resident_gpu.mapped = False
    assert preflight.estimate(shape, resident_gpu).total("host") >= 10 * 2**30


@pytest.mark.skipif(not torch.cuda.is_available(), reason="moves blocks to a CUDA device")
def test_a_block_whose_files_cannot_be_made_stays_whole_on_the_device(tmp_path, monkeypatch):
    from mrprune.runtime import BlockMover
    from tests.conftest import tiny_model

    blocks = get_adapter(tiny_model("llama")).blocks
    saved = {k: v.clone() for k, v in blocks[0].state_dict().items()}
    store = SpillStore(tmp_path)
    mover = BlockMover(blocks, torch.device("cuda"), spill=store)
    mover.fetch(0)
    made = []

    def second_fails(tensor):
        if made:
            raise ResourceError("--offload-dir: cannot reserve")
        made.append(tensor)
        return SpillStore.empty_like(store, tensor)

    monkeypatch.setattr(store, "empty_like", second_fails)
    with pytest.raises(ResourceError):
        mover.release(0)
    assert all(t.device.type == "cuda" for t in blocks[0].state_dict().values())  # whole, still resident
    monkeypatch.undo()
    mover.release(0)
    for key, value in blocks[0].state_dict().items():
        assert value.device.type == "cpu" and store.holds(value) and torch.equal(value, saved[key])
    mover.close()
    store.close()
