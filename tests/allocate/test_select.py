"""--allocation auto: held-out windows disjoint from calibration, the choice, and that the result is the chosen
allocation's own run."""

import math
from types import SimpleNamespace

import pytest
import torch

import mrprune
from mrprune import CalibrationConfig, PruneConfig
from mrprune.allocate.select import choose
from mrprune.card import model_card
from mrprune.config import AllocationConfig, AutoConfig, RuntimeConfig
from mrprune.data import Corpus, read_corpus, sample_calibration, sample_with_heldout
from mrprune.errors import ConfigError, DataError
from mrprune.evaluate.perplexity import windows_perplexity, with_bos
from tests.conftest import tiny_model
from tests.test_cli import assert_one_line_error, run_cli, tiny_prune_args


class NumberTokenizer:
    """Text of space-separated integers -> those integers: token ids that say where they came from."""

    def __call__(self, text):
        if isinstance(text, list):
            return SimpleNamespace(input_ids=[self(t).input_ids for t in text])
        return SimpleNamespace(input_ids=[int(t) for t in text.split()])


def numbers(start, count):
    return " ".join(str(start + i) for i in range(count))


def test_heldout_windows_of_a_text_touch_no_calibration_window():
    seqlen = 16
    corpus = Corpus("numbers", text=numbers(0, 4000))
    calib, held = sample_with_heldout(corpus, NumberTokenizer(), 40, seqlen, 3, heldout=20)
    assert torch.equal(calib, sample_calibration(corpus, NumberTokenizer(), 40, seqlen, 3))  # the same calibration
    starts = calib[:, 0].tolist()
    assert held.shape == (20, seqlen)
    for window in held.tolist():
        assert window == list(range(window[0], window[0] + seqlen)) and window[0] % seqlen == 0
        assert all(abs(window[0] - s) >= seqlen for s in starts)  # shares no token with any calibration window
    again = sample_with_heldout(corpus, NumberTokenizer(), 40, seqlen, 3, heldout=20)[1]
    assert torch.equal(held, again)
    assert not torch.equal(held, sample_with_heldout(corpus, NumberTokenizer(), 40, seqlen, 4, heldout=20)[1])


