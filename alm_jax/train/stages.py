"""Training stages as data: ordered path regexes → a trainable mask over flat params.

A stage (`projector`, `lora`, `full`, or one defined in config) is a list of
`(regex, trainable)` rules searched against "/"-joined parameter paths such as
`llm/layers/0/mlp/gate_proj/lora_a`; the first rule that matches a path decides,
and a path no rule matches is frozen. `freeze` regexes from config are checked
before every stage's rules (e.g. keep an encoder frozen even in `full`). The
train step differentiates and optimises only the trainable half of `split`, so
frozen leaves cost no gradient memory and carry no optimizer state.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping, Sequence

from flax import nnx

from alm_jax.config import ConfigError, require

# Where these keys live in a run's config; error messages name them under it.
KEY_PREFIX = "config.train"

# Built-in stages (README.md "Training stages": what each trains and why).
BUILTIN_STAGES: dict[str, tuple[tuple[str, bool], ...]] = {
    "projector": ((r"^bridge/", True),),
    "lora": ((r"^bridge/", True), (r"(^|/)lora_[ab]$", True)),
    "full": ((r".*", True),),
}


@dataclasses.dataclass(frozen=True)
class Rule:
  """One compiled rule; `key` is the config key it came from, for error messages."""

  pattern: re.Pattern
  trainable: bool
  key: str


@dataclasses.dataclass(frozen=True)
class Stage:
  """A resolved stage: its name and its rules in match order (freeze rules first)."""

  name: str
  rules: tuple[Rule, ...]

  def trainable(self, path: str) -> bool:
    """Whether `path` trains in this stage (first matching rule; frozen if none)."""
    for rule in self.rules:
      if rule.pattern.search(path):
        return rule.trainable
    return False


@dataclasses.dataclass(frozen=True)
class StageConfig:
  """Which parameters train: `stage` picks a built-in or configured rule list.

  `stages` maps a stage name to a list of `[regex, trainable]` pairs; it
  replaces a built-in stage of the same name or defines a new one. `freeze`
  lists regexes frozen in every stage, checked before the stage's own rules.
  Keys are reported as `config.train.<field>` (the section these fields live in).
  """

  stage: str = "full"
  stages: dict[str, Any] = dataclasses.field(default_factory=dict)
  freeze: tuple[str, ...] = ()

  def __post_init__(self):
    require(bool(self.stage), f"{KEY_PREFIX}.stage", "must name a stage")
    for name, rules in self.stages.items():
      _compile_rules(rules, f"{KEY_PREFIX}.stages.{name}")
    for i, pattern in enumerate(self.freeze):
      _compile(pattern, f"{KEY_PREFIX}.freeze[{i}]")
    known = self.known_stages()
    require(self.stage in known, f"{KEY_PREFIX}.stage", f"unknown stage {self.stage!r} (known: {', '.join(known)})")

  def known_stages(self) -> list[str]:
    """Built-in stage names followed by those this config adds."""
    return list(BUILTIN_STAGES) + [s for s in self.stages if s not in BUILTIN_STAGES]

  def resolve(self, name: str | None = None) -> Stage:
    """Compiles stage `name` (default: `self.stage`) with the freeze rules in front."""
    name = self.stage if name is None else name
    if name in self.stages:
      rules = _compile_rules(self.stages[name], f"{KEY_PREFIX}.stages.{name}")
    elif name in BUILTIN_STAGES:
      rules = _compile_rules(BUILTIN_STAGES[name], f"{KEY_PREFIX}.stages.{name}")
    else:
      raise ConfigError(f"{KEY_PREFIX}.stage", f"unknown stage {name!r} (known: {', '.join(self.known_stages())})")
    freeze = tuple(Rule(_compile(p, f"{KEY_PREFIX}.freeze[{i}]"), False, f"{KEY_PREFIX}.freeze[{i}]")
                   for i, p in enumerate(self.freeze))
    return Stage(name, freeze + rules)


def _compile(pattern: Any, key: str) -> re.Pattern:
  if not isinstance(pattern, str):
    raise ConfigError(key, f"expected a regex string, got {pattern!r}")
  try:
    return re.compile(pattern)
  except re.error as e:
    raise ConfigError(key, f"bad regex {pattern!r}: {e}") from None


def _compile_rules(rules: Any, key: str) -> tuple[Rule, ...]:
  """`[[regex, bool], ...]` → compiled rules, each remembering its config key."""
  if isinstance(rules, (str, bytes)) or not isinstance(rules, Sequence):
    raise ConfigError(key, f"expected a list of [regex, trainable] pairs, got {rules!r}")
  out = []
  for i, rule in enumerate(rules):
    rule_key = f"{key}[{i}]"
    if isinstance(rule, str) or not isinstance(rule, Sequence) or len(rule) != 2:
      raise ConfigError(rule_key, f"expected a [regex, trainable] pair, got {rule!r}")
    pattern, trainable = rule
    if not isinstance(trainable, bool):
      raise ConfigError(rule_key, f"trainable must be True or False, got {trainable!r}")
    out.append(Rule(_compile(pattern, rule_key), trainable, rule_key))
  return tuple(out)


def as_stage(stage: Stage | StageConfig | str) -> Stage:
  """Accepts a resolved `Stage`, a `StageConfig`, or a built-in stage name."""
  if isinstance(stage, Stage):
    return stage
  if isinstance(stage, StageConfig):
    return stage.resolve()
  if isinstance(stage, str):
    return StageConfig(stage=stage).resolve()
  raise TypeError(f"expected a Stage, StageConfig or stage name, got {type(stage).__name__}")


def trainable_mask(flat_params: Mapping[str, Any], stage: Stage | StageConfig | str) -> dict[str, bool]:
  """`{path: trainable}` for every path in `flat_params` (first matching rule wins).

  Raises `ConfigError` naming the rule's key when a rule's regex matches no
  path at all (a typo, or e.g. the `lora` stage on a model without adapters).
  """
  stage = as_stage(stage)
  paths = list(flat_params)
  for rule in stage.rules:
    if not any(rule.pattern.search(p) for p in paths):
      raise ConfigError(
          rule.key, f"stage {stage.name!r}: regex {rule.pattern.pattern!r} matches no parameter path"
      )
  return {p: stage.trainable(p) for p in paths}


def _check_mask(flat: Mapping[str, Any], mask: Mapping[str, bool]) -> None:
  if flat.keys() != mask.keys():
    missing = sorted(set(flat) - set(mask))
    extra = sorted(set(mask) - set(flat))
    what = f"{missing[0]} has no mask entry" if missing else f"{extra[0]} is in the mask but not the params"
    raise ValueError(f"mask does not fit the params: {what} ({len(missing)} missing, {len(extra)} extra)")


def split(flat: Mapping[str, Any], mask: Mapping[str, bool]) -> tuple[dict[str, Any], dict[str, Any]]:
  """Splits a flat dict into `(trainable, frozen)` dicts by the mask."""
  _check_mask(flat, mask)
  trainable = {p: v for p, v in flat.items() if mask[p]}
  frozen = {p: v for p, v in flat.items() if not mask[p]}
  return trainable, frozen


def merge(trainable: Mapping[str, Any], frozen: Mapping[str, Any]) -> dict[str, Any]:
  """Joins the halves of `split` back into one flat dict (sorted by path, as JAX orders dicts)."""
  overlap = trainable.keys() & frozen.keys()
  if overlap:
    raise ValueError(f"merge: {sorted(overlap)[0]} is both trainable and frozen")
  return dict(sorted({**frozen, **trainable}.items()))


def module_of(path: str, depth: int = 2) -> str:
  """The module a parameter path is counted under in `mask_table`.

  The leaf name is dropped, then at most `depth` components are kept, stopping
  before a layer index: `llm/layers/0/mlp/up/kernel` → `llm/layers`,
  `bridge/qformer/query_tokens` → `bridge/qformer`, `bridge/scale` → `bridge`.
  """
  parts = path.split("/")[:-1] or path.split("/")
  kept = []
  for part in parts[:depth]:
    if part.isdigit():
      break
    kept.append(part)
  return "/".join(kept) or parts[0]


def _size(leaf: Any) -> int:
  if isinstance(leaf, nnx.Variable):
    leaf = leaf.get_value()
  return int(math.prod(getattr(leaf, "shape", ())))


def mask_table(flat_params: Mapping[str, Any], mask: Mapping[str, bool], depth: int = 2) -> str:
  """A text table of trainable and frozen parameter counts per module (see `module_of`).

  Leaves may be arrays, `jax.ShapeDtypeStruct`s or nnx Variables; rows keep the
  order in which modules first appear.
  """
  _check_mask(flat_params, mask)
  rows: dict[str, list[int]] = {}
  for path, leaf in flat_params.items():
    counts = rows.setdefault(module_of(path, depth), [0, 0])
    counts[0 if mask[path] else 1] += _size(leaf)
  total_t = sum(c[0] for c in rows.values())
  total_f = sum(c[1] for c in rows.values())
  width = max([len("module"), len("total")] + [len(m) for m in rows])
  head = f"{'module':<{width}}  {'trainable':>14}  {'frozen':>14}  {'trainable %':>11}"
  lines = [head, "-" * len(head)]

  def line(name: str, t: int, f: int) -> str:
    pct = 100.0 * t / (t + f) if t + f else 0.0
    return f"{name:<{width}}  {t:>14,}  {f:>14,}  {pct:>10.1f}%"

  lines += [line(m, t, f) for m, (t, f) in rows.items()]
  lines += ["-" * len(head), line("total", total_t, total_f)]
  return "\n".join(lines)
