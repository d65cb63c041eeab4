"""`alm-jax compile --mode generate`: the generation program, compiled ahead of time for a topology.

The program is `alm_generate.generate_fn` — what the generator jits — for one serving bucket
(`--generate-batch` rows of `--prompt-tokens` tokens, one clip of at most 30 s each, `--new-tokens`
to decode, params and compute in `--dtype`). Besides the memory and whole-program roofline of train
mode it prints the decode step: an analytic HBM roofline and the roofline of the compiled decode loop's
body (`alm_jax.decode_roofline`). A program that does not fit is a report and exit status 3, as in
train mode.
"""

from __future__ import annotations

import argparse
import dataclasses

MESH_HELP = ("mesh D,F,T (data, fsdp, tensor) for generate mode, e.g. 1,1,8; default: the largest tensor split "
             "of the chips that every LLM parameter divides, the rest data-parallel (decoding reads every weight per "
             "token: over fsdp each chip would all-gather every layer's weights at every step, over tensor it "
             "reads only its shard), else the config's mesh (also used when --config.mesh.shape is given)")


def add_arguments(group: argparse._ArgumentGroup) -> None:  # pylint: disable=protected-access
  group.add_argument("--generate-batch", type=int, default=64, help="rows decoded together (default 64)")
  group.add_argument("--prompt-tokens", type=int, default=1024, help="prompt length bucket in tokens (default 1024)")
  group.add_argument("--new-tokens", type=int, default=256, help="tokens to generate per row (default 256)")
  group.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                     help="parameter and compute dtype (default bfloat16)")
  group.add_argument("--mesh", default=None, help=MESH_HELP)
  group.add_argument("--dump-hlo", default=None, help="write the compiled program's optimised HLO text here")


def run(args: argparse.Namespace, cfg, topology) -> int:
  """Compiles the generation program for `topology` and prints its report; 0, or 3 when it does not fit."""
  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp

  from alm_jax import aot, roofline
  from alm_jax import sharding as sharding_lib
  from alm_jax.commands.compile import _does_not_fit, _write_json, require_positive, target_choices
  from alm_jax.config import ConfigError
  from alm_jax.decode_roofline import KVCache, decode_report
  from alm_jax.infer import generate_program as gp

  if args.batch_per_device is not None or args.find_max_batch:
    raise ConfigError("--mode generate", "sets its batch with --generate-batch (--batch-per-device and "
                      "--find-max-batch are train-mode flags)")
  for flag in ("generate_batch", "prompt_tokens", "new_tokens"):
    require_positive(getattr(args, flag), "--" + flag.replace("_", "-"))
  shape = gp.GenerateShape(args.generate_batch, args.prompt_tokens, args.new_tokens, args.dtype)
  devices = aot.topology_devices(topology)
  layout = gp.generate_layout(cfg.model)
  mesh_text = args.mesh or ("config" if "mesh.shape" in (args.config_overrides or {}) else None)
  mesh_cfg, why = choose_mesh(mesh_text, cfg.mesh, layout, topology)
  mesh = sharding_lib.make_mesh(mesh_cfg, devices=devices)
  rules = mesh_cfg.logical_rules
  program = gp.abstract_generate_program(cfg.model, cfg.data, mesh, rules, shape, layout)

  print(target_choices(cfg.model, topology.platform))
  params = program.args[0]
  print(f"model: {sum(a.size for a in layout.abstract.values()) / 1e9:.3f} B parameters in {shape.dtype}, "
        f"{aot.human_bytes(aot.sharded_bytes(params))} per device")
  if program.unsplit:
    print(f"kept whole where the mesh does not divide them (encoders run once per prompt): {len(program.unsplit)} "
          f"parameters, e.g. {program.unsplit[0]}")
  print(f"generate: {shape.batch} rows x {shape.prompt_tokens} prompt tokens (one clip of <= 30 s each) + "
        f"{shape.new_tokens} new tokens; KV cache of {shape.cache_length} slots; mesh {dict(mesh.shape)} ({why})")
  compiled, report = aot.compile_and_report(
      program.fn, program.args, in_shardings=program.in_shardings, out_shardings=None, mesh=mesh, rules=rules,
      topology=topology, parameter_shapes=layout.gathered_shapes())
  print(report.format())
  extra = {"generate": {**dataclasses.asdict(shape), "cache_length": shape.cache_length,
                        "mesh": dict(mesh.shape), "mesh_choice": why, "unsplit": program.unsplit}}
  if compiled is not None and args.dump_hlo:
    with open(args.dump_hlo, "w") as f:
      f.write(compiled.as_text())
  if compiled is not None:
    weight_bytes, left_out = gp.llm_weight_bytes(params)
    itemsize = jnp.dtype(gp.DTYPES[shape.dtype]).itemsize
    kv_cache = KVCache(*gp.kv_cache_shapes(cfg.model.llm, shape, mesh, rules), itemsize)
    try:
      decode = decode_report(compiled.as_text(), report.roofline, batch=shape.batch, new_tokens=shape.new_tokens,
                             num_devices=mesh.size, weight_bytes=weight_bytes, kv_cache=kv_cache,
                             left_out=tuple(left_out), llm_parameters=gp.llm_parameters(layout))
    except roofline.LoopNotFound as e:
      print(f"decode loop: {e}")
      extra["generate"]["decode_error"] = str(e)
    else:
      print(decode.format())
      extra["generate"]["decode"] = decode.to_dict()
  _write_json(args.json, report, extra)
  if report.fits is False:
    return _does_not_fit(report, f"{shape.batch} rows x {shape.cache_length} cache slots do not fit")
  return 0


def choose_mesh(text: str | None, config, layout, topology):
  """(mesh config, why): `--mesh` (`text`; "config": the config's mesh, as `--config.mesh.shape` set it), else
  the tensor-parallel serving mesh (`generate_program.tensor_mesh`) for one slice, else the config's mesh."""
  # pylint: disable=import-outside-toplevel
  from alm_jax.infer import generate_program as gp

  per_slice = topology.num_devices // topology.num_slices
  if text == "config":
    return config, "the config's mesh (--config.mesh.shape)"
  if text:
    shape = gp.parse_mesh(text, per_slice)
    return dataclasses.replace(config, shape=shape), "--mesh"
  if topology.num_slices == 1:
    tensor = gp.tensor_mesh(layout, config, per_slice)
    if tensor is not None:
      return tensor, f"the largest tensor split every LLM parameter divides: {tensor.shape[2]}"
  return config, "the config's mesh: no tensor split divides every LLM parameter"
