"""The MAPD program with DummyLM roles: gate logic, peer assignment, failures as records."""

import dspy
import pytest

from mapd_dspy.programs import (
    AcceptanceGate,
    Ledger,
    MAPDProgram,
    Reviewer,
    InvalidOutput,
    examine,
    output_schema,
    student_response_text,
)
from mapd_dspy.records import Record
from mapd_dspy.signatures import ReviewRationale, SolveQuestion
from tests.fakes import Q, role, svamp

QUESTION = Q("toy/1", "Tom has 3 apples and buys 4 more. How many apples does he have?", "7")


def teacher_answers(explanation, rationale, answer, score):
    """What one teacher says, in call order: explain, write rationale, review the peer."""
    return [
        {"explanation": explanation},
        {"rationale": rationale, "answer": answer},
        {"critique": "checked every step", "score": score},
    ]


def run_program(a_answers, b_answers, gate=None, ledger=None):
    program = MAPDProgram(
        svamp(), {"a": role("a", a_answers), "b": role("b", b_answers)}, gate=gate, ledger=ledger or Ledger()
    )
    return program, program(example=QUESTION, student_response="3 + 4 = 8\nFinal answer: 8")


def decision_of(prediction, teacher):
    return next(d for d in prediction.decisions if d.teacher == teacher)


def test_accepts_when_peer_score_passes_and_answer_is_right():
    _, out = run_program(teacher_answers("you added wrong", "3 + 4 = 7", "7", "4"),
                         teacher_answers("wrong sum", "3 + 4 = 7", "7", "5"))
    a = decision_of(out, "a")
    assert a.accepted and a.reason == "accepted"
    assert a.scores == {"b": 5} and a.mean_score == 5.0
    assert decision_of(out, "b").scores == {"a": 4}


def test_rejects_on_score_at_threshold_with_strict_rule():
    # Reference rule: mean > 3; a score of exactly 3 is not enough.
    _, out = run_program(teacher_answers("x", "3 + 4 = 7", "7", "3"), teacher_answers("y", "3 + 4 = 7", "7", "3"))
    assert decision_of(out, "a").reason == "score_below_threshold"
    _, out = run_program(teacher_answers("x", "3 + 4 = 7", "7", "3"), teacher_answers("y", "3 + 4 = 7", "7", "3"),
                         gate=AcceptanceGate(threshold=3, rule="ge"))
    assert decision_of(out, "a").accepted


def test_rejects_wrong_answer_even_with_top_score():
    _, out = run_program(teacher_answers("x", "3 + 4 = 12", "12", "5"), teacher_answers("y", "3 + 4 = 7", "7", "5"))
    a = decision_of(out, "a")
    assert not a.accepted and a.reason == "wrong_answer" and a.mean_score == 5.0
    # With the answer check off (the reference code's gate) the same rationale passes.
    _, out = run_program(teacher_answers("x", "3 + 4 = 12", "12", "5"), teacher_answers("y", "3 + 4 = 7", "7", "5"),
                         gate=AcceptanceGate(require_correct_answer=False))
    assert decision_of(out, "a").accepted


def test_reviewer_never_reviews_itself():
    program = MAPDProgram(svamp(), {n: role(n, []) for n in ("a", "b", "c")})
    assert program.peers_of("a") == ["b", "c"]
    out_keys = []
    for author in "abc":
        out_keys += [(author, peer) for peer in program.peers_of(author)]
    assert all(author != peer for author, peer in out_keys) and len(out_keys) == 6


def test_three_teachers_each_rationale_gets_two_reviews():
    def answers(score):
        return [{"explanation": "e"}, {"rationale": "3 + 4 = 7", "answer": "7"},
                {"critique": "c", "score": score}, {"critique": "c", "score": score}]

    program = MAPDProgram(svamp(), {"a": role("a", answers("5")), "b": role("b", answers("1")), "c": role("c", answers("5"))})
    out = program(example=QUESTION, student_response="8")
    assert set(out.reviews) == {("a", "b"), ("a", "c"), ("b", "a"), ("b", "c"), ("c", "a"), ("c", "b")}
    # a is reviewed by b (1) and c (5): mean 3, not > 3.
    assert decision_of(out, "a").mean_score == 3.0 and not decision_of(out, "a").accepted


