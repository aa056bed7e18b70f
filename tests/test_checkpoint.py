"""Checkpoints and resume: an interrupted run continues from its last finished block and ends bit for bit where
an uninterrupted run ends; a checkpoint is never overwritten or reused by a different run silently."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import transformers

from mrprune import PruneConfig, prune
from mrprune.allocate.mrp import MrpRun
from mrprune.checkpoint import LOCK, PROGRESS, Checkpoint
from mrprune.config import merge
from mrprune.errors import CheckpointError, ConfigError
from mrprune.runner import SequentialPruner

pytestmark = pytest.mark.usefixtures("one_thread")


def job(model_dir, out=None, ckpt=None, **overrides):
    base = {"model": str(model_dir), "calibration.source": "embedded", "calibration.nsamples": 4,
            "calibration.seqlen": 32, "runtime.device": "cpu", "runtime.dtype": "float32"}
    if out is not None:
        base["output"] = str(out)
    if ckpt is not None:
        base["runtime.checkpoint_dir"] = str(ckpt)
    return merge(PruneConfig(), {**base, **overrides})


def weights_digest(out):
    return hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()


def interrupt_after(monkeypatch, owner, name, calls):
    """Make ``owner.name`` raise KeyboardInterrupt right after its ``calls``-th call has finished."""
    original = getattr(owner, name)
    seen = {"n": 0}

    def wrapper(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        seen["n"] += 1
        if seen["n"] == calls:
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(owner, name, wrapper)


AUTO = {"allocation.method": "auto", "allocation.auto.candidates": "uniform,owl", "allocation.auto.windows": 2}
CASES = {
    "uniform-wanda": ({}, SequentialPruner, "save_progress", 1),
    "uniform-sparsegpt": ({"metric": "sparsegpt"}, SequentialPruner, "save_progress", 2),
    "magnitude": ({"metric": "magnitude"}, SequentialPruner, "save_progress", 1),
    "owl": ({"allocation.method": "owl"}, SequentialPruner, "save_progress", 1),
    "alphapruning": ({"allocation.method": "alphapruning"}, SequentialPruner, "save_progress", 2),
    "mrp-fast": ({"allocation.method": "mrp-fast"}, SequentialPruner, "save_progress", 1),
    "mrp-fast-pilot": ({"allocation.method": "mrp-fast", "allocation.mrp.pilot": "start"}, SequentialPruner,
                       "save_progress", 1),
    # per layer, M 3: the drifts measured in block 0 enter the per-unit forecast, which a resumed run must keep
    "mrp-fast-layers": ({"allocation.method": "mrp-fast", "allocation.granularity": "layer", "allocation.mrp.m": 3.0},
                        SequentialPruner, "save_progress", 1),
    "mrp-start": ({"allocation.method": "mrp"}, SequentialPruner, "save_progress", 1),
    "mrp-iterate": ({"allocation.method": "mrp"}, MrpRun, "_save_progress", 2),
    # between an iteration's block file and its progress.json (3 blocks saved by the start, then iterations 1,
    # 2); SparseGPT, whose re-pruning of a block also updates its weights, so repeating an iteration shows
    "mrp-iterate-unsaved": ({"allocation.method": "mrp", "metric": "sparsegpt"}, Checkpoint, "save_blocks", 5),
    # auto with two candidates commits after each candidate (1, 2), with its choice (3), then per block (4, ...)
    "auto-measuring": (AUTO, Checkpoint, "commit", 1),
    "auto-chosen": (AUTO, Checkpoint, "commit", 3),
    "auto-winner": (AUTO, Checkpoint, "commit", 4),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_resume_after_interruption_matches_an_uninterrupted_run_bit_for_bit(tiny_dir, tmp_path, monkeypatch, case):
    overrides, owner, method, calls = CASES[case]
    model_dir = tiny_dir("llama")
    reference = prune(config=job(model_dir, tmp_path / "ref", **overrides), progress=False)

    ckpt = tmp_path / "ckpt"
    with monkeypatch.context() as patch:
        interrupt_after(patch, owner, method, calls)
        with pytest.raises(KeyboardInterrupt) as exc:
            prune(config=job(model_dir, tmp_path / "out", ckpt, **overrides), progress=False)
    assert exc.value.checkpoint_dir == str(ckpt.resolve())  # the CLI tells the user where to resume from
    assert not (tmp_path / "out").exists() and (ckpt / PROGRESS).is_file()

    resumed = prune(config=job(model_dir, tmp_path / "out", ckpt, **{"runtime.resume": True}, **overrides),
                    progress=False)
    assert weights_digest(tmp_path / "out") == weights_digest(tmp_path / "ref")
    assert resumed.report.layers == reference.report.layers
    assert resumed.report.allocation["block_targets"] == reference.report.allocation["block_targets"]
    assert resumed.report.extra["resumed_from"] == str(ckpt.resolve())
    assert [p.name for p in ckpt.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("commits, measured_on_resume", [(1, ["owl"]), (3, []), (4, [])])
def test_resumed_auto_runs_only_what_is_missing(tiny_dir, tmp_path, monkeypatch, commits, measured_on_resume):
    """Interrupted after its first candidate, auto measures only the second on resume; once it has chosen, it
    measures none and only the winner's pass runs (again, or on from its saved block)."""
    import mrprune.api
    from mrprune.checkpoint import describe

    model_dir = tiny_dir("llama")
    ckpt = tmp_path / "ckpt"
    with monkeypatch.context() as patch:
        interrupt_after(patch, Checkpoint, "commit", commits)
        with pytest.raises(KeyboardInterrupt):
            prune(config=job(model_dir, None, ckpt, **AUTO), progress=False)
    if commits == 1:  # what the resume's log line says
        assert describe(json.loads((ckpt / PROGRESS).read_text())) == "auto, 1 candidate(s) measured (uniform)"
    original = mrprune.api._allocate_and_prune
    ran = []

    def spy(config, *args, **kwargs):
        ran.append(config.allocation.method)
        return original(config, *args, **kwargs)

    monkeypatch.setattr(mrprune.api, "_allocate_and_prune", spy)
    resumed = prune(config=job(model_dir, None, ckpt, **{"runtime.resume": True}, **AUTO), progress=False)
    selection = resumed.report.extra["allocation_selection"]
    assert [c["allocation"] for c in selection["candidates"]] == ["uniform", "owl"]
    assert ran == [*measured_on_resume, selection["chosen"]]
    assert resumed.report.extra["resumed_from"] == str(ckpt.resolve())
    assert (ckpt / "allocator-auto.json").is_file()
    Checkpoint(ckpt, {}, None).remove()
    assert not ckpt.exists()  # the selection's files belong to the checkpoint


