"""The 7B recipes' generation programs compiled for TPU slices: memory, and the decode step analytic vs compiled.

Runs `alm-jax compile --mode generate` (one subprocess per program, one at a time) for each
`recipe@topology[@mesh]` given (default: Qwen2-Audio-7B on v5e:2x4, v6e:2x4 and v5p:2x2x1 with the default
serving mesh, and FSDP on v5e:2x4), then prints a markdown table and, with `--write-docs`, puts it into
docs/scaling.md between the generate-plan markers.

  python benchmarks/generate_plan.py --write-docs
  python benchmarks/generate_plan.py --programs qwen2_audio_7b:full@v5e:2x4@1,8,1 af3_7b@v5e:2x4
"""

from __future__ import annotations

import _run_info  # noqa: E402  (benchmarks/_run_info.py: date, machine and load of the run)

import argparse
import dataclasses
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

import pod_plan  # benchmarks/ is on sys.path when a script here runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEGIN, END = "<!-- generate_plan:begin -->", "<!-- generate_plan:end -->"
DEFAULT_PROGRAMS = ("qwen2_audio_7b:full@v5e:2x4", "qwen2_audio_7b:full@v5e:2x4@1,8,1", "qwen2_audio_7b:full@v6e:2x4",
                    "qwen2_audio_7b:full@v5p:2x2x1")


@dataclasses.dataclass
class Row:
  """One compiled generation program (report None where the compile did not finish)."""

  program: str
  status: int
  wall_seconds: float
  report: dict | None
  note: str = ""


def compile_one(program: str, extra: list[str], timeout: float) -> Row:
  """`alm-jax compile --mode generate` of `recipe[:stage]@topology[@D,F,T]` in a fresh interpreter."""
  recipe, topology, *mesh = program.split("@")
  name, _, stage = recipe.partition(":")
  config = f"configs/{name}.py" + (f":{stage}" if stage else "")
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "report.json")
    command = [sys.executable, "-m", "alm_jax", "compile", "--mode", "generate", "--config", config, "--topology",
               topology, "--json", out, *(["--mesh", mesh[0]] if mesh else []), *extra]
    start = time.perf_counter()
    try:
      done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
      return Row(program, -1, time.perf_counter() - start, None, f"timed out after {timeout:.0f} s")
    report = None
    if os.path.exists(out):
      with open(out) as f:
        report = json.load(f)
    note = "" if done.returncode in (0, 3) else (done.stderr.strip().splitlines() or ["?"])[-1][:200]
    return Row(program, done.returncode, time.perf_counter() - start, report, note)


COLUMNS = ("recipe", "topology", "mesh (D,F,T)", "fits", "HBM GiB/chip (args + temps)", "compile s",
           "decode step ms, analytic", "decode step ms, compiled body", "ratio", "tokens/s/chip (analytic / compiled)",
           "bound (compiled)", "prefill s (compiled)", "KV cache")


def _ms(seconds: float | None) -> str:
  return "?" if seconds is None else f"{seconds * 1e3:.2f}"


def _seconds(value: float | None) -> str:
  return "?" if value is None else f"{value:.2f}"


def _rate(value: float | None) -> str:
  return "?" if value is None else f"{value:,.0f}"


def table_row(row: Row) -> list[str]:
  """One program's cells, `?` where the report lacks the number."""
  recipe, topology = row.program.split("@")[:2]
  r = row.report or {}
  generate = r.get("generate") or {}
  mesh = generate.get("mesh") or {}
  memory = r.get("memory") or {}
  gib = lambda n: "?" if n is None else f"{n / 2**30:.1f}"
  fits = {True: "yes", False: "**no**", None: "?"}[r.get("fits")] if r else f"error: {row.note}"
  cells = [recipe, topology, ",".join(str(mesh.get(a, "?")) for a in ("data", "fsdp", "tensor")), fits,
           f"{gib(memory.get('total'))} ({gib(memory.get('arguments'))} + {gib(memory.get('temporaries'))})"
           if memory else "?", f"{r.get('compile_seconds') or row.wall_seconds:.0f}"]
  decode = generate.get("decode")
  if not decode:
    return cells + [generate.get("decode_error", "?")[:80]] + ["?"] * (len(COLUMNS) - len(cells) - 1)
  analytic, step = decode["analytic"], decode["step"]
  ratio = decode.get("ratio")
  return cells + [_ms(analytic["seconds"]), _ms(step.get("seconds")), "?" if ratio is None else f"{ratio:.2f}",
                  f"{_rate(analytic['tokens_per_s_per_chip'])} / {_rate(decode.get('tokens_per_s_per_chip'))}",
                  str(step.get("bound")), _seconds(decode["prefill"].get("seconds")), decode["kv_cache"]["verdict"]]


def table(rows: list[Row]) -> str:
  lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
  return "\n".join(lines + ["| " + " | ".join(table_row(row)) + " |" for row in rows])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--programs", nargs="+", default=list(DEFAULT_PROGRAMS),
                      help="recipe[:stage]@topology[@D,F,T] (default mesh: the serving mesh `--mode generate` picks)")
  parser.add_argument("--timeout", type=float, default=1800, help="seconds per compile before giving up")
  parser.add_argument("--write-docs", action="store_true", help="put the table into docs/scaling.md")
  parser.add_argument("--json", default=None, help="also write every report here")
  parser.add_argument("--from-json", default=None, help="no compiles: the table of the reports a --json run wrote")
  args, extra = parser.parse_known_args()  # the rest go to `alm-jax compile` (e.g. --generate-batch 32)

  rows = []
  if args.from_json:
    with open(args.from_json) as f:
      rows = [Row(**row) for row in json.load(f)]
  # One at a time: each 7B compile takes ~4 GB and a core for minutes.
  for program in [] if args.from_json else args.programs:
    row = compile_one(program, extra, args.timeout)
    print(f"{program}: exit {row.status}, {row.wall_seconds:.0f} s wall {row.note}", flush=True)
    rows.append(row)
  if args.json and not args.from_json:
    with open(args.json, "w") as f:
      json.dump([dataclasses.asdict(row) for row in rows], f, indent=1, default=str)
  shape = " ".join(extra) or "64 rows x 1024 prompt tokens + 256 new tokens, bf16"
  text = "\n".join([f"{shape}; measured {datetime.date.today().isoformat()} by `benchmarks/generate_plan.py` on a "
                    f"{os.cpu_count()}-core host.", "", table(rows)])
  print(text)
  if args.write_docs:
    pod_plan.write_docs(text, BEGIN, END)


if __name__ == "__main__":
  _run_info.stamp(__file__, "start")
  main()
  _run_info.stamp(__file__, "end")
