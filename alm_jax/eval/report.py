"""Evaluation reports: the report.json schema, a Markdown table and a PNG bar chart.

The schema (this docstring is its definition; `alm-jax demo`, `alm-jax eval` and their tests rely on it):

    {"benchmark", "checkpoint", "n",
     "scores": {SCORER: {"overall": {"accuracy", "random", "n"},
                         "by_category": {NAME: {"accuracy", "random", "n"}},
                         "by_sub_category": ..., "by_difficulty": ..., ...}}}

SCORER is `official` and `robust` for multiple-choice benchmarks (plus `judge`
for open items when a judge is configured and `instruction_following` for
MMAU-Pro's rule-checked items) and `wer` for ASR, whose blocks carry "wer" in
place of "accuracy" (with edit counts). Accuracy and WER are fractions (0.5 =
50 %); `random` is the mean over items of 1/len(choices) (None where chance is
undefined). Extra top-level keys: `items` / `per_file` (per-item results),
`skipped` (id, reason), `unscored` (open items without a judge), `notes`, and for
scored predictions files `missing_predictions` / `unmatched_predictions` (ids).
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Mapping, Sequence

# (report key, row field) of the groupings reported beside the overall score.
GROUPS: tuple[tuple[str, str], ...] = (
    ("by_category", "category"),
    ("by_sub_category", "sub_category"),
    ("by_difficulty", "difficulty"),
    ("by_skill", "skill"),
    ("by_length", "length"),
)
UNSPECIFIED = "unspecified"


def accuracy_block(rows: Sequence[Mapping[str, Any]], scorer: str) -> dict[str, Any]:
  """{"accuracy", "random", "n", "correct"} of `rows[i][scorer]` (bool or a score in [0, 1])."""
  n = len(rows)
  total = float(sum(float(r[scorer]) for r in rows))
  chances = [r.get("n_choices") for r in rows]
  random = sum(1.0 / c for c in chances) / n if n and all(chances) else None
  correct = int(total) if total.is_integer() else total
  return {"accuracy": total / n if n else 0.0, "random": random, "n": n, "correct": correct}


def grouped(rows: Sequence[Mapping[str, Any]], field: str, order: Sequence[str] | None = None) -> dict[str, list]:
  """Rows split by `row[field]` (missing → "unspecified"), in `order` or sorted by name."""
  groups: dict[str, list] = {}
  for row in rows:
    value = row.get(field)
    groups.setdefault(UNSPECIFIED if value is None else str(value), []).append(row)
  rank = {name: i for i, name in enumerate(order or ())}
  return dict(sorted(groups.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0])))


def scorer_block(
    rows: Sequence[Mapping[str, Any]],
    scorer: str,
    *,
    orders: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, Any]:
  """Overall and grouped accuracy of one scorer; a grouping is listed only if some row has its field.

  `by_category` is always present.
  """
  orders = orders or {}
  block: dict[str, Any] = {"overall": accuracy_block(rows, scorer)}
  for key, field in GROUPS:
    if key != "by_category" and not any(r.get(field) is not None for r in rows):
      continue
    groups = grouped(rows, field, orders.get(field))
    block[key] = {name: accuracy_block(group, scorer) for name, group in groups.items()}
  return block


def make_report(benchmark: str, checkpoint: str, n: int, scores: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
  """A report dict: the schema's four keys first, then `extra` (items, skipped, notes, ...)."""
  return {"benchmark": benchmark, "checkpoint": checkpoint, "n": n, "scores": dict(scores), **extra}


# ----------------------------------------------------------------------------- Markdown


def pct(value: Any) -> str:
  """A fraction as a percentage with one decimal ("–" for None)."""
  return "–" if value is None else f"{100.0 * value:.1f}"


def cell(text: Any) -> str:
  """Text safe inside a Markdown table cell."""
  return str(text).replace("|", "\\|").replace("\n", " ")


def rows_of(block: Mapping[str, Any]) -> Iterable[tuple[str, str, Mapping[str, Any]]]:
  """(group, name, entry) of a scorer block: overall first, then every grouping in `GROUPS` order."""
  yield "overall", "", block["overall"]
  for key, _ in GROUPS:
    for name, entry in block.get(key, {}).items():
      yield key[len("by_") :].replace("_", " "), name, entry


