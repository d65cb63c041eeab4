"""`alm-jax compile --config C --topology v5p:4x4x4`: compile the real train step ahead of time for a
device topology (no such devices needed) and print per-device memory, collectives and a roofline estimate
of the step's time (`alm_jax.roofline`). `--mode generate` compiles the generation program instead (prefill
and while-loop decode, `alm_jax.commands.compile_generate`) and adds the decode step's time.

A program that does not fit (the compiler runs out of device memory, or the total exceeds `--hbm-gib`)
is a report like any other, with what is known of its memory and a 1-row-per-device stand-in showing
what scales; the command then exits with status 3 and one line on stderr. `--find-max-batch` finds
the largest rows per device that fit.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from typing import Any, Callable


EXIT_DOES_NOT_FIT = 3  # the program needs more memory per device than the target has (a report, no traceback)


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--config", required=True, help="config file, e.g. configs/af3_7b.py")
  parser.add_argument("--topology", required=True,
                      help="v5p:4x4x4, v5p-128, v5e:4x4, v6e-16, v4-16, or h100:8 / cpu:8 (CPU devices as GPUs)")
  parser.add_argument("--num-slices", type=int, default=1, help="TPU slices (or GPU nodes) over DCN")
  parser.add_argument("--hbm-gib", type=float, default=None, help="per-device memory to compare against")
  parser.add_argument("--batch-per-device", type=int, default=None,
                      help="rows per device (sets config.data.batch_size to this times the batch-split devices)")
  parser.add_argument("--find-max-batch", action="store_true",
                      help="find the largest rows per device that fits, by doubling then bisection")
  parser.add_argument("--no-stand-in", action="store_true",
                      help="when the program does not fit, do not compile the 1-row-per-device stand-in")
  parser.add_argument("--json", default=None, help="also write the report as JSON here")
  parser.add_argument("--mode", choices=("train", "generate"), default="train",
                      help="train: the config's train step; generate: the generation program (features, encoders, "
                      "bridge, prefill, while-loop decode) the generator runs, with the decode step's roofline")
  from alm_jax.commands import compile_generate  # pylint: disable=import-outside-toplevel

  compile_generate.add_arguments(parser.add_argument_group("--mode generate"))


def run(args: argparse.Namespace) -> int:
  from alm_jax import aot  # pylint: disable=import-outside-toplevel
  from alm_jax.run_config import load_run_config  # pylint: disable=import-outside-toplevel

  cfg = load_run_config(args.config, args.config_overrides)
  topology = aot.parse_topology(args.topology, args.num_slices, args.hbm_gib)
  aot.prepare_host(topology)

  from alm_jax import sharding as sharding_lib  # pylint: disable=import-outside-toplevel

  if args.mode == "generate":
    from alm_jax.commands import compile_generate  # pylint: disable=import-outside-toplevel

    return compile_generate.run(args, cfg, topology)
  devices = aot.topology_devices(topology)
  mesh = sharding_lib.make_mesh(cfg.mesh, devices=devices)
  rules = cfg.mesh.logical_rules
  shards = sharding_lib.batch_shard_count(mesh, rules)
  if args.batch_per_device is not None:
    require_positive(args.batch_per_device, "--batch-per-device")
    cfg = with_rows_per_device(cfg, args.batch_per_device, shards)
  compile_rows = lambda rows: compile_config(with_rows_per_device(cfg, rows, shards), mesh, rules, topology)[:2]

  print(target_choices(cfg.model, topology.platform))
  if args.find_max_batch:
    best, report, tried = find_max_rows(compile_rows, start=max(1, cfg.data.batch_size // shards))
    for rows, fits in tried:
      print(f"  {rows} rows per device: {'fits' if fits else 'does not fit'}")
    if best is None:
      print(report.format())
      _write_json(args.json, report, {"max_batch_per_device": None, "tried": tried})
      return _does_not_fit(report, "even 1 row per device does not fit")
    print(f"largest batch that fits: {best} rows per device ({best * shards} global) — its report:")
    print(report.format())
    _write_json(args.json, report, {"max_batch_per_device": best, "tried": tried})
    return 0

  report, _, program = compile_config(cfg, mesh, rules, topology)
  total = sum(a.size for a in program.layout.abstract.values())
  trainable = sum(program.layout.abstract[p].size for p, t in program.mask.items() if t)
  print(f"model: {total / 1e9:.3f} B parameters, {trainable / 1e9:.3f} B trainable (stage {cfg.train.stage})")
  print(f"batch: {cfg.data.batch_size} rows ({cfg.data.batch_size / shards:g} per device over {shards} devices)")
  print(report.format())
  extra = {}
  rows = cfg.data.batch_size // shards
  if report.fits is False and rows > 1 and not args.no_stand_in:
    from alm_jax.aot import largest_arrays  # pylint: disable=import-outside-toplevel

    stand_in, compiled = compile_rows(1)
    extra["stand_in"] = scaling_estimate(stand_in, report, rows)
    extra["stand_in"]["largest_arrays"] = largest_arrays(compiled.as_text()) if compiled is not None else []
    print(format_stand_in(extra["stand_in"], rows))
  _write_json(args.json, report, extra)
  if report.fits is False:
    return _does_not_fit(report, f"{rows} rows per device do not fit")
  return 0


def require_positive(value: int, flag: str) -> None:
  if value < 1:
    from alm_jax.config import ConfigError  # pylint: disable=import-outside-toplevel

    raise ConfigError(flag, f"must be at least 1, got {value}")


def with_rows_per_device(cfg, rows: int, shards: int):
  """`cfg` with `data.batch_size` = `rows` × the batch-split devices."""
  return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=rows * shards))


def compile_config(cfg, mesh, rules, topology):
  """Compiles the config's train step for `topology`; returns `(report, compiled or None, program)` (a program
  that does not fit is a report, not an exception)."""
  from alm_jax import aot  # pylint: disable=import-outside-toplevel
  from alm_jax.train.program import abstract_train_program  # pylint: disable=import-outside-toplevel

  program = abstract_train_program(cfg, mesh, rules)
  compiled, report = aot.compile_and_report(
      program.step_fn, program.args, in_shardings=program.in_shardings, out_shardings=program.out_shardings,
      mesh=mesh, rules=rules, donate_argnums=(0, 2), topology=topology,
      parameter_shapes=program.layout.gathered_shapes(),
      model_flops=model_flops(program, mesh.size), model_flops_source=MODEL_FLOPS_SOURCE)
  return report, compiled, program


MODEL_FLOPS_SOURCE = "6·N·tokens, N = parameters less the input embedding table"


def model_flops(program, num_devices: int) -> float | None:
  """6·N·tokens per device for one step of `program` (N: every parameter, trainable or not, less an untied
  input embedding table, which is a lookup rather than a matmul; tokens: the batch's text positions,
  micro-batches included): the usual MFU convention, not the step's exact work."""
  from alm_jax.roofline import model_flops_per_device  # pylint: disable=import-outside-toplevel

  tokens = program.args[3].get("tokens")
  if tokens is None:
    return None
  abstract = program.layout.abstract
  lookup = abstract["llm/embed/embedding"].size if "llm/lm_head/kernel" in abstract else 0
  parameters = sum(a.size for a in abstract.values()) - lookup
  return model_flops_per_device(parameters, math.prod(tokens.shape), num_devices)


