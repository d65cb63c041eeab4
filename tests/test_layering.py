"""The package's layers (docs/CONTRIBUTING.md "Layers"): each package imports only from the layers below it,
so a reader finds a module's dependencies beneath it and a model file knows nothing of trainers or formats."""

import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What each package may import from (besides itself); anything missing here is above it.
ALLOWED = {
    "errors": set(),
    "config": {"errors"},
    "audio": {"errors", "config"},
    "models": {"errors", "config", "audio"},
    "data": {"errors", "config", "audio", "models"},
    "checkpoints": {"errors", "config", "audio", "models", "sharding", "params", "data"},
    "infer": {"errors", "config", "audio", "models", "sharding", "params", "distributed", "data", "checkpoints"},
    "eval": {"errors", "config", "audio", "models", "data", "infer"},
}


def imported_units(package: str) -> dict[str, set[str]]:
  """`{file: {alm_jax unit}}` for every module under `alm_jax/<package>` (a unit: top-level module or package)."""
  out = {}
  folder = os.path.join(REPO, "alm_jax", package)
  files = [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.endswith(".py")] \
      if os.path.isdir(folder) else [folder + ".py"]
  for path in files:
    with open(path) as f:
      tree = ast.parse(f.read(), path)
    units = set()
    for node in ast.walk(tree):
      names = []
      if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "alm_jax":
        names = [f"alm_jax.{a.name}" for a in node.names] if node.module == "alm_jax" else [node.module]
      elif isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      units.update(n.split(".")[1] for n in names if n.startswith("alm_jax.") and n.split(".")[1] != package)
    out[os.path.relpath(path, REPO)] = units
  return out


def test_every_package_imports_only_from_the_layers_below_it():
  wrong = [f"{path} imports alm_jax.{unit}" for package, allowed in ALLOWED.items()
           for path, units in imported_units(package).items() for unit in sorted(units - allowed)]
  assert not wrong, wrong
