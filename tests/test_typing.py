"""The package's annotations hold (it ships py.typed, so users' type checkers read them)."""

from pathlib import Path

import mrprune

SRC = Path(mrprune.__file__).parent


def test_the_package_type_checks(tmp_path):
    from mypy import api

    stdout, stderr, status = api.run([str(SRC), "--ignore-missing-imports", "--cache-dir", str(tmp_path / "cache")])
    assert status == 0, stdout + stderr
    assert (SRC / "py.typed").is_file()