def find_max_rows(compile_rows: Callable[[int], tuple[Any, Any]], start: int = 1, limit: int = 1 << 20
                  ) -> tuple[int | None, Any, list[tuple[int, bool]]]:
  """The largest rows per device whose program fits; returns `(rows or None, its report, tried)`.

  Each probe is one compile (8-13 minutes for a 7B recipe on a small host), so the search is guided:
  memory per device grows about linearly with the rows, so after two probes (doubling or halving
  from `start`) the line through them predicts the largest batch that fits. From that guess the
  search gallops (steps 1, 2, 4 up while it fits, down while it does not: padding makes the growth
  stepwise), then doubles or bisects until the largest fit and the smallest miss are neighbours.
  Reports without totals fall back to doubling and bisection.
  """
  tried: list[tuple[int, bool]] = []
  reports: dict[int, Any] = {}
  good, bad = 0, None  # the largest rows known to fit, the smallest known not to

  def open_between(rows: int) -> bool:
    return good < rows and (bad is None or rows < bad) and rows <= limit

  def probe(rows: int) -> bool:
    nonlocal good, bad
    report, _ = compile_rows(rows)
    reports[rows] = report
    fits = report.fits is not False
    tried.append((rows, fits))
    if fits:
      good = max(good, rows)
    else:
      bad = rows if bad is None else min(bad, rows)
    return fits

  def predicted() -> int | None:
    (r0, _), (r1, _) = tried[0], tried[1]
    t0, t1 = reports[r0].memory.total, reports[r1].memory.total
    hbm = reports[r0].memory.hbm or reports[r1].memory.hbm
    if not (t0 and t1 and hbm) or t1 == t0:
      return None
    slope = (t1 - t0) / (r1 - r0)
    return max(1, int(r0 + (hbm - t0) // slope)) if slope > 0 else None

  first = max(1, start)
  probe(first)
  if not (good == 0 and first == 1):
    probe(2 * first if good else max(1, first // 2))
    guess = predicted()
    if guess is not None and open_between(guess):  # gallop from the prediction to a bracket
      step, fits = 1, probe(guess)
      while (bad is None or bad - good > 1) and step <= 4:  # then bisection: the line was far off
        nxt = guess + step if fits else guess - step
        if not open_between(nxt):
          break
        probe(nxt)
        step *= 2
  while (bad is None or bad - good > 1) and not (good == 0 and bad == 1):
    if bad is None:
      if 2 * good > limit:
        break
      probe(2 * good)
    elif good == 0:
      probe(max(1, bad // 2))
    else:
      probe((good + bad) // 2)
  if good == 0:
    return None, reports[bad], tried
  return good, reports[good], tried


def scaling_estimate(stand_in, report, rows: int) -> dict:
  """What scales with the batch, from the 1-row stand-in and the `rows`-row program that did not fit."""
  base = stand_in.memory.total
  per_row = (report.memory.total - base) / max(rows - 1, 1)
  hbm = report.memory.hbm or stand_in.memory.hbm
  estimate = int((hbm - base) // per_row) + 1 if hbm and per_row > 0 and stand_in.fits is not False else 0
  return {"rows": 1, "fits": stand_in.fits, "total": base, "temporaries": stand_in.memory.temporaries,
          "arguments": stand_in.memory.arguments, "per_row": per_row, "estimated_max_rows": estimate,
          "report": stand_in.to_dict()}


def format_stand_in(estimate: dict, rows: int) -> str:
  """What the 1-row stand-in shows: its memory, the growth per row, and its largest arrays."""
  from alm_jax.aot import GIB, human_bytes  # pylint: disable=import-outside-toplevel

  lines = [f"stand-in at 1 row per device (the same program at 1/{rows} of the batch): total "
           f"{estimate['total'] / GIB:.2f} GiB (arguments {estimate['arguments'] / GIB:.2f} GiB, temporaries "
           f"{estimate['temporaries'] / GIB:.2f} GiB), "
           f"{'fits' if estimate['fits'] is not False else 'does NOT fit either'}",
           f"  each further row per device adds ~{estimate['per_row'] / GIB:.2f} GiB"]
  if estimate["estimated_max_rows"]:
    lines.append(f"  estimated largest batch that fits: ~{estimate['estimated_max_rows']} rows per device "
                 "(--find-max-batch finds it exactly)")
  if estimate.get("largest_arrays"):
    lines.append("  largest arrays in the stand-in's program (per device; they grow with the rows):")
    lines += [f"    {human_bytes(a['bytes']):>12}  {a['shape']}  {a['op_name'][:100]}"
              for a in estimate["largest_arrays"]]
  return "\n".join(lines)


def _write_json(path: str | None, report, extra: dict) -> None:
  if path:
    with open(path, "w") as f:
      json.dump({**report.to_dict(), **extra}, f, indent=2, default=str)


def _does_not_fit(report, what: str) -> int:
  """The one line scripts read, on stderr, and the exit status for "does not fit"."""
  from alm_jax.aot import GIB  # pylint: disable=import-outside-toplevel

  memory = report.memory
  print(f"alm-jax compile: does not fit on {report.target}: {what}: needs {memory.total / GIB:.2f} GiB of "
        f"{(memory.hbm or 0) / GIB:.2f} GiB per device", file=sys.stderr)
  return EXIT_DOES_NOT_FIT


def target_choices(model, platform: str) -> str:
  """The config's per-target computation choices, which the compiled program bakes in (nothing is detected),
  with a warning when a TPU is compiled for with the choices made for CPUs."""
  frontend = model.frontend
  whisper = model.whisper if model.whisper is not None and "whisper" in model.encoders else None
  block = whisper.attention_block if whisper is not None else 0
  impls = {"llm": model.llm.attention, **({"whisper": whisper.attention} if whisper is not None else {})}
  line = (f"target choices (config): front end method={frontend.method} "
          f"examples_per_step={frontend.examples_per_step}, whisper attention_block={block}, attention "
          + ", ".join(f"{tower}={impl}" for tower, impl in impls.items())
          + f", layers {'scanned' if model.llm.scan_layers else 'unrolled'}"
          + ("" if model.llm.decode_scan or not model.llm.scan_layers else " (decode unrolled)"))
  if platform == "tpu" and (frontend.method == "fft" or frontend.examples_per_step or block):
    line += ("\nwarning: these are CPU choices; on a TPU set --config.model.frontend.method=matmul "
             "--config.model.frontend.examples_per_step=0 --config.model.whisper.attention_block=0")
  if platform == "tpu" and model.llm.scan_layers and not model.llm.decode_scan:
    line += ("\nnote: decode_scan=False is a CPU choice; a TPU reads scanned weights in place "
             "(--config.model.llm.decode_scan=True compiles one decode layer body)")
  if platform == "tpu" and any(impl != "splash" for impl in impls.values()):
    line += "\nnote: splash is the TPU attention kernel (--config.model.llm.attention=splash, same for whisper)"
  if platform != "tpu" and "splash" in impls.values():
    line += f"\nwarning: splash attention is a TPU kernel; a {platform} target needs xla or cudnn"
  return line
