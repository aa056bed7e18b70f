import sys

import pytest

from mrprune.analyze import plots
from mrprune.errors import OutputError
from tests.analyze.helpers import EVAL_ARGS, FAST_ARGS, PNG_MAGIC
from tests.test_cli import assert_one_line_error, run_cli


def test_value_scale():
    assert plots.value_scale([0.5, 2.0, 30.0]) == ("linear", {})
    assert plots.value_scale([0.1, 2.0, 300.0]) == ("log", {})
    assert plots.value_scale([-3.0, 0.2, 50.0]) == ("symlog", {"linthresh": 0.1, "linscale": 0.5})
    assert plots.value_scale([-0.01] + [0.3] * 9 + [40.0]) == ("symlog", {"linthresh": 0.1, "linscale": 0.5})
    assert plots.value_scale([-3.0, -1.0]) == ("linear", {})


def test_plots_draw_pngs(tmp_path):
    plots.lps_plot(tmp_path / "a.png", [0, 1, 2], {"wanda": [0.1, 5.0, 80.0], "magnitude": [1.0, 2.0, 3.0]},
                   "title", "subtitle")
    plots.redundancy_plot(tmp_path / "b.png", [0.99, 0.995, 0.97], "title", "subtitle")
    plots.allocation_plot(tmp_path / "c.png", {"uniform": [0.5, 0.5]}, {"uniform": [0.98, 0.99]}, 0.5, "t", "s",
                          {"uniform": 0.01})
    plots.compare_plot(tmp_path / "d.png", [0.5, 0.6], {"wanda": {"uniform": [10.0, 20.0]}}, 8.0, "t", "s")
    for name in "abcd":
        assert (tmp_path / f"{name}.png").read_bytes().startswith(PNG_MAGIC)


def test_missing_matplotlib_is_a_one_line_error_before_any_work(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import of it raises ImportError
    with pytest.raises(OutputError, match=r"pip install 'mrprune\[plot\]'"):
        plots.require()
    code, _, err = run_cli(capsys, "analyze", "lps", "--model", tmp_path / "no-model", *FAST_ARGS, *EVAL_ARGS,
                           "--output", tmp_path / "out")
    assert_one_line_error(code, err, "plots need matplotlib: pip install 'mrprune[plot]'")
    code, _, err = run_cli(capsys, "analyze", "lps", "--model", tmp_path / "no-model", *FAST_ARGS, *EVAL_ARGS,
                           "--output", tmp_path / "out", "--no-plot")
    assert_one_line_error(code, err, "does not exist")  # without plots it gets as far as loading the model
