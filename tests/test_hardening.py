"""Failing early, clearly and cleanly: checks before the weights load, disk room, NaN/Inf, SparseGPT's recorded
retries, determinism, safe loading and the CLI's interruption handling."""

import hashlib
import json
import re
import signal

import pytest
import torch
import transformers

import mrprune.api
import mrprune.export
from mrprune import PruneConfig, prune
from mrprune.cli import interrupted_message, main
from mrprune.config import merge
from mrprune.errors import ConfigError, DataError, Interrupted, NumericsError, OutputError, PatternError, ResourceError
from mrprune.preflight import gib
from tests.conftest import tiny_model
from tests.test_cli import assert_one_line_error, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


def job(model_dir, **overrides):
    base = {"model": str(model_dir), "calibration.source": "embedded", "calibration.nsamples": 4,
            "calibration.seqlen": 32, "runtime.device": "cpu"}
    return merge(PruneConfig(), {**base, **overrides})


@pytest.fixture
def no_weights(monkeypatch):
    """Fail the test if the weights load: the error must come before."""

    def refuse(*args, **kwargs):
        raise AssertionError("the weights loaded before the bad input was found")

    monkeypatch.setattr(mrprune.api, "load_weights", refuse)


# ------------------------------------------------------------------------------------ 1. before the weights


@pytest.mark.parametrize("overrides,error,fragment", [
    ({"calibration.nsamples": 500, "calibration.seqlen": 512}, DataError, "too few for 500 x 512"),
    ({"evaluate": True, "evaluation.text": "EMPTY"}, DataError, "is empty"),
    ({"evaluate": True, "evaluation.text": "embedded", "evaluation.seqlen": 10**6}, DataError,
     "fewer than one window of 1000000"),
    ({"pattern": "3:7"}, PatternError, "needs in_features divisible by 7"),
    ({"allocation.method": "file", "allocation.ratios": "RATIOS"}, ConfigError, "has 2 block ratios but the model has 3"),
    ({"allocation.method": "mrp", "allocation.mrp.smax": 0.2}, ConfigError, "MRP s_max=0.2"),
    ({"output": "INPUT"}, OutputError, "inside the input model"),
])
def test_bad_inputs_fail_before_the_weights_load(tiny_dir, tmp_path, no_weights, overrides, error, fragment):
    model_dir = tiny_dir("llama")
    (tmp_path / "empty.txt").write_text("   \n")
    (tmp_path / "ratios.json").write_text("[0.5, 0.5]")
    values = {k: {"EMPTY": str(tmp_path / "empty.txt"), "RATIOS": str(tmp_path / "ratios.json"),
                  "INPUT": str(model_dir / "out")}.get(v, v) if isinstance(v, str) else v
              for k, v in overrides.items()}
    with pytest.raises(error, match=fragment):
        prune(config=job(model_dir, **values), progress=False)


def test_disk_room_for_the_export_is_checked_with_both_numbers(tiny_dir, tmp_path, monkeypatch, no_weights):
    model_dir = tiny_dir("llama")
    parameters = sum(p.numel() for p in tiny_model("llama").parameters())
    real = mrprune.export.shutil.disk_usage

    def full_disk(path):
        usage = real(path)
        return usage._replace(free=1000)

    monkeypatch.setattr(mrprune.export.shutil, "disk_usage", full_disk)
    with pytest.raises(ResourceError) as exc:
        prune(config=job(model_dir, output=str(tmp_path / "out")), progress=False)
    message = str(exc.value)
    needed = gib(int(parameters * 4 * 1.1))
    assert message.startswith(f"not enough free disk for the export at {tmp_path}: it needs about {needed} "
                              f"({parameters:,} parameters x 4 bytes + 10%) but 0 MiB is free")
    assert "\n" not in message


# --------------------------------------------------------------------------------------------- 3. numerics


def test_nan_weight_is_found_at_load(tokenizer):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[2].mlp.up_proj.weight[3, 5] = float("nan")
    with pytest.raises(NumericsError, match=r"weight model.layers.2.mlp.up_proj.weight \(block 2\)"):
        prune(model, job(None, model=None), tokenizer=tokenizer, progress=False)


def test_float16_overflow_stops_with_the_block_named(tokenizer):
    model = tiny_model("llama").to(torch.float16)
    with torch.no_grad():
        for proj in ("gate_proj", "up_proj"):
            getattr(model.model.layers[1].mlp, proj).weight.mul_(3000)
    with pytest.raises(NumericsError) as exc:
        prune(model, job(None, model=None), tokenizer=tokenizer, progress=False)
    message = str(exc.value)
    assert "block 1" in message and "float16 overflows?" in message and "\n" not in message


