"""Zero-shot evaluation through lm-evaluation-harness: local task configs, the HellaSwag converter, errors, CLI."""

import bz2
import importlib.util
import json
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from mrprune.errors import EvalError
from mrprune.evaluate import zeroshot as zs
from mrprune.hub import hub_reachable
from tests.conftest import need_files
from tests.test_cli import assert_one_line_error, run_cli, tiny_prune_args

HAS_LM_EVAL = importlib.util.find_spec("lm_eval") is not None
needs_lm_eval = pytest.mark.skipif(not HAS_LM_EVAL, reason="lm_eval is not installed (pip install 'mrprune[eval]')")

# the first three items of the hub's HellaSwag validation split (rowanz/hellaswag, hellaswag_val.jsonl), as the
# hub stores them: lm-eval's prompts for these are the reference for the converted text file
HUB_HELLASWAG = [
    {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
     "ctx": "A man is sitting on a roof. he", "label": "3",
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.", "is holding a rubik's cube.",
                 "starts pulling up roofing on a roof."]},
    {"ind": 92, "activity_label": "Clean and jerk",
     "ctx_a": "A lady walks to a barbell. She bends down and grabs the pole.", "ctx_b": "the lady",
     "ctx": "A lady walks to a barbell. She bends down and grabs the pole. the lady", "label": "3",
     "endings": ["swings and lands in her arms.", "pulls the barbell forward.", "pulls a rope attached to the barbell.",
                 "stands and lifts the weight over her head."]},
    {"ind": 106, "activity_label": "Canoeing",
     "ctx_a": "Two women in a child are shown in a canoe while a man pulls the canoe while standing in the water, "
              "with other individuals visible in the background.",
     "ctx_b": "the child and a different man",
     "ctx": "Two women in a child are shown in a canoe while a man pulls the canoe while standing in the water, "
            "with other individuals visible in the background. the child and a different man", "label": "2",
     "endings": ["are then shown paddling down a river in a boat while a woman talks.",
                 "are driving the canoe, they go down the river flowing side to side.",
                 "sit in a canoe while the man paddles.",
                 "walking go down the rapids, while the man in his helicopter almost falls and goes out of canoehood."]},
]


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Converted data and generated task configs go to a per-test cache; hub reachability is re-read."""
    monkeypatch.setenv("MRPRUNE_CACHE_DIR", str(tmp_path / "cache"))
    hub_reachable.cache_clear()
    yield
    hub_reachable.cache_clear()


def standard_yaml(*parts: str) -> dict:
    """One of lm-eval's own task configs, with ``!function`` references kept as text."""
    import lm_eval

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: f"!function {loader.construct_scalar(node)}")
    return yaml.load(Path(lm_eval.__file__).parent.joinpath("tasks", *parts).read_text(), Loader=Loader)


def local_yaml(task_dir: Path, name: str) -> dict:
    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: f"!function {loader.construct_scalar(node)}")
    return yaml.load((task_dir / f"{name}.yaml").read_text(), Loader=Loader)


def load_task(task_dir: Path, name: str):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(task_dir), include_defaults=False).load([name])["tasks"][name]


