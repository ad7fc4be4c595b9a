"""Config loading: defaults, TOML, overrides, and errors that name the key."""


import pytest

from mapd_dspy.config import ConfigError, RunConfig, load_config
from tests.conftest import REPO


def test_default_toml_is_exactly_the_builtin_defaults():
    from_file = load_config(REPO / "configs" / "default.toml")
    assert from_file == RunConfig()


def test_example_configs_are_valid():
    for path in (REPO / "configs").glob("*.toml"):
        load_config(path)


def test_defaults_mirror_reference_code():
    config = RunConfig()
    assert (config.review.scale_min, config.review.scale_max, config.review.threshold) == (1, 5, 3.0)
    assert config.review.threshold_rule == "gt" and config.review.require_correct_answer
    assert all(t.temperature == 0.8 for t in config.teachers) and len(config.teachers) >= 2
    assert config.student.model == "embedded:smollm2-135m-instruct"


def test_overrides_parse_types_and_reach_list_items():
    config = load_config(None, ["review.threshold=3.5", "teachers.1.model=openai/gpt-4o-mini", "engine.cache=false"], 7)
    assert config.review.threshold == 3.5 and config.engine.cache is False and config.task.limit == 7
    assert config.teachers[1].model == "openai/gpt-4o-mini" and config.teachers[1].name == "smol-b"
    assert config.teachers[0].model == "embedded:smollm2-135m-instruct"


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["task.nmae=gsm8k"], "task.nmae: unknown key"),
        (["review.threshold=7"], "outside the score scale [1, 5]"),
        (["review.scale_min=5"], "scale_min (5) must be below scale_max (5)"),
        (["engine.concurrency=0"], "engine.concurrency"),
        (["review.threshold_rule=gte"], "review.threshold_rule"),
        (["teachers.1.name=smol-a"], "duplicate teacher names ['smol-a']"),
        (["teachers.0.api_key_env=sk-abc123"], "teachers.0.api_key_env"),
        (["task.limit=ten"], "task.limit"),
        (["task.limit=true"], "task.limit: Value error, expected int | None, not a boolean"),
        (["train.max_steps=false"], "train.max_steps: Value error, expected int, not a boolean"),
        (["review"], "expected key=value"),
    ],
)
def test_bad_values_name_the_key(overrides, expected):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert expected in str(info.value)


def test_fewer_than_two_teachers_is_an_error(tmp_path):
    path = tmp_path / "one.toml"
    path.write_text('[[teachers]]\nname = "solo"\nmodel = "openai/gpt-4o-mini"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and "at least 2 teachers, got 1" in str(info.value)


def test_bad_toml_and_missing_file_name_the_file(tmp_path):
    broken = tmp_path / "broken.toml"
    broken.write_text("[task\nname = 1\n")
    with pytest.raises(ConfigError, match="broken.toml: invalid TOML"):
        load_config(broken)
    with pytest.raises(ConfigError, match="nope.toml: config file not found"):
        load_config(tmp_path / "nope.toml")


def test_api_key_itself_is_not_a_config_key(tmp_path):
    path = tmp_path / "key.toml"
    path.write_text('[[teachers]]\nname = "a"\napi_key = "sk-secret"\n[[teachers]]\nname = "b"\n')
    with pytest.raises(ConfigError, match="teachers.0.api_key: unknown key"):
        load_config(path)


def test_public_dump_round_trips():
    config = load_config(None, ["teachers.0.api_key_env=OPENAI_API_KEY"])
    assert RunConfig.model_validate(config.public_dump()) == config
    assert config.public_dump()["teachers"][0]["api_key_env"] == "OPENAI_API_KEY"


def test_readme_config_reference_matches_the_code():
    from mapd_dspy.config import config_reference_markdown

    assert config_reference_markdown() in (REPO / "README.md").read_text()
