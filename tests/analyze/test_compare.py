import json

import pytest

from mrprune.analyze import compare
from tests.analyze.helpers import EVAL_ARGS, FAST_ARGS, PNG_MAGIC, fast_config, same_state, state
from tests.conftest import tiny_model
from tests.test_cli import assert_one_line_error, run_cli


def table_rows(markdown: str, header_start: str) -> list[list[str]]:
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return [rows[0]] + rows[2:]  # header, then the body without the alignment row


def test_grid_has_one_cell_per_point(tiny_dir, tmp_path, capsys):
    out = tmp_path / "grid.md"
    code, stdout, _ = run_cli(capsys, "compare", "--model", tiny_dir("llama"), *FAST_ARGS, *EVAL_ARGS,
                              "--allocations", "uniform,owl", "--metrics", "wanda,magnitude",
                              "--sparsities", "0.5,0.7", "--redundancy", "--output", out)
    assert code == 0
    table = table_rows(stdout, "| allocation")
    assert table[0] == ["allocation", "wanda 0.5", "wanda 0.7", "magnitude 0.5", "magnitude 0.7"]
    assert [row[0] for row in table[1:]] == ["uniform", "owl"] and all(len(row) == 5 for row in table)
    assert out.read_text().strip() in stdout
    data = json.loads(out.with_suffix(".json").read_text())
    points = {(r["allocation"], r["metric"], r["sparsity"]) for r in data["rows"]}
    assert len(data["rows"]) == 8 and len(points) == 8
    for row in data["rows"]:
        assert row["target_met"] and row["achieved"] == pytest.approx(row["sparsity"], abs=1e-5)
        assert row["redundancy"]["cv"] >= 0 and row["perplexity"] > 0
        cell = table[1 + ["uniform", "owl"].index(row["allocation"])][1 + ["wanda 0.5", "wanda 0.7", "magnitude 0.5",
                                                                        "magnitude 0.7"].index(
            f"{row['metric']} {row['sparsity']:g}")]
        assert float(cell) == pytest.approx(row["perplexity"], rel=1e-2)
    assert "Redundancy spread" in stdout
    assert out.with_suffix(".png").read_bytes().startswith(PNG_MAGIC)

    code, _, err = run_cli(capsys, "compare", "--model", tiny_dir("llama"), *FAST_ARGS, *EVAL_ARGS,
                           "--allocations", "uniform", "--output", out)
    assert_one_line_error(code, err, "pass --overwrite")


def test_analyze_compare_is_the_same_command_and_the_api_leaves_the_model_dense(tokenizer, capsys):
    model = tiny_model("qwen2")
    original = state(model)
    result = compare(model, fast_config(), allocations="uniform", metrics="sparsegpt", sparsities=[0.4, 0.6],
                     tokenizer=tokenizer, progress=False)
    assert same_state(model, original)
    assert [c.sparsity for c in result.cells] == [0.4, 0.6]
    assert result.cell("uniform", "sparsegpt", 0.6).perplexity > 0
    with pytest.raises(SystemExit):
        run_cli(capsys, "analyze", "compare", "--help")
    assert "--sparsities" in capsys.readouterr().out


@pytest.mark.parametrize("args,fragment", [
    (("--sparsities", "0.5,1.2"), "sparsities must be in [0, 1)"),
    (("--sparsities", "0.5,x"), "sparsities must be comma-separated numbers"),
    (("--metrics", "wanda,owl"), "unknown metric 'owl'"),
    (("--allocations", "uniform,mrq"), "unknown allocation 'mrq'"),
])
def test_bad_compare_inputs(tiny_dir, tmp_path, capsys, args, fragment):
    code, _, err = run_cli(capsys, "compare", "--model", tiny_dir("llama"), *FAST_ARGS, *EVAL_ARGS, *args,
                           "--output", tmp_path / "grid.md")
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "grid.md").exists()


def test_zero_shot_columns(tiny_dir, shared_data, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    out = tmp_path / "grid.md"
    code, stdout, _ = run_cli(capsys, "compare", "--model", tiny_dir("llama"), *FAST_ARGS, *EVAL_ARGS,
                              "--allocations", "uniform", "--metrics", "magnitude", "--sparsities", "0.5",
                              "--tasks", "rte", "--limit", 4, "--task-data", shared_data, "--output", out,
                              "--no-plot")
    assert code == 0 and "Zero-shot rte, acc (dense" in stdout
    data = json.loads(out.with_suffix(".json").read_text())
    assert 0 <= data["rows"][0]["zeroshot"]["rte"]["acc"] <= 1 and "acc" in data["dense"]["zeroshot"]["rte"]
    assert "first 4 items per task" in data["zeroshot_protocol"] and not out.with_suffix(".png").exists()


def test_a_failed_writer_leaves_none_of_the_set(tokenizer, tmp_path, monkeypatch):
    """The table, its rows and its plot are one output: a plot that fails to render leaves no .json or .md behind
    (a re-run would otherwise refuse them as existing output)."""
    from mrprune.analyze.compare import CompareResult

    def broken_plot(self, path):
        raise OSError("disk full")

    result = compare(tiny_model("llama"), fast_config(), tokenizer=tokenizer, allocations="uniform", progress=False)
    monkeypatch.setattr(CompareResult, "plot", broken_plot)
    with pytest.raises(OSError, match="disk full"):
        result.save(tmp_path / "grid.md")
    assert list(tmp_path.iterdir()) == []
    result.save(tmp_path / "grid.md", plot=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.json", "grid.md"]
