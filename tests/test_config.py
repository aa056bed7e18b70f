import json

import pytest

from mrprune.config import PruneConfig, dump_config, load_config, merge
from mrprune.errors import ConfigError


def test_config_round_trips_through_yaml(tmp_path):
    config = merge(PruneConfig(), {"metric": "sparsegpt", "calibration.nsamples": 16, "evaluation.max_windows": 3})
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(config))
    assert load_config(path) == config
    assert PruneConfig().calibration.nsamples == 128  # merge copied, did not mutate defaults


def test_unquoted_nm_pattern_in_yaml_stays_a_pattern(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("pattern: 2:4\nsparsity: 0.5\nallocation:\n  mrp:\n    gamma: 0.95\n")  # YAML 1.1: 2:4 is 124
    config = load_config(path)
    assert config.pattern == "2:4" and config.sparsity == 0.5 and config.allocation.mrp.gamma == 0.95


def test_exponent_numbers_read_as_numbers_and_a_key_given_twice_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("sparsity: 7e-1\nallocation:\n  mrp:\n    min_step: 5E-3\n")  # YAML 1.1 would keep text
    config = load_config(path)
    assert config.sparsity == 0.7 and config.allocation.mrp.min_step == 0.005
    for name, text in [("twice.yaml", "metric: wanda\nsparsity: 0.5\nmetric: magnitude\n"),
                       ("nested.yaml", "calibration:\n  nsamples: 8\n  nsamples: 16\n"),
                       ("twice.json", '{"metric": "wanda", "metric": "magnitude"}')]:
        (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError, match="key '(metric|nsamples)' is given twice"):
            load_config(tmp_path / name)


def test_unknown_key_names_the_closest_valid_one(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("calibration:\n  nsample: 32\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'calibration.nsample'; did you mean 'calibration.nsamples'"):
        load_config(path)
    path.write_text("metirc: wanda\n")
    with pytest.raises(ConfigError, match="did you mean 'metric'"):
        load_config(path)


def test_wrong_types_and_bad_files_are_config_errors(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"calibration": {"nsamples": "many"}}))
    with pytest.raises(ConfigError, match="calibration.nsamples' expects int"):
        load_config(path)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(path)
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("overrides,message", [
    ({"sparsity": 1.0}, "sparsity must be in"),
    ({"sparsity": -0.1}, "sparsity must be in"),
    ({"metric": "random"}, "unknown metric 'random'"),
    ({"pattern": "5:4"}, "0 < N < M"),
    ({"pattern": "2:4", "sparsity": 0.7}, "implies sparsity 0.5"),
    ({"pattern": "2:4", "allocation.method": "file", "allocation.ratios": "x"}, "cannot be combined"),
    ({"allocation.method": "file"}, "needs --ratios"),
    ({"calibration.nsamples": 0}, "nsamples must be a positive integer"),
    ({"calibration.seqlen": -5}, "seqlen must be a positive integer"),
    ({"allocation.method": "nope"}, "unknown allocation.method"),
    ({"overwrite": "False"}, "'overwrite' expects bool, got 'False'"),  # a truthy string must not replace files
    ({"evaluate": "no"}, "'evaluate' expects bool"),
    ({"sparsity": "0.5"}, "'sparsity' expects float or None"),
    ({"calibration.seed": "1"}, "'calibration.seed' expects int"),
    ({"calibration": {"nsamples": 2}}, "'calibration' expects CalibrationConfig, got dict"),
    ({"allocation": "owl"}, "'allocation' expects AllocationConfig, got str"),
])
def test_validation_names_the_problem(overrides, message):
    with pytest.raises(ConfigError, match=message):
        merge(PruneConfig(), overrides).validate()


def test_paths_given_in_python_are_accepted_and_dumped_as_text(tmp_path):
    config = merge(PruneConfig(), {"output": tmp_path / "out", "calibration.source": tmp_path / "c.txt"}).validate()
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(config))
    loaded = load_config(path)
    assert loaded.output == str(tmp_path / "out") and loaded.calibration.source == str(tmp_path / "c.txt")
