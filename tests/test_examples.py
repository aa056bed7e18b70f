"""The example job files load strictly (an unknown or mistyped key is an error) and survive a round trip."""

from pathlib import Path

import pytest

from mrprune.cli import main
from mrprune.config import PruneConfig, dump_config, load_config

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))


def test_there_are_examples():
    assert len(EXAMPLES) >= 4


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_loads_strictly_and_round_trips(path, tmp_path, capsys):
    config = load_config(path)
    assert isinstance(config, PruneConfig)
    again = tmp_path / "again.yaml"
    again.write_text(dump_config(config))
    assert load_config(again) == config
    assert main(["prune", "--config", str(path), "--dump-config"]) == 0  # and the command line takes it
    assert load_config(path) == config
    assert "metric:" in capsys.readouterr().out
