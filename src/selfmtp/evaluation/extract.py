"""Answer extraction and matching, following lm-evaluation-harness conventions.

GSM8K (lm-eval `gsm8k_cot`):
- gold: the number after `#### ` on the answer's last line;
- strict-match: the first "The answer is N." in the output;
- flexible-extract: the last number-like span in the output (regex `(-?[$0-9.,]{2,})|(-?[0-9]+)`);
both sides are normalised the way lm-eval's `regexes_to_ignore` does: commas, `$` and a trailing `.`
removed. The comparison is then an exact string match (so "18.00" does not equal "18", as in lm-eval).

BBH (lm-eval `bbh_cot_fewshot`): the answer is what follows the first "the answer is " (any case) up
to the end of that line, minus a trailing period; it must equal the target exactly (case-insensitive,
whitespace-trimmed). For multiple-choice targets such as "(A)" a bare "A" or "(A) 12/14/1937" also
counts, since the option letter is the whole answer there.
"""

from __future__ import annotations

import re

_GOLD = re.compile(r"####\s*(.+)")
_STRICT = re.compile(r"The answer is (\-?[0-9\.\,]+)\.")
_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
_BBH_ANSWER = re.compile(r"the answer is (.*)", re.IGNORECASE)
_OPTION = re.compile(r"^\(([A-Z])\)$")
_LEADING_OPTION = re.compile(r"^(?:\(([A-Z])\)|([A-Z])$)")  # "(A) text" or a bare "A"


def normalize_number(text: str) -> str:
    """Drop commas and dollar signs, then one trailing period (lm-eval's gsm8k regexes_to_ignore)."""
    text = text.strip().replace(",", "").replace("$", "")
    return text[:-1] if text.endswith(".") else text


def gsm8k_gold(answer: str) -> str:
    """The `#### N` value of a GSM8K answer, normalised; ValueError when there is none."""
    found = _GOLD.findall(answer)
    if not found:
        raise ValueError(f"no '#### N' line in answer: {answer[-80:]!r}")
    return normalize_number(found[-1])


def strict_match(text: str) -> str | None:
    """N from the first "The answer is N." in `text`, normalised; None when absent."""
    found = _STRICT.search(text)
    return normalize_number(found.group(1)) if found else None


def flexible_extract(text: str) -> str | None:
    """The last number-like span in `text`, normalised; None when the text holds no digit."""
    spans = [a or b for a, b in _FLEXIBLE.findall(text)]
    spans = [s for s in spans if any(ch.isdigit() for ch in s)]  # "..", "$," are not numbers
    return normalize_number(spans[-1]) if spans else None


def bbh_extract(text: str) -> str | None:
    """What follows the first "the answer is " up to the end of its line, minus a trailing period."""
    found = _BBH_ANSWER.search(text)
    if not found:
        return None
    answer = found.group(1).strip()
    return answer[:-1].rstrip() if answer.endswith(".") else answer


def bbh_match(prediction: str | None, target: str) -> bool:
    """Exact match (case-insensitive); an option target "(X)" also accepts "X" or "(X) option text"."""
    if prediction is None:
        return False
    prediction, target = prediction.strip(), target.strip()
    if prediction.lower() == target.lower():
        return True
    option = _OPTION.match(target)
    if option:
        leading = _LEADING_OPTION.match(prediction)
        return bool(leading) and (leading.group(1) or leading.group(2)) == option.group(1)
    return False
