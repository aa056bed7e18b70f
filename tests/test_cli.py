import json
import subprocess
import sys

import pytest

from mrprune.cli import main


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, fragment):
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("mrprune")]
    assert len(lines) == 1 and fragment in lines[0], err
    assert "Traceback" not in err


def tiny_prune_args(model_dir, *extra):
    return ("prune", "-q", "--model", model_dir, "--calib", "embedded", "--nsamples", 4, "--seqlen", 32, *extra)


def test_prune_eval_info_end_to_end(tiny_dir, tmp_path, capsys):
    model_dir = tiny_dir("qwen2")
    out = tmp_path / "out"
    code, stdout, _ = run_cli(capsys, *tiny_prune_args(model_dir, "--metric", "sparsegpt", "--pattern", "2:4",
                                                         "--eval", "--eval-text", "embedded", "--eval-seqlen", 64,
                                                         "--max-windows", 2, "--output", out))
    assert code == 0
    assert "global sparsity 0.500000" in stdout and "perplexity after" in stdout and "met" in stdout
    assert "2 non-overlapping windows of 64 tokens" in stdout

    code, stdout, _ = run_cli(capsys, "eval", "-q", out, "--text", "embedded", "--seqlen", 64, "--max-windows", 2,
                              "--json")
    result = json.loads(stdout)["perplexity"]
    report = json.loads((out / "mrprune_report.json").read_text())
    assert code == 0 and result["perplexity"] == pytest.approx(report["perplexity"]["after"]["perplexity"], rel=1e-5)

    code, stdout, _ = run_cli(capsys, "info", "-q", out, "--json")
    info = json.loads(stdout)
    assert code == 0 and info["family"] == "qwen2" and info["num_blocks"] == 3
    assert info["layers"][0]["path"] == "model.layers.0.self_attn.q_proj"  # as a ratios file's 'layers' names it
    assert info["global_sparsity"] == 0.5 and all(b == 0.5 for b in info["blocks"])


def test_config_file_sets_options_and_flags_win(tiny_dir, tmp_path, capsys):
    model_dir = tiny_dir("llama")
    config = tmp_path / "job.yaml"
    config.write_text(f"model: {model_dir}\nmetric: magnitude\nsparsity: 0.3\ncalibration:\n  nsamples: 4\n")
    code, stdout, _ = run_cli(capsys, "prune", "--config", config, "--sparsity", 0.6, "--dump-config")
    assert code == 0 and "metric: magnitude" in stdout and "sparsity: 0.6" in stdout and "nsamples: 4" in stdout
    code, stdout, _ = run_cli(capsys, "prune", "-q", "--config", config)
    assert code == 0 and "global sparsity 0.3000" in stdout and "off by +0.4 weights" in stdout
    assert "pruning    magnitude" in stdout


def test_eval_reads_its_protocol_from_a_config_file_and_flags_win(tiny_dir, tmp_path, capsys):
    model_dir = tiny_dir("llama")
    config = tmp_path / "job.yaml"
    config.write_text("evaluation:\n  text: embedded\n  seqlen: 48\n  max_windows: 2\n  bos: never\n"
                      "  limit: 5\nruntime:\n  dtype: float32\n")
    code, stdout, _ = run_cli(capsys, "eval", "-q", model_dir, "--config", config, "--json")
    from_file = json.loads(stdout)["perplexity"]
    assert code == 0 and (from_file["windows"], from_file["seqlen"], from_file["bos_per_window"]) == (2, 48, False)
    # a zero-shot setting in the file is no mistake of this perplexity run (a typed --limit would be)
    code, stdout, _ = run_cli(capsys, "eval", "-q", model_dir, "--config", config, "--seqlen", 32, "--json")
    typed = json.loads(stdout)["perplexity"]
    assert code == 0 and (typed["windows"], typed["seqlen"]) == (2, 32)
    code, _, err = run_cli(capsys, "eval", "-q", model_dir, "--tasks", "rte", "--max-windows", 2)
    assert_one_line_error(code, err, "which 'eval --tasks' measures only with --text")
    code, _, err = run_cli(capsys, "eval", "-q", model_dir, "--config", tmp_path / "missing.yaml")
    assert code == 2 and "missing.yaml" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("args,fragment", [
    (("--sparsity", 1.5), "sparsity must be in [0, 1)"),
    (("--pattern", "3:7"), "needs in_features divisible by 7"),
    (("--pattern", "4:2"), "needs 0 < N < M"),
    (("--nsamples", 500, "--seqlen", 512), "too few for 500 x 512"),
    (("--calib", "no_such_file.txt"), "does not exist"),
    (("--allocation", "file", "--ratios", "missing.json"), "cannot read missing.json"),
    (("--nsamples", 0), "nsamples must be a positive integer"),
    (("--output", ""), "output is empty: give a path"),
    (("--checkpoint-dir", " "), "runtime.checkpoint_dir is empty"),
])
def test_bad_prune_inputs_give_one_line_errors(tiny_dir, capsys, args, fragment):
    code, _, err = run_cli(capsys, *tiny_prune_args(tiny_dir("llama"), *args))
    assert_one_line_error(code, err, fragment)


