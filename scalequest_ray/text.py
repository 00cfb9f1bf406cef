"""Pure functions on text: prompt building, seeds, answer extraction. No model, no Ray."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Optional

from .prompts import SOLVER_USER_TEMPLATE, TEMPLATE_SENTINEL

# Seeds stay in the non-negative int63 range (torch generators, Arrow int64 columns).
_SEED_BITS = 63


def derive_seed(run_seed: int, *parts: object) -> int:
    """A per-row sampling seed from the run seed and the row's identity.

    Deterministic (a re-run reproduces the same rows) and, being a 63-bit hash, distinct across
    rows in practice (collision chance for 10M rows is about 1e-5).
    """
    key = "\x1f".join([str(run_seed), *map(str, parts)]).encode()
    digest = hashlib.blake2b(key, digest_size=8).digest()
    return int.from_bytes(digest, "big") >> (64 - _SEED_BITS)


@dataclass(frozen=True)
class TurnTemplate:
    """A chat template cut around the user turn's content.

    `prefix` is everything up to where the user's text starts (system prompt, role markers);
    `suffix` is what follows it up to where the assistant's text starts; `end_of_turn` is the
    marker that closes a user turn (the stop sequence when a model writes the user turn itself).
    """

    prefix: str
    suffix: str
    end_of_turn: str

    def wrap(self, user_text: str) -> str:
        return self.prefix + user_text + self.suffix


def turn_template(tokenizer) -> TurnTemplate:
    """Cut the tokenizer's own chat template around a user turn (works for ChatML, Llama-3, ...)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the model's tokenizer has no chat template")
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": TEMPLATE_SENTINEL}], tokenize=False, add_generation_prompt=True
    )
    if rendered.count(TEMPLATE_SENTINEL) != 1:
        raise ValueError("the chat template does not render the user message verbatim")
    prefix, suffix = rendered.split(TEMPLATE_SENTINEL)
    # The end-of-turn marker is what the template writes right after the content, before any
    # whitespace or the next role's header: compare against the rendering without generation prompt.
    closed = tokenizer.apply_chat_template(
        [{"role": "user", "content": TEMPLATE_SENTINEL}], tokenize=False, add_generation_prompt=False
    ).split(TEMPLATE_SENTINEL)[1]
    end = closed.strip() or suffix.strip()
    eot_token = getattr(tokenizer, "eos_token", None)
    # Prefer a single special token that begins the closing text (e.g. <|im_end|>, <|eot_id|>).
    for token in tokenizer.all_special_tokens:
        if token and end.startswith(token):
            end = token
            break
    else:
        end = end.split()[0] if end else (eot_token or "")
    return TurnTemplate(prefix=prefix, suffix=suffix, end_of_turn=end)


def stop_criteria(tokenizer, end_of_turn: str) -> tuple[list[int], list[str]]:
    """(stop token ids, stop strings) that end a turn: the end-of-turn marker as a token id when it
    is one token (special tokens are skipped in decoded text, so a stop string would never match),
    else as a string; plus EOS."""
    ids, strings = set(), []
    if end_of_turn:
        encoded = tokenizer.encode(end_of_turn, add_special_tokens=False)
        if len(encoded) == 1:
            ids.add(encoded[0])
        else:
            strings.append(end_of_turn)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids), strings


def solver_user_text(query: str, instruction: str) -> str:
    return SOLVER_USER_TEMPLATE.format(query=query.strip(), instruction=instruction).strip()


def extract_boxed(text: Optional[str]) -> Optional[str]:
    """Content of the LAST \\boxed{...} (or \\fbox{...}) in text, nested braces handled; else None."""
    if not text:
        return None
    best = None
    for command in ("\\boxed", "\\fbox"):
        start = text.rfind(command)
        while start != -1:
            i = start + len(command)
            while i < len(text) and text[i] == " ":
                i += 1
            if i < len(text) and text[i] == "{":
                content = _balanced(text, i)
                if content is not None:
                    if best is None or start > best[0]:
                        best = (start, content.strip())
                    break
            start = text.rfind(command, 0, start)
    return best[1] if best else None


