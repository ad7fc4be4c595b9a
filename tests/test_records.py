"""The record store: append-only, last write wins, torn final line tolerated, damage reported."""

import pytest

from mapd_dspy.records import Failure, Record, RecordFileError, RecordStore


def make(example_id="e1", stage="exam", status="ok", **kwargs):
    return Record(example_id=example_id, stage=stage, status=status, model="m", **kwargs)


def test_records_survive_reopening_and_last_write_wins(tmp_path):
    path = tmp_path / "records.jsonl"
    store = RecordStore(path)
    store.append(make(status="failed", failure=Failure(kind="lm_error", reason="timeout")))
    store.append(make(answer="7", correct=True))
    store.append(make("e2", "review", teacher="a", reviewer="b", score=4))
    reopened = RecordStore(path)
    assert len(reopened) == 2
    assert reopened.get(("e1", "exam", "", "")).answer == "7"
    assert reopened.get(("e2", "review", "a", "b")).score == 4
    assert len(path.read_text().splitlines()) == 3  # nothing is rewritten, only appended


def test_torn_final_line_is_dropped(tmp_path):
    path = tmp_path / "records.jsonl"
    RecordStore(path).append(make())
    with path.open("a") as handle:
        handle.write('{"example_id": "e2", "stage": "ex')  # a kill -9 in the middle of a write
    store = RecordStore(path)
    assert len(store) == 1 and store.get(("e2", "exam", "", "")) is None


def test_damage_before_the_end_names_file_and_line(tmp_path):
    path = tmp_path / "records.jsonl"
    RecordStore(path).append(make())
    with path.open("a") as handle:
        handle.write("not json\n")
    RecordStore(path).append(make("e3"))
    with pytest.raises(RecordFileError, match=r"records.jsonl:2: not a valid record"):
        RecordStore(path)


def test_in_memory_store_writes_nothing(tmp_path):
    store = RecordStore.in_memory()
    store.append(make())
    assert store.get(("e1", "exam", "", "")) is not None and store.path is None
