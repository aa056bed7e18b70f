import json
import re

import pytest

from mrprune.data import (Corpus, embedded_text, load_eval_text, read_corpus, sample_calibration)
from mrprune.errors import DataError
from tests.conftest import need_files


def test_embedded_calibration_and_evaluation_text_do_not_overlap():
    calib, evaluation = embedded_text("calibration"), embedded_text("evaluation")
    assert len(calib) > 3 * len(evaluation) > 50_000
    calib_paragraphs = set(calib.split("\n\n"))
    eval_paragraphs = [p for p in evaluation.split("\n\n") if len(p) > 200]
    assert eval_paragraphs and not any(p in calib_paragraphs for p in eval_paragraphs)


def test_sampling_is_seeded_and_windows_come_from_the_text(tokenizer):
    corpus = read_corpus("embedded", "calibration")
    a = sample_calibration(corpus, tokenizer, 4, 32, seed=0)
    b = sample_calibration(corpus, tokenizer, 4, 32, seed=0)
    c = sample_calibration(corpus, tokenizer, 4, 32, seed=1)
    assert a.shape == (4, 32) and a.equal(b) and not a.equal(c)
    stream = tokenizer(corpus.text).input_ids
    joined = " ".join(map(str, stream))
    assert " ".join(map(str, a[0].tolist())) in joined


def test_documents_protocol_draws_windows_from_long_documents_only(tokenizer):
    docs = ["short text"] * 20 + [embedded_text("evaluation")[:4000]]
    ids = sample_calibration(Corpus("docs", documents=docs), tokenizer, 3, 64, seed=0)
    long_doc = " ".join(map(str, tokenizer(docs[-1]).input_ids))
    for row in ids:
        assert " ".join(map(str, row.tolist())) in long_doc


def test_too_little_text_is_a_clear_error(tokenizer, tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("only a few words here")
    with pytest.raises(DataError, match="too few for 4 x 64"):
        sample_calibration(read_corpus(str(small), "calibration"), tokenizer, 4, 64, 0)
    with pytest.raises(DataError, match="longer than seqlen"):
        sample_calibration(Corpus("docs", documents=["tiny doc"] * 500), tokenizer, 2, 64, 0)


def test_jsonl_and_parquet_documents_with_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"body": f"document number {i}"} for i in range(3)]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    assert read_corpus(str(jsonl), "calibration", column="body").documents[2] == "document number 2"
    with pytest.raises(DataError, match="'text' field"):
        read_corpus(str(jsonl), "calibration")
    parquet = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"body": [r["body"] for r in rows]}), parquet)
    assert read_corpus(str(parquet), "calibration", column="body").documents == [r["body"] for r in rows]
    with pytest.raises(DataError, match="no column 'text'"):
        read_corpus(str(parquet), "calibration")
    pretty = tmp_path / "docs.json"  # one JSON array laid out over many lines
    pretty.write_text(json.dumps(rows, indent=2))
    assert read_corpus(str(pretty), "calibration", column="body").documents[1] == "document number 1"


@pytest.mark.parametrize("name, content, fragment", [
    ("empty.jsonl", "", "holds no text in 'text': 0 record(s)"),
    ("numbers.jsonl", '{"text": 5}\n{"text": null}\n', "holds no text in 'text': 2 record(s), none a non-empty"),
    ("blank.jsonl", '{"text": "   "}\n', "none a non-empty string (--calib-column"),
    ("other.jsonl", '{"body": "x"}\n', "a 'text' field (this one has: body); --calib-column names another"),
    ("broken.jsonl", '{"text": "a"}\n{"text": "b"}\n{"text": "c\n', "line 3: Unterminated string"),
])
def test_unusable_document_files_are_clear_errors(tmp_path, name, content, fragment):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=re.escape(fragment)):
        read_corpus(str(path), "calibration")


def test_a_parquet_column_without_text_is_a_clear_error(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    for name, values in [("empty", pa.array([], pa.string())), ("ints", pa.array([1, 2, 3]))]:
        path = tmp_path / f"{name}.parquet"
        pq.write_table(pa.table({"text": values}), path)
        with pytest.raises(DataError, match="holds no text in 'text'"):
            read_corpus(str(path), "calibration")


def test_missing_source_and_offline_hub_dataset_are_clear_errors(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from mrprune import hub

    hub.hub_reachable.cache_clear()
    with pytest.raises(DataError, match="does not exist"):
        read_corpus("./no/such/file.txt", "calibration")
    with pytest.raises(DataError, match="unreachable"):
        read_corpus("wikitext2", "evaluation")
    # with nothing given and no hub, the embedded text is used
    assert read_corpus(None, "evaluation").name.startswith("embedded")
    hub.hub_reachable.cache_clear()


def test_eval_text_joins_documents(shared_data):
    need_files(shared_data, "rte_validation.parquet")
    corpus = load_eval_text(str(shared_data / "rte_validation.parquet"), column="sentence1")
    assert corpus.text.count("\n\n") == 276


def test_raw_text_where_a_source_belongs_is_a_clear_error():
    for text in ("A sentence. " * 40, "line one\nline two"):
        with pytest.raises(DataError, match="looks like text, not a source"):
            read_corpus(text, "evaluation")