def test_finished_checkpoint_re_exports_without_pruning_and_can_be_removed(tiny_dir, tmp_path, monkeypatch):
    model_dir = tiny_dir("llama")
    ckpt = tmp_path / "ckpt"
    prune(config=job(model_dir, tmp_path / "a", ckpt), progress=False)
    assert (ckpt / PROGRESS).is_file()  # kept by default

    def no_pruning(*args, **kwargs):
        raise AssertionError("a finished checkpoint needs no pruning")

    monkeypatch.setattr(SequentialPruner, "prune_block", no_pruning)
    prune(config=job(model_dir, tmp_path / "b", ckpt, **{"runtime.resume": True, "runtime.remove_checkpoint": True}),
          progress=False)
    assert weights_digest(tmp_path / "a") == weights_digest(tmp_path / "b")
    assert not ckpt.exists()


def test_checkpoint_rules_are_one_line_errors_before_the_weights_load(tiny_dir, tmp_path, monkeypatch):
    model_dir = tiny_dir("llama")
    ckpt = tmp_path / "ckpt"
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        prune(config=job(model_dir, ckpt=ckpt, **{"runtime.resume": True}), progress=False)
    with pytest.raises(ConfigError, match="--resume needs --checkpoint-dir"):
        prune(config=job(model_dir, **{"runtime.resume": True}), progress=False)
    prune(config=job(model_dir, ckpt=ckpt), progress=False)
    prune(config=job(model_dir, ckpt=ckpt, **{"runtime.resume": True, "sparsity": 0.5}), progress=False)  # default

    import mrprune.api

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights must not load before the checkpoint is checked")

    monkeypatch.setattr(mrprune.api, "load_weights", no_weights)
    with pytest.raises(CheckpointError, match="pass --resume to continue it"):
        prune(config=job(model_dir, ckpt=ckpt), progress=False)
    mismatches = [
        ({"sparsity": 0.6}, r"option sparsity \(0.5 in the checkpoint, 0.6 now\)"),
        ({"metric": "magnitude"}, "option metric"),
        ({"calibration.nsamples": 5}, r"calibration windows \(4 x 32 tokens in the checkpoint, 5 x 32 tokens now\)"),
        ({"calibration.seed": 1}, "calibration token ids"),
        ({"runtime.dtype": "bfloat16"}, "device/dtype dtype"),
        ({"runtime.batch_size": 2}, "option runtime.batch_size"),
    ]
    for overrides, message in mismatches:
        with pytest.raises(CheckpointError, match=message):
            prune(config=job(model_dir, ckpt=ckpt, **{"runtime.resume": True}, **overrides), progress=False)
    other = tiny_dir("qwen2")
    with pytest.raises(CheckpointError, match="different run: model source"):
        prune(config=job(other, ckpt=ckpt, **{"runtime.resume": True}), progress=False)

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not empty and holds no mrprune checkpoint"):
        prune(config=job(model_dir, ckpt=foreign), progress=False)
    with pytest.raises(ConfigError, match="must be separate directories"):
        prune(config=job(model_dir, tmp_path / "o", tmp_path / "o" / "ck"), progress=False)


