"""The generation program as an abstract program: every argument a sharded `ShapeDtypeStruct`.

`alm-jax compile --mode generate` lowers `alm_generate.generate_fn` — the very
function the generator runs (features → encoders → bridge → splice → prefill →
while-loop decode) — for a device topology that is not attached, as
`alm_jax.train.program` does for the train step, so the memory of a serving
batch and the time of one decode step are known before any hardware is booked.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from alm_jax.config import ConfigError
from alm_jax.data.pipeline import DataConfig, batch_shapes
from alm_jax.infer import placement
from alm_jax.infer.alm_generate import generate_fn
from alm_jax.infer.sampling import SamplingConfig
from alm_jax.models.alm import ALMConfig, AudioLanguageModel
from alm_jax.models.llm import LLMConfig
from alm_jax.models.partitioning import Rules, divisible_spec, logical_to_spec
from alm_jax.params import ParamLayout
from alm_jax.sharding import MeshConfig, batch_shard_count, resolve_shape

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}
# What `generate_fn` reads of a collated batch (`data.pipeline.collate`'s dtypes; no loss mask).
BATCH_DTYPES = {"tokens": jnp.int32, "token_mask": jnp.bool_, "audio": jnp.float32, "audio_samples": jnp.int32,
                "audio_clip": jnp.int32}
CACHE_AXES = ("layers", "batch", "kv_length", "kv_heads", "head_dim")  # `llm.init_cache`, scanned layers


@dataclasses.dataclass(frozen=True)
class GenerateShape:
  """One serving bucket: rows, prompt tokens (the length bucket), new tokens, and the dtype of params and
  compute (the model computes in its parameters' dtype); `stops`: stop-id slots (padded with -1)."""

  batch: int = 64
  prompt_tokens: int = 1024
  new_tokens: int = 256
  dtype: str = "bfloat16"
  stops: int = 8

  @property
  def cache_length(self) -> int:
    """KV-cache slots `decode` allocates: the prompt and every new token but the last (never fed back)."""
    return self.prompt_tokens + self.new_tokens - 1


@dataclasses.dataclass
class AbstractGenerateProgram:
  """`generate_fn` for one bucket with its abstract, sharded arguments `(params, batch, seed, stops)`."""

  fn: Any
  args: tuple
  in_shardings: tuple
  layout: ParamLayout
  shape: GenerateShape
  unsplit: list[str] = dataclasses.field(default_factory=list)  # parameters kept whole along some mesh axis


def generate_layout(model_cfg: ALMConfig) -> ParamLayout:
  """The configured model's parameter layout (shapes only; any audio token id will do)."""
  if model_cfg.audio_token_id < 0:
    model_cfg = dataclasses.replace(model_cfg, audio_token_id=0)
  return ParamLayout(lambda rngs: AudioLanguageModel(model_cfg, rngs=rngs))


def tensor_mesh(layout: ParamLayout, config: MeshConfig, num_devices: int) -> MeshConfig | None:
  """The mesh for serving: the largest `tensor` split of one slice's devices that every LLM parameter divides,
  the rest as `data` (weights replicated, rows split); None when no split above 1 divides.

  Decoding reads every LLM weight once per token. Over `fsdp` each device all-gathers every layer's
  weights at every step (the whole model through each chip's links per token); over `tensor` each device
  reads only its shard and exchanges activations (a few KiB per row). `data` costs memory (a weight copy
  per group), not traffic. The config's rules decide what `tensor` splits (heads, kv heads, MLP width,
  vocabulary in the defaults). The encoders run once per prompt, so a tower the split does not divide
  (Whisper-large's 20 heads over 8) keeps those dimensions whole (`serving_shardings`) rather than cap it.
  """
  llm = {p: a for p, a in layout.abstract.items() if p.startswith("llm/")}
  for tensor in sorted((t for t in range(2, num_devices + 1) if num_devices % t == 0), reverse=True):
    candidate = dataclasses.replace(config, shape=(num_devices // tensor, 1, tensor), dcn_shape=(1, 1, 1))
    sizes = {"data": num_devices // tensor, "fsdp": 1, "tensor": tensor}
    if not _uneven(layout, llm, sizes, candidate.logical_rules):
      return candidate
  return None


def _uneven(layout: ParamLayout, params: dict[str, Any], mesh_shape: dict[str, int], rules: Rules) -> list[str]:
  """`path (dims)` of each parameter with a dimension its mesh axes do not split evenly."""
  out = []
  for path, abstract in params.items():
    for dim, entry in zip(abstract.shape, layout.spec(path, rules)):
      names = (entry,) if isinstance(entry, str) else (entry or ())
      if dim % math.prod(mesh_shape[n] for n in names):
        out.append(f"{path} {tuple(abstract.shape)}")
        break
  return out


def serving_shardings(layout: ParamLayout, mesh: Mesh, rules: Rules) -> tuple[dict[str, NamedSharding], list[str]]:
  """Each parameter split as the rules say, less the mesh axes that do not divide a dimension (it stays whole
  there); and the paths that lost a split. Every LLM parameter must split evenly (its weights are read at every
  decode step): a `ConfigError` names `--mesh` otherwise."""
  llm = {p: a for p, a in layout.abstract.items() if p.startswith("llm/")}
  bad = _uneven(layout, llm, dict(mesh.shape), rules)
  if bad:
    raise ConfigError("--mesh", f"{dict(mesh.shape)} does not split LLM parameter {bad[0]} evenly")
  shardings, whole = {}, []
  for path, abstract in layout.abstract.items():
    spec = layout.spec(path, rules)
    even = divisible_spec(abstract.shape, spec, mesh)
    if tuple(even) != tuple(spec) + (None,) * (len(even) - len(spec)):
      whole.append(path)
    shardings[path] = NamedSharding(mesh, even)
  return shardings, whole


def parse_mesh(text: str, num_devices: int) -> tuple[int, int, int]:
  """`--mesh D,F,T` (one entry may be -1) -> the (data, fsdp, tensor) sizes, checked against the devices."""
  shape = placement.parse_mesh(text)
  if len(shape) != 3:
    raise ConfigError("--mesh", f"expected three sizes D,F,T (data, fsdp, tensor), got {text!r}")
  return resolve_shape(shape, num_devices, "--mesh")


def generate_batch(model_cfg: ALMConfig, data_cfg: DataConfig, shape: GenerateShape, mesh: Mesh,
                   rules: Rules) -> dict[str, jax.ShapeDtypeStruct]:
  """The collated batch `generate_fn` reads, at the data pipeline's shapes for `shape.batch` rows of
  `shape.prompt_tokens` tokens with one clip of at most 30 s (one encoder window; AF3's window bucket too),
  every field split over its rows (the logical `batch` axis)."""
  spec = model_cfg.token_spec()
  shards = batch_shard_count(mesh, rules)
  if shape.batch % shards:
    raise ConfigError("--generate-batch", f"{shape.batch} rows do not split over the {shards} devices the batch "
                      "is sharded over")
  data = dataclasses.replace(data_cfg, batch_size=shape.batch, length_buckets=(shape.prompt_tokens,), max_clips=1,
                             max_clip_seconds=min(30.0, spec.window_seconds), window_buckets=(1,))
  shapes = batch_shapes(data, spec)[-1]
  rows = lambda ndim: NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules))
  return {name: jax.ShapeDtypeStruct(shapes[name], dtype, sharding=rows(len(shapes[name])))
          for name, dtype in BATCH_DTYPES.items()}


def abstract_generate_program(model_cfg: ALMConfig, data_cfg: DataConfig, mesh: Mesh, rules: Rules,
                              shape: GenerateShape, layout: ParamLayout | None = None,
                              sampling: SamplingConfig = SamplingConfig(), pad_id: int = 0) -> AbstractGenerateProgram:
  """`generate_fn(layout, ...)` with params in `shape.dtype` (floating leaves; as served) split by
  `serving_shardings`, the batch split over the logical `batch` axis, and the seed and stop ids replicated:
  the jit the generator makes."""
  layout = layout or generate_layout(model_cfg)
  dtype = DTYPES[shape.dtype]
  shardings, whole = serving_shardings(layout, mesh, rules)
  params = {p: jax.ShapeDtypeStruct(a.shape, dtype if jnp.issubdtype(a.dtype, jnp.floating) else a.dtype,
                                    sharding=shardings[p])
            for p, a in layout.abstract.items()}
  batch = generate_batch(model_cfg, data_cfg, shape, mesh, rules)
  replicated = NamedSharding(mesh, PartitionSpec())
  seed = jax.ShapeDtypeStruct((2,), jnp.int32, sharding=replicated)
  stops = jax.ShapeDtypeStruct((shape.stops,), jnp.int32, sharding=replicated)
  fn = generate_fn(layout, max_new_tokens=shape.new_tokens, sampling=sampling, pad_id=pad_id)
  shardings = lambda tree: jax.tree.map(lambda a: a.sharding, tree)
  in_shardings = (shardings(params), shardings(batch), replicated, replicated)
  return AbstractGenerateProgram(fn, (params, batch, seed, stops), in_shardings, layout, shape, whole)


def kv_cache_shapes(llm: LLMConfig, shape: GenerateShape, mesh: Mesh, rules: Rules) -> tuple[
    tuple[int, ...], tuple[int, ...], int]:
  """(global shape, per-device shape, how many) of the K and V arrays `decode` creates (`llm.init_cache`):
  two stacked `[layers, B, S, K, Dh]` arrays for scanned layers, else two `[B, S, K, Dh]` per layer; split as
  their logical axes say."""
  full = (llm.num_layers, shape.batch, shape.cache_length, llm.num_kv_heads, llm.head_dim)
  axes, count = CACHE_AXES, 2
  if not llm.scan_layers:
    full, axes, count = full[1:], CACHE_AXES[1:], 2 * llm.num_layers
  return full, tuple(NamedSharding(mesh, logical_to_spec(axes, rules)).shard_shape(full)), count


def llm_weight_bytes(params: dict[str, jax.ShapeDtypeStruct]) -> tuple[int, Sequence[str]]:
  """Bytes of LLM weights one device reads per decode step, and the paths left out: every `llm/` parameter's
  shard, less an untied input embedding table (a lookup of one row per token, not a matmul)."""
  skipped = ["llm/embed/embedding"] if "llm/lm_head/kernel" in params else []
  total = 0
  for path, a in params.items():
    if path.startswith("llm/") and path not in skipped:
      total += math.prod(a.sharding.shard_shape(a.shape)) * jnp.dtype(a.dtype).itemsize
  return total, skipped


def llm_parameters(layout: ParamLayout) -> int:
  """N for the decode MFU: the decoder's parameters less an untied input embedding table (a lookup, not a
  matmul; a tied one is also the output projection)."""
  skipped = {"llm/embed/embedding"} if "llm/lm_head/kernel" in layout.abstract else set()
  return sum(a.size for p, a in layout.abstract.items() if p.startswith("llm/") and p not in skipped)
