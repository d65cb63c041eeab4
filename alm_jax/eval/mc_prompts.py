"""Multiple-choice prompts: options as "(A) text" lines, the user text a model is asked
(the synthetic corpus's wording, optionally asking for reasoning first), and
choices parsed back out of a question's text (AF3's "Q (A) x (B) y")."""

from __future__ import annotations

import re
from typing import Sequence

from alm_jax.eval.mc_scoring import LETTERS, strip_labels

# The same user text as the synthetic corpus's multiple-choice lines (alm_jax.data.records.format_mcq),
# so a model trained there is asked the same way here.
DEFAULT_TEMPLATE = "{question}\nChoose the correct option:\n{options}"
THINK_SUFFIX = (
    "\nThink step by step about what you hear first, then give your final answer on the last line "
    'in the form "Answer: <option text>".'
)


def format_options(choices: Sequence[str]) -> str:
  """Options one per line as "(A) text"."""
  return "\n".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(strip_labels(list(choices))))


def build_prompt(
    question: str, choices: Sequence[str], *, think: bool = False, template: str = DEFAULT_TEMPLATE
) -> str:
  """The user text for a multiple-choice item: `template` with {question} and {options};
  with `think`, asks for reasoning first and a final "Answer:" line."""
  prompt = template.format(question=question.strip(), options=format_options(choices)) if choices else question.strip()
  return prompt + (THINK_SUFFIX if think else "")


def parse_choices(text: str) -> tuple[str, list[str]]:
  """Splits "Q ... (A) x (B) y" or lines "A. x" into (question, choices); no options → (text, [])."""
  marks = list(re.finditer(r"\(([A-Z])\)\s*", text))
  letters = [m.group(1) for m in marks]
  start = next((i for i, letter in enumerate(letters) if letter == "A"), None)
  if start is not None:
    run = [marks[start]]
    for m in marks[start + 1 :]:
      if m.group(1) == LETTERS[len(run)]:
        run.append(m)
    if len(run) >= 2:
      choices = []
      for i, m in enumerate(run):
        end = run[i + 1].start() if i + 1 < len(run) else len(text)
        piece = text[m.end() : end].strip()
        if i + 1 == len(run):
          piece = piece.split("\n")[0].strip()
        choices.append(re.sub(r"(?:,|;|\bor)\s*$", "", piece).strip())
      question = text[: run[0].start()].strip()
      return question, choices
  lines = text.splitlines()
  opts, first = [], None
  for i, line in enumerate(lines):
    m = re.match(r"\s*([A-Z])[\.\)]\s+(.+)$", line)
    if m and m.group(1) == LETTERS[len(opts)]:
      first = i if first is None else first
      opts.append(m.group(2).strip())
    elif opts:
      break
  if len(opts) >= 2:
    return "\n".join(lines[:first]).strip(), opts
  return text.strip(), []