def test_bad_models_give_one_line_errors(tmp_path, capsys):
    import transformers

    code, _, err = run_cli(capsys, "prune", "--model", tmp_path / "nowhere")
    assert_one_line_error(code, err, "does not exist")
    code, _, err = run_cli(capsys, "prune", "--model", "some-org/some-model")
    assert_one_line_error(code, err, "hub is unreachable")
    bert = tmp_path / "bert"
    transformers.BertForMaskedLM(transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                         intermediate_size=32, vocab_size=50)).save_pretrained(bert)
    code, _, err = run_cli(capsys, "info", bert)
    assert_one_line_error(code, err, "not a decoder-only causal LM")
    fake = tmp_path / "broken.gguf"
    fake.write_bytes(b"not a gguf at all")
    code, _, err = run_cli(capsys, "eval", fake)
    assert_one_line_error(code, err, "cannot read GGUF file")
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_cli(capsys, "eval", empty)
    assert_one_line_error(code, err, "no config.json")


@pytest.mark.parametrize("flags,fragment", [
    (("--ratios", "r.json"), "--ratios is read only with --allocation file"),
    (("--allocation", "uniform", "--owl-m", "3"), "--owl-m is read only with --allocation owl"),
    (("--allocation", "owl", "--mrp-m", "5"), "--mrp-m is read only with --allocation mrp or mrp-fast"),
    (("--allocation", "owl", "--mrp-step", "0.1"), "--mrp-step is read only with --allocation mrp, not owl"),
    # fast MRP has no step schedule, the exact loop no pilot and no nested first leg
    (("--allocation", "mrp-fast", "--mrp-step", "0.2"), "--mrp-step is read only with --allocation mrp, not"),
    (("--allocation", "mrp-fast", "--mrp-gamma", "0.5"), "--mrp-gamma is read only with --allocation mrp,"),
    (("--allocation", "mrp-fast", "--mrp-min-step", "0.1"), "--mrp-min-step is read only with --allocation mrp,"),
    (("--allocation", "mrp-fast", "--mrp-checkpoint-stride", "3"), "--mrp-checkpoint-stride is read only with"),
    (("--allocation", "mrp", "--mrp-pilot", "dense"), "--mrp-pilot is read only with --allocation mrp-fast, not"),
    (("--allocation", "mrp", "--mrp-masks", "one-shot"), "--mrp-masks is read only with --allocation mrp-fast,"),
    (("--allocation", "mrp", "--mrp-drift", "global"), "--mrp-drift is read only with --allocation mrp-fast,"),
    (("--allocation", "auto", "--mrp-step", "0.1"), "not auto with candidates uniform,owl,alphapruning,mrp-fast"),
    (("--allocation", "mrp", "--mrp-min-step", "0.1"), "min_step 0.1, step 0.05, gamma 0.95 (--mrp-min-step"),
    (("--allocation", "mrp-fast", "--sparsity", "0.97"), "MRP s_max=0.95 must lie in [target 0.97, 1) (--mrp-smax)"),
    (("--max-windows", "1"), "--max-windows sets the perplexity evaluation"),
])
def test_flags_the_job_would_not_read_are_refused(tiny_dir, tmp_path, capsys, flags, fragment):
    code, _, err = run_cli(capsys, *tiny_prune_args(tiny_dir("llama"), *flags, "--output", tmp_path / "out"))
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "out").exists()


