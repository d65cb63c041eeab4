"""Reports side by side: `alm-jax eval --compare A.json B.json ... --out C.json` (or `--out C.md`).

Reads eval reports (the schema in `alm_jax/eval/report.py`) of one benchmark and
writes beside `--out`:
  * C.md: per scorer, one table of overall and every grouping the reports have
    (category, sub-category, difficulty, skill, length) with each report's
    accuracy (WER for `wer`), n and the random baseline, in percent;
  * C.png: per scorer, grouped bars (one per report, and random) over overall
    and the categories;
  * C.json: the same numbers, `{"benchmark", "reports": [{"label", "path",
    "checkpoint", "n"}], "scores": {SCORER: {"overall": {LABEL: ENTRY},
    "by_category": {NAME: {LABEL: ENTRY}}, ...}}}` with ENTRY the report's own
    `{"accuracy" (or "wer"), "random", "n"}`; a report without a scorer or
    group has no LABEL there.
Columns are named by `labels`, else by each report's `checkpoint`, or its file
stem where the checkpoint is missing or shared with another report. Reports of
different benchmarks, and files that are no report, are refused naming the file.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

from alm_jax.errors import DataError
from alm_jax.eval import report as report_lib
from alm_jax.eval.report import cell, pct

COLORS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B2", "#937860", "#DA8BC3", "#8C8C8C", "#CCB974",
          "#64B5CD")
RANDOM_COLOR = "#BBBBBB"


def read_report(path: str) -> dict[str, Any]:
  """Reads one report.json; anything without `benchmark` and per-scorer `overall` blocks is refused."""
  if not os.path.isfile(path):
    raise DataError(f"{path}: no such report")
  with open(path, encoding="utf-8") as f:
    try:
      report = json.load(f)
    except json.JSONDecodeError as e:
      raise DataError(f"{path}:{e.lineno}: not a report: invalid JSON: {e.msg}") from None
  if not isinstance(report, dict) or not isinstance(report.get("benchmark"), str):
    raise DataError(f"{path}: not an eval report (no `benchmark`)")
  scores = report.get("scores")
  if not isinstance(scores, dict) or not scores or not all(
      isinstance(b, dict) and isinstance(b.get("overall"), dict) for b in scores.values()):
    raise DataError(f"{path}: not an eval report (no `scores` with an `overall` block per scorer)")
  return report


def _stem(path: str) -> str:
  return os.path.splitext(os.path.basename(path))[0]


def default_labels(paths: Sequence[str], reports: Sequence[Mapping[str, Any]]) -> list[str]:
  """Each report's `checkpoint`; its file stem where that is empty or shared; a `#k` suffix if still shared."""
  names = [str(r.get("checkpoint") or "") for r in reports]
  labels = [n if n and names.count(n) == 1 else _stem(p) for n, p in zip(names, paths)]
  seen: dict[str, int] = {}
  unique = []
  for label in labels:
    seen[label] = seen.get(label, 0) + 1
    unique.append(label if labels.count(label) == 1 else f"{label}#{seen[label]}")
  return unique


def _metric(scorer: str) -> str:
  return "wer" if scorer == "wer" else "accuracy"


def _entry(entry: Mapping[str, Any], scorer: str) -> dict[str, Any]:
  metric = _metric(scorer)
  return {metric: entry.get(metric), "random": entry.get("random"), "n": entry.get("n")}


def combine(paths: Sequence[str], labels: Sequence[str] | None = None) -> dict[str, Any]:
  """Reads the reports and gathers their numbers by scorer, group and name (the C.json layout above)."""
  if not paths:
    raise DataError("--compare: no reports given")
  reports = [read_report(p) for p in paths]
  for path, report in zip(paths[1:], reports[1:]):
    if report["benchmark"] != reports[0]["benchmark"]:
      raise DataError(f"{path}: a {report['benchmark']!r} report, but {paths[0]} is {reports[0]['benchmark']!r}; "
                      "compare reports of one benchmark")
  if labels is None:
    labels = default_labels(paths, reports)
  elif len(labels) != len(paths) or len(set(labels)) != len(labels):
    raise DataError(f"--labels: {len(paths)} distinct names needed (one per report), got {list(labels)}")
  scores: dict[str, dict[str, Any]] = {}
  for label, report in zip(labels, reports):
    for scorer, block in report["scores"].items():
      out = scores.setdefault(scorer, {"overall": {}})
      out["overall"][label] = _entry(block["overall"], scorer)
      for key, _ in report_lib.GROUPS:
        for name, entry in (block.get(key) or {}).items():
          out.setdefault(key, {}).setdefault(name, {})[label] = _entry(entry, scorer)
  for scorer, out in scores.items():  # groupings in the report's order, whatever order reports listed them in
    scores[scorer] = {k: out[k] for k in ["overall"] + [key for key, _ in report_lib.GROUPS] if k in out}
  return {
      "benchmark": reports[0]["benchmark"],
      "reports": [{"label": label, "path": path, "checkpoint": report.get("checkpoint"), "n": report.get("n")}
                  for label, path, report in zip(labels, paths, reports)],
      "scores": scores,
  }


