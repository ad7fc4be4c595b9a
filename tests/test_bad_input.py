"""Malformed config and data through the CLI: exit 2, one clear message naming file/line/key, nothing written.

(tests/test_config.py checks the config loader's messages in detail, tests/test_tasks.py each loader's;
this file checks what a user of ``python -m mapd_dspy.run`` sees, and that the run folder stays empty.)
"""

import json

import pytest

from mapd_dspy.engine import ModelPool
from mapd_dspy.run import main


@pytest.fixture(autouse=True)
def no_model_server(monkeypatch):
    """Bad input must be rejected before any server starts; if a case slips through, fail fast."""

    def refuse(self):
        raise AssertionError("this input should have been rejected before any model server was started")

    monkeypatch.setattr(ModelPool, "_start_or_attach", refuse)


def run_cli(tmp_path, *args):
    return main(["--set", f"runs_dir={tmp_path / 'runs'}", *args])


def error_of(capsys) -> str:
    err = " ".join(capsys.readouterr().err.split())
    assert err.count("error:") == 1, err  # one message, no traceback
    assert "Traceback" not in err
    return err


def assert_nothing_written(tmp_path):
    runs = tmp_path / "runs"
    assert not runs.exists() or not any(runs.rglob("*")), sorted(runs.rglob("*"))


# -- config files ---------------------------------------------------------------------------------

TEACHERS_OK = '[[teachers]]\nname = "a"\n[[teachers]]\nname = "b"\n'


@pytest.mark.parametrize(
    "toml, expected",
    [
        ('[[teachers]]\nmodel = "openai/gpt-4o-mini"\n[[teachers]]\nname = "b"\n', ["teachers.0.name: Field required"]),
        ("[review]\nthreshold = \"high\"\n", ["review.threshold", "high"]),
        ("[engine]\nconcurrency = 1.5\n", ["engine.concurrency"]),
        ("[task]\nlimit = [1, 2]\n", ["task.limit"]),
        ("[task]\nname = \"mmlu\"\n", ["task.name", "unknown task 'mmlu'"]),
        ("[review]\nthreshold = 5.5\n", ["review", "threshold 5.5 is outside the score scale [1, 5]"]),
        ("[review]\nscale_min = 0\nscale_max = 10\nthreshold = 11\n", ["outside the score scale [0, 10]"]),
        ('[[teachers]]\nname = "solo"\n', ["peer review needs at least 2 teachers, got 1"]),
        ("teachers = []\n", ["peer review needs at least 2 teachers, got 0"]),
        (TEACHERS_OK + "[[teachers]]\nname = \"a\"\n", ["duplicate teacher names ['a']"]),
        ("[sever]\nport = 1\n", ["sever: unknown key"]),
        ("[task]\nname = \"svamp\"\n[task]\nsplit = \"test\"\n", ["invalid TOML", "line 3"]),
        ('[student]\napi_key_env = "sk-live-123"\n', ["student.api_key_env", "NAME of an environment variable"]),
        ("[[teachers]]\nname = \"a\"\nprice_in_per_mtok = 1\n[[teachers]]\nname = \"b\"\n",
         ["teachers.0", "set both price_in_per_mtok and price_out_per_mtok"]),
        ("[engine]\nbudget_usd = 10\n", ["engine.budget_usd: no model has a price"]),
    ],
)
def test_bad_config_file_exits_2_names_file_and_key_writes_nothing(tmp_path, capsys, toml, expected):
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    assert run_cli(tmp_path, str(path)) == 2
    err = error_of(capsys)
    assert str(path) in err
    for fragment in expected:
        assert fragment in err
    assert_nothing_written(tmp_path)


def test_unreadable_config_file(tmp_path, capsys):
    path = tmp_path / "binary.toml"
    path.write_bytes(b"\xff\xfe\x00name = 1")
    assert run_cli(tmp_path, str(path)) == 2
    err = error_of(capsys)
    assert "binary.toml" in err
    assert_nothing_written(tmp_path)


def test_config_path_is_a_folder(tmp_path, capsys):
    assert run_cli(tmp_path, str(tmp_path)) == 2
    assert str(tmp_path) in error_of(capsys)
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["teachers.2.name=c", "teachers.2.model=openai/x", "teachers.2.temperature=hot"], "teachers.2.temperature"),
        (["task.limit=-3"], "task.limit"),
        (["engine.budget_usd=-1", "teachers.0.price_in_per_mtok=1", "teachers.0.price_out_per_mtok=1"], "engine.budget_usd"),
        (["teachers.5.name=x"], "index 5 is past the end"),
        (["task.limit=5", "task.limit.x=1"], "'limit' is a value, not a section"),
    ],
)
def test_bad_overrides_exit_2_and_name_the_key(tmp_path, capsys, overrides, expected):
    args = [item for override in overrides for item in ("--set", override)]
    assert run_cli(tmp_path, *args) == 2
    assert expected in error_of(capsys)
    assert_nothing_written(tmp_path)