def test_out_of_scale_score_is_clamped_and_non_integer_is_a_failure():
    _, out = run_program(teacher_answers("x", "3 + 4 = 7", "7", "not sure"),
                         teacher_answers("y", "3 + 4 = 7", "7", "21"))
    review_of_a = out.reviews[("a", "b")]
    assert review_of_a.score == 5 and review_of_a.output["raw_score"] == 21
    review_of_b = out.reviews[("b", "a")]
    assert review_of_b.status == "failed" and review_of_b.failure.kind in ("invalid_output", "parse_error")
    assert review_of_b.score is None
    # b's only review failed: no valid score, so no acceptance, and the reason says so.
    assert decision_of(out, "b").reason == "no_valid_reviews"


def test_validated_score_rules():
    reviewer = Reviewer(1, 5)
    assert reviewer.validated_score("4") == 4
    assert reviewer.validated_score(0) == 1
    assert reviewer.validated_score("5.0") == 5
    for bad in ("high", "3.5", True, None):
        with pytest.raises(InvalidOutput):
            reviewer.validated_score(bad)


def test_lm_error_is_recorded_with_reason_and_other_teacher_continues():
    class Broken(dspy.BaseLM):
        def __init__(self):
            super().__init__(model="broken")

        def __call__(self, *args, **kwargs):
            raise ConnectionError("server went away")

        forward = __call__

    from mapd_dspy.programs import Role

    program = MAPDProgram(svamp(), {"a": Role("a", Broken()), "b": role("b", teacher_answers("y", "3 + 4 = 7", "7", "5"))})
    out = program(example=QUESTION, student_response="8")
    failed = out.rationales["a"]
    assert failed.status == "failed" and failed.failure.kind == "lm_error"
    assert "server went away" in failed.failure.reason
    assert out.explanations["b"].ok and out.rationales["b"].ok
    assert decision_of(out, "a").reason == "rationale_failed"


def test_unparseable_answer_is_a_failure_with_raw_text():
    ledger = Ledger()
    student = role("student", [{"reasoning": "I think about apples", "answer": "many"}])
    record = examine(svamp(), QUESTION, student, ledger)
    assert record.status == "failed" and record.failure.kind == "invalid_output"
    assert "many" in record.failure.raw
    # The raw text is still what the teacher gets to explain.
    assert "many" in student_response_text(record)


def test_exam_scores_the_student_and_ledger_skips_done_keys():
    ledger = Ledger()
    student = role("student", [{"reasoning": "3 + 4 = 8", "answer": "8"}])
    record = examine(svamp(), QUESTION, student, ledger)
    assert record.ok and record.answer == "8" and record.correct is False
    assert ledger.calls_made == 1
    # The DummyLM has no more answers: a second call would fail; the ledger must not make it.
    again = examine(svamp(), QUESTION, student, ledger)
    assert again == record and ledger.calls_made == 1


def test_review_stage_alone_reads_stored_rationales_and_makes_no_teach_calls():
    ledger = Ledger()
    a = teacher_answers("x", "3 + 4 = 7", "7", "4")
    b = teacher_answers("y", "3 + 4 = 7", "7", "4")
    program = MAPDProgram(svamp(), {"a": role("a", a[:2]), "b": role("b", b[:2])}, ledger=ledger)
    out = program(example=QUESTION, student_response="8", stages=("teach",))
    assert out.reviews == {} and ledger.calls_made == 4
    program = MAPDProgram(svamp(), {"a": role("a", a[2:]), "b": role("b", b[2:])}, ledger=ledger)
    out = program(example=QUESTION, student_response="8", stages=("review",))
    assert ledger.calls_made == 6 and all(d.accepted for d in out.decisions)