def _balanced(text: str, open_at: int) -> Optional[str]:
    depth = 0
    for j in range(open_at, len(text)):
        ch = text[j]
        if ch == "\\" and j + 1 < len(text) and text[j + 1] in "{}":
            continue
        if ch == "{" and (j == 0 or text[j - 1] != "\\"):
            depth += 1
        elif ch == "}" and (j == 0 or text[j - 1] != "\\"):
            depth -= 1
            if depth == 0:
                return text[open_at + 1 : j]
    return None


def finish_reason(num_generated: int, max_tokens: int, last_token: Optional[int], stop_ids: list[int]) -> str:
    """'stop' or 'length'. Ray Data LLM's output row does not carry vLLM's finish_reason, so it is
    derived: a sequence that used its whole token budget without ending on a stop token was cut."""
    if num_generated >= max_tokens and (last_token is None or last_token not in stop_ids):
        return "length"
    return "stop"


# A box holding only punctuation or a code fence ("\\boxed{:}") is no answer; a letter, a digit
# or a LaTeX command (\\pi, \\infty) can be one.
_MEANINGFUL = re.compile(r"[^\W_]|\\[A-Za-z]")


def math_verify_kwargs(limit: str = "parsing_timeout") -> dict:
    """math-verify bounds its work with SIGALRM, which exists only in the main thread: elsewhere
    (a Ray actor's thread pool) it must run without the limit."""
    import threading

    return {} if threading.current_thread() is threading.main_thread() else {limit: None}


def _stated_answer(text: str) -> Optional[str]:
    """The answer a reply states after an anchor ("the answer is", "Final answer:", ...), as
    math-verify extracts it (LaTeX first, then a plain expression), or None.

    Anchors are required: without one, math-verify would take the last number anywhere in the
    text ("She has 5 apples ..." -> 5), and a non-answer counts as a vote in the majority.
    """
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    found = parse(text, extraction_config=[LatexExtractionConfig(try_extract_without_anchor=False),
                                           ExprExtractionConfig(try_extract_without_anchor=False)],
                  fallback_mode="first_match", **math_verify_kwargs())
    # [parsed, matched text] when it parsed; [matched text] alone when only the string matched.
    text_forms = [f for f in found if isinstance(f, str)]
    answer = text_forms[-1].strip() if text_forms else None
    return answer or None


def extract_answer(text: Optional[str]) -> tuple[Optional[str], Optional[str]]:
    """(answer, how): the content of the LAST \\boxed{} ('boxed'); else the answer stated after an
    anchor such as "the answer is" ('answer_is', extracted by math-verify); else (None, None).

    An empty box, punctuation, a code fence or a sentence is never an answer. The last box wins
    (math-verify would read several boxes as one set answer; solvers box intermediate results).
    """
    if not text:
        return None, None
    boxed = extract_boxed(text)
    if boxed is not None and _MEANINGFUL.search(boxed):
        return boxed, "boxed"
    if boxed is None:
        stated = _stated_answer(text)
        if stated:
            return stated, "answer_is"
    return None, None


def choose_direction(run_seed: int, query_id: str) -> str:
    """The QPO rewrite direction for a question, from a seeded per-row draw (reproducible)."""
    return ("solvability", "difficulty")[derive_seed(run_seed, "qpo-direction", query_id) % 2]


def _same_question(a: str, b: str) -> bool:
    squash = lambda s: re.sub(r"\s+", " ", s).strip().strip("\"'“”").strip().lower()  # noqa: E731
    return squash(a) == squash(b)


def parse_rewrite(output: Optional[str], original: str, marker: str) -> tuple[Optional[str], Optional[str]]:
    """(rewritten question, None) or (None, reason) from an optimizer's reply.

    The rewrite is the text after the LAST marker (replies may quote the marker while reasoning),
    with surrounding quotes and markdown emphasis removed. Reasons: missing_marker,
    empty_rewrite, identical (same text as the original up to whitespace, quotes and case).
    """
    if not output:
        return None, "empty_output"
    pattern = re.compile(r"\**\s*" + re.escape(marker.rstrip(":")) + r"\s*:?\s*\**", re.IGNORECASE)
    matches = list(pattern.finditer(output))
    if not matches:
        return None, "missing_marker"
    rewrite = output[matches[-1].end():].strip()
    rewrite = rewrite.strip("*").strip().strip("\"“”").strip()
    if not rewrite:
        return None, "empty_rewrite"
    if _same_question(rewrite, original):
        return None, "identical"
    return rewrite, None