def test_non_finite_hessian_names_block_and_layer(tokenizer):
    model = tiny_model("llama")
    model.model.layers[1].mlp.act_fn.register_forward_hook(lambda m, args, out: out * float("inf"))
    with pytest.raises(NumericsError, match="non-finite Hessian in block 1, layer model.layers.1.mlp.down_proj: "
                                           "check the model's dtype"):
        prune(model, job(None, model=None, metric="sparsegpt"), tokenizer=tokenizer, progress=False)


def test_non_finite_activations_name_the_block(tokenizer):
    model = tiny_model("llama")
    model.model.layers[0].register_forward_hook(lambda m, args, out: (out[0] * float("nan"),) + tuple(out[1:])
                                                if isinstance(out, tuple) else out * float("nan"))
    with pytest.raises(NumericsError, match="non-finite activations after block 0"):
        prune(model, job(None, model=None), tokenizer=tokenizer, progress=False)


@pytest.mark.parametrize(("ids", "message"), [
    (torch.zeros((0, 16), dtype=torch.long), "at least one window of 2 tokens, got (0, 16)"),
    (torch.ones(16, dtype=torch.long), "n x seqlen tensor of token ids, got (16,)"),
    (torch.ones((2, 16)), "n x seqlen tensor of token ids, got (2, 16)"),  # float: not token ids
    ([[1, 2, 3]], "n x seqlen tensor of token ids, got list"),
    (torch.full((2, 16), 10**6), "token ids in [0, "),  # beyond the embedding: not 'the model is unsupported'
    (torch.full((2, 16), -1), "got values from -1 to -1"),
])
def test_calibration_ids_that_are_not_windows_of_token_ids_are_refused(tokenizer, ids, message):
    model = tiny_model("llama")
    before = {name: p.clone() for name, p in model.named_parameters()}
    with pytest.raises(ConfigError, match=re.escape(message)):
        prune(model, job(None, model=None), tokenizer=tokenizer, progress=False, calibration_ids=ids)
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_sparsegpt_dampening_retry_is_in_the_report(tiny_dir, tmp_path):
    """16 tokens for 64-wide inputs: a singular Hessian that the base dampening (0 -> 1e-8) cannot fix."""
    out = tmp_path / "out"
    outcome = prune(config=job(tiny_dir("llama"), metric="sparsegpt", output=str(out),
                               **{"calibration.nsamples": 1, "calibration.seqlen": 16, "sparsegpt.percdamp": 0.0}),
                    progress=False)
    noted = {layer["name"]: layer["notes"] for layer in json.loads((out / "mrprune_report.json").read_text())["layers"]
             if layer.get("notes")}
    assert noted, "no retry recorded"
    for notes in noted.values():  # one note per layer, even where layers share their Hessian
        assert len(notes) == 1 and notes[0].startswith("dampening raised to")
    assert "note       model.layers." in outcome.report.format_text()


# ------------------------------------------------------------------------------------------ 5. determinism


@pytest.mark.parametrize("metric", ["wanda", "sparsegpt"])
def test_same_seed_and_inputs_give_identical_weight_files(tiny_dir, tmp_path, metric):
    model_dir = tiny_dir("qwen2")
    digests = []
    for name in ("a", "b"):
        prune(config=job(model_dir, metric=metric, output=str(tmp_path / name), sparsity=0.6), progress=False)
        digests.append(hashlib.sha256((tmp_path / name / "model.safetensors").read_bytes()).hexdigest())
    assert digests[0] == digests[1]


# ----------------------------------------------------------------------------------------- 6. safe loading


