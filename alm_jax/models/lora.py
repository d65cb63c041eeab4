"""LoRA on an existing model: add adapters to chosen projections, merge them back, count them.

Adapters live in `layers.Linear` as two `LoRAParam` leaves (`lora_a` random,
`lora_b` zero), so a fresh adapter changes nothing and training stages select
adapters by type or by path (`.../attn/q_proj/lora_a`). Works on any module
tree holding the LLM's projection names (a bare `LLM` or an audio-LLM with the
decoder under some prefix). Graph changes happen outside jit.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Iterator, Sequence

import jax
from flax import nnx

from alm_jax.models import layers
from alm_jax.models.llm import LLM, LORA_TARGETS

# Short target name → the path suffix of the projection inside a decoder layer.
PROJECTIONS = {
    "q": "attn/q_proj",
    "k": "attn/k_proj",
    "v": "attn/v_proj",
    "o": "attn/o_proj",
    "gate": "mlp/gate_proj",
    "up": "mlp/up_proj",
    "down": "mlp/down_proj",
}

# Path pattern of every adapter leaf, stacked (`layers/attn/...`) or per layer (`layers/3/attn/...`).
LORA_PATH_PATTERN = r"(^|/)layers(/\d+)?/(attn/[qkvo]|mlp/(gate|up|down))_proj/lora_[ab]$"


def _check_targets(targets: Sequence[str]) -> tuple[str, ...]:
  bad = [t for t in targets if t not in LORA_TARGETS]
  if bad:
    raise ValueError(f"unknown LoRA targets {bad} (known: {', '.join(LORA_TARGETS)})")
  return tuple(targets)


def target_linears(model: nnx.Module, targets: Sequence[str] = LORA_TARGETS) -> Iterator[tuple[str, layers.Linear]]:
  """Yields `(path, Linear)` for every decoder projection named by `targets` (`layers/attn/q_proj` when the
  layers are stacked, one per layer `layers/3/attn/q_proj` when not)."""
  suffixes = tuple(PROJECTIONS[t] for t in _check_targets(targets))
  pattern = re.compile(r"(^|/)layers(/\d+)?/(" + "|".join(re.escape(s) for s in suffixes) + r")$")
  for path, module in nnx.iter_modules(model):
    name = "/".join(str(p) for p in path)
    if isinstance(module, layers.Linear) and pattern.search(name):
      yield name, module


def add_lora(
    model: nnx.Module,
    rank: int,
    alpha: float,
    targets: Sequence[str] = ("q", "k", "v", "o"),
    *,
    rngs: nnx.Rngs,
) -> int:
  """Adds zero-effect adapters (A random, B zero) of `rank` to the targeted projections; returns their param count.

  Raises ValueError if a targeted projection already has an adapter or none is
  found. Updates `model.cfg` when `model` is an `LLM`.
  """
  if rank <= 0:
    raise ValueError(f"LoRA rank must be positive, got {rank}")
  found = list(target_linears(model, targets))
  if not found:
    raise ValueError(f"no projections {list(targets)} found in {type(model).__name__}")
  for path, linear in found:
    if linear.lora_a is not None:
      raise ValueError(f"{path} already has a LoRA adapter; merge it first")
  for _, linear in found:
    # A Linear built without LoRA holds `lora_a/lora_b = None` as static attributes, which
    # `Linear.add_lora` cannot overwrite with parameters: drop them first.
    del linear.lora_a, linear.lora_b
    linear.add_lora(rank, alpha, rngs)
  if isinstance(model, LLM):
    model.cfg = dataclasses.replace(
        model.cfg, lora_rank=int(rank), lora_alpha=float(alpha), lora_targets=tuple(targets)
    )
  return lora_param_count(model)


def merge_lora(model: nnx.Module) -> int:
  """Folds every adapter into its base kernel (W + alpha/r · A·B) and drops the adapter leaves; returns how many."""
  merged = 0
  for _, module in nnx.iter_modules(model):
    if isinstance(module, layers.Linear) and module.lora_a is not None:
      graphdef, state = nnx.split(module)
      module.kernel[...] = _merged_kernel(graphdef, state)
      del module.lora_a, module.lora_b  # back to static `None`, as in a Linear built without LoRA
      module.lora_a = None
      module.lora_b = None
      module.lora_rank = 0
      merged += 1
  if isinstance(model, LLM):
    model.cfg = dataclasses.replace(model.cfg, lora_rank=0)
  return merged


@functools.partial(jax.jit, static_argnums=0)
def _merged_kernel(graphdef: nnx.GraphDef, state: nnx.State) -> jax.Array:
  """`Linear.merged_kernel` compiled once per projection shape (one kernel in memory at a time)."""
  return nnx.merge(graphdef, state).merged_kernel()


def lora_param_count(model: nnx.Module | nnx.State) -> int:
  """Number of adapter parameters (all `LoRAParam` leaves) in a module or state."""
  if isinstance(model, nnx.Module):
    state = nnx.state(model, layers.LoRAParam)
  else:
    state = nnx.filter_state(model, layers.LoRAParam)
  return sum(int(leaf.size) for leaf in _leaves(state))


def _leaves(state: nnx.State) -> Iterator:
  for _, leaf in nnx.to_flat_state(state):
    value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
    yield value