def small_hellaswag(shared_data: Path, folder: Path, items: int = 12) -> Path:
    """The first ``items`` items of the real HellaSwag text file, in a task-data folder of their own."""
    with bz2.open(shared_data / "hellaswag_val_full.txt.bz2", "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    folder.mkdir(parents=True, exist_ok=True)
    with bz2.open(folder / "hellaswag_val_full.txt.bz2", "wt", encoding="utf-8") as handle:
        handle.write("\n".join(lines[: 6 * items]) + "\n")
    return folder


# --------------------------------------------------------------------------------------------- configs


@needs_lm_eval
def test_rte_config_is_lm_evals_rte_on_the_local_parquet(shared_data):
    plans, task_dir = zs.write_task_dir(zs.plan_tasks("rte", shared_data))
    assert [(p.name, p.lm_eval_task) for p in plans] == [("rte", "rte_local")]
    mine, standard = local_yaml(task_dir, "rte_local"), standard_yaml("glue", "rte", "default.yaml")
    for key in ("output_type", "doc_to_text", "doc_to_target", "doc_to_choice", "metric_list", "validation_split"):
        assert mine[key] == standard[key], key
    assert mine["dataset_path"] == "parquet"
    assert mine["dataset_kwargs"]["data_files"]["validation"] == str((shared_data / "rte_validation.parquet").resolve())

    task = load_task(task_dir, "rte_local")
    docs = list(task.validation_docs())
    rows = pq.read_table(shared_data / "rte_validation.parquet").to_pylist()
    assert len(docs) == len(rows) == 277
    assert set(docs[0]) >= {"sentence1", "sentence2", "label", "idx"}
    from lm_eval.utils import apply_template

    doc = docs[5]
    prompt = task.doc_to_text(doc)
    assert prompt == apply_template(standard["doc_to_text"], rows[5])
    assert prompt == f"{rows[5]['sentence1']}\nQuestion: {rows[5]['sentence2']} True or False?\nAnswer:"
    assert task.doc_to_choice(doc) == ["True", "False"] and task.doc_to_target(doc) == rows[5]["label"]


def test_hellaswag_converter_on_the_real_file(shared_data):
    need_files(shared_data, "hellaswag_val_full.txt.bz2")
    items = zs.read_hellaswag_text(shared_data / "hellaswag_val_full.txt.bz2")
    assert len(items) == 10042
    assert all(set(i) == {"ind", "activity_label", "ctx_a", "ctx_b", "ctx", "endings", "label"} for i in items)
    assert all(len(i["endings"]) == 4 and i["label"] in "0123" for i in items)
    for mine, hub in zip(items, HUB_HELLASWAG):
        assert {k: mine[k] for k in ("activity_label", "ctx_a", "ctx_b", "ctx", "endings", "label")} == \
               {k: hub[k] for k in ("activity_label", "ctx_a", "ctx_b", "ctx", "endings", "label")}
    wikihow = [i for i in items if i["ctx"].startswith("How to ")]
    assert wikihow and all(i["ctx_b"] == "" for i in wikihow)
    assert all(i["ctx_a"] + (" " + i["ctx_b"] if i["ctx_b"] else "") == i["ctx"] for i in items)

    path = zs.hellaswag_jsonl(shared_data / "hellaswag_val_full.txt.bz2")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert rows == items
    assert zs.hellaswag_jsonl(shared_data / "hellaswag_val_full.txt.bz2") == path  # converted once


def test_broken_hellaswag_text_is_a_data_error(tmp_path):
    from mrprune.errors import DataError

    bad = tmp_path / "hellaswag_val_full.txt"
    bad.write_text("Label: context\n7\na\nb\nc\nd\n")
    with pytest.raises(DataError, match="item 1"):
        zs.read_hellaswag_text(bad)
    bad.write_text("Label: context\n1\na\nb\n")
    with pytest.raises(DataError, match="6 per item"):
        zs.read_hellaswag_text(bad)


@needs_lm_eval
def test_hellaswag_prompts_are_lm_evals(shared_data, tmp_path):
    import datasets
    from lm_eval.tasks.hellaswag.utils import process_docs as standard_process_docs

    from mrprune.evaluate.tasks.hellaswag_local_utils import process_docs

    folder = small_hellaswag(shared_data, tmp_path / "data")
    _, task_dir = zs.write_task_dir(zs.plan_tasks("hellaswag", folder))
    mine, standard = local_yaml(task_dir, "hellaswag_local"), standard_yaml("hellaswag", "hellaswag.yaml")
    for key in ("output_type", "doc_to_text", "doc_to_target", "doc_to_choice", "metric_list", "validation_split"):
        assert mine[key] == standard[key], key
    assert mine["dataset_path"] == "json" and (task_dir / "hellaswag_local_utils.py").is_file()

    task = load_task(task_dir, "hellaswag_local")
    docs = list(task.validation_docs())
    assert len(docs) == 12
    reference = list(standard_process_docs(datasets.Dataset.from_list(HUB_HELLASWAG)))
    for doc, ref in zip(docs, reference):
        assert task.doc_to_text(doc) == ref["query"]  # e.g. "Roof shingle removal: A man is sitting on a roof. He"
        assert task.doc_to_choice(doc) == ref["choices"]
        assert task.doc_to_target(doc) == int(ref["label"])
    # the WikiHow markup lm-eval cleans, cleaned the same way
    wikihow = [{"activity_label": "Home and Garden", "ctx_a": "[header] How to paint a wall [title] Buy paint. "
                "[step] Pick  a [insert colour] shade.", "ctx_b": "", "label": "1",
                "endings": ["[substeps] Then  dry it [title] Done.", "b", "c", "d"]}]
    assert list(process_docs(datasets.Dataset.from_list(wikihow))) == \
        list(standard_process_docs(datasets.Dataset.from_list(wikihow)))


# ---------------------------------------------------------------------------------------------- errors


def test_hub_task_offline_is_a_one_line_error_before_loading(monkeypatch, shared_data, tmp_path, capsys):
    need_files(shared_data, "rte_validation.parquet", "hellaswag_val_full.txt.bz2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_reachable.cache_clear()
    with pytest.raises(EvalError, match="task boolq needs the Hugging Face hub, which is unreachable.*rte, hellaswag"):
        zs.plan_tasks("rte,boolq", shared_data)
    with pytest.raises(EvalError, match="task hellaswag needs the Hugging Face hub"):
        zs.plan_tasks("hellaswag")
    with pytest.raises(EvalError, match="unknown task 'hellswag'; did you mean 'hellaswag'"):
        zs.plan_tasks("rte,hellswag", shared_data)
    with pytest.raises(EvalError, match="task rte_local needs local data"):
        zs.plan_tasks("rte_local", tmp_path)
    assert [p.lm_eval_task for p in zs.plan_tasks("rte_local,hellaswag", shared_data)] == \
        ["rte_local", "hellaswag_local"]
    if HAS_LM_EVAL:  # the model path does not exist: the task error must come first
        code, _, err = run_cli(capsys, "eval", "-q", tmp_path / "no-model", "--tasks", "boolq",
                               "--task-data", shared_data)
        assert_one_line_error(code, err, "task boolq needs the Hugging Face hub, which is unreachable")
        code, _, err = run_cli(capsys, *tiny_prune_args(tmp_path / "no-model", "--tasks", "arc_easy,rte"))
        assert_one_line_error(code, err, "tasks arc_easy, rte need the Hugging Face hub")


def test_missing_lm_eval_is_a_one_line_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    code, _, err = run_cli(capsys, "eval", "-q", tmp_path / "no-model", "--tasks", "rte", "--task-data", tmp_path)
    assert_one_line_error(code, err, "zero-shot evaluation needs lm-evaluation-harness: pip install 'mrprune[eval]'")


@pytest.mark.parametrize("args,fragment", [
    (("--limit", 5), "apply to zero-shot tasks"),
    (("--tasks", "rte", "--limit", 0), "evaluation.limit must be a positive integer"),
    (("--tasks", "rte,", "--num-fewshot", 1), "comma-separated task names"),
    (("--tasks", "rte", "--num-fewshot", -1), "num_fewshot must be a non-negative integer"),
    (("--tasks", "rte", "--zs-batch-size", 0), "evaluation.batch_size must be a positive integer"),
])
def test_bad_zeroshot_options(capsys, args, fragment):
    code, _, err = run_cli(capsys, "prune", *args, "--dump-config")
    assert_one_line_error(code, err, fragment)


def test_zeroshot_options_reach_the_config(capsys):
    code, out, _ = run_cli(capsys, "prune", "--tasks", "rte,hellaswag", "--limit", 8, "--task-data", "data",
                           "--zs-batch-size", 4, "--dump-config")
    evaluation = yaml.safe_load(out)["evaluation"]
    assert code == 0 and evaluation["tasks"] == "rte,hellaswag" and evaluation["limit"] == 8
    assert evaluation["task_data"] == "data" and evaluation["batch_size"] == 4 and evaluation["num_fewshot"] == 0


# ------------------------------------------------------------------------------------------ end to end


@needs_lm_eval
def test_prune_then_eval_rte_through_the_cli(tiny_dir, shared_data, tmp_path, capsys):
    model_dir = tiny_dir("llama")
    out = tmp_path / "pruned"
    code, stdout, _ = run_cli(capsys, *tiny_prune_args(model_dir, "--tasks", "rte", "--limit", 8,
                                                         "--task-data", shared_data, "--output", out))
    assert code == 0 and "| rte | 8 | " in stdout and "acc ± stderr" in stdout and "rte_local" in stdout
    report = json.loads((out / "mrprune_report.json").read_text())
    rte = report["zeroshot"]["tasks"]["rte"]
    assert rte["lm_eval_task"] == "rte_local" and rte["items"] == 8 and rte["total"] == 277
    assert 0.0 <= rte["acc"] <= 1.0 and rte["acc_stderr"] > 0 and "zeroshot" in report["timings_s"]
    assert report["zeroshot"]["num_fewshot"] == 0 and report["zeroshot"]["limit"] == 8

    code, stdout, _ = run_cli(capsys, "eval", "-q", out, "--tasks", "rte", "--limit", 8, "--task-data", shared_data,
                              "--json")
    again = json.loads(stdout)["zeroshot"]["tasks"]["rte"]
    assert code == 0 and again["acc"] == rte["acc"] and again["acc_stderr"] == rte["acc_stderr"]


@needs_lm_eval
def test_zeroshot_outside_a_repository_prints_no_git_error(shared_data, tmp_path, monkeypatch, capfd, tokenizer):
    """lm-eval runs git to stamp its results; outside a repository git's 'fatal:' reached the terminal."""
    import lm_eval.evaluator

    from tests.conftest import tiny_model

    originals = (lm_eval.evaluator.get_git_commit_hash, lm_eval.evaluator.add_env_info)
    monkeypatch.chdir(tmp_path)  # not inside any git repository
    result = zs.evaluate_zeroshot(tiny_model("llama"), tokenizer, "rte", limit=4, task_data=shared_data)
    assert result.scores[0].task == "rte"
    assert "fatal" not in capfd.readouterr().err
    assert (lm_eval.evaluator.get_git_commit_hash, lm_eval.evaluator.add_env_info) == originals


# --------------------------------------------------------------------------------------------- offloaded


def loglikelihood_requests(tokenizer) -> list:
    """Real-text requests of many lengths, some sharing a context with one-token continuations (lm-eval
    computes those from one forward)."""
    from lm_eval.api.instance import Instance

    from mrprune.data import embedded_text

    words = embedded_text("evaluation").split()
    pairs = [(" ".join(words[i : i + 3 + 7 * (i % 5)]), " " + " ".join(words[i + 40 : i + 41 + i % 4]))
             for i in range(0, 120, 10)]
    pairs += [("The answer to the question is", answer) for answer in (" True", " False", " yes")]
    return [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=0) for pair in pairs]


@needs_lm_eval
@pytest.mark.parametrize("batch_size", [1, 3])
def test_block_by_block_loglikelihoods_are_hflms(tokenizer, monkeypatch, batch_size, one_thread):
    """Offloaded zero-shot runs HFLM's own request handling twice around a block-by-block pass: the answers
    must be HFLM's, over several parts, with right-padded batches and shared one-token contexts."""
    import copy

    from lm_eval.models.huggingface import HFLM

    from mrprune.evaluate import blockwise
    from mrprune.evaluate.lm_blockwise import block_major_lm
    from tests.conftest import tiny_model

    model = tiny_model("qwen2")
    requests = loglikelihood_requests(tokenizer)
    plain = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)
    expected = plain.loglikelihood(requests, disable_tqdm=True)
    monkeypatch.setattr(blockwise, "CHUNK_BYTES", 60 * 64 * 4)  # parts of about 60 tokens: several parts
    calls = []
    original = blockwise.run_blocks
    monkeypatch.setattr(blockwise, "run_blocks", lambda *a, **k: calls.append(len(a[1])) or original(*a, **k))
    blockwise_lm = block_major_lm(HFLM)(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)
    got = blockwise_lm.loglikelihood(requests, disable_tqdm=True)
    assert len(calls) > 2  # the requests really were split into parts, each one pass through the blocks
    assert [g[1] for g in got] == [e[1] for e in expected]
    # HFLM's own forward fills a KV cache, which may change a CPU's summation order in the last bits
    assert [g[0] for g in got] == pytest.approx([e[0] for e in expected], rel=1e-6, abs=1e-6)
    assert "_model_call" not in vars(blockwise_lm)