def with_custom_code(model_dir, model_type):
    config = json.loads((model_dir / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                          "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    config["model_type"] = model_type
    (model_dir / "config.json").write_text(json.dumps(config))
    (model_dir / "modeling_evil.py").write_text("raise SystemExit('custom code ran')\n")
    return model_dir


def test_custom_code_is_refused_without_trust_remote_code(tiny_dir, capsys):
    model_dir = with_custom_code(tiny_dir("llama"), "evil")
    code, _, err = run_cli(capsys, "prune", "--model", model_dir, "--calib", "embedded", "--nsamples", 4,
                           "--seqlen", 32)
    assert_one_line_error(code, err, "needs its own Python code (custom code named by auto_map")
    assert "--trust-remote-code" in err
    code, _, err = run_cli(capsys, "info", model_dir)
    assert_one_line_error(code, err, "does not run unless you pass --trust-remote-code")


def test_built_in_class_is_used_and_remote_code_never_trusted(tiny_dir, monkeypatch):
    model_dir = with_custom_code(tiny_dir("llama"), "llama")
    seen = []
    original = transformers.AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    outcome = prune(config=job(model_dir), progress=False)
    assert seen == [False] and type(outcome.model).__name__ == "LlamaForCausalLM"


# ------------------------------------------------------------------------------------------ 4. the CLI side


def test_interruption_messages_and_exit_codes():
    message, code = interrupted_message(KeyboardInterrupt())
    assert code == 130 and message == "mrprune: interrupted by SIGINT; no output was written"
    exc = Interrupted(signal.SIGTERM, "SIGTERM")
    exc.checkpoint_dir = "/tmp/ck"
    message, code = interrupted_message(exc)
    assert code == 143 and message.startswith("mrprune: interrupted by SIGTERM; no output was written; progress is "
                                              "saved in /tmp/ck: rerun the same command with --resume")


def test_sigterm_unwinds_through_main(monkeypatch, capsys):
    import os

    import mrprune.cli

    def handler(args):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not interrupt")

    monkeypatch.setattr(mrprune.cli, "cmd_info", handler)
    previous = signal.getsignal(signal.SIGTERM)
    code = main(["info", "-q"])
    assert code == 143 and "interrupted by SIGTERM" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) == previous  # restored


def test_new_flags(tiny_dir, capsys, tmp_path):
    code, out, _ = run_cli(capsys, "prune", "--no-preflight", "--checkpoint-dir", tmp_path / "ck", "--resume",
                           "--remove-checkpoint", "--dump-config")
    assert code == 0 and "preflight: false" in out and "resume: true" in out and "remove_checkpoint: true" in out
    code, _, err = run_cli(capsys, "prune", "--resume", "--model", tiny_dir("llama"))
    assert_one_line_error(code, err, "--resume needs --checkpoint-dir")
    with pytest.raises(SystemExit):
        main(["analyze", "lps", "--checkpoint-dir", str(tmp_path)])
    assert "unrecognized arguments: --checkpoint-dir" in capsys.readouterr().err


def test_sigterm_during_the_export_leaves_nothing_behind(tiny_dir, tmp_path, monkeypatch, capsys):
    model_dir = tiny_dir("llama")

    def terminated(self, *args, **kwargs):
        raise Interrupted(signal.SIGTERM, "SIGTERM")

    monkeypatch.setattr(transformers.PreTrainedTokenizerFast, "save_pretrained", terminated)
    code, _, err = run_cli(capsys, "prune", "-q", "--model", model_dir, "--calib", "embedded", "--nsamples", 4,
                           "--seqlen", 32, "--output", tmp_path / "out")
    assert code == 143 and err.strip().splitlines()[-1] == "mrprune: interrupted by SIGTERM; no output was written"
    assert sorted(p.name for p in tmp_path.iterdir()) == [model_dir.name]


def test_analyses_refuse_checkpoint_options(tiny_dir):
    from mrprune.analyze.common import load_job

    config = job(tiny_dir("llama"), **{"runtime.checkpoint_dir": "ck"})
    with pytest.raises(ConfigError, match="apply to 'mrprune prune' only"):
        load_job(None, None, config)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_is_finite_finds_any_nan_or_inf_wherever_it_is(dtype, device):
    from mrprune.numerics import is_finite

    clean = torch.randn(3, 1000, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    assert is_finite(clean) and is_finite(clean[:, :0]) and is_finite(torch.arange(5))
    for position in (0, 1234, 2999):
        for bad in (float("nan"), float("inf"), -float("inf")):
            dirty = clean.clone()
            dirty.view(-1)[position] = bad
            assert not is_finite(dirty), (position, bad)
    assert not is_finite(torch.full((7,), float("nan"), dtype=dtype, device=device))


def test_is_finite_on_float8():
    from mrprune.numerics import is_finite

    clean = torch.randn(100).to(torch.float8_e5m2)
    assert is_finite(clean)
    for bad in (float("nan"), float("inf")):
        dirty = clean.clone()
        dirty[37] = bad
        assert not is_finite(dirty)


def test_python_api_slips_are_config_errors(tokenizer):
    model = tiny_model("llama")
    with pytest.raises(ConfigError, match="call prune\\(config=...\\)"):
        prune(PruneConfig())
    with pytest.raises(ConfigError, match="takes a tokenizer object"):
        prune(model, PruneConfig(), tokenizer="path/to/tokenizer")
    for kwargs, fragment in [({}, "needs its tokenizer"), ({"tokenizer": tokenizer, "seqlen": 0}, "seqlen must be"),
                             ({"tokenizer": tokenizer, "max_windows": 0}, "max_windows must be"),
                             ({"tokenizer": tokenizer, "bos": "Always"}, "unknown bos 'Always'")]:
        with pytest.raises(ConfigError, match=fragment):
            mrprune.api.evaluate_perplexity(model, text="embedded", **kwargs)
    for call, fragment in [
        (lambda: prune(model, {"sparsity": 0.5}, tokenizer=tokenizer), "config must be a PruneConfig, got dict"),
        (lambda: prune(5, PruneConfig(), tokenizer=tokenizer), "model must be a transformers model object, .* int"),
        (lambda: prune(model, PruneConfig(), tokenizer=5), "takes a tokenizer object .* got int"),
        (lambda: mrprune.api.evaluate_perplexity(5, tokenizer, text="embedded"), "got int"),
        (lambda: mrprune.api.evaluate_zeroshot(model, tokenizer, tasks="rte", limit=0), "limit must be"),
        (lambda: mrprune.api.evaluate_zeroshot(model, tokenizer, tasks="rte", num_fewshot=-1), "num_fewshot"),
        (lambda: mrprune.api.evaluate_zeroshot(model, tokenizer, tasks="rte", batch_size=0), "batch_size must"),
    ]:
        with pytest.raises(ConfigError, match=fragment):
            call()


def test_a_model_in_training_mode_is_pruned_and_measured_as_in_eval_mode_and_keeps_its_mode(tokenizer):
    """A model built with from_config starts in training mode: dropout would make calibration and perplexity
    random. Both run with dropout off; the caller's model keeps its own mode."""
    config = job(None, model=None, metric="sparsegpt")
    reference = tiny_model("gpt2").eval()  # GPT-2's dropouts are 0.1
    prune(reference, config, tokenizer=tokenizer, progress=False)
    training = tiny_model("gpt2").train()
    prune(training, config, tokenizer=tokenizer, progress=False)
    assert training.training and all(m.training for m in training.modules())
    assert all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(), training.state_dict().values()))
    measured = [mrprune.api.evaluate_perplexity(m, tokenizer, text="embedded", seqlen=32, max_windows=2,
                                                progress=False).perplexity for m in (reference, training, training)]
    assert measured[0] == measured[1] == measured[2] and training.training


