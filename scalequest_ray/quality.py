"""Pure checks of generated question text: is it a well-formed English math question, and how
diverse is a set of them. Used by the quality benchmark (and by the language filter later)."""

from __future__ import annotations

import re
from typing import Iterable, Optional

_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?|\d+(?:[.,]\d+)?")
_NUMBER = re.compile(r"\d|\b(?:zero|one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|twenty|hundred|thousand|half|twice|double|triple)\b", re.I)
# A question sentence: one that ends with "?", or an instruction that opens a sentence with a
# math verb ("Find the ...", "Compute ..."). A verb in mid-sentence ("... to determine what ...")
# does not count.
_QUESTION = re.compile(
    r"\?\s*$|\?\s+[\"'”’)]?\s*|(?:^|[.!?:]\s+|\n)(?:find|compute|calculate|determine|evaluate|solve|prove|show that|simplify|how many|how much|what is)\b",
    re.I | re.M)
_CODE = re.compile(r"```|\bdef \w+\(|\bimport \w+|#include|\bfunction\s*\(|\bprint\(|;\s*$|</?\w+>", re.M)


def language(text: str) -> str:
    """ISO 639-1 code from py3langid (its model ships inside the wheel; nothing is downloaded)."""
    import py3langid

    return py3langid.classify(text)[0]


def wellformed_reason(text: Optional[str], min_words: int = 8, max_words: int = 150) -> Optional[str]:
    """None if `text` is a well-formed English math question, else why not."""
    if not text or not text.strip():
        return "empty"
    words = _WORD.findall(text)
    if len(words) < min_words:
        return "too_short"
    if len(words) > max_words:
        return "too_long"
    if _CODE.search(text):
        return "code"
    if language(text) != "en":
        return "not_english"
    if not _QUESTION.search(text):
        return "no_question"
    if not _NUMBER.search(text):
        return "no_number"
    return None


def distinct_ngram_ratio(texts: Iterable[str], n: int = 4) -> float:
    """Distinct word n-grams / all word n-grams over the set (1.0 = no n-gram repeats)."""
    total, distinct = 0, set()
    for t in texts:
        words = [w.lower() for w in _WORD.findall(t or "")]
        grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
        total += len(grams)
        distinct.update(grams)
    return len(distinct) / total if total else 0.0


def summarize(texts: list[str]) -> dict:
    reasons = [wellformed_reason(t) for t in texts]
    lengths = [len(_WORD.findall(t or "")) for t in texts]
    return {
        "n": len(texts),
        "wellformed_share": sum(r is None for r in reasons) / max(len(texts), 1),
        "distinct_4gram_ratio": distinct_ngram_ratio(texts, 4),
        "mean_words": sum(lengths) / max(len(lengths), 1),
        "rejected_by_reason": {r: reasons.count(r) for r in sorted(set(reasons) - {None})},
    }
