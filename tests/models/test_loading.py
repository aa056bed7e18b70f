"""GGUF conversion: its cache follows the converting versions, and a tokenizer that does not survive it is refused."""

import pytest

from mrprune.errors import ModelLoadError
from mrprune.models import loading
from mrprune.testing import train_tokenizer


def test_gguf_cache_key_changes_with_the_converting_versions(tmp_path, monkeypatch):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setenv("MRPRUNE_CACHE_DIR", str(tmp_path / "cache"))
    versions = {"transformers": "5.24.0", "gguf": "0.17.1"}
    monkeypatch.setattr(loading, "installed_version", lambda package: versions.get(package))
    first = loading.gguf_cache_dir(gguf)
    assert loading.gguf_cache_dir(gguf) == first
    versions["transformers"] = "5.25.0"
    upgraded = loading.gguf_cache_dir(gguf)
    versions["gguf"] = "0.18.0"
    assert len({first, upgraded, loading.gguf_cache_dir(gguf)}) == 3


def test_a_saved_tokenizer_that_encodes_text_differently_is_refused(tokenizer, tmp_path):
    same, other = tmp_path / "same", tmp_path / "other"
    tokenizer.save_pretrained(same)
    loading.check_saved_tokenizer(tokenizer, same, "model.gguf")
    train_tokenizer(300).save_pretrained(other)
    with pytest.raises(ModelLoadError, match="model.gguf so that it encodes text differently"):
        loading.check_saved_tokenizer(tokenizer, other, "model.gguf")


@pytest.mark.slow
def test_a_conversion_whose_tokenizer_breaks_caches_nothing(tokenizer, tmp_path, monkeypatch):
    """The embedded GGUF converted for real, with its saved tokenizer replaced as a faulty transformers would."""
    monkeypatch.setenv("MRPRUNE_CACHE_DIR", str(tmp_path))
    check = loading.check_saved_tokenizer

    def broken_save(original, directory, what):
        tokenizer.save_pretrained(directory)
        check(original, directory, what)

    monkeypatch.setattr(loading, "check_saved_tokenizer", broken_save)
    gguf = loading.embedded_default_gguf()
    with pytest.raises(ModelLoadError, match="encodes text differently"):
        loading.convert_gguf(gguf)
    assert not any((tmp_path / "gguf").iterdir())


@pytest.mark.slow
def test_runs_converting_the_same_gguf_side_by_side_share_the_first_copy(tmp_path, monkeypatch):
    """Two runs started together on one GGUF both convert it; the one that finishes second finds the cache
    filled (the rename onto a non-empty directory fails) and uses that copy instead of failing."""
    import shutil

    monkeypatch.setenv("MRPRUNE_CACHE_DIR", str(tmp_path))
    check = loading.check_saved_tokenizer
    gguf = loading.embedded_default_gguf()
    target = loading.gguf_cache_dir(gguf)

    def other_process_finishes_first(original, directory, what):
        check(original, directory, what)
        shutil.copytree(directory, target)  # the other run's rename, just before ours

    monkeypatch.setattr(loading, "check_saved_tokenizer", other_process_finishes_first)
    assert loading.convert_gguf(gguf) == target
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]  # our temporary copy removed
    assert (target / "config.json").is_file() and any(target.glob("*.safetensors"))
