"""Declarative name maps between our parameter paths and a foreign checkpoint's
tensor names, usable in both directions.

A family (Whisper, BEATs, Qwen2, ...) describes its layout as a list of
`Rule(ours, theirs, transform)` with `{i}`-style placeholders for layer
indices. `import_params` walks our abstract parameter tree, reads each foreign
tensor once (lazily, so a 7B checkpoint streams tensor by tensor), converts it,
checks the shape, and raises a single `CheckpointError` listing every missing,
unexpected or mis-shaped key. `export_params` runs the same rules backwards.

Rules always name layers one by one (`layers/{i}/...`). A model with scanned
layers holds them stacked (`layers/attn/q_proj/kernel` of shape `[N, ...]`,
see `alm_jax.models.stack`); `layer_view` maps each stacked parameter to its N
per-layer names, so import stacks the N tensors it reads and export yields one
slice per layer, with the same rules for both forms of a model.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol, Sequence

import jax
import numpy as np
from flax import nnx

from alm_jax.errors import CheckpointError

# ---------------------------------------------------------------------------
# Transforms: theirs → ours (given our shape) and ours → theirs.


@dataclasses.dataclass(frozen=True)
class Transform:
  """A pair of array conversions between the foreign layout and ours."""

  name: str
  to_ours: Callable[[np.ndarray, tuple[int, ...]], np.ndarray]
  to_theirs: Callable[[np.ndarray], np.ndarray]


def _reshape_to(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  return x.reshape(shape) if x.size == math.prod(shape) else x


IDENTITY = Transform("identity", lambda x, shape: x, lambda x: x)

# A foreign 1-D (or any) tensor reshaped to our shape, e.g. a bias (H·D,) → (H, D).
RESHAPE = Transform("reshape", _reshape_to, lambda x: x.reshape(-1))


def linear(in_dims: int = 1) -> Transform:
  """torch Linear weight (out, in) ↔ our kernel (*in_shape, *out_shape)."""

  def to_theirs(kernel: np.ndarray) -> np.ndarray:
    n_in = math.prod(kernel.shape[:in_dims])
    return kernel.reshape(n_in, -1).T

  return Transform(f"linear(in_dims={in_dims})", lambda w, shape: _reshape_to(w.T, shape), to_theirs)


LINEAR = linear(1)
LINEAR_IN2 = linear(2)  # output projections whose input is (heads, head_dim)

# torch Conv1d weight (out, in, k) ↔ ours (k, in, out).
CONV1D = Transform("conv1d", lambda w, shape: w.transpose(2, 1, 0), lambda k: k.transpose(2, 1, 0))

# torch Conv2d weight (out, in, kh, kw) ↔ ours (kh, kw, in, out).
CONV2D = Transform("conv2d", lambda w, shape: w.transpose(2, 3, 1, 0), lambda k: k.transpose(3, 2, 0, 1))


# ---------------------------------------------------------------------------
# Rules and name maps.


@dataclasses.dataclass(frozen=True)
class Rule:
  """`ours` and `theirs` are templates with the same `{name}` placeholders."""

  ours: str
  theirs: str
  transform: Transform = IDENTITY


def _template_regex(template: str) -> re.Pattern:
  parts = re.split(r"\{(\w+)\}", template)
  out = []
  for i, part in enumerate(parts):
    out.append(re.escape(part) if i % 2 == 0 else f"(?P<{part}>\\d+)")
  return re.compile("^" + "".join(out) + "$")


class NameMap:
  """A family's rules, compiled for lookups in both directions.

  `ignore` lists regexes of foreign tensors we deliberately do not use (e.g. a
  Whisper checkpoint's decoder); anything else left over is an error.
  """

  def __init__(self, family: str, rules: Sequence[Rule], ignore: Sequence[str] = ()):
    self.family = family
    self.rules = tuple(rules)
    self._ours = [(_template_regex(r.ours), r) for r in self.rules]
    self._theirs = [(_template_regex(r.theirs), r) for r in self.rules]
    self._ignore = [re.compile(p) for p in ignore]

  def theirs_for(self, our_path: str) -> tuple[str, Transform] | None:
    """The foreign name and transform for one of our paths (None if unmapped)."""
    for regex, rule in self._ours:
      m = regex.match(our_path)
      if m:
        return rule.theirs.format(**m.groupdict()), rule.transform
    return None

  def ours_for(self, their_name: str) -> str | None:
    """Our path for a foreign tensor name (None if unmapped)."""
    for regex, rule in self._theirs:
      m = regex.match(their_name)
      if m:
        return rule.ours.format(**m.groupdict())
    return None

  def ignored(self, their_name: str) -> bool:
    return any(p.search(their_name) for p in self._ignore)

  def prefixed(self, ours: str = "", theirs: str = "", family: str | None = None) -> "NameMap":
    """The same rules under a path prefix on each side (towers inside a bigger model)."""
    rules = [Rule(ours + r.ours, theirs + r.theirs, r.transform) for r in self.rules]
    return NameMap(family or self.family, rules, [p.pattern for p in self._ignore])

  @staticmethod
  def combine(family: str, maps: Iterable["NameMap"], ignore: Sequence[str] = ()) -> "NameMap":
    """One map from several (e.g. encoder + projector + LLM)."""
    maps = list(maps)
    rules = [r for m in maps for r in m.rules]
    patterns = [p.pattern for m in maps for p in m._ignore] + list(ignore)
    return NameMap(family, rules, patterns)


# ---------------------------------------------------------------------------
# Flat views of parameter trees.


def flat_paths(state: nnx.State | Any) -> dict[str, Any]:
  """`{"a/b/0/kernel": leaf}` for an nnx.State (leaves are Variables or arrays)."""
  if isinstance(state, nnx.Module):
    state = nnx.state(state)
  return {"/".join(str(k) for k in path): leaf for path, leaf in nnx.to_flat_state(state)}


STACKED_SEGMENT = "layers"  # `.../layers/<name>` (not `.../layers/<index>`) holds stacked layers


def split_stacked(path: str) -> tuple[str, str] | None:
  """(`head`, `tail`) around a stacked-layers segment, e.g. `llm/layers/attn/q_proj/kernel` →
  (`llm/layers`, `attn/q_proj/kernel`); None for a path that is not stacked (`layers/3/...`)."""
  parts = path.split("/")
  for j in range(len(parts) - 1):
    if parts[j] == STACKED_SEGMENT and not parts[j + 1].isdigit():
      return "/".join(parts[: j + 1]), "/".join(parts[j + 1 :])
  return None


@dataclasses.dataclass(frozen=True)
class LayerEntry:
  """One per-layer name of a parameter: `path` in the model, its `index` on the stacked axis (None: not
  stacked) and the shape of that one layer's tensor."""

  path: str
  index: int | None
  shape: tuple[int, ...]


def layer_view(targets: Mapping[str, Any]) -> dict[str, LayerEntry]:
  """Our flat paths as checkpoint maps name them: each stacked `[N, ...]` parameter becomes N
  `.../layers/{i}/...` entries of shape `[...]`; every other path maps to itself."""
  view = {}
  for path, leaf in targets.items():
    shape = _shape_of(leaf)
    split = split_stacked(path)
    if split is None:
      view[path] = LayerEntry(path, None, shape)
      continue
    head, tail = split
    for i in range(shape[0]):
      view[f"{head}/{i}/{tail}"] = LayerEntry(path, i, shape[1:])
  return view


class TensorReader(Protocol):
  """Random access to a checkpoint's tensors by name, one at a time."""

  source: str

  def keys(self) -> Iterable[str]: ...

  def get(self, name: str) -> np.ndarray: ...


class DictReader:
  """A `TensorReader` over an in-memory mapping (e.g. a converted torch state dict)."""

  def __init__(self, tensors: Mapping[str, Any], source: str):
    self.tensors, self.source = tensors, source

  def keys(self) -> Iterable[str]:
    return self.tensors.keys()

  def get(self, name: str) -> np.ndarray:
    value = self.tensors[name]
    if hasattr(value, "detach"):  # a torch tensor, converted lazily
      value = value.detach().float().numpy() if value.is_floating_point() else value.detach().numpy()
    return np.asarray(value)


def _shape_of(leaf: Any) -> tuple[int, ...]:
  value = leaf.value if isinstance(leaf, nnx.Variable) else leaf
  return tuple(value.shape)


def foreign_shape(transform: Transform, ours: tuple[int, ...]) -> tuple[int, ...] | None:
  """The shape a foreign tensor must have to become `ours` (None if it cannot be derived).

  Traced abstractly, so a transposed tensor of the right size is caught
  instead of being silently reshaped into place.
  """
  try:
    return tuple(jax.eval_shape(transform.to_theirs, jax.ShapeDtypeStruct(ours, np.float32)).shape)
  except Exception:  # noqa: BLE001 - a transform numpy-only in its reverse direction
    return None


def _read_one(path: str, want: tuple[int, ...], name_map: NameMap, reader: TensorReader, available: set[str],
              used: set[str], errors: list[str], allow_missing: Callable[[str], bool] | None) -> np.ndarray | None:
  """One tensor of our (per-layer) `path`, converted to our layout; None after recording why not (or if
  it may be missing)."""
  mapped = name_map.theirs_for(path)
  if mapped is None:
    if not (allow_missing is not None and allow_missing(path)):
      errors.append(f"{path}: no {name_map.family} name for this parameter")
    return None
  name, transform = mapped
  if name not in available:
    if not (allow_missing is not None and allow_missing(path)):
      errors.append(f"{name}: missing from checkpoint (needed for {path})")
    return None
  used.add(name)
  theirs = reader.get(name)
  expected = foreign_shape(transform, want)
  if expected is not None and tuple(theirs.shape) != expected:
    errors.append(f"{name}: shape {tuple(theirs.shape)} does not fit {path} {want} (expected {expected})")
    return None
  array = transform.to_ours(theirs, want)
  if tuple(array.shape) != want:
    errors.append(f"{name}: shape {tuple(theirs.shape)} does not fit {path} {want}")
    return None
  if np.issubdtype(array.dtype, np.floating) or "float" in str(array.dtype):
    array = np.asarray(array, dtype=np.float32)  # float16 and ml_dtypes' bfloat16 widen to our float32
  return array


def import_params(
    targets: Mapping[str, Any],
    name_map: NameMap,
    reader: TensorReader,
    *,
    place: Callable[[str, np.ndarray], Any] | None = None,
    allow_missing: Callable[[str], bool] | None = None,
    strict_unused: bool = True,
) -> dict[str, Any]:
  """Reads every tensor our tree needs from `reader`, converted to our layout.

  `targets` maps our flat paths to anything with a `.shape` (abstract
  ShapeDtypeStructs, Variables or arrays). `place(path, array)` may move each
  array onto devices as soon as it is read (so host memory holds one tensor at
  a time); by default arrays are returned as float32 numpy. `allow_missing`
  names our (per-layer) paths that may be absent (e.g. fresh LoRA adapters).
  A stacked parameter is read layer by layer into one host buffer and placed
  when its last layer is in (see `layer_view`). All problems are collected and
  raised together as one `CheckpointError`.
  """
  errors: list[str] = []
  used: set[str] = set()
  out: dict[str, Any] = {}
  stacks: dict[str, np.ndarray] = {}  # stacked parameters being filled layer by layer
  failed: set[str] = set()
  available = set(reader.keys())
  for name_path, entry in layer_view(targets).items():
    array = _read_one(name_path, entry.shape, name_map, reader, available, used, errors, allow_missing)
    if array is None:
      failed.add(entry.path)
      continue
    if entry.index is None:
      out[entry.path] = place(entry.path, array) if place is not None else array
      continue
    full = _shape_of(targets[entry.path])
    buffer = stacks.setdefault(entry.path, np.empty(full, array.dtype))
    buffer[entry.index] = array
    if entry.index == full[0] - 1 and entry.path not in failed:
      out[entry.path] = place(entry.path, buffer) if place is not None else buffer
      del stacks[entry.path]
  if strict_unused:
    for name in sorted(available - used):
      if not name_map.ignored(name):
        errors.append(f"{name}: unexpected tensor (not used by the {name_map.family} model)")
  if errors:
    shown = "; ".join(errors[:8]) + (f"; ... and {len(errors) - 8} more" if len(errors) > 8 else "")
    raise CheckpointError(f"{reader.source}: {len(errors)} mismatch(es) with {name_map.family}: {shown}")
  return out


def export_params(flat: Mapping[str, Any], name_map: NameMap) -> Iterator[tuple[str, np.ndarray]]:
  """Yields `(foreign_name, array)` for every parameter in our path order, a stacked one layer by layer."""
  held_path, held = None, None  # the host copy of the parameter being written (a stacked one serves N names)
  for path, entry in layer_view(flat).items():
    mapped = name_map.theirs_for(path)
    if mapped is None:
      raise CheckpointError(f"{path}: no {name_map.family} name for this parameter")
    name, transform = mapped
    if entry.path != held_path:
      leaf = flat[entry.path]
      held_path, held = entry.path, np.asarray(leaf.value if isinstance(leaf, nnx.Variable) else leaf)
    value = held if entry.index is None else held[entry.index]
    yield name, np.ascontiguousarray(transform.to_theirs(value))