def test_placement_options_do_not_block_a_resume(tiny_dir, tmp_path, monkeypatch):
    """After an out-of-memory, a user resumes with --offload-activations: that changes no arithmetic."""
    model_dir = tiny_dir("llama")
    ckpt = tmp_path / "ckpt"
    prune(config=job(model_dir, tmp_path / "ref"), progress=False)
    with monkeypatch.context() as patch:
        interrupt_after(patch, SequentialPruner, "save_progress", 1)
        with pytest.raises(KeyboardInterrupt):
            prune(config=job(model_dir, ckpt=ckpt), progress=False)
    prune(config=job(model_dir, tmp_path / "out", ckpt, **{"runtime.resume": True, "runtime.offload": True,
                                                             "runtime.offload_activations": True}), progress=False)
    assert weights_digest(tmp_path / "out") == weights_digest(tmp_path / "ref")


# ------------------------------------------------------------------------------------ real signals, real CLI


@pytest.fixture
def deep_dir(tmp_path, tokenizer):
    """A tiny Llama with many blocks: a CLI run of it lasts a few seconds, enough to interrupt it midway."""
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=48,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=384,
                                      bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    path = tmp_path / "deep"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


#: the CLI, holding after each saved block while the file $HOLD exists (at most 300 s), so the signal lands
#: midway however fast or loaded the machine is; SIGINT handled as in a terminal (a shell's background job
#: inherits it ignored)
SLOW_CLI = """
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even under a background pytest
from mrprune import checkpoint as c
commit = c.Checkpoint.commit
def held_commit(self, *args, **kwargs):
    commit(self, *args, **kwargs)
    start = time.monotonic()
    while os.path.exists(os.environ["HOLD"]) and time.monotonic() - start < 300:
        time.sleep(0.01)
c.Checkpoint.commit = held_commit
from mrprune.cli import main
sys.exit(main())
"""


def cli_command(model_dir, out, ckpt, *extra, slow=True):
    launcher = ["-c", SLOW_CLI] if slow else ["-m", "mrprune"]
    return [sys.executable, *launcher, "prune", "-q", "--model", str(model_dir), "--calib", "embedded",
            "--nsamples", "8", "--seqlen", "64", "--metric", "sparsegpt", "--device", "cpu",
            "--output", str(out), "--checkpoint-dir", str(ckpt), *extra]


def next_block(ckpt):
    try:
        return json.loads((ckpt / PROGRESS).read_text())["next_block"]
    except (OSError, ValueError):
        return None


