"""Where generation runs: the mesh over every device of every process, the parameters' dtype, and which
prompts each process supplies.

Inference uses the training mesh and logical rules (`config.mesh`): weights split over `fsdp` and/or
`tensor`, prompts over the axes the `batch` rule names, the KV cache over both. A process supplies the
rows its devices hold (`distributed.process_rows`); processes whose devices hold the same rows (a
batch not split across them, e.g. a tensor axis spanning hosts) form one *group* and must supply the
same prompts, so an evaluation hands out items per group, not per process (`BatchGroup`).
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Mapping

import numpy as np

from alm_jax.config import ConfigError

DTYPES = ("float32", "bfloat16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """`--mesh` and `--dtype` for commands that load a model to generate with."""
  parser.add_argument("--mesh", default=None,
                      help="mesh shape data,fsdp,tensor over all devices of all processes, one size may be -1 "
                           "(default: the largest tensor split of each host's devices that the decoder divides, "
                           "hosts on data, as `alm-jax compile --mode generate`; else the checkpoint's config.mesh); "
                           "e.g. -1,1,1 = every device holds the model and answers its share of prompts, "
                           "1,1,-1 = weights and heads split")
  parser.add_argument("--dtype", default=None, choices=DTYPES,
                      help="parameter and compute dtype (default: the checkpoint's train.compute_dtype)")


def parse_mesh(text: str, key: str = "--mesh") -> tuple[int, ...]:
  """`"8,1,1"`, `"(1, -1, 1)"` or `"1x1x8"` -> a shape tuple (checked by `MeshConfig`)."""
  cleaned = text.strip().strip("()[]").replace("x", ",")
  try:
    return tuple(int(part) for part in cleaned.split(",") if part.strip())
  except ValueError:
    raise ConfigError(key, f"expected sizes like 8,1,1, got {text!r}") from None


def mesh_config(stored: Mapping[str, Any] | None, mesh: str | None, overrides: Mapping[str, str] | None = None):
  """The `MeshConfig` to generate with: the checkpoint's `config.mesh` (`stored`, the run's resolved config),
  its shape replaced by `--mesh` and fields by `--config.mesh.*` overrides."""
  import ml_collections  # pylint: disable=import-outside-toplevel

  from alm_jax import sharding as sharding_lib  # pylint: disable=import-outside-toplevel
  from alm_jax.config import apply_overrides  # pylint: disable=import-outside-toplevel

  section = dict((stored or {}).get("mesh") or sharding_lib.default_mesh_section())
  unknown = [k for k in (overrides or {}) if not k.startswith("mesh.")]
  if unknown:
    raise ConfigError(f"config.{unknown[0]}", "only config.mesh.* can be overridden when loading a checkpoint")
  config = ml_collections.ConfigDict({"mesh": section})
  apply_overrides(config, dict(overrides or {}))
  section = config.to_dict()["mesh"]
  if mesh is not None:
    section["shape"] = parse_mesh(mesh)
  return sharding_lib.mesh_config_from(section)


def inference_dtype(stored: Mapping[str, Any] | None, dtype: str | None) -> str:
  """`--dtype`, else the compute dtype the checkpoint trained with (a recipe's `train.compute_dtype`), else
  the dtype of the Hugging Face release it was imported from (`config.json`'s `torch_dtype` / `dtype`:
  bfloat16 for the released 7B models), else float32."""
  if dtype is not None:
    if dtype not in DTYPES:
      raise ConfigError("--dtype", f"expected one of {DTYPES}, got {dtype!r}")
    return dtype
  stored = stored or {}
  hf = (stored.get("hf") or {}).get("config") or {}
  for candidate in ((stored.get("train") or {}).get("compute_dtype"), hf.get("torch_dtype"), hf.get("dtype"),
                    (hf.get("text_config") or {}).get("torch_dtype"), (hf.get("text_config") or {}).get("dtype")):
    if candidate in DTYPES:
      return candidate
  return "float32"


def load_for_generation(path: str, mesh: str | None = None, dtype: str | None = None,
                        overrides: Mapping[str, str] | None = None):
  """`load_bundle` over every device: the mesh from `--mesh` / the checkpoint's `config.mesh`, the dtype
  from `--dtype` / its compute dtype; parameters restored straight into their shards."""
  from alm_jax import sharding as sharding_lib  # pylint: disable=import-outside-toplevel
  from alm_jax.checkpoints.bundle import load_bundle, stored_config  # pylint: disable=import-outside-toplevel
  from alm_jax.infer import generate_program  # pylint: disable=import-outside-toplevel

  stored = stored_config(path)
  config = mesh_config(stored, mesh, overrides)
  if mesh is None and stored.get("model"):
    config = serving_mesh(stored, config)
  serving = lambda layout, m, rules: generate_program.serving_shardings(layout, m, rules)[0]
  return load_bundle(path, mesh=sharding_lib.make_mesh(config), rules=config.logical_rules,
                     dtype=inference_dtype(stored, dtype), shardings=serving)


def serving_mesh(stored: Mapping[str, Any], config: Any) -> Any:
  """Without `--mesh`: the largest `tensor` split of each host's devices that every LLM parameter divides,
  hosts (and the rest of each host) on `data` — the mesh `alm-jax compile --mode generate` picks, since
  decoding over `fsdp` re-gathers every weight at every token; the checkpoint's `config.mesh` when no split
  divides (or on one device)."""
  import jax  # pylint: disable=import-outside-toplevel

  from alm_jax.config import from_dict  # pylint: disable=import-outside-toplevel
  from alm_jax.infer import generate_program  # pylint: disable=import-outside-toplevel
  from alm_jax.models.alm import ALMConfig  # pylint: disable=import-outside-toplevel

  layout = generate_program.generate_layout(from_dict(ALMConfig, stored["model"], "checkpoint.model"))
  candidate = generate_program.tensor_mesh(layout, config, jax.local_device_count())
  if candidate is None:
    return config
  if jax.process_count() > 1:
    candidate = dataclasses.replace(candidate, dcn_shape=(jax.process_count(), 1, 1))
  return candidate


@dataclasses.dataclass(frozen=True)
class BatchGroup:
  """This process's place in the batch split.

  Attributes:
    index: which block of the global batch this process's devices hold.
    count: how many blocks: processes in different blocks answer different prompts.
    rows: the global batch rows this process supplies (`distributed.process_rows`) for a global batch
      of `count` × rows-per-process.
    leader: the lowest-numbered process of its block, the one that saves its answers.
  """

  index: int
  count: int
  leader: bool


def batch_group(mesh: Any, rules: Any) -> BatchGroup:
  """Which block of the global batch this process holds, and whether it speaks for that block."""
  import jax  # pylint: disable=import-outside-toplevel
  from jax.sharding import NamedSharding  # pylint: disable=import-outside-toplevel

  from alm_jax import distributed  # pylint: disable=import-outside-toplevel
  from alm_jax import sharding as sharding_lib  # pylint: disable=import-outside-toplevel
  from alm_jax.models.partitioning import logical_to_spec  # pylint: disable=import-outside-toplevel

  shards = sharding_lib.batch_shard_count(mesh, rules)
  rows = distributed.process_rows(NamedSharding(mesh, logical_to_spec(("batch",), rules)), (shards,))
  per = len(rows)
  if not per or shards % per or not np.array_equal(rows, np.arange(rows[0], rows[0] + per)) or rows[0] % per:
    raise ConfigError("--mesh", f"this process's devices hold batch shards {rows.tolist()} of {shards}: not one "
                                f"contiguous block; put the batch axes ({dict(mesh.shape)}) outermost over hosts")
  index, count = int(rows[0] // per), shards // per
  leader = True
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

    indices = np.asarray(multihost_utils.process_allgather(np.asarray(index, np.int32))).reshape(-1)
    leader = int(np.flatnonzero(indices == index)[0]) == jax.process_index()
  return BatchGroup(index, count, leader)


def local_rows(array: Any) -> np.ndarray:
  """The rows (dimension 0) of a global array that this process's devices hold, in order, as numpy.

  No collective: each process reads only its own shards (the generated tokens of its prompts).
  """
  blocks: dict[int, np.ndarray] = {}
  for shard in array.addressable_shards:
    index = shard.index[0] if shard.index else slice(None)
    start, _, _ = index.indices(array.shape[0])
    blocks.setdefault(start, np.asarray(shard.data))
  return np.concatenate([blocks[k] for k in sorted(blocks)]) if blocks else np.zeros((0,) + array.shape[1:])
