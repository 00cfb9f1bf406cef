"""The filtering rules as pure functions on hand-made text (no model, no Ray)."""

from __future__ import annotations

import pytest

from scalequest_ray.filters import (MinHasher, answers_equal, gold_answer, language_reason, majority, ngram_hashes,
                                    normalize_answer, normalize_text, parse_verdict)
from scalequest_ray.stages.difficulty import cutoffs, keep_probabilities

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("text,reason", [
    ("What is the area of a circle with radius 3 cm, in terms of \u03c0?", None),
    ("The angle is 35\u00b0. What is its supplement in degrees?", None),
    ("Tom\u2019s garden has 8 rows of 14 plants. How many plants are there?", None),
    ("Solve for x: 3x + 7 = 22.", None),  # an instruction, not a '?'
    ("Wie viele \u00c4pfel hat Anna, wenn sie 3 \u00c4pfel kauft und 2 davon isst?", "language_de"),
    ("\u5c0f\u660e\u6709\u4e09\u4e2a\u82f9\u679c\uff0c\u4ed6\u53c8\u4e70\u4e86\u4e24\u4e2a\uff0c\u73b0\u5728\u4ed6\u6709\u51e0\u4e2a\u82f9\u679c\uff1f", "language_zh"),
    ("def area(r):\n    return 3.14 * r * r\nprint(area(2))", "code"),
    ("   ", "empty"),
    (None, "empty"),
    ("How many?", "too_short"),
    ("A store sells pens for 2 dollars each. Solution: 5 pens cost 10 dollars, so the answer is 10.", "contains_solution"),
    ("1. What is 2 plus 2 in total here?\n2. What is 3 plus 5 in total here?", "multiple_questions"),
    ("I really enjoyed the concert we went to last night with all my friends.", "no_question"),
])
def test_language_reason(text, reason):
    assert language_reason(text) == reason


def test_ascii_only_is_the_reference_rule_and_off_by_default():
    text = "What is the area of a circle with radius 3 cm, in terms of \u03c0?"
    assert language_reason(text) is None
    assert language_reason(text, ascii_only=True) == "non_ascii"
    assert language_reason("Find 2 + 2 and explain why it is so.", require_number=True) is None
    assert language_reason("Find the derivative of the sine function, please?", require_number=True) == "no_number"


def test_near_duplicates_with_changed_numbers_or_spacing_share_a_bucket():
    h = MinHasher(num_perm=128, threshold=0.8, shingle_words=3)
    a = "A farmer has 12 cows and buys 5 more. How many cows does the farmer have now?"
    keys = lambda t: set(h.band_keys(normalize_text(t, mask_numbers=True)))  # noqa: E731
    assert keys(a) & keys("A farmer has 40 cows and buys 9 more. How many cows does the farmer have now?")
    assert keys(a) & keys("A  farmer has 12 cows and\tbuys 5 more.How many cows does the farmer have now ?")
    assert not keys(a) & keys("A train travels at 60 km per hour for 2 hours. How far does it travel in total?")
    assert normalize_text("A  B, c!") == normalize_text("a b c") == "a b c"


def test_benchmark_ngram_overlap():
    bench = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May."
    grams = ngram_hashes(bench, 13)
    contaminated = "Here is one: natalia sold clips to 48 of her friends in April, and then she sold half as many."
    assert ngram_hashes(contaminated, 13) & grams
    assert not ngram_hashes("Natalia sold 48 clips in April. How many in May if half as many?", 13) & grams
    assert ngram_hashes("Short one?", 13) == ngram_hashes("short  ONE", 13)  # shorter than n: whole text


@pytest.mark.parametrize("reply,verdict", [
    ("It states all quantities.\nVerdict: Yes", True),
    ("Missing the price.\n**Verdict: No**", False),
    ("verdict: yes.", True),
    ("Reasoning...\nNo", False),
    ("Yes, it is a math problem, but the rate is missing.\nVerdict: No", False),
    ("Yes, this is a math problem and all facts are given.", None),  # "yes" in the text is not a verdict
    ("Verdict: maybe", None),
    ("", None),
    (None, None),
])
def test_parse_verdict_reads_only_the_last_line(reply, verdict):
    assert parse_verdict(reply) is verdict