def run_and_signal(command, ckpt, sig, after_block):
    """Start ``command``; once the checkpoint has passed ``after_block``, send ``sig``; return the process."""
    hold = ckpt.parent / "hold"
    hold.touch()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HOLD": str(hold)}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300  # a loaded machine can take minutes to import, load and calibrate
    block = None
    while time.monotonic() < deadline and process.poll() is None:
        block = next_block(ckpt)
        if block is not None and block > after_block:
            process.send_signal(sig)
            break
        time.sleep(0.005)
    hold.unlink()
    out, err = process.communicate(timeout=120)
    return process.returncode, out, err, block


def test_real_sigint_and_sigterm_leave_no_output_and_resume_gives_the_same_model(deep_dir, tmp_path):
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"

    code, _, err, _ = run_and_signal(cli_command(deep_dir, out, ckpt), ckpt, signal.SIGINT, 0)
    lines = [line for line in err.splitlines() if line.startswith("mrprune")]
    assert code == 130, err
    assert len(lines) == 1 and lines[0].startswith("mrprune: interrupted by SIGINT; no output was written")
    assert f"progress is saved in {ckpt}" in lines[0] and "--resume" in lines[0] and "Traceback" not in err
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert [p.name for p in ckpt.iterdir() if p.name.startswith(".")] == []
    stopped = next_block(ckpt)
    assert 1 <= stopped < 48

    code, _, err, _ = run_and_signal(cli_command(deep_dir, out, ckpt, "--resume"), ckpt, signal.SIGTERM, stopped)
    lines = [line for line in err.splitlines() if line.startswith("mrprune")]
    assert code == 143, err
    assert len(lines) == 1 and lines[0].startswith("mrprune: interrupted by SIGTERM; no output was written")
    assert not out.exists() and next_block(ckpt) > stopped

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cli_command(deep_dir, out, ckpt, "--resume", slow=False), env=env, capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr
    # the uninterrupted run, in this process (one thread, as the CLI runs had)
    reference = tmp_path / "reference"
    prune(config=job(deep_dir, reference, metric="sparsegpt", **{"calibration.nsamples": 8,
                                                                 "calibration.seqlen": 64}), progress=False)
    assert weights_digest(out) == weights_digest(reference)


def test_allocator_files_belong_to_the_checkpoint(tmp_path):
    """Fast MRP's pilot curves are written before the first progress.json: a re-run must still take the folder,
    and removing the checkpoint removes them."""
    from mrprune.checkpoint import Checkpoint

    folder = tmp_path / "ckpt"
    first = Checkpoint.open(folder, {"run": 1}, resume=False)
    first.save_tensors("mrp-fast-pilot", {"0.0": torch.arange(3)})
    first.close()  # the run stops
    ckpt = Checkpoint.open(folder, {"run": 1}, resume=False)  # an interrupted pilot leaves nothing to resume
    assert [p.name for p in folder.iterdir()] == [LOCK]  # held while this run uses the folder
    ckpt.save_tensors("mrp-fast-pilot", {"0.0": torch.arange(3)})
    assert torch.equal(ckpt.load_tensors("mrp-fast-pilot")["0.0"], torch.arange(3))
    ckpt.commit("mrp-fast", [], next_block=0)
    ckpt.remove()
    assert not folder.exists()


