"""The released 7B recipes compiled for a TPU pod: memory, compile time and a roofline per recipe × stage.

Runs `alm-jax compile` (one subprocess per program, so one compile's memory is
returned before the next) for every recipe and stage at one global batch
(default 256 rows × 2048 tokens, one 30 s clip per row) on one topology
(default v5p:4x4x4, 64 chips), then prints a markdown table and, with
`--write-docs`, puts it into docs/scaling.md between its pod-plan markers.
`--unrolled` also compiles one program with `scan_layers=False` on every tower
and prints the compile-time ratio against its scanned form.

  python benchmarks/pod_plan.py --write-docs            # the whole matrix (~1 h on 2 cores)
  python benchmarks/pod_plan.py --recipes qwen2_audio_7b --stages full --unrolled
"""

from __future__ import annotations

import _run_info  # noqa: E402  (benchmarks/_run_info.py: date, machine and load of the run)

import argparse
import concurrent.futures
import dataclasses
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = ("qwen2_audio_7b", "af3_7b", "salmonn_7b")
STAGES = ("projector", "lora", "full")
BEGIN, END = "<!-- pod_plan:begin -->", "<!-- pod_plan:end -->"
UNROLLED = ("--config.model.llm.scan_layers=False", "--config.model.whisper.scan_layers=False",
            "--config.model.beats.scan_layers=False")


@dataclasses.dataclass
class Row:
  """One compiled program's numbers (None where the compile did not get that far)."""

  recipe: str
  stage: str
  status: int
  wall_seconds: float
  report: dict | None
  note: str = ""


def batch_overrides(rows: int, tokens: int) -> list[str]:
  """Config overrides for `rows` sequences of `tokens` tokens holding one clip of at most 30 s each: one
  Whisper window per row (AF3's recipe allows 20 windows per clip; a 30 s clip fills one)."""
  return [f"--config.data.batch_size={rows}", f"--config.data.length_buckets=({tokens},)",
          "--config.data.max_clips=1", "--config.data.max_clip_seconds=30.0", "--config.data.window_buckets=(1,)"]


def compile_one(recipe: str, stage: str, topology: str, extra: list[str], timeout: float) -> Row:
  """`alm-jax compile` of `configs/<recipe>.py:<stage>` in a fresh interpreter; its JSON report and wall time."""
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "report.json")
    command = [sys.executable, "-m", "alm_jax", "compile", "--config", f"configs/{recipe}.py:{stage}",
               "--topology", topology, "--no-stand-in", "--json", out, *extra]
    start = time.perf_counter()
    try:
      done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
      return Row(recipe, stage, -1, time.perf_counter() - start, None, f"timed out after {timeout:.0f} s")
    wall = time.perf_counter() - start
    report = None
    if os.path.exists(out):
      with open(out) as f:
        report = json.load(f)
    note = "" if done.returncode in (0, 3) else (done.stderr.strip().splitlines() or ["?"])[-1][:200]
    return Row(recipe, stage, done.returncode, wall, report, note)


def _gib(n: float | None) -> str:
  return "?" if n is None else f"{n / 2**30:.1f}"


def _seconds(s: float | None) -> str:
  return "?" if s is None else (f"{s:.2f}" if s >= 0.1 else f"{s * 1e3:.1f} ms")


COLUMNS = ("recipe", "stage", "fits", "HBM GiB/chip (args + temps)", "compile s", "TFLOP/chip", "HBM GB/chip",
           "ICI GB/chip", "step s (roofline)", "bound", "MFU")


def table_row(row: Row) -> list[str]:
  """One program's cells, `?` where the report lacks the number."""
  r = row.report or {}
  memory, roof = r.get("memory") or {}, r.get("roofline") or {}
  fits = {True: "yes", False: "**no**", None: "?"}[r.get("fits")] if r else f"error: {row.note}"
  hbm = f"{_gib(memory.get('total'))} ({_gib(memory.get('arguments'))} + {_gib(memory.get('temporaries'))})"
  cells = [row.recipe, row.stage, fits, hbm if memory else "?", f"{r.get('compile_seconds') or row.wall_seconds:.0f}"]
  if roof.get("flops") is None:
    return cells + ["?"] * (len(COLUMNS) - len(cells))
  # 6·N·tokens assumes every weight trains: with frozen towers (projector, lora) it exceeds the step's work.
  mfu = roof.get("mfu") if row.stage == "full" else None
  return cells + [f"{roof['flops'] / 1e12:.1f}", f"{roof['hbm_bytes'] / 1e9:.0f}",
                  f"{roof['collective_bytes'] / 1e9:.1f}", _seconds(roof.get("seconds")), str(roof.get("bound")),
                  "—" if mfu is None else f"{100 * mfu:.0f} %"]