@needs_lm_eval
def test_offloaded_zeroshot_scores_as_resident(shared_data, tokenizer):
    from tests.conftest import tiny_model

    model = tiny_model("llama")
    scores = [zs.evaluate_zeroshot(model, tokenizer, "rte", limit=8, task_data=shared_data, offload=offload)
              .to_dict()["tasks"]["rte"] for offload in (False, True)]
    assert scores[1]["acc"] == scores[0]["acc"] and scores[1]["acc_stderr"] == scores[0]["acc_stderr"]


@needs_lm_eval
def test_offloaded_generation_is_hflms(tokenizer, one_thread):
    """Generation tasks cannot run block by block; the subclass streams the blocks for them and must answer
    what HFLM answers."""
    import copy

    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from mrprune.evaluate.lm_blockwise import block_major_lm
    from tests.conftest import tiny_model

    model = tiny_model("llama")
    requests = [Instance(request_type="generate_until", doc={}, idx=0,
                         arguments=(context, {"until": ["\n\n"], "max_gen_toks": 6, "do_sample": False}))
                for context in ("The module", "A function returns")]
    expected = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=1).generate_until(
        requests, disable_tqdm=True)
    lm = block_major_lm(HFLM)(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=1)
    assert lm.generate_until(requests, disable_tqdm=True) == expected and all(expected)
