"""`alm-jax compile` when the program does not fit: a report, exit status 3, one line on stderr, and the
largest batch that fits (issue 22)."""

import json
import os

import jax
import pytest

from alm_jax import aot, oom
from alm_jax.commands import compile as compile_command

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The TPU compiler's words (libtpu 0.0.42) for the demo model at 20,000 rows per chip of v5p:2x2x1.
MESSAGE = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (171.46G) "
           "exceeds available HBM (95.74G).")
LONG_MESSAGE = """RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. Used 120.5G of 95.74G hbm.
Program hbm requirement 120.0G:
    HLO temp        119.5G (100.0% utilization)
  Largest program allocations in hbm:
  1. Size: 12.00G
     Operator: op_name="jit(train_step)/jvp(llm)/dot_general" source_file="x.py"
     Shape: bf16[4,2048,152064]{2,1,0}
  2. Size: 512.0M
     Shape: f32[1024,1024]{1,0}
"""


def test_out_of_memory_messages_are_read_as_numbers():
  short = oom.parse(MESSAGE)
  assert short.temporaries == int(171.46 * 2**30) and short.available == int(95.74 * 2**30)
  assert short.message.startswith("RESOURCE_EXHAUSTED") and short.largest == []
  long = oom.parse(LONG_MESSAGE)
  assert long.temporaries == int(119.5 * 2**30) and long.available == int(95.74 * 2**30)
  assert long.largest == [
      {"bytes": 12 * 2**30, "shape": "bf16[4,2048,152064]{2,1,0}", "op_name": "jit(train_step)/jvp(llm)/dot_general"},
      {"bytes": 512 * 2**20, "shape": "f32[1024,1024]{1,0}", "op_name": ""}]
  assert oom.is_out_of_memory(RuntimeError(MESSAGE)) and not oom.is_out_of_memory(RuntimeError("INVALID_ARGUMENT"))


class _Memory:
  def __init__(self, total, hbm):
    self.total, self.hbm = total, hbm


class _Report:
  def __init__(self, total, hbm):
    self.memory = _Memory(total, hbm)
    self.fits = total <= hbm


