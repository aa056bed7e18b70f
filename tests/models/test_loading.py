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
    assert [p.name for p in (tmp_path / "gguf").iterdir() if not p.name.endswith(".lock")] == []


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
    assert sorted(p.name for p in target.parent.iterdir() if p.is_dir()) == [target.name]  # our copy removed
    assert (target / "config.json").is_file() and any(target.glob("*.safetensors"))


def test_a_run_waiting_for_another_runs_conversion_uses_its_copy(tmp_path, monkeypatch):
    """Runs started together convert a GGUF once: the others wait for the conversion's lock, then find the
    cache filled and load nothing from the GGUF."""
    import subprocess
    import sys
    import time

    from mrprune import locking

    monkeypatch.setenv("MRPRUNE_CACHE_DIR", str(tmp_path))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")  # never read: the cache is filled before the lock is released
    target = loading.gguf_cache_dir(gguf)
    target.parent.mkdir(parents=True)
    lock = target.parent / f".{target.name}.lock"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); fcntl.flock(fd, "
        "fcntl.LOCK_EX); print('held', flush=True); time.sleep(1.0); os.makedirs(sys.argv[2]); "
        "open(os.path.join(sys.argv[2], 'config.json'), 'w').write('{}')"), str(lock), str(target)],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    started = time.monotonic()
    assert loading.convert_gguf(gguf) == target  # would fail reading the fake GGUF had it not waited
    assert time.monotonic() - started > 0.5 and holder.wait(10) == 0
    fd = locking.try_lock(lock)
    assert fd is not None  # released
    locking.release(fd)