def table(rows: list[Row]) -> str:
  """Markdown: per program the memory, compile time and roofline columns."""
  lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
  lines += ["| " + " | ".join(table_row(row)) + " |" for row in rows]
  return "\n".join(lines)


MFU_NOTE = """MFU is shown for `full` only: 6·N·tokens assumes every weight trains, so with frozen towers it
exceeds the step's work. Where a program is compute-bound in the roofline, the predicted step time is
the counted FLOPs over the peak (HFU 100 % by construction) and MFU is 6·N·tokens over the counted
FLOPs: the remat recompute, the audio encoder's 1500 frames per clip and the chunked loss are the
difference."""


def write_docs(text: str, begin: str = BEGIN, end: str = END) -> None:
  """Replaces what lies between the `begin` / `end` markers (the pod-plan ones by default) in docs/scaling.md."""
  path = os.path.join(ROOT, "docs", "scaling.md")
  with open(path) as f:
    doc = f.read()
  if begin not in doc or end not in doc:
    raise SystemExit(f"{path}: no {begin} ... {end} markers to write between")
  before, rest = doc.split(begin, 1)
  _, after = rest.split(end, 1)
  with open(path, "w") as f:
    f.write(before + begin + "\n" + text + "\n" + end + after)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--recipes", nargs="+", default=list(RECIPES))
  parser.add_argument("--stages", nargs="+", default=list(STAGES))
  parser.add_argument("--topology", default="v5p:4x4x4")
  parser.add_argument("--rows", type=int, default=256, help="global batch (sequences)")
  parser.add_argument("--tokens", type=int, default=2048, help="tokens per sequence")
  parser.add_argument("--timeout", type=float, default=1800, help="seconds per compile before giving up")
  parser.add_argument("--jobs", type=int, default=1,
                      help="compiles at once (each takes ~1 core and ~4 GB here; compile times then include sharing)")
  parser.add_argument("--unrolled", action="store_true",
                      help="also compile the first recipe's last stage (full by default) with unrolled layers: the "
                           "compile-time baseline")
  parser.add_argument("--write-docs", action="store_true", help="put the table into docs/scaling.md")
  args = parser.parse_args()

  overrides = batch_overrides(args.rows, args.tokens)
  programs = [(recipe, stage) for recipe in args.recipes for stage in args.stages]
  with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
    futures = [pool.submit(compile_one, recipe, stage, args.topology, overrides, args.timeout)
               for recipe, stage in programs]
    for future in concurrent.futures.as_completed(futures):
      row = future.result()
      print(f"{row.recipe}:{row.stage}: exit {row.status}, {row.wall_seconds:.0f} s wall {row.note}", flush=True)
  rows = [future.result() for future in futures]
  lines = [f"{args.topology}, global batch {args.rows} × {args.tokens} tokens, one ≤30 s clip per row; "
           f"measured {datetime.date.today().isoformat()} by `benchmarks/pod_plan.py --jobs {args.jobs}` on a "
           f"{os.cpu_count()}-core host.", "", table(rows), "", MFU_NOTE]
  if args.unrolled:
    recipe, stage = args.recipes[0], args.stages[-1]
    base = next(r for r in rows if (r.recipe, r.stage) == (recipe, stage))
    flat = compile_one(recipe, stage, args.topology, overrides + list(UNROLLED), args.timeout)
    scanned_s = (base.report or {}).get("compile_seconds", base.wall_seconds)
    unrolled_s = (flat.report or {}).get("compile_seconds", flat.wall_seconds)
    lines += ["", f"Compile time of {recipe}:{stage}, layers scanned vs unrolled (`scan_layers=False` on every "
              f"tower): {scanned_s:.0f} s vs {unrolled_s:.0f} s{' (timed out)' if flat.status == -1 else ''}, "
              f"{unrolled_s / scanned_s:.1f}x faster scanned."]
  text = "\n".join(lines)
  print(text)
  if args.write_docs:
    write_docs(text)


if __name__ == "__main__":
  _run_info.stamp(__file__, "start")
  main()
  _run_info.stamp(__file__, "end")