def to_markdown(report: Mapping[str, Any]) -> str:
  """The report as Markdown: a score table (percent), notes, skipped and unscored items."""
  scores = report.get("scores", {})
  lines = [f"# {report.get('benchmark', '?')} — {report.get('checkpoint') or 'no checkpoint named'}", ""]
  lines.append(f"{report.get('n', 0)} items scored; {len(report.get('skipped', []))} skipped; "
               f"{len(report.get('unscored', []))} listed but not scored.")
  lines.append("")
  if "wer" in scores:
    lines += ["## Word error rate (%)", "", "| group | name | n | words | WER |", "| --- | --- | ---: | ---: | ---: |"]
    for group, name, entry in rows_of(scores["wer"]):
      lines.append(f"| {group} | {cell(name)} | {entry['n']} | {entry.get('words', '')} | {pct(entry['wer'])} |")
    lines.append("")
  acc_scorers = [s for s in scores if s != "wer"]
  if acc_scorers:
    first = scores[acc_scorers[0]]
    header = "| group | name | n | " + " | ".join(acc_scorers) + " | random |"
    lines += ["## Accuracy (%)", "", header, "| --- | --- | ---: |" + " ---: |" * (len(acc_scorers) + 1)]
    for group, name, entry in rows_of(first):
      key = None if group == "overall" else "by_" + group.replace(" ", "_")
      cells = []
      for scorer in acc_scorers:
        other = scores[scorer]["overall"] if key is None else scores[scorer].get(key, {}).get(name)
        cells.append(pct(other["accuracy"]) if other else "–")
      lines.append(f"| {group} | {cell(name)} | {entry['n']} | " + " | ".join(cells) + f" | {pct(entry['random'])} |")
    for scorer in acc_scorers[1:]:  # groups only the later scorers have (e.g. judge on open items)
      for group, name, entry in rows_of(scores[scorer]):
        key = None if group == "overall" else "by_" + group.replace(" ", "_")
        if key is not None and name not in first.get(key, {}):
          lines.append(f"| {group} ({scorer}) | {cell(name)} | {entry['n']} | "
                       + " | ".join(pct(entry["accuracy"]) if s == scorer else "–" for s in acc_scorers)
                       + f" | {pct(entry['random'])} |")
    lines.append("")
  if report.get("notes"):
    lines += ["## Notes", ""] + [f"- {cell(note)}" for note in report["notes"]] + [""]
  if report.get("skipped"):
    lines += ["## Skipped items", "", "| id | reason |", "| --- | --- |"]
    lines += [f"| {cell(s['id'])} | {cell(s['reason'])} |" for s in report["skipped"]] + [""]
  if report.get("unscored"):
    lines += ["## Listed, not scored", "", "| id | category | reason |", "| --- | --- | --- |"]
    lines += [f"| {cell(u['id'])} | {cell(u.get('category', ''))} | {cell(u['reason'])} |"
              for u in report["unscored"]] + [""]
  for key, title in (("missing_predictions", "Items without a prediction (scored as empty answers)"),
                     ("unmatched_predictions", "Prediction ids that name no item (ignored)")):
    if report.get(key):  # `alm-jax eval --predictions` (alm_jax/eval/external.py)
      lines += [f"## {title}", "", ", ".join(f"`{cell(i)}`" for i in report[key]), ""]
  return "\n".join(lines)


def summary(report: Mapping[str, Any]) -> str:
  """One line for the console: overall scores in percent, item counts."""
  scores = report.get("scores", {})
  parts = []
  for scorer, block in scores.items():
    overall = block["overall"]
    value = overall.get("wer" if scorer == "wer" else "accuracy")
    parts.append(f"{scorer} {pct(value)}%")
  randoms = [b["overall"].get("random") for s, b in scores.items() if s != "wer" and b["overall"].get("random")]
  if randoms:
    parts.append(f"random {pct(randoms[0])}%")
  return (f"{report.get('benchmark', '?')}: " + ", ".join(parts) + f" | n={report.get('n', 0)}, "
          f"skipped {len(report.get('skipped', []))}, unscored {len(report.get('unscored', []))}")


# ----------------------------------------------------------------------------- chart


def plot(report: Mapping[str, Any], path: str) -> None:
  """Bar chart per category: each accuracy scorer against the random baseline (ASR: WER per category)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=import-outside-toplevel
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

  scores = report.get("scores", {})
  wer = "wer" in scores
  scorers = ["wer"] if wer else [s for s in scores if s != "wer"]
  names = ["overall"]
  for scorer in scorers:
    for name in scores[scorer].get("by_category", {}):
      if name not in names:
        names.append(name)

  def entry(scorer: str, name: str) -> Mapping[str, Any] | None:
    block = scores[scorer]
    return block["overall"] if name == "overall" else block.get("by_category", {}).get(name)

  series = [(s, [(entry(s, n) or {}).get("wer" if wer else "accuracy") for n in names]) for s in scorers]
  if not wer:
    randoms = []
    for name in names:
      found = [entry(s, name) for s in scorers if entry(s, name) and entry(s, name).get("random") is not None]
      randoms.append(found[0]["random"] if found else None)
    series.append(("random", randoms))
  fig = Figure(figsize=(max(5.0, 1.2 * len(names) + 2.0), 4.0), dpi=100)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  width = 0.8 / max(1, len(series))
  colors = {"official": "#4C72B0", "robust": "#55A868", "random": "#BBBBBB", "judge": "#C44E52",
            "instruction_following": "#8172B2", "wer": "#DD8452"}
  for k, (label, values) in enumerate(series):
    xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(names))]
    heights = [100.0 * v if v is not None else 0.0 for v in values]
    ax.bar(xs, heights, width=width, label=label, color=colors.get(label))
  ax.set_xticks(range(len(names)))
  ax.set_xticklabels(names, rotation=20, ha="right")
  ax.set_ylabel("WER (%)" if wer else "accuracy (%)")
  if not wer:
    ax.set_ylim(0, 110)
    ax.set_yticks(range(0, 101, 20))
  ax.set_title(f"{report.get('benchmark', '')} — {report.get('checkpoint') or ''}".strip(" —"))
  ax.legend(loc="best", fontsize="small")
  fig.tight_layout()
  fig.savefig(path)


# ----------------------------------------------------------------------------- files


def atomic_write(path: str, text: str) -> None:
  """Writes `text` to `path` through a temporary file, so a reader never sees half a file."""
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)


def report_paths(out_path: str) -> tuple[str, str, str]:
  """(json, markdown, png) paths for a report written to `out_path` (the JSON goes to `out_path` itself)."""
  stem = os.path.splitext(out_path)[0] if out_path.endswith(".json") else out_path
  return out_path, stem + ".md", stem + ".png"


def write_report(report: Mapping[str, Any], out_path: str, *, chart: bool = True) -> tuple[str, str, str | None]:
  """Writes report.json, report.md and report.png (the chart unless `chart` is False); returns the paths."""
  json_path, md_path, png_path = report_paths(out_path)
  os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
  atomic_write(json_path, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
  atomic_write(md_path, to_markdown(report) + "\n")
  if not chart:
    return json_path, md_path, None
  plot(report, png_path)
  return json_path, md_path, png_path
