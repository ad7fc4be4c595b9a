"""Answer normalisation and extraction shared by the tasks: numbers, yes/no, option letters.

Every function here is pure and returns the *normalised* form used as ``Example.gold``:

* numbers: canonical decimal strings, ``"18"``, ``"12.5"``, ``"-3"``, ``"0.75"``;
* yes/no: ``"yes"`` or ``"no"``;
* options: one upper-case letter ``"A"`` .. ``"D"``.

Extraction from free text (a model's reasoning or its ``answer`` field) prefers an explicit final
answer marker over anything else, because chains of thought mention many intermediate values;
the exact rules are in each ``extract_*`` docstring. The three ``*Answers`` mixins at the bottom
turn these functions into the ``extract_answer`` / ``normalize`` / ``is_correct`` trio of a Task.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mapd_dspy.tasks.base import Example

# ---------------------------------------------------------------------------------------------
# Numbers
# ---------------------------------------------------------------------------------------------

# One number as written in prose or LaTeX. The look-behind stops a match from starting inside a
# word ("x2"), inside another number ("1.5" must not yield "5") or right after a digit ("5-3" is
# a subtraction, so its "-" is not a sign). Thousands commas need groups of exactly three digits
# so that a list "1,2,3" stays three numbers. A dot is part of the number only when a digit
# follows, so the full stop of "is 18." is not. Ordinals ("the 3rd turn") are not quantities.
_NUMBER_PATTERN = re.compile(
    r"""
    (?<![\w.])
    (?P<sign>[-−])?
    (?:[$€£]\s?)?
    (?P<sign_after_currency>[-−])?
    (?P<number>(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)
    (?!\d)(?!(?:st|nd|rd|th)\b)
    (?:\s?/\s?(?P<denominator>\d+)(?!\d|\.\d))?
    """,
    re.VERBOSE,
)

# Markers that announce the final answer, strongest first. Each captures the text that follows.
_HASH_MARKER = re.compile(r"####\s*(?P<tail>[^\n]*)")
_BOXED_MARKER = re.compile(r"\\boxed\s*\{(?P<tail>(?:[^{}]|\{[^{}]*\})*)\}")
_ANSWER_MARKER = re.compile(
    r"\banswer\b\s*(?:is|was|would be|will be|:|=)\s*:?\s*(?P<tail>[^\n]*)", re.IGNORECASE
)
# Bold spans are paired left to right, so "**Step 1:** 4 + 5 = 9. **12**" has the spans
# "Step 1:" and "12", never the gap " 4 + 5 = 9. " between them.
_BOLD_SPAN = re.compile(r"\*\*(?P<tail>[^*\n]+?)\*\*")
# Only bold spans that open with the number: "**Step 1:**" is a heading, not an answer.
_OPENS_WITH_NUMBER = re.compile(r"^\s*[-−$€£]?\s?\.?\d")


def _latex_to_plain(text: str) -> str:
    """Rewrite the LaTeX a model may put around a number (\\frac{3}{4}, \\$, \\,) as plain text."""
    text = re.sub(r"\\d?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}", r"\1/\2", text)
    text = text.replace("\\$", "$").replace("\\%", "%").replace("\\!", "")
    return re.sub(r"(?<=\d)\\,(?=\d{3})", ",", text)


def _match_to_fraction(match: re.Match[str]) -> Fraction | None:
    """Exact value of one ``_NUMBER_PATTERN`` match, or None for a zero denominator."""
    value = Fraction(Decimal(match["number"].replace(",", "")))
    if match["denominator"] is not None:
        denominator = int(match["denominator"])
        if denominator == 0:
            return None
        value /= denominator
    if match["sign"] or match["sign_after_currency"]:
        value = -value
    return value


def format_number(value: Fraction) -> str:
    """Canonical text of a number: no exponent, no trailing zeros, no "-0".

    Terminating decimals are written exactly ("0.75"); others are rounded to 12 decimals, which
    the 1e-6 relative tolerance of :func:`numbers_match` absorbs.
    """
    if value.denominator == 1:
        return str(value.numerator)
    text = f"{float(value):.12f}".rstrip("0").rstrip(".")
    if _is_terminating(value):
        text = format(Decimal(value.numerator) / Decimal(value.denominator), "f")
    return "0" if text in ("-0", "") else text


def _is_terminating(value: Fraction) -> bool:
    denominator = value.denominator
    for prime in (2, 5):
        while denominator % prime == 0:
            denominator //= prime
    return denominator == 1


def _numbers_in(text: str) -> list[Fraction]:
    values = (_match_to_fraction(m) for m in _NUMBER_PATTERN.finditer(_latex_to_plain(text)))
    return [value for value in values if value is not None]


def normalize_number(value: object) -> str | None:
    """Canonical form of a raw numeric answer (int, float, Decimal or text), None if not a number.

    Text must be a single number, possibly with currency, thousands commas, a percent sign, a
    unit word or a trailing full stop around it ("$1,234.50", "25%", "18 apples", "3/4"); text with
    several numbers is not a raw value and goes through :func:`extract_number` instead.
    """
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, (float, Decimal)):
        if not math.isfinite(value):
            return None
        return format_number(Fraction(Decimal(str(value))))
    if isinstance(value, str):
        numbers = _numbers_in(value)
        return format_number(numbers[0]) if len(numbers) == 1 else None
    return None


def _bold_spans(text: str) -> list[str]:
    return [match["tail"] for match in _BOLD_SPAN.finditer(text)]


def _number_marker_tails(text: str) -> list[tuple[list[str], bool]]:
    """Text after each kind of final-answer marker, strongest kind first, with whether the
    *first* number of a tail is the answer ("answer is 7 apples, then 9") or the last."""
    return [
        ([match["tail"] for match in _HASH_MARKER.finditer(text)], True),
        ([match["tail"] for match in _BOXED_MARKER.finditer(text)], False),
        ([match["tail"] for match in _ANSWER_MARKER.finditer(text)], True),
        ([span for span in _bold_spans(text) if _OPENS_WITH_NUMBER.match(span)], False),
    ]


def extract_number(text: str) -> str | None:
    """The final numeric answer in free text, normalised; None when the text has no number.

    Rules, in order: the number after the last ``#### ``; the last number inside the last
    ``\\boxed{...}``; the first number after the last "answer is" / "answer:" / "answer =" on the
    same line; the last number in the last ``**bold**`` span holding one; otherwise the last number
    anywhere. Numbers may carry thousands commas, a currency sign, a percent sign (dropped: "25%"
    is 25), a sign ("-3", "$-3", "-$3") or be a fraction ("3/4" is 0.75, also ``\\frac{3}{4}``).
    """
    if not isinstance(text, str):
        return None
    for tails, first_number_is_answer in _number_marker_tails(text):
        for tail in reversed(tails):
            numbers = _numbers_in(tail)
            if numbers:
                return format_number(numbers[0] if first_number_is_answer else numbers[-1])
    numbers = _numbers_in(text)
    return format_number(numbers[-1]) if numbers else None


def numbers_match(prediction: str | None, gold: str, relative_tolerance: float = 1e-6) -> bool:
    """Whether two normalised numbers are equal within a small relative tolerance."""
    if prediction is None:
        return False
    try:
        predicted_value, gold_value = float(prediction), float(gold)
    except ValueError:
        return False
    return math.isclose(predicted_value, gold_value, rel_tol=relative_tolerance, abs_tol=1e-9)


# ---------------------------------------------------------------------------------------------
# Yes / no
# ---------------------------------------------------------------------------------------------

_YES_WORDS = {"yes": "yes", "true": "yes", "correct": "yes"}
_NO_WORDS = {"no": "no", "false": "no", "incorrect": "no"}
_YES_NO_WORDS = {**_YES_WORDS, **_NO_WORDS}
_YES_NO_WORD = r"(?P<word>yes|no|true|false|incorrect|correct)\b"
_YES_NO_ANYWHERE = re.compile(r"\b" + _YES_NO_WORD, re.IGNORECASE)
_YES_NO_MARKERS = (
    re.compile(r"\\boxed\s*\{\s*(?:\\text(?:bf)?\s*\{)?\s*" + _YES_NO_WORD, re.IGNORECASE),
    re.compile(
        r"\banswer\b\s*(?:is|was|would be|will be|:|=)\s*:?\s*[*\"'“(\[]*\s*" + _YES_NO_WORD,
        re.IGNORECASE,
    ),
)
_YES_NO_BOLD = re.compile(r"^\W*" + _YES_NO_WORD, re.IGNORECASE)
_LEADING_YES_NO = re.compile(r"^\W*" + _YES_NO_WORD, re.IGNORECASE)


def normalize_yes_no(value: object) -> str | None:
    """"yes"/"no" for a raw answer: a bool, or text that is one of yes/no/true/false/correct/
    incorrect (any case, surrounding punctuation ignored); otherwise falls back to
    :func:`extract_yes_no` on the text. None when nothing fits."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if not isinstance(value, str):
        return None
    bare = re.sub(r"[^a-z]", "", value.lower())
    if bare in _YES_NO_WORDS:
        return _YES_NO_WORDS[bare]
    return extract_yes_no(value)


def extract_yes_no(text: str) -> str | None:
    """The final yes/no answer in free text, None when there is none.

    Rules, in order: the word inside the last ``\\boxed{...}``; the word right after the last
    "answer is" / "answer:"; the word opening the last ``**bold**`` span; the word the text opens
    with ("Yes, because ..."), since a reply that leads with its verdict often says "no" again in
    passing later; otherwise the last yes/no word anywhere. Words: yes/true/correct mean "yes",
    no/false/incorrect mean "no".
    """
    if not isinstance(text, str):
        return None
    bold_matches = [_YES_NO_BOLD.match(span) for span in _bold_spans(text)]
    candidates = (
        *(list(marker.finditer(text)) for marker in _YES_NO_MARKERS),
        [match for match in bold_matches if match],
        list(_LEADING_YES_NO.finditer(text)),
    )
    for matches in candidates:
        if matches:
            return _YES_NO_WORDS[matches[-1]["word"].lower()]
    matches = list(_YES_NO_ANYWHERE.finditer(text))
    return _YES_NO_WORDS[matches[-1]["word"].lower()] if matches else None


# ---------------------------------------------------------------------------------------------
# Option letters
# ---------------------------------------------------------------------------------------------

OPTION_LETTERS = ("A", "B", "C", "D")

# A letter counts as an answer only when no word character follows it. Lower-case "a" is also an
# English article, so it counts only when no further word follows: "the answer is a bit unclear"
# must not read as option A. Marker words are matched case-insensitively through scoped (?i:...)
# groups so that the letter itself stays case-sensitive.
_LETTER = r"(?P<letter>[A-Db-d](?![\w'])|a(?![\w'])(?!\s+[A-Za-z]))"
_FINAL_ANSWER_WORDS = r"(?i:\banswer\b\s*(?:is|was|would be|will be|:|=)\s*:?)"
_OPTION_WORD = r"(?i:\b(?:option|choice)\s+)"
_OPTION_FINAL_MARKERS = (
    re.compile(r"\\boxed\s*\{\s*(?:\\text(?:bf)?\s*\{)?\s*\(?" + _LETTER),
    re.compile(
        _FINAL_ANSWER_WORDS + r"\s*[*\"'“]*\s*(?:" + _OPTION_WORD + r")?[(\[]?\s*" + _LETTER
    ),
)
# The content of a bold span that names an option: "B", "(B)", "B. text", "Option B"; text after
# the letter only behind a "." ":" or ")", so that a bold "**A man ...**" is not an answer.
_OPTION_BOLD = re.compile(
    r"^\s*(?:" + _OPTION_WORD + r")?\(?(?P<letter>[A-D])(?:\)|[.:])?(?:(?<=[.:)]).*)?\s*$"
)
_OPTION_MENTIONS = (
    re.compile(_OPTION_WORD + r"\(?" + _LETTER),
    re.compile(r"\((?P<letter>[A-D])\)"),
    re.compile(r"^\s*(?P<letter>[A-D])[.):]", re.MULTILINE),
)
_BARE_LETTER = re.compile(r"^\W*(?P<letter>[A-Da-d])\W*$")


def normalize_option(value: object) -> str | None:
    """Upper-case letter for a raw option answer: "B", "b", "(B)", "B.", "Option B", "B) text";
    other text goes through :func:`extract_option` (without option texts). None otherwise."""
    if not isinstance(value, str):
        return None
    bare = _BARE_LETTER.match(value)
    if bare:
        return bare["letter"].upper()
    return extract_option(value)


def extract_option(text: str, options: tuple[str, ...] = ()) -> str | None:
    """The chosen option letter in free text, None when none is found.

    Rules, in order, each taking its last match: a final-answer marker ("\\boxed{B}",
    "answer is b", "Answer: (C)", "**D**"); a marked mention ("option B", "choice c", "(B)", a
    line opening with "B." / "B)" / "B:"); a text that is a single letter; the exact text of one
    of ``options`` (case and spacing ignored; the longest wins where one contains another). A bare
    capital "A" in prose ("A man walks in") is never read as an option.
    """
    if not isinstance(text, str):
        return None
    bold_matches = [_OPTION_BOLD.match(span) for span in _bold_spans(text)]
    candidates = (
        *(list(marker.finditer(text)) for marker in _OPTION_FINAL_MARKERS),
        [match for match in bold_matches if match],
        *(list(marker.finditer(text)) for marker in _OPTION_MENTIONS),
        list(_BARE_LETTER.finditer(text)),
    )
    for matches in candidates:
        if matches:
            return matches[-1]["letter"].upper()
    return _option_by_text(text, options)


def _squash(text: str) -> str:
    return " ".join(text.lower().split()).strip(" .")


def _option_by_text(text: str, options: tuple[str, ...]) -> str | None:
    """Letter of the option whose full text appears last in ``text`` (longest on ties).

    None when that text belongs to several options: the published LogiQA files hold a few
    items with two identical options, and naming such a text picks neither.
    """
    haystack = _squash(text)
    best: tuple[int, int, str] | None = None
    for letter, option in zip(OPTION_LETTERS, options):
        needle = _squash(option)
        position = haystack.rfind(needle) if needle else -1
        if position >= 0:
            candidate = (position + len(needle), len(needle), letter)
            best = candidate if best is None or candidate[:2] > best[:2] else best
    if best is None:
        return None
    chosen_text = _squash(options[OPTION_LETTERS.index(best[2])])
    is_shared = sum(_squash(option) == chosen_text for option in options) > 1
    return None if is_shared else best[2]


# ---------------------------------------------------------------------------------------------
# Mixins: give a Task its metric from one answer kind
# ---------------------------------------------------------------------------------------------


class NumericAnswers:
    """extract_answer / normalize / is_correct for tasks whose answer is one number."""

    answer_format = "a single number"

    def extract_answer(self, text: str, example: Example | None = None) -> str | None:
        return extract_number(text)

    def normalize(self, answer: object) -> str | None:
        if isinstance(answer, str):
            return normalize_number(answer) or extract_number(answer)
        return normalize_number(answer)

    def is_correct(self, prediction: str | None, example: Example) -> bool:
        return numbers_match(self.normalize(prediction), example.gold)


class YesNoAnswers:
    """extract_answer / normalize / is_correct for yes/no tasks."""

    answer_format = "yes or no"

    def extract_answer(self, text: str, example: Example | None = None) -> str | None:
        return extract_yes_no(text)

    def normalize(self, answer: object) -> str | None:
        return normalize_yes_no(answer)

    def is_correct(self, prediction: str | None, example: Example) -> bool:
        normalised = self.normalize(prediction)
        return normalised is not None and normalised == example.gold


class OptionAnswers:
    """extract_answer / normalize / is_correct for four-option multiple choice."""

    answer_format = "one option letter (A, B, C or D)"

    def extract_answer(self, text: str, example: Example | None = None) -> str | None:
        return extract_option(text, example.options if example is not None else ())

    def normalize(self, answer: object) -> str | None:
        return normalize_option(answer)

    def is_correct(self, prediction: str | None, example: Example) -> bool:
        if not isinstance(prediction, str):
            return False
        # Option texts are only known per example, so a prediction that names the option by its
        # text (rather than its letter) is resolved here instead of in normalize().
        letter = normalize_option(prediction) or extract_option(prediction, example.options)
        return letter == example.gold
