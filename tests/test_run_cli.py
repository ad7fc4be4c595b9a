"""The CLI's error paths: clear message, non-zero exit, nothing written to the run folder."""

import pytest

from mapd_dspy.run import main


def run_cli(tmp_path, *args):
    return main(["--set", f"runs_dir={tmp_path / 'runs'}", *args])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "task.name=mmlu"], "mmlu"),
        (["--set", "review.threshold=0"], "review: Value error, threshold 0.0 is outside the score scale"),
        (["--set", "teachers.0.api_key_env=MAPD_TEST_UNSET_KEY", "--set", "teachers.0.model=openai/gpt-4o-mini"],
         "teachers.0.api_key_env: environment variable MAPD_TEST_UNSET_KEY is not set"),
        (["--set", "teachers.0.model=embedded:other-model"], "teachers.0.model: embedded teachers"),
        (["--set", "task.split=dev"], "dev"),
    ],
)
def test_bad_config_exits_2_and_writes_nothing(tmp_path, capsys, args, message, monkeypatch):
    monkeypatch.delenv("MAPD_TEST_UNSET_KEY", raising=False)
    assert run_cli(tmp_path, *args) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "error:" in err and message in err
    assert not (tmp_path / "runs").exists()


def test_bad_data_file_exits_2_naming_file_and_line(tmp_path, capsys):
    data = tmp_path / "gsm8k.jsonl"
    data.write_text('{"question": "q", "answer": "#### 1"}\n{"question": "q2"\n')
    assert run_cli(tmp_path, "--set", "task.name=gsm8k", "--set", f"task.source={data}") == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "gsm8k.jsonl" in err and "2" in err
    assert not (tmp_path / "runs").exists()


def test_later_stage_without_exam_records_says_what_to_run(tmp_path, capsys, shared_data):
    assert run_cli(tmp_path, "--stage", "teach", "--set", f"task.data_dir={shared_data}") == 2
    assert "run `--stage exam` first" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_limit_must_be_positive(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--limit", "0"])
    assert info.value.code == 2
