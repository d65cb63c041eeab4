"""The end-to-end demo: synthetic corpus → a tiny ALM trained from scratch through
pretraining and the three stages (projector → LoRA → full) → evaluation on the
held-out test split, per category against the random baseline.

Each stage is an ordinary `alm-jax train` run in its own workdir
(`W/stages/<name>`), started from the previous stage's checkpoint
(`train.init_from`); rerunning the demo resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Mapping

from alm_jax.config import apply_overrides, load_config
from alm_jax.run_config import RunConfig, validate

DEFAULT_CONFIG = "configs/tiny.py"
# Answers are a few tokens; multi-clip answers first name each clip (`data.clip_rationale`): up to ~32 tokens.
EVAL_NEW_TOKENS = 48


@dataclasses.dataclass(frozen=True)
class StagePlan:
  """One training run of the demo."""

  name: str  # workdir name and train.stage
  steps: int
  learning_rate: float
  tasks: tuple[str, ...] = ()  # data.tasks filter (empty: everything)
  lora: bool = False
  objective: str = "lm"  # train.objective
  settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # config keys set for this stage


@dataclasses.dataclass(frozen=True)
class DemoPlan:
  """Sizes of a demo run (`full` for `make demo`, `ci` for the test suite)."""

  examples: int
  batch_size: int
  stages: tuple[StagePlan, ...]
  eval_limit: int | None = None


PAIR_TASKS = ("caption", "transcribe")  # one clip and its description per example
PAIR_WINDOWS = {"data.window_buckets": (1,)}  # one single-window clip per row
# Packed pairs (~44 tokens, one window each): two per 96-token row, so 8 rows hold the 16 examples a step
# takes (benchmarks/data.py: 8 % token padding instead of 54 %).
PACKED_PAIRS = {"data.window_buckets": (1, 2), "data.batch_size": 8}
# Packed questions (43-96 tokens, 1-6 windows): one 128-token bucket and K in (2, 4, 6) keep two or three
# compiled shapes; 10 rows hold about the 16 examples a step took unpacked (~16 % token and window padding,
# against 31 % and 13 % unpacked). Measured on the whole demo, 2026-12-01: the same wall time for these
# stages as one example per row (full 262 s either way) and 64.9 % overall against 62.2 %.
PACKED_QUESTIONS = {"data.length_buckets": (128,), "data.window_buckets": (2, 4, 6), "data.batch_size": 10}
# The question stages' multi-audio recipe (docs/multi_audio.md): multi-clip questions are learned with their
# rationale first ("<think>first music no, second speech yes, third music no</think>the second clip",
# `data.clip_rationale`), and each clip's audio tokens carry a learned clip-number vector (`model.clip_embeddings`,
# added fresh at the first question stage). Measured from the same pretrain stage: multi-audio 46.4 % against
# 37.0 % without either and 39.1 % with the rationale alone.
REASONED = {"data.clip_rationale": True, "model.clip_embeddings": 3}
NO_VALIDATION = {"train.eval_batches": 0}  # short stages: validation's compile costs more than it tells
# The test suite's chain: one (L, K) shape per stage (the largest buckets, so every row fits), one compile
# each instead of two or three; these stages run a few steps, so compiling is most of their time.
CI_SHAPES = {"data.length_buckets": (128,), "data.window_buckets": (6,)}

PLANS = {
    # About 14 minutes on a 2-core CPU. `encoder` and `pretrain` stand in for
    # released towers: the encoders learn on their own to tag each clip with the
    # words of its caption or transcript (as released encoders come pretrained),
    # then the bridge and decoder learn to caption and transcribe from them; the
    # three stages then learn the question answering (pairs stay in the mix).
    "full": DemoPlan(
        examples=6000,
        batch_size=16,
        stages=(
            StagePlan("encoder", 450, 1e-2, tasks=PAIR_TASKS, objective="tagging", settings=PAIR_WINDOWS),
            StagePlan("pretrain", 350, 2e-3, tasks=PAIR_TASKS, settings=PACKED_PAIRS),
            StagePlan("projector", 60, 2e-3, settings={**NO_VALIDATION, **PACKED_QUESTIONS, **REASONED}),
            StagePlan("lora", 60, 2e-3, lora=True, settings={**NO_VALIDATION, **PACKED_QUESTIONS, **REASONED}),
            # 1000 steps: the rationales' one-pair judgements need them (500: multi-audio 46.4 %, 1000: 63.0 %).
            StagePlan("full", 1000, 2e-3, lora=True, settings={**PACKED_QUESTIONS, **REASONED}),
        ),
    ),
    # The same chain at a size the test suite can afford.
    "ci": DemoPlan(
        examples=120,
        batch_size=8,
        stages=(
            StagePlan("encoder", 4, 1e-2, tasks=PAIR_TASKS, objective="tagging", settings=CI_SHAPES),
            StagePlan("pretrain", 6, 2e-3, tasks=PAIR_TASKS, settings=CI_SHAPES),
            StagePlan("projector", 4, 2e-3, settings={**CI_SHAPES, **REASONED}),
            StagePlan("lora", 4, 1e-3, lora=True, settings={**CI_SHAPES, **REASONED}),
            StagePlan("full", 6, 1e-3, lora=True, settings={**CI_SHAPES, **REASONED}),
        ),
        eval_limit=16,
    ),
}

# The towers' own pretraining: the encoders with their tagging head, then the
# bridge and decoder on top of them (encoders kept as tagging left them).
DEMO_STAGES = {
    "encoder": [["^encoder/", True], ["^tagger/", True]],
    "pretrain": [["^encoder/", False], [".*", True]],
}


def resolve_config_path(path: str) -> str:
  """`path` as given, else relative to the repository holding this package."""
  if os.path.isfile(path.partition(":")[0]):
    return path
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  candidate = os.path.join(repo, path)
  return candidate if os.path.isfile(candidate.partition(":")[0]) else path


def stage_config(config_path: str, plan: DemoPlan, stage: StagePlan, data_dir: str, init_from: str,
                 overrides: Mapping[str, str], compile_cache: str = "") -> RunConfig:
  """The run config of one demo stage (`compile_cache`: the compilation cache folder all stages share)."""
  config = load_config(config_path)
  config.data.path = data_dir
  config.data.batch_size = plan.batch_size
  config.data.tasks = tuple(stage.tasks)
  config.update_from_flattened_dict(dict(stage.settings))
  config.train.stage = stage.name
  config.train.stages = DEMO_STAGES
  config.train.objective = stage.objective
  config.train.steps = stage.steps
  config.train.init_from = init_from
  config.train.optimizer.learning_rate = stage.learning_rate
  config.train.optimizer.warmup_steps = max(1, stage.steps // 10)
  config.train.checkpoint_every = stage.steps
  config.train.log_every = max(1, min(25, stage.steps // 4))
  config.train.compilation_cache_dir = compile_cache
  if stage.lora:
    config.model.llm.lora_rank = 8
  apply_overrides(config, overrides)
  return validate(config)


def synth_corpus(data_dir: str, examples: int, seed: int) -> None:
  """Builds the synthetic corpus unless a complete one is already there."""
  from alm_jax.data import synth  # pylint: disable=import-outside-toplevel

  if os.path.isfile(os.path.join(data_dir, "corpus.json")):
    return
  synth.write_corpus(data_dir, examples, seed=seed)


def print_table(report: Mapping[str, Any]) -> None:
  """Per-category accuracy (robust and official scorers) next to the random baseline."""
  robust = report["scores"]["robust"]
  official = report["scores"]["official"]
  print(f"\n{'category':14s} {'n':>4s} {'robust':>8s} {'official':>9s} {'random':>8s}")
  rows = list(robust["by_category"].items()) + [("overall", robust["overall"])]
  for name, block in rows:
    off = official["overall"] if name == "overall" else official["by_category"][name]
    print(f"{name:14s} {block['n']:4d} {100 * block['accuracy']:7.1f}% {100 * off['accuracy']:8.1f}% "
          f"{100 * block['random']:7.1f}%")


def run_demo(workdir: str, *, scale: str = "full", config_path: str = DEFAULT_CONFIG, seed: int = 0,
             overrides: Mapping[str, str] | None = None, quiet: bool = False) -> dict[str, Any]:
  """Runs (or resumes) the whole demo; returns the evaluation report (also in `W/report.json`)."""
  from alm_jax.checkpoints.bundle import load_bundle  # pylint: disable=import-outside-toplevel
  from alm_jax.eval.predictor import ALMPredictor  # pylint: disable=import-outside-toplevel
  from alm_jax.eval.runner import EvalOptions, run_eval  # pylint: disable=import-outside-toplevel
  from alm_jax.infer.alm_generate import ALMGenerator  # pylint: disable=import-outside-toplevel
  from alm_jax.train.loop import Trainer  # pylint: disable=import-outside-toplevel

  plan = PLANS[scale]
  workdir = os.path.abspath(workdir)
  config_path = resolve_config_path(config_path)
  data_dir = os.path.join(workdir, "data")
  start = time.perf_counter()
  say = (lambda *a: None) if quiet else print

  say(f"[demo] building the synthetic corpus ({plan.examples} examples) in {data_dir}")
  synth_corpus(data_dir, plan.examples, seed)
  say(f"[demo] corpus ready after {time.perf_counter() - start:.0f} s")

  init_from = ""
  timings = {}
  for stage in plan.stages:
    stage_dir = os.path.join(workdir, "stages", stage.name)
    # One cache for every stage: a rerun of the demo loads its compiled programs instead of compiling again.
    cfg = stage_config(config_path, plan, stage, data_dir, init_from, overrides or {},
                       compile_cache=os.path.join(workdir, "compile_cache"))
    say(f"[demo] stage '{stage.name}': {stage.steps} steps in {stage_dir}")
    stage_start = time.perf_counter()
    Trainer(cfg, stage_dir, quiet=quiet).run()
    timings[stage.name] = round(time.perf_counter() - stage_start, 1)
    init_from = stage_dir

  say("[demo] evaluating the final checkpoint on the test split")
  bundle = load_bundle(init_from)
  generator = ALMGenerator(bundle, max_new_tokens=EVAL_NEW_TOKENS, batch_size=plan.batch_size)
  report_path = os.path.join(workdir, "report.json")
  options = EvalOptions(checkpoint=init_from, batch_size=plan.batch_size, limit=plan.eval_limit, progress=not quiet)
  report = run_eval(ALMPredictor(generator), "mmau", os.path.join(data_dir, "test.jsonl"), data_dir, report_path,
                    options)
  total = time.perf_counter() - start
  with open(os.path.join(workdir, "timings.json"), "w") as f:
    json.dump({"stages_seconds": timings, "total_seconds": round(total, 1)}, f, indent=2)
  if not quiet:
    print_table(report)
    print(f"\n[demo] done in {total / 60:.1f} min. Report: {report_path} (+ .md, .png)")
    print(f"[demo] checkpoints: {workdir}/stages/<stage>/checkpoints; TensorBoard: "
          f"tensorboard --logdir {workdir}/stages")
  return report