def test_a_block_saved_again_keeps_its_committed_file_until_the_next_commit(tmp_path):
    """Exact MRP saves a block at every iteration that changes it: the new weights go to a new file, so the
    committed progress.json always names the weights it was written with, whenever the run stops."""
    from mrprune.models import get_adapter
    from tests.conftest import tiny_model

    adapter = get_adapter(tiny_model("llama"))
    ref = adapter.linear_layers(1)[0]
    folder = tmp_path / "ckpt"
    ckpt = Checkpoint.open(folder, {"run": 1}, resume=False)
    ckpt.save_blocks(adapter, range(adapter.num_blocks))
    ckpt.commit("mrp-iterate", range(adapter.num_blocks))
    committed = ref.weight.detach().clone()
    with torch.no_grad():
        ref.weight.zero_()
    ckpt.save_blocks(adapter, [1])  # the next iteration's weights; the run stops before its commit
    ckpt.close()
    assert len(list(folder.glob("block-00001-*.safetensors"))) == 2

    resumed = Checkpoint.open(folder, {"run": 1}, resume=True)
    assert len(list(folder.glob("block-00001-*.safetensors"))) == 1  # the uncommitted file is gone
    resumed.restore_weights(adapter)
    assert torch.equal(ref.weight, committed)
    with torch.no_grad():
        ref.weight.zero_()
    resumed.save_blocks(adapter, [1])
    resumed.commit("mrp-iterate", range(adapter.num_blocks))
    named = set(json.loads((folder / PROGRESS).read_text())["block_files"].values())
    assert {p.name for p in folder.glob("block-*.safetensors")} == named and len(named) == adapter.num_blocks
    with torch.no_grad():
        ref.weight.copy_(committed)
    resumed.restore_weights(adapter)
    assert not ref.weight.any()


def test_a_second_run_on_a_checkpoint_in_use_is_refused_and_the_first_keeps_it(tmp_path):
    """Two runs started on one --checkpoint-dir would write the same file names and mix their blocks (a later
    --resume then exported weights of the other run): the directory is locked while a run uses it."""
    folder = tmp_path / "ckpt"
    first = Checkpoint.open(folder, {"run": 1}, resume=False)
    first.save_tensors("mrp-fast-pilot", {"0.0": torch.arange(3)})
    with pytest.raises(CheckpointError, match=f"checkpoint dir {folder} is in use by another mrprune run"):
        Checkpoint.open(folder, {"run": 2}, resume=False)  # before the first commit: it would delete the pilot
    assert torch.equal(first.load_tensors("mrp-fast-pilot")["0.0"], torch.arange(3))
    first.commit("mrp-fast", [], next_block=0)
    for resume in (False, True):
        with pytest.raises(CheckpointError, match=f"checkpoint dir {folder} is in use by another mrprune run"):
            Checkpoint.open(folder, {"run": 1}, resume=resume)
    assert (folder / LOCK).is_file()  # the refused runs left the holder's lock in place
    first.close()
    assert PROGRESS in {p.name for p in folder.iterdir()} and not (folder / LOCK).exists()
    Checkpoint.open(folder, {"run": 1}, resume=True).close()  # free again once the first run ended


def test_a_checkpoint_directory_a_run_made_and_saved_nothing_in_is_removed(tmp_path):
    folder = tmp_path / "new" / "ckpt"
    Checkpoint.open(folder, {"run": 1}, resume=False).close()
    assert not folder.exists()
    kept = tmp_path / "given"
    kept.mkdir()
    Checkpoint.open(kept, {"run": 1}, resume=False).close()
    assert kept.is_dir() and list(kept.iterdir()) == []  # a directory the user made stays, empty
    (kept / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="holds no mrprune checkpoint"):
        Checkpoint.open(kept, {"run": 1}, resume=False)
    assert [p.name for p in kept.iterdir()] == ["notes.txt"]  # refused without leaving a lock file


def test_an_interruption_during_a_commits_clean_up_still_counts_as_saved(tmp_path, monkeypatch):
    """progress.json is on disk before the old files are removed: a Ctrl-C in that clean-up must still lead to
    'progress is saved ... --resume' (the real-signal test above once hit that window)."""
    folder = tmp_path / "ckpt"
    ckpt = Checkpoint.open(folder, {"run": 1}, resume=False)
    assert not ckpt.saved
    real_glob = type(folder).glob

    def interrupted_glob(self, pattern):
        if pattern.startswith("activations-"):
            raise KeyboardInterrupt
        return real_glob(self, pattern)

    monkeypatch.setattr(type(folder), "glob", interrupted_glob)
    with pytest.raises(KeyboardInterrupt):
        ckpt.commit("uniform", [], next_block=1)
    assert ckpt.saved and ckpt.progress is not None and ckpt.progress["next_block"] == 1
    monkeypatch.undo()
    ckpt.progress = None  # the instant between the file's rename and the assignment: the file itself says so
    assert ckpt.saved
    ckpt.close()
