"""Numeric answers, read and compared as FinQA's execution accuracy reads them (czyssrs/FinQA,
code/evaluate/evaluate.py, `str_to_num`): thousands separators removed, a percentage as a fraction (`14.1%` ->
0.141), and yes/no for its comparison questions (`greater`). A generated answer's value is its last `\\boxed{}`
value, else its last number (its last yes or no for a yes/no question), and it is right within a relative
tolerance of the reference: FinQA compares the results of executed programs, a model writes rounded numbers.

Pure functions, no model and no chat template: the benchmarks stage reads each reference with `reference`,
evaluate each generated answer with `extract` and `correct`.
"""

from __future__ import annotations

import math
import re

Value = float | str  # a number, or "yes" / "no"
YES_NO = ("yes", "no")
MINUS = "-\u2212"  # ASCII hyphen-minus and the Unicode minus sign
SIGN = r"[+\-\u2212]"
# a number in running text, not inside a word or another number ("Q4" holds none, "2019-20" no -20): an optional
# sign and dollar sign (LaTeX's \$ too) in either order, digits with or without thousands separators, an optional
# fraction and exponent, an optional percent sign (LaTeX's \% too, or the word)
NUMBER = re.compile(
    rf"(?<![\w.,])(?P<sign>{SIGN})?(?:\\?\$\s?)?(?P<sign2>{SIGN})?"
    r"(?P<digits>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)(?P<exponent>[eE][-+]?\d+)?(?![\d,]\d)"
    r"(?P<percent>\s?(?:\\?%|percent\b|per cent\b))?"
)
FRACTION = re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}")  # LaTeX's \frac{a}{b}, \dfrac and \tfrac
# LaTeX as models write numbers, rewritten as plain text before reading: `1{,}234` (a comma in braces), thin and
# negative spaces (`1\,234`, `14.1\,\%`), a power of ten (`1.2 \times 10^{3}` -> `1.2e3`)
LATEX = [
    (re.compile(r"\{,\}"), ","),
    (re.compile(r"\\[,!;:]"), ""),
    (re.compile(rf"\s*(?:\\times|\\cdot|\u00d7)\s*10\^\{{?({SIGN}?\d+)\}}?"), r"e\1"),
]
WORD = re.compile(r"\b(yes|no)\b", re.IGNORECASE)


def number(match: re.Match[str]) -> float:
    """The value of one `NUMBER` match, a percentage as a fraction: `-$1,250.5` -> -1250.5, `12.5%` -> 0.125."""
    value = float(match["digits"].replace(",", "") + (match["exponent"] or ""))
    if any(sign in MINUS for sign in (match["sign"] or "") + (match["sign2"] or "")):
        value = -value
    return value / 100 if match["percent"] else value


def numbers(text: str) -> list[float]:
    """Every number of `text`, in order: `numbers("from $1,250.5 to −3 (-12.5%) in 2019-2020")` ->
    `[1250.5, -3.0, -0.125, 2019.0, 2020.0]`."""
    return [number(match) for match in NUMBER.finditer(text)]


def boxed(text: str) -> list[str]:
    """The contents of every `\\boxed{...}` of `text`, braces inside them balanced; an unclosed one is left out.

    `boxed(r"so \\boxed{\\frac{1}{4}} or \\boxed{2}")` -> `["\\frac{1}{4}", "2"]`.
    """
    out = []
    for match in re.finditer(r"\\boxed\s*\{", text):
        depth = 1
        for i in range(match.end(), len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                out.append(text[match.end() : i])
                break
    return out


def plain(text: str) -> str:
    """`text` with LaTeX's ways of writing numbers rewritten as plain text (`LATEX`), the Unicode minus of an
    exponent a hyphen: `plain(r"\\boxed{1{,}234.5\\,\\%}")` -> `r"\\boxed{1,234.5\\%}"`."""
    for pattern, replacement in LATEX:
        text = pattern.sub(replacement, text)
    return re.sub(r"(?<=[eE])\u2212(?=\d)", "-", text)


def last_value(text: str, yes_no: bool) -> Value | None:
    """The last value of `text`: its last yes or no (`yes_no`), else its last number, or the `\\frac{a}{b}` that
    number ends, with a sign written before it; None where there is none.
    `last_value(r"x = -\\frac{1}{4}", False)` -> -0.25."""
    if yes_no:
        words = WORD.findall(text)
        return words[-1].lower() if words else None
    matches = list(NUMBER.finditer(text))
    if not matches:
        return None
    for fraction in FRACTION.finditer(text):
        top, bottom = (list(NUMBER.finditer(part)) for part in (fraction[1], fraction[2]))
        inside = fraction.start() <= matches[-1].start() < fraction.end()
        if inside and len(top) == len(bottom) == 1 and number(bottom[0]) != 0:
            # a minus right before it (a dollar sign between), unless it subtracts: `5 - \frac{1}{4}`
            head = re.sub(r"\\?\$$", "", text[: fraction.start()].rstrip()).rstrip()
            operand = head[:-1].rstrip()[-1:]
            negative = head.endswith(tuple(MINUS)) and not (operand.isdigit() or operand in tuple(")]}"))
            sign = -1.0 if negative else 1.0
            return sign * number(top[0]) / number(bottom[0])
    return number(matches[-1])


def extract(answer: str, yes_no: bool) -> Value | None:
    """The value of a final answer (the text after the reasoning block): its last `\\boxed{}`'s value if it has
    one, else its own last value; None where there is none, an extraction failure.

    `extract(r"The margin is \\boxed{12.5\\%}, up from 10%", False)` -> 0.125; `extract("It rose.", False)` -> None.
    """
    answer = plain(answer)
    boxes = boxed(answer)
    return last_value(boxes[-1] if boxes else answer, yes_no)


def reference(value: object) -> Value | None:
    """A reference answer as a dataset holds it: a number, a text that is one number (`"1,234.5"`, `"12%"`,
    `"$3"`, `"5e-05"`) or yes/no; None for anything else (words, two numbers, a non-finite number).

    `reference("0.26685")` -> 0.26685; `reference("14.1%")` -> 0.141; `reference("Yes")` -> `"yes"`.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value) if math.isfinite(value) else None
    if not isinstance(value, str):
        return None
    text = value.strip()
    if text.lower() in YES_NO:
        return text.lower()
    match = NUMBER.fullmatch(text)
    return number(match) if match else None


def correct(predicted: Value | None, expected: Value, rel_tolerance: float) -> bool:
    """Whether a prediction matches the reference: the same yes or no, or a number within `rel_tolerance` of the
    reference's size, bounds included (a reference of 0 must be met exactly).

    `correct(0.1414, 0.14136, 0.01)` -> True; `correct(14.14, 0.14136, 0.01)` -> False (a percentage written
    without its % sign is another number); `correct(None, 1.0, 0.01)` -> False.
    """
    if predicted is None or isinstance(predicted, str) or isinstance(expected, str):
        return predicted == expected
    # the bound's own rounding let in: 1.01 - 1.0 is 0.010000000000000009 in binary floating point
    return abs(predicted - expected) <= (rel_tolerance + 1e-12) * abs(expected)