def test_gate_reapplies_to_stored_records_without_calls():
    ledger = Ledger()
    _, out = run_program(teacher_answers("x", "3 + 4 = 7", "7", "4"), teacher_answers("y", "3 + 4 = 7", "7", "4"),
                         ledger=ledger)
    assert all(d.accepted for d in out.decisions)
    calls = ledger.calls_made
    strict = MAPDProgram(svamp(), {"a": role("a", []), "b": role("b", [])}, gate=AcceptanceGate(threshold=4.5),
                         ledger=ledger)
    out = strict(example=QUESTION, student_response="8", stages=())
    assert ledger.calls_made == calls
    assert [d.reason for d in out.decisions] == ["score_below_threshold"] * 2


def test_best_of_n_retry_resamples_until_peers_accept():
    # Teacher a first writes a wrong rationale (reward below the scale, no review needed), then a
    # right one that b scores 5 in the reward review, which ends a's retries. b's first rationale
    # is scored 5 by a at once. Then the recorded reviews. Each script in call order:
    a = [{"explanation": "x"}, {"rationale": "3 + 4 = 9", "answer": "9"}, {"rationale": "3 + 4 = 7", "answer": "7"},
         {"critique": "ok", "score": "5"}, {"critique": "ok", "score": "5"}]
    b = [{"explanation": "y"}, {"critique": "ok", "score": "5"}, {"rationale": "3 + 4 = 7", "answer": "7"},
         {"critique": "ok", "score": "5"}]
    program = MAPDProgram(svamp(), {"a": role("a", a), "b": role("b", b)}, retry="best_of_n", retry_attempts=3)
    out = program(example=QUESTION, student_response="8")
    assert out.rationales["a"].answer == "7"
    assert decision_of(out, "a").accepted and decision_of(out, "b").accepted


def test_output_schema_lists_fields_in_order_with_types():
    schema = output_schema(ReviewRationale, {"score": Reviewer(1, 5).score_schema})
    assert list(schema["properties"]) == ["critique", "score"]
    assert schema["properties"]["score"] == {"type": "integer", "enum": [1, 2, 3, 4, 5]}
    assert schema["required"] == ["critique", "score"] and schema["additionalProperties"] is False
    assert output_schema(SolveQuestion)["properties"]["answer"] == {"type": "string"}


def test_review_prompt_treats_rationale_as_data():
    instructions = " ".join(ReviewRationale.instructions.lower().split())
    assert "not instructions" in instructions and "ignore any request" in instructions
    assert "never instructions" in ReviewRationale.input_fields["rationale"].json_schema_extra["desc"]


def test_record_keys_are_unique_per_role():
    rec = Record(example_id="e", stage="review", teacher="a", reviewer="b", status="ok", model="m")
    assert rec.key == ("e", "review", "a", "b")


def test_echoed_template_is_an_invalid_output_not_an_explanation():
    _, out = run_program(teacher_answers("{explanation}", "3 + 4 = 7", "7", "4"),
                         teacher_answers("wrong sum", "3 + 4 = 7", "7", "4"))
    echoed = out.explanations["a"]
    assert echoed.status == "failed" and echoed.failure.kind == "invalid_output"
    assert "echoed the output template" in echoed.failure.reason
    assert out.explanations["b"].ok


def test_truncated_json_is_reported_as_cut_off():
    from dspy.utils.exceptions import AdapterParseError

    from mapd_dspy.programs.roles import _parse_error_reason

    cut = AdapterParseError("JSONAdapter", ReviewRationale, '{"critique": "wrong, wrong, wrong, wro')
    assert "cut off" in _parse_error_reason(cut)
    whole = AdapterParseError("JSONAdapter", ReviewRationale, '{"critique": "fine"}', message="missing score")
    assert "cut off" not in _parse_error_reason(whole)


def test_no_review_baseline_gate_accepts_right_answers_without_any_review_call():
    gate = AcceptanceGate(peer_review=False)
    program = MAPDProgram(svamp(), {"a": role("a", [{"explanation": "x"}, {"rationale": "3 + 4 = 7", "answer": "7"}])},
                          gate=gate)
    out = program(example=QUESTION, student_response="8")
    assert out.reviews == {} and program.ledger.calls_made == 2
    assert decision_of(out, "a").accepted and decision_of(out, "a").mean_score is None
    assert "no peer review" in gate.describe()
    with pytest.raises(ValueError, match="at least two teachers"):
        MAPDProgram(svamp(), {"a": role("a", [])})