# ----------------------------------------------------------------------------- Markdown


def _shared(values: Sequence[Any], fmt) -> str:
  """One value when all reports agree, else each report's, separated by " / " ("–" where absent)."""
  present = [v for v in values if v is not None]
  if present and all(v == present[0] for v in present) and len(present) == len(values):
    return fmt(present[0])
  return " / ".join("–" if v is None else fmt(v) for v in values)


def to_markdown(combined: Mapping[str, Any]) -> str:
  """Per scorer a table: group, name, each report's accuracy (or WER), n and random, in percent."""
  labels = [r["label"] for r in combined["reports"]]
  lines = [f"# {combined['benchmark']}: {len(labels)} reports side by side", "",
           "| column | report | checkpoint | n |", "| --- | --- | --- | ---: |"]
  lines += [f"| {cell(r['label'])} | {cell(r['path'])} | {cell(r.get('checkpoint') or '')} | {r.get('n')} |"
            for r in combined["reports"]]
  lines.append("")
  for scorer, block in combined["scores"].items():
    wer = _metric(scorer) == "wer"
    lines += [f"## {scorer}: " + ("word error rate (%, lower is better)" if wer else "accuracy (%)"), ""]
    lines.append("| group | name | " + " | ".join(cell(l) for l in labels) + " | n |" + ("" if wer else " random |"))
    lines.append("| --- | --- |" + " ---: |" * (len(labels) + (1 if wer else 2)))
    for group, name, by_label in report_lib.rows_of(block):
      entries = [by_label.get(label) for label in labels]
      cells = [pct(e.get(_metric(scorer))) if e else "–" for e in entries]
      n = _shared([e.get("n") if e else None for e in entries], str)
      row = f"| {group} | {cell(name)} | " + " | ".join(cells) + f" | {n} |"
      if not wer:
        row += f" {_shared([e.get('random') if e else None for e in entries], pct)} |"
      lines.append(row)
    lines.append("")
  return "\n".join(lines)


# ----------------------------------------------------------------------------- chart


def plot(combined: Mapping[str, Any], path: str) -> None:
  """One panel per scorer: overall and every category, a bar per report (and the random baseline)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=import-outside-toplevel
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

  labels = [r["label"] for r in combined["reports"]]
  scorers = list(combined["scores"])
  names = ["overall"]
  for scorer in scorers:
    names += [n for n in combined["scores"][scorer].get("by_category", {}) if n not in names]
  fig = Figure(figsize=(max(6.0, (0.35 * (len(labels) + 1) + 0.5) * len(names) + 2.0), 3.6 * len(scorers)), dpi=100)
  FigureCanvasAgg(fig)
  for row, scorer in enumerate(scorers):
    block, metric = combined["scores"][scorer], _metric(scorer)
    by_name = {name: block["overall"] if name == "overall" else block.get("by_category", {}).get(name, {})
               for name in names}
    series = [(label, COLORS[k % len(COLORS)], [(by_name[n].get(label) or {}).get(metric) for n in names])
              for k, label in enumerate(labels)]
    if metric == "accuracy":
      randoms = [next((e["random"] for e in by_name[n].values() if e.get("random") is not None), None) for n in names]
      if any(r is not None for r in randoms):
        series.append(("random", RANDOM_COLOR, randoms))
    ax = fig.add_subplot(len(scorers), 1, row + 1)
    width = 0.8 / len(series)
    for k, (label, color, values) in enumerate(series):
      xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(names))]
      ax.bar(xs, [100.0 * v if v is not None else 0.0 for v in values], width=width, label=label, color=color)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=20, ha="right")
    ax.set_ylabel("WER (%)" if metric == "wer" else "accuracy (%)")
    if metric == "accuracy":
      ax.set_ylim(0, 110)
      ax.set_yticks(range(0, 101, 20))
    ax.set_title(f"{combined['benchmark']} — {scorer}")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")  # beside the bars, never over them
  fig.tight_layout()
  fig.savefig(path)


# ----------------------------------------------------------------------------- files


def comparison_paths(out_path: str) -> tuple[str, str, str]:
  """(json, markdown, png) beside `out_path`, which may name the .json or the .md."""
  stem, ext = os.path.splitext(out_path)
  stem = stem if ext in (".json", ".md") else out_path
  return stem + ".json", stem + ".md", stem + ".png"


def write_comparison(combined: Mapping[str, Any], out_path: str, *, chart: bool = True) -> tuple[str, str, str | None]:
  """Writes C.json, C.md and C.png (unless `chart` is False); returns the paths."""
  json_path, md_path, png_path = comparison_paths(out_path)
  os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
  report_lib.atomic_write(json_path, json.dumps(combined, indent=2, ensure_ascii=False) + "\n")
  report_lib.atomic_write(md_path, to_markdown(combined) + "\n")
  if not chart:
    return json_path, md_path, None
  plot(combined, png_path)
  return json_path, md_path, png_path
