"""Multiple-choice scoring: the published MMAU string-match rule and a robust option matcher.

  * `official_match` is the published MMAU rule (Sakshi113/MMAU `evaluation.py`,
    `string_match`): lowercase word sets `\\b\\w+\\b` of prediction, answer and
    choices; correct iff every answer word is in the prediction and the
    prediction holds no word of a wrong choice other than words that choice
    shares with the answer. A bare letter is therefore wrong. Deviations only on
    degenerate input: a prediction that is not text (None, a list) is wrong,
    numbers are read as text, an empty reference answer is wrong.
  * `robust_choice` maps an answer to one option; see its docstring for the rule.
  * `score_mc` gives both scores of one item (after `extract_final_answer` for
    chain-of-thought answers).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from typing import Any, Sequence

from alm_jax.eval.items import EvalItem

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


# ----------------------------------------------------------------------------- official scorer


def _words(text: Any) -> set[str]:
  """Lowercase word set `\\b\\w+\\b` (the published tokenisation); None reads as ""."""
  if text is None:
    return set()
  return set(re.findall(r"\b\w+\b", str(text).lower()))


def official_match(answer: Any, prediction: Any, choices: Sequence[Any] | None) -> bool:
  """The published MMAU string-match rule; never raises, whatever the input types.

  A prediction that is neither text nor a number (None, a list, ...) is wrong;
  missing choices leave only the "every answer word present" condition.
  """
  if isinstance(prediction, bool) or not isinstance(prediction, (str, int, float)):
    return False
  prediction_words = _words(prediction)
  answer_words = _words(answer)
  if not prediction_words or not answer_words:
    return False
  wrong_words: set[str] = set()
  for choice in choices if isinstance(choices, (list, tuple)) else ():
    choice_words = _words(choice)
    if choice_words != answer_words:
      wrong_words |= choice_words - answer_words
  return answer_words <= prediction_words and prediction_words.isdisjoint(wrong_words)


# ----------------------------------------------------------------------------- robust scorer


@dataclasses.dataclass(frozen=True)
class Match:
  """The option an answer was mapped to (None: no option or ambiguous) and the rule that decided."""

  index: int | None
  rule: str


_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.IGNORECASE | re.DOTALL)
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.IGNORECASE | re.DOTALL)
_MARKER = re.compile(
    r"(?:final\s+answer\s*(?:is|would\s+be|should\s+be)?"
    r"|(?:correct|right|best)\s+(?:answer|option|choice)\s*(?:is|would\s+be|should\s+be)"
    r"|answer\s*(?:is|would\s+be|should\s+be)"
    r"|answer\s*(?=[:：]))"
    r"\s*[:：]?\s*",
    re.IGNORECASE,
)
_MARKDOWN = re.compile(r"[*_`#]+")
_LABEL = re.compile(r"^\s*[\(\[]?\s*([A-Za-z])\s*[\)\]\.:]\s*")
_WHOLE_LETTER = re.compile(r"[\(\[]?\s*([A-Za-z])\s*[\)\]]?\s*[.:]?")
_LETTER_PREFIX = re.compile(r"[\(\[]\s*([A-Za-z])\s*[\)\]]\s*[.:]?|([A-Za-z])[\).:](?=\s|$)")
_BARE_LETTER = re.compile(r"([B-HJ-Z])(?=[\s,;]|$)")  # no "A"/"I": they start English sentences
_ARTICLES = re.compile(r"^(?:the|a|an)\s+")
FUZZY_MIN = 0.6
FUZZY_MARGIN = 0.1


def drop_think_blocks(text: Any) -> Any:
  """Text without its `<think>` blocks (and anything before an unmatched `</think>`); other values as given."""
  if not isinstance(text, str):
    return text
  text = _THINK_BLOCK.sub(" ", text)
  if "</think>" in text.lower():
    text = text[text.lower().rfind("</think>") + len("</think>") :]
  return text.strip()


def strip_reasoning(text: str) -> str:
  """Drops `<think>` blocks (and anything before an unmatched `</think>`) and markdown marks."""
  return _MARKDOWN.sub("", drop_think_blocks(text)).strip()


def final_segment(text: str) -> str | None:
  """The text after the last answer marker ("Answer:", "the answer is", `<answer>`), or None."""
  tags = _ANSWER_TAG.findall(text)
  if tags:
    return tags[-1].strip()
  last = None
  for m in _MARKER.finditer(text):
    last = m
  if last is None:
    return None
  rest = text[last.end() :].strip()
  for line in rest.splitlines():
    if line.strip():
      return line.strip()
  return ""


def extract_final_answer(prediction: Any) -> str:
  """The final answer of a (chain-of-thought) response: after `</think>`, an answer tag or
  marker, else its last non-empty line. Non-strings give ""."""
  if not isinstance(prediction, str):
    return ""
  text = strip_reasoning(prediction)
  segment = final_segment(text)
  if segment:
    return segment
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  return lines[-1] if lines else ""


def normalize(text: Any) -> str:
  """Lowercase, punctuation to spaces, whitespace collapsed."""
  return " ".join(re.sub(r"[^\w\s]", " ", str(text).lower()).split())


def strip_labels(choices: Sequence[str]) -> list[str]:
  """Removes "(A) " / "A. " labels from choices, but only when every choice carries its own letter in order."""
  matches = [_LABEL.match(c) for c in choices]
  if choices and all(m and m.group(1).upper() == LETTERS[i] for i, m in enumerate(matches)):
    return [c[m.end() :].strip() for c, m in zip(choices, matches)]
  return list(choices)


def _mentions(norm_text: str, options: Sequence[str]) -> list[int]:
  """Options named in the text as whole-word phrases; an option that only occurs inside a
  longer named option ("dog" in "dog barking") does not count on its own."""
  padded = f" {norm_text} "
  hits = [i for i, o in enumerate(options) if o and f" {o} " in padded]
  keep = []
  for i in hits:
    inside = [j for j in hits if j != i and options[i] != options[j] and f" {options[i]} " in f" {options[j]} "]
    if inside and padded.count(f" {options[i]} ") <= sum(padded.count(f" {options[j]} ") for j in inside):
      continue
    keep.append(i)
  return keep


def _letter(letter: str, n: int) -> int | None:
  index = LETTERS.find(letter.upper())
  return index if 0 <= index < n else None


def _fuzzy(norm_text: str, options: Sequence[str]) -> int | None:
  """The clearly closest option by max(difflib ratio, token-overlap F1), for short answers only."""
  words = norm_text.split()
  longest = max((len(o.split()) for o in options), default=0)
  if not words or len(words) > 2 * longest + 3:
    return None
  scores = []
  for option in options:
    ratio = difflib.SequenceMatcher(None, norm_text, option).ratio()
    a, b = set(words), set(option.split())
    common = len(a & b)
    f1 = 0.0 if not common else 2 * common / (len(a) + len(b))
    scores.append(max(ratio, f1))
  order = sorted(range(len(options)), key=lambda i: -scores[i])
  best = order[0]
  second = scores[order[1]] if len(order) > 1 else 0.0
  if scores[best] >= FUZZY_MIN and scores[best] - second >= FUZZY_MARGIN:
    return best
  return None


def _resolve(text: str, options: Sequence[str]) -> Match:
  """Maps one piece of answer text to an option (see `robust_choice` for the order of rules)."""
  n = len(options)
  text = text.strip()
  index = _exact(text, options)
  if index is not None:  # first, so options that are letters themselves ("C", "E" notes) read as text
    return Match(index, "option text")
  m = _WHOLE_LETTER.fullmatch(text)
  if m:
    index = _letter(m.group(1), n)
    return Match(index, "letter" if index is not None else "letter out of range")
  norm = normalize(text)
  m = _LETTER_PREFIX.match(text)
  if m:
    index = _letter(m.group(1) or m.group(2), n)
    if index is not None:
      rest = text[m.end() :]
      if not normalize(rest):
        return Match(index, "letter")
      if _exact(rest, options) == index:
        return Match(index, "letter + text")
      named = _mentions(normalize(rest), options)
      if not named or named == [index]:
        return Match(index, "letter + text" if named else "letter")
      if len(named) == 1:
        return Match(None, "letter and text name different options")
      return Match(None, "ambiguous: names several options")
  named = _mentions(norm, options)
  if len(named) == 1:
    return Match(named[0], "option named")
  if len(named) > 1:
    return Match(None, "ambiguous: names several options")
  m = _BARE_LETTER.match(text)
  if m:
    index = _letter(m.group(1), n)
    if index is not None:
      return Match(index, "letter")
  index = _fuzzy(norm, options)
  if index is not None:
    return Match(index, "closest option")
  return Match(None, "no option recognised")


def _exact(text: str, options: Sequence[str]) -> int | None:
  """Index of the option equal to the text after normalisation (articles ignored)."""
  norm = normalize(text)
  bare = norm if _LABEL.match(text) else _ARTICLES.sub("", norm)  # "(a) dog": a label, not an article
  for i, option in enumerate(options):
    if option and (norm == option or bare == _ARTICLES.sub("", option)):
      return i
  return None


def robust_choice(prediction: Any, choices: Sequence[Any] | None) -> Match:
  """Maps a free-form answer to one of `choices`; never raises.

  The rule, applied first to the final-answer segment (after the last
  "Answer:", "the answer is", "final answer", `<answer>` tag; `<think>` blocks
  and markdown removed) and, if that names no option, to the whole answer:
    1. the option's text, case/punctuation/article-insensitive → that option
       (first, so options that are letters themselves, like note names, read as text);
    2. a bare letter ("B", "(b)", "B.", "[B]") → that option (out of range: none);
    3. a labelled letter ("(b) dog barking", "B. Dog") → that option, unless the
       text after it names a different option (then: none, contradictory);
    4. exactly one option named as a whole-word phrase → that option; two or more
       named (outside one another) → none: an answer naming two options is
       wrong, unless the final-answer segment names just one;
    5. a leading capital letter B–Z followed by a word ("B because …") → that option;
    6. for short answers (≤ 2× the longest option + 3 words) the clearly closest
       option: max(difflib ratio, token-overlap F1) ≥ 0.6 and ≥ 0.1 above the
       runner-up.
  Empty or non-string predictions map to no option.
  """
  if not isinstance(prediction, str):
    return Match(None, "no answer")
  options_raw = [str(c) for c in choices] if isinstance(choices, (list, tuple)) else []
  if not options_raw:
    return Match(None, "no choices")
  options = [normalize(c) for c in strip_labels(options_raw)]
  text = strip_reasoning(prediction)
  if not text:
    return Match(None, "empty answer")
  segment = final_segment(text)
  if segment:
    match = _resolve(segment, options)
    if match.index is not None or match.rule.startswith(("ambiguous", "letter and text")):
      return Match(match.index, "final answer: " + match.rule)
  return _resolve(text, options)


def answer_index(answer: Any, choices: Sequence[str]) -> int | None:
  """Index of the reference answer among the choices: exact, then normalised, then as a letter."""
  if answer is None:
    return None
  answer = str(answer).strip()
  for i, choice in enumerate(choices):
    if answer == choice:
      return i
  stripped = strip_labels(list(choices))
  options = [normalize(c) for c in stripped]
  label = _LABEL.match(answer)
  text = answer[label.end() :] if label else answer
  for candidate in (answer, text):
    for i, option in enumerate(options):
      if option and normalize(candidate) == option:
        return i
  m = _WHOLE_LETTER.fullmatch(answer)
  if m:
    return _letter(m.group(1), len(choices))
  return None


def robust_match(answer: Any, prediction: Any, choices: Sequence[Any] | None) -> bool:
  """True iff `robust_choice` maps the prediction to the reference answer's option."""
  if not isinstance(choices, (list, tuple)) or not choices:
    return False
  target = answer_index(answer, [str(c) for c in choices])
  return target is not None and robust_choice(prediction, choices).index == target


# ----------------------------------------------------------------------------- both scores of one item


def score_mc(item: EvalItem, prediction: Any, *, think: bool = False) -> dict[str, Any]:
  """Both scores of one multiple-choice item, plus what the robust matcher chose and why.

  With `think`, both scorers see only the final answer (`extract_final_answer`); otherwise both see the
  answer after any `<think>` block (a model that reasons first, as `data.clip_rationale` trains, is scored on
  its answer, not on the words of its reasoning).
  """
  answer_text = extract_final_answer(prediction) if think else drop_think_blocks(prediction)
  match = robust_choice(answer_text, list(item.choices))
  target = answer_index(item.answer, list(item.choices))
  return {
      "official": official_match(item.answer, answer_text, list(item.choices)),
      "robust": match.index is not None and match.index == target,
      "robust_choice": match.index,
      "robust_rule": match.rule,
  }