def test_windows_past_a_learned_position_table_are_refused(tiny_dir, capsys):
    gpt2 = tiny_dir("gpt2")  # n_positions 128
    code, _, err = run_cli(capsys, "prune", "-q", "--model", gpt2, "--calib", "embedded", "--nsamples", 2,
                           "--seqlen", 256)
    assert_one_line_error(code, err, "calibration window (--seqlen) of 256 tokens is longer than the model's context")
    code, _, err = run_cli(capsys, "eval", "-q", gpt2, "--text", "embedded", "--seqlen", 256, "--max-windows", 1)
    assert_one_line_error(code, err, "evaluation window")
    code, stdout, _ = run_cli(capsys, "eval", "-q", tiny_dir("llama"), "--text", "embedded", "--seqlen", 256,
                              "--max-windows", 1)  # rotary positions: runs (with a warning, below)
    assert code == 0 and "perplexity" in stdout


def test_rotary_models_past_their_context_get_a_warning():
    import logging

    from mrprune.models.adapter import check_context, context_limit
    from tests.conftest import tiny_model

    seen = []
    handler = logging.Handler()
    handler.emit = seen.append
    logger = logging.getLogger("mrprune.models.adapter")
    logger.addHandler(handler)
    try:
        phi3 = tiny_model("phi3")
        assert context_limit(phi3) == (128, False)
        assert context_limit(tiny_model("gpt2")) == context_limit(tiny_model("opt")) == (128, True)
        check_context(phi3, 128, "a window")
        assert seen == []
        check_context(phi3, 256, "a window")
    finally:
        logger.removeHandler(handler)
    assert len(seen) == 1 and "beyond the model's context of 128" in seen[0].getMessage()