def test_a_tokenizer_given_with_a_model_path_is_the_one_used(tiny_dir, monkeypatch):
    class Marked:
        def __call__(self, *args, **kwargs):
            raise RuntimeError("the given tokenizer was used")

        encode = __call__

    config = merge(PruneConfig(), {"calibration.source": "embedded", "calibration.nsamples": 2,
                                   "calibration.seqlen": 16})
    with pytest.raises(RuntimeError, match="the given tokenizer was used"):
        prune(str(tiny_dir("llama")), config, tokenizer=Marked(), progress=False)
    with pytest.raises(RuntimeError, match="the given tokenizer was used"):
        mrprune.api.evaluate_perplexity(str(tiny_dir("llama")), Marked(), text="embedded")
    without_tokenizer = tiny_dir("llama")  # a tokenizer given makes the model's own unnecessary: it is not read
    for path in without_tokenizer.glob("tokenizer*"):
        path.unlink()
    marked, seen = Marked(), []
    monkeypatch.setattr(mrprune.api.zs, "evaluate_zeroshot", lambda model, tok, *args, **kwargs: seen.append(tok))
    mrprune.api.evaluate_zeroshot(str(without_tokenizer), marked, tasks=mrprune.api.zs.ZeroShotTasks([], None, None))
    assert seen == [marked]
    from mrprune.analyze.common import load_job

    with pytest.raises(RuntimeError, match="the given tokenizer was used"):  # the analyses take it the same way
        load_job(str(without_tokenizer), Marked(), config).tokenizer("text")


def test_a_layer_already_sparser_than_its_share_is_named_when_the_target_is_missed(tokenizer, caplog):
    model = tiny_model("llama")
    down = model.model.layers[0].mlp.down_proj.weight
    with torch.no_grad():
        down[torch.rand(down.shape, generator=torch.Generator().manual_seed(0)) < 0.8] = 0
    before = int((down == 0).sum())
    with caplog.at_level("WARNING", logger="mrprune"):
        outcome = prune(model, job(None, model=None), tokenizer=tokenizer, progress=False)
    assert not outcome.report.sparsity["target_met"] and outcome.report.sparsity["achieved"] > 0.5
    assert int((down == 0).sum()) == before  # masks only add zeros: it keeps its own
    warning = [r.getMessage() for r in caplog.records if "misses the target" in r.getMessage()]
    assert len(warning) == 1 and "model.layers.0.mlp.down_proj" in warning[0] and "share 50.0%" in warning[0]