# -- data -------------------------------------------------------------------------------------------


def svamp_item(item_id, answer=3.0, **overrides):
    item = {"ID": item_id, "Body": "Tom has 1 apple and gets 2 more.", "Question": "How many now?",
            "Equation": "( 1.0 + 2.0 )", "Answer": answer, "Type": "Addition"}
    return item | overrides


def write_svamp(tmp_path, items) -> str:
    path = tmp_path / "SVAMP.json"
    path.write_text(json.dumps(items, indent=1))
    return str(path)


def run_on_data(tmp_path, task, source, *more):
    return run_cli(tmp_path, "--set", f"task.name={task}", "--set", f"task.source={source}", *more)


@pytest.mark.parametrize(
    "items, expected",
    [
        ([], ["SVAMP.json", "no examples"]),
        ([svamp_item("chal-1"), svamp_item("chal-2"), svamp_item("chal-1")], ["duplicate id 'svamp/chal-1'", "examples 0 and 2"]),
        ([svamp_item("chal-1"), {k: v for k, v in svamp_item("chal-2").items() if k != "Body"}], ["item 1", "missing field 'Body'"]),
        ([svamp_item("chal-1", answer="many")], ["item 0", "'Answer' is not a number"]),
        ([svamp_item("chal-1", Question=7)], ["item 0", "field 'Question' should be str, got int"]),
        ([svamp_item("chal-1", Question="  ")], ["item 0", "field 'Question' is empty"]),
        ({"ID": "chal-1"}, ["expected a JSON list"]),
        (["not an object"], ["item 0", "expected a JSON object"]),
    ],
)
def test_bad_svamp_data_exits_2_naming_file_item_field(tmp_path, capsys, items, expected):
    assert run_on_data(tmp_path, "svamp", write_svamp(tmp_path, items)) == 2
    err = error_of(capsys)
    assert "SVAMP.json" in err
    for fragment in expected:
        assert fragment in err
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"", ["no examples for split 'train'"]),
        (b'{"question": "q1", "answer": "#### 1"}\n{"question": "q2"}\n', ["line 2", "missing field 'answer'"]),
        (b'{"question": "q1", "answer": "#### 1"}\n\n{"question": "q3", "answer": "#### 3"\n', ["line 3", "malformed JSON"]),
        (b'{"question": "q1", "answer": 5}\n', ["line 1", "'answer'"]),
        (b'{"question": "q1", "answer": "#### 1"}\n\xff\xfe{"question": "q2"}\n', ["cannot read file"]),
    ],
)
def test_bad_gsm8k_data_exits_2_naming_file_and_line(tmp_path, capsys, content, expected):
    path = tmp_path / "train.jsonl"
    path.write_bytes(content)
    assert run_on_data(tmp_path, "gsm8k", str(path)) == 2
    err = error_of(capsys)
    assert "train.jsonl" in err
    for fragment in expected:
        assert fragment in err
    assert_nothing_written(tmp_path)


def test_missing_data_file_and_data_folder_without_the_file(tmp_path, capsys):
    assert run_on_data(tmp_path, "gsm8k", str(tmp_path / "nope.jsonl")) == 2
    err = error_of(capsys)
    assert "nope.jsonl" in err and "does not exist" in err
    folder = tmp_path / "empty_folder"
    folder.mkdir()
    assert run_on_data(tmp_path, "svamp", str(folder)) == 2
    assert "SVAMP.json: file not found" in error_of(capsys)
    assert_nothing_written(tmp_path)


def test_bad_eval_split_data_fails_before_anything_is_written(tmp_path, capsys):
    # One item: round(0.8) = 1 train item and an empty test split, which only the eval stage reads.
    source = write_svamp(tmp_path, [svamp_item("chal-1")])
    assert run_on_data(tmp_path, "svamp", source, "--stage", "eval") == 2
    assert "no examples for split 'test'" in error_of(capsys)
    assert_nothing_written(tmp_path)


def test_damaged_records_file_exits_2_naming_file_and_line(tmp_path, capsys, shared_data):
    run_dir = tmp_path / "runs" / "default"
    run_dir.mkdir(parents=True)
    records = run_dir / "records.jsonl"
    records.write_text('{"example_id": "svamp/chal-1"}\n{"not": "a record"}\n{"x": 1}\n')
    before = {p: p.read_bytes() for p in run_dir.rglob("*")}
    assert run_cli(tmp_path, "--set", f"task.data_dir={shared_data}", "--stage", "review") == 2
    err = error_of(capsys)
    assert "records.jsonl:1" in err and "not a valid record" in err
    assert {p: p.read_bytes() for p in run_dir.rglob("*")} == before  # nothing written or changed