def test_corrupt_weights_and_missing_tokenizer_are_one_line_errors(tiny_dir, tmp_path, capsys):
    import shutil

    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_dir("llama"), truncated)
    weights = next(truncated.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    code, _, err = run_cli(capsys, "info", truncated)
    assert_one_line_error(code, err, "cannot load model")
    no_tokenizer = tmp_path / "no_tokenizer"
    shutil.copytree(tiny_dir("llama"), no_tokenizer)
    for path in no_tokenizer.glob("tokenizer*"):
        path.unlink()
    code, _, err = run_cli(capsys, "eval", no_tokenizer)
    assert_one_line_error(code, err, "has no tokenizer files (tokenizer.json, tokenizer_config.json")
    (no_tokenizer / "tokenizer_config.json").write_text("{}")  # files that name no usable tokenizer
    code, _, err = run_cli(capsys, "eval", no_tokenizer)
    assert_one_line_error(code, err, "cannot load the tokenizer")
    assert not err.rstrip().endswith(":")  # the reason, not a dangling "from one of:"
    code, out, _ = run_cli(capsys, "info", "-q", no_tokenizer)  # describing a model needs no tokenizer
    assert code == 0 and "num_blocks" in out


@pytest.mark.parametrize("change, fragment", [
    ({"num_hidden_layers": 4}, "weight(s) it declares are not in the checkpoint (e.g. model.layers.3."),
    ({"num_hidden_layers": 2}, "modules it does not declare (e.g. model.layers.2."),
    ({"intermediate_size": 96}, ("have other shapes than it declares (e.g. model.layers.0.mlp.down_proj.weight: "
                                 "(64, 128) in the checkpoint, (64, 96) declared)")),
])
def test_a_config_that_does_not_match_the_weights_is_refused(tiny_dir, tmp_path, capsys, change, fragment):
    """A block more in config.json would be random weights, pruned and saved; a block less would be dropped."""
    import shutil

    edited = tmp_path / "edited"
    shutil.copytree(tiny_dir("llama"), edited)
    config = json.loads((edited / "config.json").read_text())
    (edited / "config.json").write_text(json.dumps({**config, **change}))
    result = subprocess.run([sys.executable, "-m", "mrprune", *map(str, tiny_prune_args(edited, "--output",
                                                                                       tmp_path / "out"))],
                            capture_output=True, text=True, check=False)  # what the terminal shows, all of it
    assert_one_line_error(result.returncode, result.stderr, fragment)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr  # no load report of transformers before it
    assert not (tmp_path / "out").exists()


def pickle_only(model_dir):
    """Replace the safetensors weights of ``model_dir`` by a pickle checkpoint."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    for path in model_dir.glob("*.safetensors"):
        path.unlink()
    torch.save(model.state_dict(), model_dir / "pytorch_model.bin")
    return model_dir


def test_pickle_weights_need_explicit_permission(tiny_dir, capsys):
    model_dir = pickle_only(tiny_dir("llama"))
    code, _, err = run_cli(capsys, "info", model_dir)
    assert_one_line_error(code, err, "--allow-pickle")
    code, stdout, _ = run_cli(capsys, "info", "-q", model_dir, "--allow-pickle", "--json")
    assert code == 0 and json.loads(stdout)["num_blocks"] == 3


def test_existing_output_and_unknown_config_key(tiny_dir, tmp_path, capsys):
    model_dir = tiny_dir("llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    code, _, err = run_cli(capsys, *tiny_prune_args(model_dir, "--output", out))
    assert_one_line_error(code, err, "pass --overwrite")
    assert (out / "keep.txt").exists()
    config = tmp_path / "c.yaml"
    config.write_text("sparsty: 0.5\n")
    code, _, err = run_cli(capsys, "prune", "--config", config)
    assert_one_line_error(code, err, "did you mean 'sparsity'")


def test_usage_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["prune", "--metric", "random"])
    _, err = capsys.readouterr()
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1 and "invalid choice" in err
    with pytest.raises(SystemExit) as exc:
        main(["prune", "-q", "-v"])
    _, err = capsys.readouterr()
    assert exc.value.code == 2 and "-v/--verbose: not allowed with argument -q/--quiet" in err
    for argv, prog in [(["prune", "--bogus"], "mrprune prune"), (["eval", "x", "--bogus", "1"], "mrprune eval"),
                       (["analyze", "lps", "--bogus"], "mrprune analyze lps")]:
        with pytest.raises(SystemExit) as exc:
            main(argv)
        _, err = capsys.readouterr()
        assert exc.value.code == 2 and err.startswith(f"{prog}: error: unrecognized arguments: --bogus")


def test_console_script_exit_code(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mrprune", "eval", str(tmp_path / "missing")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("mrprune: error:")



def test_a_closed_stdout_pipe_ends_quietly(tiny_dir):
    """`mrprune info M | head -1`: the reader is gone before the output is; no traceback, the SIGPIPE status."""
    import os

    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader already left: every write fails
    try:
        result = subprocess.run([sys.executable, "-m", "mrprune", "info", str(tiny_dir("llama"))], stdout=write_end,
                                stderr=subprocess.PIPE, text=True, check=False)
    finally:
        os.close(write_end)
    assert result.returncode == 141, result.stderr
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, result.stderr


def test_ctrl_c_while_the_command_line_loads_is_one_line(monkeypatch, capsys):
    """mrprune.cli imports torch and transformers (seconds): an interrupt then is no traceback either."""
    from mrprune import entry

    class Interrupting:
        def find_spec(self, name, path=None, target=None):
            if name == "mrprune.cli":
                raise KeyboardInterrupt
            return None

    monkeypatch.delitem(sys.modules, "mrprune.cli", raising=False)
    monkeypatch.setattr(sys, "meta_path", [Interrupting(), *sys.meta_path])
    assert entry.run() == 130
    assert capsys.readouterr().err == "mrprune: interrupted by SIGINT while starting; no output was written\n"