def test_every_reply_the_verdict_regex_admits_has_a_verdict():
    """The constrained judge's language (filters.verdict_regex) against the parser: whatever the
    engine writes inside it, parse_verdict reads a verdict; nothing outside it matches."""
    import re
    import random

    from scalequest_ray.filters import verdict_regex

    pattern = re.compile(verdict_regex(40))
    rng = random.Random(3)
    alphabet = "abc XYZ 0123.,:;*-?!'\"\\$()verdict:VERDICT yes no Yes No"
    for _ in range(300):
        reasoning = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        verdict = rng.choice(["Yes", "No"])
        reply = f"{reasoning}\nVerdict: {verdict}"
        assert pattern.fullmatch(reply)
        assert parse_verdict(reply) is (verdict == "Yes"), reply
    for outside in ["x" * 41 + "\nVerdict: Yes", "two\nlines\nVerdict: No", "ok\nVerdict: maybe", "ok\nverdict: yes",
                    "ok Verdict: Yes"]:
        assert not pattern.fullmatch(outside)


def test_constrained_judge_needs_room_for_its_verdict():
    from pydantic import ValidationError

    from scalequest_ray.config import SolvabilityStageConfig

    with pytest.raises(ValidationError, match=r"sampling.max_tokens \(100\) must be at least reasoning_max_chars \+ 16 \(216\)"):
        SolvabilityStageConfig(model="m", sampling={"max_tokens": 100})
    SolvabilityStageConfig(model="m", sampling={"max_tokens": 100}, constrained=False)
    SolvabilityStageConfig(model="m", sampling={"max_tokens": 100}, reasoning_max_chars=84)


@pytest.mark.parametrize("raw,norm", [
    ("$12$", "12"), ("\\text{12 cm}", "12"), ("x = 5", "5"), ("1,000", "1000"), ("2.50", "2.5"), ("3.0", "3"),
    ("\\dfrac{1}{2}", "\\frac{1}{2}"), ("45^\\circ", "45"), ("50\\%", "50"), (" 7. ", "7"), (None, None), ("  ", None),
])
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


def test_answer_equivalence_and_majority():
    assert answers_equal("\\frac{1}{2}", "0.5")
    assert answers_equal("1,000", "1000")
    assert not answers_equal("3", "4")
    assert not answers_equal(None, "4")
    major, share, agrees = majority(["0.5", "\\frac12", None, "3", "\\dfrac{1}{2}"])
    assert major == "0.5" and share == pytest.approx(3 / 5) and agrees == [True, True, False, False, True]
    assert majority([None, None]) == (None, 0.0, [False, False])


def test_gold_answers_from_dataset_formats():
    assert gold_answer("She sold 48/2 = 24 clips in May.\n#### 72", "gsm8k") == "72"
    assert gold_answer("so the area is $\\boxed{\\frac{3}{4}}$.", "boxed") == "\\frac{3}{4}"
    assert gold_answer("239", "plain") == "239"
    assert gold_answer("no marker", "gsm8k") is None


def test_difficulty_cutoffs_and_target_histogram():
    # 10 bins; group g has 10 rows, one per bin: dropping 30% cuts below bin 3.
    assert cutoffs({"g": [1] * 10}, 0.3) == {"g": 3}
    assert cutoffs({"g": [5, 0, 5]}, 0.0) == {"g": 0}
    # target: half easy (< 0.5), half hard; we have 8 easy and 2 hard -> keep all hard, 2 easy.
    probs = keep_probabilities({"g": [4, 4, 0, 0, 0, 0, 0, 1, 1, 0]}, [(0.0, 0.5, 0.5), (0.5, 1.01, 0.5)], 10)
    assert probs["g"] == [pytest.approx(0.25), pytest.approx(1.0)]
