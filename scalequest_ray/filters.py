"""Pure functions behind the filtering stages: language and question checks, text
normalisation, MinHash/LSH keys, benchmark n-grams, solvability verdicts, answer agreement.

Nothing here touches Ray, storage or models, so each rule is unit-tested on hand-made text.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Iterable, Optional

from .prompts import VERDICT_MARKER
from .quality import _CODE, _NUMBER, _QUESTION, _WORD

# --- language / "one math question" -----------------------------------------------------------

# Text that is (or contains) a worked solution rather than a question.
_SOLUTION = re.compile(
    r"\\boxed\{|^\s*(?:solution|answer|step \d+)\s*[:.]|\bthe (?:final )?answer is\b|^\s*therefore\b",
    re.I | re.M)
# A numbered list of several problems ("1. ... 2. ...", "Question 2:", "Problem 3)").
_ENUMERATED = re.compile(r"^\s*(?:(?:question|problem|exercise)\s*)?\d+\s*[.):]\s+\S", re.I | re.M)


_IDENTIFIER = None


def detect_language(text: str, wanted: Iterable[str], confident: float = 0.5) -> str:
    """py3langid's language for `text`, or a wanted one when py3langid is unsure.

    Short math text ("Solve for x: 3x + 7 = 22.") is mostly symbols: py3langid then spreads its
    probability thin (Danish 0.09, Norwegian 0.09, English 0.08). Below `confident` we accept a
    wanted language if it is among the top three; a confident German/Chinese call still drops.
    """
    global _IDENTIFIER
    if _IDENTIFIER is None:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        _IDENTIFIER = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    ranked = _IDENTIFIER.rank(text)[:3]
    top, prob = ranked[0]
    if top in wanted or prob >= confident:
        return top
    return next((lang for lang, _ in ranked if lang in wanted), top)


def language_reason(text: Optional[str], languages: Iterable[str] = ("en",), min_words: int = 5,
                    max_words: int = 300, require_question: bool = True, require_number: bool = False,
                    ascii_only: bool = False, min_language_confidence: float = 0.5) -> Optional[str]:
    """None if `text` is one math question in one of `languages`; else the reason to drop it."""
    if not isinstance(text, str) or not text.strip():
        return "empty"
    if ascii_only and not text.isascii():
        return "non_ascii"
    if _CODE.search(text):
        return "code"
    words = _WORD.findall(text)
    # Language before length: a German or Chinese question is "not English", not "too short".
    lang = detect_language(text, languages, min_language_confidence)
    if lang not in languages:
        return f"language_{lang}"
    if len(words) < min_words:
        return "too_short"
    if len(words) > max_words:
        return "too_long"
    if _SOLUTION.search(text):
        return "contains_solution"
    if len(_ENUMERATED.findall(text)) >= 2:
        return "multiple_questions"
    if require_question and not _QUESTION.search(text):
        return "no_question"
    if require_number and not _NUMBER.search(text):
        return "no_number"
    return None


# --- normalisation, exact and near-duplicate keys ---------------------------------------------

_NON_WORD = re.compile(r"[^\w\s]")
_SPACES = re.compile(r"\s+")
_DIGITS = re.compile(r"\d+(?:[.,]\d+)*")


def normalize_text(text: str, mask_numbers: bool = False) -> str:
    """Case-, accent-width-, punctuation- and whitespace-insensitive form of a question."""
    text = unicodedata.normalize("NFKC", text or "").lower()
    if mask_numbers:
        text = _DIGITS.sub(" 0 ", text)
    text = _NON_WORD.sub(" ", text)
    return _SPACES.sub(" ", text).strip()


def stable_hash(text: str) -> int:
    """63-bit hash, the same in every process (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") >> 1


def shingles(text: str, words: int) -> set[str]:
    tokens = text.split()
    if len(tokens) <= words:
        return {" ".join(tokens)} if tokens else set()
    return {" ".join(tokens[i:i + words]) for i in range(len(tokens) - words + 1)}


def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) minimising false positives + negatives at `threshold` (datasketch's
    own optimiser, the one its MinHashLSH uses)."""
    from datasketch.lsh import _optimal_param

    return _optimal_param(threshold, num_perm, 0.5, 0.5)


class MinHasher:
    """MinHash signatures (datasketch) and their LSH band keys. Two texts share a band key with
    high probability iff their shingle Jaccard similarity is above the threshold."""

    def __init__(self, num_perm: int, threshold: float, shingle_words: int, seed: int = 1):
        from datasketch import MinHash

        self.num_perm, self.shingle_words = num_perm, shingle_words
        self.bands, self.rows = lsh_params(threshold, num_perm)
        # One template; copies share its permutations (building them is the costly part).
        self._template = MinHash(num_perm=num_perm, seed=seed)

    def band_keys(self, normalized: str) -> list[str]:
        items = shingles(normalized, self.shingle_words)
        if not items:
            return []
        m = self._template.copy()
        m.update_batch([s.encode() for s in items])
        hv = m.hashvalues
        keys = []
        for b in range(self.bands):
            band = hv[b * self.rows:(b + 1) * self.rows].tobytes()
            keys.append(f"b{b}:" + hashlib.blake2b(band, digest_size=8).hexdigest())
        return keys


def ngram_hashes(text: str, n: int) -> set[int]:
    """Hashes of the word n-grams of the normalised text (all of it, if shorter than n)."""
    tokens = normalize_text(text).split()
    if not tokens:
        return set()
    if len(tokens) < n:
        return {stable_hash(" ".join(tokens))}
    return {stable_hash(" ".join(tokens[i:i + n])) for i in range(len(tokens) - n + 1)}


# --- solvability verdicts ---------------------------------------------------------------------

_VERDICT = re.compile(r"^\W*" + re.escape(VERDICT_MARKER.rstrip(":")) + r"\W*\s*(yes|no)\b\W*$", re.I)
_BARE = re.compile(r"^\W*(yes|no)\W*$", re.I)


def verdict_regex(reasoning_max_chars: int) -> str:
    """What a constrained judge may write (vLLM structured outputs, xgrammar): one line of
    reasoning of at most `reasoning_max_chars` characters, then the verdict line. Every reply it
    admits is read by parse_verdict."""
    return r"[^\n]{0,%d}\n%s (Yes|No)" % (reasoning_max_chars, re.escape(VERDICT_MARKER))


def parse_verdict(text: Optional[str]) -> Optional[bool]:
    """The judge's final verdict: True (solvable), False, or None if its LAST non-empty line is
    not a verdict. "Yes" somewhere in the reasoning does not count."""
    if not text:
        return None
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return None
    last = lines[-1].replace("*", "")
    m = _VERDICT.match(last) or _BARE.match(last)
    return None if m is None else m.group(1).lower() == "yes"


# --- answers ----------------------------------------------------------------------------------

_TEXT_WRAP = re.compile(r"\\(?:text|mathrm|textbf|mbox)\{([^{}]*)\}")
_UNITS = re.compile(r"\s*(?:\^\\circ|\^\{\\circ\}|°|\\%|%|degrees?|dollars?|cents?|units?|cm|m|km|kg|g|hours?|minutes?|seconds?)\s*$",
                    re.I)


def normalize_answer(answer: Optional[str]) -> Optional[str]:
    """A canonical string for an extracted final answer (None if there is none)."""
    if answer is None:
        return None
    a = str(answer).strip()
    for _ in range(2):
        a = _TEXT_WRAP.sub(r"\1", a)
    a = a.strip().strip("$").strip()
    a = a.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\left", "").replace("\\right", "")
    a = a.replace("\\!", "").replace("\\,", "").replace("\\ ", " ").replace("\\$", "")
    a = re.sub(r"^(?:x|y|n|k|a)\s*=\s*", "", a)  # "x = 5" -> "5"
    a = _UNITS.sub("", a).rstrip(".").strip()
    if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", a):  # 1,000 -> 1000
        a = a.replace(",", "")
    if re.fullmatch(r"-?\d+\.\d*?0+", a):  # 2.50 -> 2.5, 3.0 -> 3
        a = a.rstrip("0").rstrip(".")
    return a or None


def gold_answer(raw, fmt: str) -> Optional[str]:
    """The reference answer of a labelled problem, from how its dataset writes it."""
    from .text import extract_boxed

    if raw is None:
        return None
    raw = str(raw)
    if fmt == "gsm8k":
        return normalize_answer(raw.split("####")[-1]) if "####" in raw else None
    if fmt == "boxed":
        return normalize_answer(extract_boxed(raw))
    return normalize_answer(raw)


def _math_verify_equal(a: str, b: str) -> bool:
    from math_verify import parse, verify

    from .text import math_verify_kwargs

    try:
        kw = math_verify_kwargs()
        pa_, pb = parse(f"${a}$", **kw), parse(f"${b}$", **kw)
        if not pa_ or not pb:
            return False
        return bool(verify(pa_, pb, **math_verify_kwargs("timeout_seconds")))
    except Exception:
        return False


def answers_equal(a: Optional[str], b: Optional[str]) -> bool:
    """Same final answer: equal after normalisation, or mathematically equal per math-verify."""
    a, b = normalize_answer(a), normalize_answer(b)
    if a is None or b is None:
        return False
    return a == b or _math_verify_equal(a, b)


def answer_groups(answers: list[Optional[str]]) -> list[Optional[int]]:
    """Cluster label per answer (None for no answer); equal answers share a label."""
    labels: list[Optional[int]] = []
    reps: list[str] = []
    for ans in answers:
        if normalize_answer(ans) is None:
            labels.append(None)
            continue
        for i, rep in enumerate(reps):
            if answers_equal(ans, rep):
                labels.append(i)
                break
        else:
            reps.append(ans)
            labels.append(len(reps) - 1)
    return labels


def majority(answers: list[Optional[str]]) -> tuple[Optional[str], float, list[bool]]:
    """(majority answer, its share of ALL candidates, per-candidate "agrees with it").
    Ties go to the cluster seen first; no answers at all -> (None, 0.0, all False)."""
    labels = answer_groups(answers)
    counts: dict[int, int] = {}
    for lab in labels:
        if lab is not None:
            counts[lab] = counts.get(lab, 0) + 1
    if not counts:
        return None, 0.0, [False] * len(answers)
    best = max(counts, key=lambda k: (counts[k], -k))
    first = labels.index(best)
    return normalize_answer(answers[first]), counts[best] / len(answers), [lab == best for lab in labels]