def test_heldout_windows_of_documents_come_from_documents_calibration_did_not_use():
    seqlen = 8
    documents = [numbers(1000 * d, 30 if d % 3 else 5) for d in range(60)]  # every third too short
    corpus = Corpus("docs", documents=documents)
    calib, held = sample_with_heldout(corpus, NumberTokenizer(), 10, seqlen, 0, heldout=12)
    used = {int(t) // 1000 for t in calib[:, 0]}
    got = [int(t) // 1000 for t in held[:, 0]]
    assert len(set(got)) == 12 and not used.intersection(got)
    assert all(d % 3 for d in got)  # only documents longer than seqlen
    for window in held.tolist():
        assert window == list(range(window[0], window[0] + seqlen))


def test_too_little_text_left_for_the_heldout_windows_is_a_data_error():
    corpus = Corpus("numbers", text=numbers(0, 400))
    with pytest.raises(DataError, match="fewer than the 30 held-out windows"):
        sample_with_heldout(corpus, NumberTokenizer(), 10, 16, 0, heldout=30)
    docs = Corpus("docs", documents=[numbers(1000 * d, 30) for d in range(6)])
    with pytest.raises(DataError, match="documents longer than seqlen 8 that calibration did not use"):
        sample_with_heldout(docs, NumberTokenizer(), 4, 8, 0, heldout=5)


def test_choose_keeps_the_lowest_finite_perplexity_and_always_restores():
    events = []
    scores = {"a": 5.0, "b": float("nan"), "c": 3.0, "d": 3.0}
    current = {}

    def prune_with(name):
        current["name"] = name
        events.append(f"prune {name}")
        return 0.5

    def restore():
        events.append("restore")

    selection = choose(list(scores), prune_with, lambda: scores[current["name"]], restore, "p")
    assert selection.chosen == "c"  # nan never wins; ties go to the earlier candidate
    assert events == [e for name in scores for e in (f"prune {name}", "restore")]
    assert [c.allocation for c in selection.candidates] == list(scores)

    def failing(name):
        raise RuntimeError("out of memory")

    events.clear()
    with pytest.raises(RuntimeError):
        choose(["a"], failing, lambda: 1.0, restore, "p")
    assert events == ["restore"]  # the dense weights come back even when a candidate fails


def auto_config(candidates="uniform,owl", **runtime):
    return PruneConfig(metric="wanda", sparsity=0.6,
                       allocation=AllocationConfig(method="auto", auto=AutoConfig(candidates=candidates, windows=4)),
                       calibration=CalibrationConfig(source="embedded", nsamples=8, seqlen=64),
                       runtime=RuntimeConfig(**runtime))


def linear_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("proj.weight")}


def test_auto_prunes_with_the_candidate_of_lowest_heldout_perplexity(tokenizer, one_thread):
    model = tiny_model("llama", seed=1)
    dense = linear_weights(model)
    outcome = mrprune.prune(model, auto_config("uniform,owl,mrp-fast"), tokenizer=tokenizer, progress=False)
    selection = outcome.report.extra["allocation_selection"]
    scores = {c["allocation"]: c["heldout_perplexity"] for c in selection["candidates"]}
    assert list(scores) == ["uniform", "owl", "mrp-fast"] and all(math.isfinite(v) for v in scores.values())
    assert selection["chosen"] == min(scores, key=scores.get)
    assert len(set(scores.values())) == 3  # the candidates did prune differently
    assert outcome.report.allocation["method"] == selection["chosen"]
    assert "chosen     " + selection["chosen"] in outcome.report.format_text()
    assert f"{selection['chosen']}, chosen by `--allocation auto`" in model_card(outcome.report.to_dict())

    # the result is the chosen allocation's own run: the same weights as pruning a copy with it directly
    direct = tiny_model("llama", seed=1)
    assert all(torch.equal(p, dense[n]) for n, p in linear_weights(direct).items())
    config = auto_config()
    config.allocation.method = selection["chosen"]
    mrprune.prune(direct, config, tokenizer=tokenizer, progress=False)
    pruned, expected = linear_weights(model), linear_weights(direct)
    assert all(torch.equal(pruned[n], expected[n]) for n in pruned)

    # and measured on the same held-out windows it has the chosen candidate's perplexity
    corpus = read_corpus("embedded", "calibration")
    held = sample_with_heldout(corpus, tokenizer, 8, 64, 0, heldout=4)[1]
    windows, bos = with_bos(held, tokenizer, "auto", "llama")
    value = windows_perplexity(model, windows, bos, corpus.name, next(model.parameters()).device, False).perplexity
    assert value == pytest.approx(scores[selection["chosen"]], rel=1e-6)


@pytest.mark.parametrize("placement", ["offload", "offload_dir"])
def test_auto_offloaded_gives_the_same_model_and_choice(tokenizer, one_thread, tmp_path, device, placement):
    """Offloaded blocks (and, with --offload-dir, blocks and the dense copy in scratch files) are restored
    between candidates exactly as resident ones."""
    plain = tiny_model("qwen2", seed=2)
    moved = tiny_model("qwen2", seed=2)
    settings = {"offload": True} if placement == "offload" else {"offload_dir": str(tmp_path / "scratch")}
    first = mrprune.prune(plain, auto_config(device=str(device)), tokenizer=tokenizer, progress=False)
    second = mrprune.prune(moved, auto_config(device=str(device), **settings), tokenizer=tokenizer,
                           progress=False)
    a, b = first.report.extra["allocation_selection"], second.report.extra["allocation_selection"]
    assert a["chosen"] == b["chosen"]
    for x, y in zip(a["candidates"], b["candidates"]):
        assert x["heldout_perplexity"] == pytest.approx(y["heldout_perplexity"], rel=1e-4)
    a, b = linear_weights(plain), linear_weights(moved)
    assert all(torch.equal(a[n].cpu(), b[n].cpu()) for n in a)


@pytest.mark.parametrize("change, fragment", [
    ({"candidates": "uniform,owll"}, "unknown allocation.auto.candidates entry 'owll'"),
    ({"candidates": "uniform,auto"}, "unknown allocation.auto.candidates entry 'auto'"),
    ({"candidates": "owl"}, "at least two different allocations"),
    ({"candidates": "owl,owl"}, "at least two different allocations"),
    ({"candidates": "owl,,uniform"}, "needs comma-separated allocations"),
    ({"windows": 0}, "allocation.auto.windows must be a positive integer"),
    ({"candidates": "uniform,file"}, "allocation 'file' needs --ratios"),
])
def test_bad_auto_settings_are_config_errors(change, fragment):
    config = auto_config()
    for key, value in change.items():
        setattr(config.allocation.auto, key, value)
    with pytest.raises(ConfigError, match=fragment):
        config.validate()


def test_auto_refuses_nm_patterns_and_given_calibration_ids(tokenizer):
    config = auto_config()
    config.pattern, config.sparsity = "2:4", None
    with pytest.raises(ConfigError, match="allocation 'auto' cannot be combined with pattern 2:4"):
        config.validate()
    model = tiny_model("llama")
    before = linear_weights(model)
    with pytest.raises(ConfigError, match="give config.calibration instead of calibration_ids"):
        mrprune.prune(model, auto_config(), tokenizer=tokenizer, calibration_ids=torch.zeros(2, 16, dtype=torch.long))
    assert all(torch.equal(p, before[n]) for n, p in linear_weights(model).items())


def test_cli_auto_prints_the_choice_and_checks_its_flags(tiny_dir, capsys):
    model_dir = tiny_dir("llama")
    code, out, _ = run_cli(capsys, *tiny_prune_args(model_dir, "--sparsity", 0.5, "--allocation", "auto",
                                                    "--auto-candidates", "uniform,alphapruning", "--auto-windows", 2,
                                                    "--alpha-eps", 0.2))
    assert code == 0 and "chosen     " in out and "by held-out perplexity: uniform" in out
    assert "2 windows of 32 tokens" in out
    code, _, err = run_cli(capsys, *tiny_prune_args(model_dir, "--auto-windows", 2))
    assert_one_line_error(code, err, "--auto-windows is read only with --allocation auto")
    code, _, err = run_cli(capsys, *tiny_prune_args(model_dir, "--allocation", "auto", "--auto-candidates",
                                                    "uniform,owl", "--mrp-m", 5))
    assert_one_line_error(code, err, "not auto with candidates uniform,owl")
    code, _, err = run_cli(capsys, *tiny_prune_args(model_dir, "--allocation", "auto", "--auto-windows", 10**6))
    assert_one_line_error(code, err, "held-out windows --allocation auto needs")
