"""`alm-jax compile --config C --topology v5p:4x4x4`: compile the real train step ahead of time for a
device topology (no such devices needed) and print per-device memory and collectives."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--config", required=True, help="config file, e.g. configs/af3_7b.py")
  parser.add_argument("--topology", required=True,
                      help="v5p:4x4x4, v5p-128, v5e:4x4, v6e-16, v4-16, or h100:8 / cpu:8 (CPU devices as GPUs)")
  parser.add_argument("--num-slices", type=int, default=1, help="TPU slices (or GPU nodes) over DCN")
  parser.add_argument("--hbm-gib", type=float, default=None, help="per-device memory to compare against")
  parser.add_argument("--json", default=None, help="also write the report as JSON here")


def run(args: argparse.Namespace) -> int:
  from alm_jax import aot  # pylint: disable=import-outside-toplevel
  from alm_jax.run_config import load_run_config  # pylint: disable=import-outside-toplevel

  cfg = load_run_config(args.config, args.config_overrides)
  topology = aot.parse_topology(args.topology, args.num_slices, args.hbm_gib)
  aot.prepare_host(topology)

  from alm_jax import sharding as sharding_lib  # pylint: disable=import-outside-toplevel
  from alm_jax.train.program import abstract_train_program  # pylint: disable=import-outside-toplevel

  devices = aot.topology_devices(topology)
  mesh = sharding_lib.make_mesh(cfg.mesh, devices=devices)
  rules = cfg.mesh.logical_rules
  program = abstract_train_program(cfg, mesh, rules)
  _, report = aot.compile_and_report(program.step_fn, program.args, in_shardings=program.in_shardings,
                                     out_shardings=program.out_shardings, mesh=mesh, rules=rules,
                                     donate_argnums=(0, 2), topology=topology,
                                     parameter_shapes=[a.shape for a in program.layout.abstract.values()])
  total = sum(a.size for a in program.layout.abstract.values())
  trainable = sum(program.layout.abstract[p].size for p, t in program.mask.items() if t)
  print(f"model: {total / 1e9:.3f} B parameters, {trainable / 1e9:.3f} B trainable (stage {cfg.train.stage})")
  print(target_choices(cfg.model, topology.platform))
  print(report.format())
  if args.json:
    with open(args.json, "w") as f:
      json.dump(report.to_dict(), f, indent=2, default=str)
  return 0


def target_choices(model, platform: str) -> str:
  """The config's per-target computation choices, which the compiled program bakes in (nothing is detected),
  with a warning when a TPU is compiled for with the choices made for CPUs."""
  frontend = model.frontend
  block = model.whisper.attention_block if model.whisper is not None and "whisper" in model.encoders else 0
  line = (f"target choices (config): front end method={frontend.method} "
          f"examples_per_step={frontend.examples_per_step}, whisper attention_block={block}")
  if platform == "tpu" and (frontend.method == "fft" or frontend.examples_per_step or block):
    line += ("\nwarning: these are CPU choices; on a TPU set --config.model.frontend.method=matmul "
             "--config.model.frontend.examples_per_step=0 --config.model.whisper.attention_block=0")
  return line