# Memory per device against rows: linear, stepwise (tile padding: rows rounded up to 8), and unknown totals.
MEMORY_MODELS = {
    "linear": lambda rows: 1000 + 70 * rows,
    "stepwise": lambda rows: 1000 + 70 * 8 * -(-rows // 8),
    "superlinear": lambda rows: 1000 + 3 * rows * rows,
}


@pytest.mark.parametrize("model", sorted(MEMORY_MODELS))
@pytest.mark.parametrize("start,budget", [(1, 1950), (4, 1950), (64, 1950), (1, 1071), (8, 90_000), (1, 1000)])
def test_find_max_rows_brackets_the_largest_batch_that_fits(model, start, budget):
  memory = MEMORY_MODELS[model]
  compiled = []

  def compile_rows(rows):
    compiled.append(rows)
    return _Report(memory(rows), budget), None

  best, report, tried = compile_command.find_max_rows(compile_rows, start=start)
  truth = max((r for r in range(1, 5000) if memory(r) <= budget), default=None)
  assert best == truth
  if truth is None:
    assert report.fits is False and tried[-1] == (1, False)
    return
  assert report.fits and (best, True) in tried and (best + 1, False) in tried
  assert len(compiled) == len(set(compiled)) <= 16  # each size compiled once, logarithmically many probes
  if model == "linear" and start == 1:
    assert len(compiled) <= 4  # two points, the predicted largest, its neighbour


def test_find_max_rows_without_totals_falls_back_to_doubling_and_bisection():
  reports = lambda rows: (_Report(0, 100) if rows <= 13 else type("R", (), {"fits": False, "memory": _Memory(0, 100)})(),
                          None)
  best, _, tried = compile_command.find_max_rows(reports, start=1)
  assert best == 13 and [r for r, _ in tried][:5] == [1, 2, 4, 8, 16]


def test_a_budget_the_program_cannot_meet_is_a_does_not_fit_report(capsys):
  memory = aot.MemoryReport(arguments=3 * aot.GIB, outputs=0, aliased=0, temporaries=5 * aot.GIB, generated_code=0,
                            hbm=4 * aot.GIB)
  report = aot.CompileReport(target="v5p:2x2x1", num_devices=4, mesh_shape={"fsdp": 4}, memory=memory,
                             collectives={}, flops=None, compile_seconds=1.0)
  assert report.fits is False and report.to_dict()["fits"] is False
  assert "does NOT fit: needs 8.00 GiB of 4.00 GiB" in report.format()
  assert compile_command._does_not_fit(report, "2 rows per device do not fit") == compile_command.EXIT_DOES_NOT_FIT
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "does not fit on v5p:2x2x1: 2 rows per device do not fit: needs 8.00 GiB" in err


# The demo model at its smallest, for the projector stage (a real train step, backward through the LLM; its
# compile takes ~0.6x the `full` stage's), with the TPU choices and one length and one window bucket (32
# tokens, one 3 s window per row; compiles ~0.6x as long as with the demo's buckets).
FIT_CONFIG = ("--config", os.path.join(REPO, "configs", "tiny.py") + ":micro,projector", "--topology", "v5p:2x2x1",
              "--config.mesh.shape=(1,-1,1)", "--config.model.frontend.method=matmul",
              "--config.model.frontend.examples_per_step=0", "--config.model.whisper.attention_block=0",
              "--config.data.length_buckets=(32,)", "--config.data.window_buckets=(1,)", "--config.data.max_clips=1")
REFUSED_ROWS = 100_000  # ~420 GiB per chip, 4x the HBM: the compiler gives up within seconds (at 20,000 rows,
# ~63 GiB, the program fits and takes minutes to compile)


def _compile_command(argv, capsys) -> tuple[int, str, str]:
  """`alm-jax compile ARGV` through the console script's entry point, in this process: (status, stdout, stderr)."""
  from alm_jax import cli  # pylint: disable=import-outside-toplevel

  status = cli.main(["compile", *argv])
  out, err = capsys.readouterr()
  return status, out, err


@pytest.mark.slow
def test_compile_reports_what_does_not_fit_and_finds_the_largest_batch_that_does(tmp_path, monkeypatch, capsys):
  # Both commands run in this process, so a program is compiled once: the refusal's 1-row stand-in is the same
  # program (same config, same shapes) as the search's first probe. Only the compiled executable is shared;
  # each command still builds its own report and verdict against its own HBM budget.
  compiled: dict[str, object] = {}
  compile_step = aot.compile_step

  def compile_once(fn, args, **kwargs):
    key = repr([(a.shape, a.dtype, a.sharding) for a in jax.tree.leaves(args)]) + repr(jax.tree.structure(args))
    if key not in compiled:
      compiled[key] = compile_step(fn, args, **kwargs)  # a refusal raises and is not kept
    return compiled[key]

  monkeypatch.setattr(aot, "compile_step", compile_once)

  # 100,000 rows per v5p chip: the TPU compiler refuses the program. A report, exit status 3 and one line on
  # stderr (no traceback: an exception would fail this test), then the 1-row stand-in.
  out = tmp_path / "refused.json"
  status, stdout, stderr = _compile_command(
      [*FIT_CONFIG, "--batch-per-device", str(REFUSED_ROWS), "--json", str(out)], capsys)
  assert status == compile_command.EXIT_DOES_NOT_FIT, stdout[-3000:] + stderr[-3000:]
  assert stderr.count("\n") == 1, stderr
  assert stderr.startswith(f"alm-jax compile: does not fit on v5p:2x2x1: {REFUSED_ROWS} rows per device do not fit: "
                           "needs ")
  assert "the compiler ran out of device memory" in stdout and "does NOT fit: needs" in stdout
  assert "stand-in at 1 row per device" in stdout and "largest arrays" in stdout
  report = json.loads(out.read_text())
  assert report["fits"] is False and report["compiler_error"].startswith("RESOURCE_EXHAUSTED")
  assert report["memory"]["temporaries"] > report["memory"]["hbm"] > 0
  assert report["memory"]["arguments"] > REFUSED_ROWS * 48_000 * 4  # each row's 3 s window of float32 PCM
  stand_in = report["stand_in"]
  assert stand_in["fits"] and stand_in["largest_arrays"] and 1 < stand_in["estimated_max_rows"] < REFUSED_ROWS
  assert len(compiled) == 1  # the refused program was not kept

  # A budget a little above the stand-in's total: a quarter of its estimated growth per row (which the refused
  # program, superlinear at 100,000 rows, overstates ~1.5x), so 1 row per chip fits and 2 should not. Every
  # probe is a real compile (the compiler accepts it), compared with --hbm-gib.
  budget = (stand_in["total"] + 0.25 * stand_in["per_row"]) / aot.GIB
  out = tmp_path / "max.json"
  status, stdout, stderr = _compile_command(
      [*FIT_CONFIG, "--config.data.batch_size=4", "--hbm-gib", f"{budget:.9f}", "--find-max-batch", "--json",
       str(out)], capsys)
  assert status == 0, stdout[-3000:] + stderr[-3000:]
  report = json.loads(out.read_text())
  best, tried = report["max_batch_per_device"], [tuple(t) for t in report["tried"]]
  assert best >= 1 and report["fits"] and f"largest batch that fits: {best} rows per device" in stdout
  # The true boundary: the largest batch fits and one more row does not (a program the compiler accepted).
  assert (best, True) in tried and (best + 1, False) in tried, tried
  assert not report["compiler_error"] and report["memory"]["total"] <= report["memory"]["hbm"]
  assert 1 in dict(tried) and len(compiled) == len(tried)  # each probe compiled once, 1 row by the refusal's stand-in
