import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
import torch
import transformers

from mrprune import PruneConfig, prune
from mrprune.analyze.common import prepare_files
from mrprune.config import merge
from mrprune.errors import OutputError
from mrprune.export import REPORT_NAME, check_output


def file_hashes(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def job(model_dir, out, **overrides):
    base = {"model": str(model_dir), "calibration.source": "embedded", "calibration.nsamples": 4,
            "calibration.seqlen": 32, "output": str(out)}
    return merge(PruneConfig(), {**base, **overrides})


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_export_round_trip_gives_identical_logits_and_exact_sparsity(tiny_dir, tmp_path, family, device):
    model_dir = tiny_dir(family)
    before = file_hashes(model_dir)
    out = tmp_path / "pruned"
    config = job(model_dir, out, sparsity=0.5, **{"runtime.device": device.type, "runtime.dtype": "float32"})
    outcome = prune(config=config, progress=False)
    outcome.model.to("cpu")
    assert outcome.output == out.resolve()
    assert file_hashes(model_dir) == before  # the input model is never modified

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(3, 300, (2, 20))
    with torch.inference_mode():
        assert torch.equal(reloaded(ids).logits, outcome.model(ids).logits)
    for ref_name, layer in ((r["name"], r) for r in outcome.report.layers):
        weight = reloaded.get_submodule(ref_name).weight
        assert float((weight == 0).float().mean()) == 0.5 == layer["sparsity"]
    assert any(p.suffix == ".safetensors" for p in out.iterdir())
    assert (out / "tokenizer.json").is_file()

    report = json.loads((out / REPORT_NAME).read_text())
    assert report["sparsity"]["target_met"] and report["sparsity"]["achieved"] == 0.5
    assert report["settings"]["metric"] == "wanda" and report["seed"] == 0
    assert len(report["blocks"]) == 3 and report["versions"]["torch"]
    assert {"capture", "statistics", "masks", "recompute", "export"} <= set(report["timings_s"])


def test_existing_output_needs_overwrite_and_is_replaced_whole(tiny_dir, tmp_path):
    model_dir = tiny_dir("llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / REPORT_NAME).write_text("{}")  # an earlier export
    (out / "stale.txt").write_text("old")
    with pytest.raises(OutputError, match="--overwrite"):
        prune(config=job(model_dir, out), progress=False)
    prune(config=job(model_dir, out, overwrite=True), progress=False)
    assert not (out / "stale.txt").exists() and json.loads((out / REPORT_NAME).read_text())["blocks"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_overwrite_never_replaces_a_directory_mrprune_did_not_write(tiny_dir, tmp_path):
    model_dir = tiny_dir("llama")
    out = tmp_path / "notes"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputError, match="did not write"):
        prune(config=job(model_dir, out, overwrite=True), progress=False)
    assert (out / "thesis.tex").read_text() == "years of work"


def test_output_below_a_file_is_refused_before_any_work(tiny_dir, tmp_path):
    model_dir = tiny_dir("llama")
    blocker = tmp_path / "afile.txt"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        check_output(blocker / "sub", False, model_dir)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc, where nothing can be created")
def test_output_where_nothing_can_be_created_is_refused_even_for_root(tiny_dir, tmp_path):
    """os.access says yes to root for /proc; the check creates a directory, as the export will."""
    with pytest.raises(OutputError, match="cannot write to /proc: creating a directory there fails"):
        check_output("/proc/mrprune-out", False, tiny_dir("llama"))
    with pytest.raises(OutputError, match="cannot write to /proc: creating a directory there fails"):
        prepare_files([Path("/proc/compare.md")], False)  # the analyses' file outputs share the check
    area = tmp_path / "area"
    area.mkdir()
    check_output(area / "fine", False, tiny_dir("llama"))
    assert list(area.iterdir()) == []  # the probe left nothing behind


def test_exported_directory_follows_the_umask(tiny_dir, tmp_path):
    model_dir = tiny_dir("llama")
    old = os.umask(0o022)
    try:
        out = prune(config=job(model_dir, tmp_path / "out"), progress=False).output
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755


def test_output_inside_input_model_is_refused(tiny_dir):
    model_dir = tiny_dir("llama")
    for bad in (model_dir, model_dir / "pruned", model_dir.parent):
        with pytest.raises(OutputError, match="input model"):
            prune(config=job(model_dir, bad, overwrite=True), progress=False)


def test_crash_during_export_leaves_nothing_behind(tiny_dir, tmp_path, monkeypatch):
    model_dir = tiny_dir("llama")
    out = tmp_path / "out"

    def explode(self, *args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(transformers.PreTrainedTokenizerFast, "save_pretrained", explode)
    with pytest.raises(RuntimeError, match="disk full"):
        prune(config=job(model_dir, out), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [model_dir.name]


def test_export_writes_a_model_card_that_reproduces_the_job(tiny_dir, tmp_path):
    import yaml

    from mrprune.config import from_dict

    model_dir = tiny_dir("llama")
    out = tmp_path / "pruned"
    config = job(model_dir, out, sparsity=0.6, metric="sparsegpt", evaluate=True,
                 **{"evaluation.text": "embedded", "evaluation.seqlen": 64, "evaluation.max_windows": 2})
    outcome = prune(config=config, progress=False)
    card = (out / "README.md").read_text()
    _, front, body = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "transformers" and "sparsegpt" in meta["tags"] and "base_model" not in meta
    report = outcome.report.to_dict()
    assert f"{report['sparsity']['achieved']:.6f} of {report['sparsity']['weights']:,}" in body
    after = report["perplexity"]["after"]
    assert f"{after['perplexity']:.3f} after ({after['protocol']})" in body
    for block in report["blocks"]:
        assert f"| {block['index']} | {block['target']:.4f} | {block['sparsity']:.4f} |" in body
    settings = body.split("```yaml\n", 1)[1].split("```", 1)[0]
    again = from_dict(PruneConfig, yaml.safe_load(settings))  # the settings block is a valid --config
    assert again == merge(config, {"output": None}).validate()


def test_model_card_names_a_hub_source_only():
    from mrprune.card import hub_id

    assert hub_id("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert hub_id("./models/x") is None and hub_id("/abs/path") is None and hub_id("a/b/c") is None
    assert hub_id("LlamaForCausalLM") is None and hub_id(None) is None


def test_an_overwrite_interrupted_between_its_renames_keeps_the_old_output(tmp_path, monkeypatch):
    """The old directory goes aside, then the new one comes in: an interrupt between the two puts the old one
    back, so the output is never missing."""
    from mrprune import export

    out = tmp_path / "out"
    out.mkdir()
    (out / "weights").write_text("old")
    real = os.replace
    for when in ("before the second rename", "after the first rename"):
        calls = []

        def interrupted(src, dst, when=when, calls=calls):
            calls.append((src, dst))
            if when == "after the first rename" and len(calls) == 1:
                real(src, dst)  # the old directory is aside when the interrupt lands
                raise KeyboardInterrupt
            if when == "before the second rename" and len(calls) == 2:
                raise KeyboardInterrupt
            return real(src, dst)

        monkeypatch.setattr(export.os, "replace", interrupted)
        with pytest.raises(KeyboardInterrupt):
            export.write_dir_atomically(out, lambda tmp: (tmp / "weights").write_text("new"), overwrite=True)
        assert (out / "weights").read_text() == "old" and calls[-1][1] == out, when  # the last rename put it back
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], when  # no hidden temporary or aside folder


@pytest.fixture
def terminal_sigint():
    """SIGINT raising KeyboardInterrupt as in a terminal: a shell starts background jobs (``.ci/run &``) with
    SIGINT ignored, and Python then keeps it ignored, which these tests would mistake for a lost signal."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_deferred_signals_hold_a_signal_until_the_block_ends(terminal_sigint):
    import signal

    from mrprune.export import deferred_signals

    seen = []
    with pytest.raises(KeyboardInterrupt):
        with deferred_signals():
            os.kill(os.getpid(), signal.SIGINT)
            seen.append("inside, after the signal")
        seen.append("after the block")
    assert seen == ["inside, after the signal"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is back


def test_an_ignored_sigint_stays_ignored_through_the_block():
    """Started with SIGINT ignored (a shell's background job, nohup): the held signal is dropped as the user asked,
    and the ignore disposition is back afterwards."""
    import signal

    from mrprune.export import deferred_signals

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with deferred_signals():
            os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_an_interrupt_during_the_swap_lands_after_it_and_says_the_output_is_complete(tmp_path, monkeypatch,
                                                                                       terminal_sigint):
    import signal

    from mrprune import export
    from mrprune.cli import interrupted_message

    out = tmp_path / "out"
    out.mkdir()
    (out / "weights").write_text("old")
    real = os.replace

    def signalled(src, dst):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the old output is moved aside
        return real(src, dst)

    monkeypatch.setattr(export.os, "replace", signalled)
    with pytest.raises(KeyboardInterrupt) as exc:
        export.write_dir_atomically(out, lambda tmp: (tmp / "weights").write_text("new"), overwrite=True)
    assert (out / "weights").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the old copy removed, nothing hidden left
    assert interrupted_message(exc.value)[0] == f"mrprune: interrupted by SIGINT; the output had been written " \
                                                f"completely to {out}"


def test_a_bf16_checkpoint_saved_wider_on_the_cpu_is_said(tiny_dir, tmp_path, caplog):
    """--dtype auto prunes in float32 on the CPU: a bf16 input then comes out twice its size, and the run says so
    (and how to keep bf16); with --dtype bfloat16 it stays bf16 and nothing is said."""
    model_dir = tiny_dir("llama")
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    model.save_pretrained(model_dir)
    with caplog.at_level("WARNING", logger="mrprune.api"):
        prune(config=job(model_dir, tmp_path / "wide", **{"runtime.device": "cpu"}), progress=False)
    said = [r.getMessage() for r in caplog.records if r.name == "mrprune.api"]
    assert said == [("the model's weights are bfloat16 but --dtype auto prunes and saves them in float32 here, 2x "
                     "the size; --dtype bfloat16 keeps them bfloat16")]
    assert json.loads((tmp_path / "wide" / "config.json").read_text())["dtype"] == "float32"
    caplog.clear()
    with caplog.at_level("WARNING", logger="mrprune.api"):
        prune(config=job(model_dir, tmp_path / "kept", **{"runtime.device": "cpu", "runtime.dtype": "bfloat16"}),
              progress=False)
    assert not [r for r in caplog.records if r.name == "mrprune.api"]
    assert json.loads((tmp_path / "kept" / "config.json").read_text())["dtype"] == "bfloat16"


def test_an_output_another_run_wrote_meanwhile_is_not_replaced_without_overwrite(tmp_path):
    """Two runs started with the same --output both pass the early check; the one that finishes second must not
    replace the first one's result (it was not given --overwrite): it keeps its own complete result beside it
    and says where, in one line."""
    from mrprune import export
    from mrprune.errors import OutputError

    out = tmp_path / "out"

    def other_run_finishes_first(tmp):
        (tmp / "weights").write_text("second")
        out.mkdir()
        (out / "weights").write_text("first")

    with pytest.raises(OutputError) as exc:
        export.write_dir_atomically(out, other_run_finishes_first, overwrite=False)
    kept = [p for p in tmp_path.iterdir() if p != out]
    assert len(kept) == 1 and kept[0].name.startswith("out.mrprune-") and (kept[0] / "weights").read_text() == "second"
    assert str(exc.value) == (f"output {out} was written by another run meanwhile; nothing was replaced, and this "
                              f"run's complete output is in {kept[0]}")
    assert (out / "weights").read_text() == "first"
    # with --overwrite the later run replaces it, as asked
    export.write_dir_atomically(out, lambda tmp: (tmp / "weights").write_text("third"), overwrite=True)
    assert (out / "weights").read_text() == "third"
