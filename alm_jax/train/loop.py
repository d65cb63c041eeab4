"""`alm-jax train`: one stage of training, read top to bottom in sections:
set-up → parameters (resume | init_from | pretrained | random) → optimizer →
data → compile → steps (log, validate, checkpoint, preemption) → final save.

The step loop does not wait on the devices between fetch points: each step's
metrics stay on the devices until the next log, validation or checkpoint step
(or the last step, or a stop), where the whole window is fetched at once and
checked for non-finite steps before anything is saved; the next batches are
loaded and placed while the current step runs (`train.prefetch_batches`); and
processes compare preemption flags only every `train.sync_every` steps.

Running the same command again in the same workdir resumes from the latest
checkpoint, data iterator included, so the loss curve continues step for step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from alm_jax import distributed
from alm_jax import sharding as sharding_lib
from alm_jax.checkpoints import orbax as ckpt_lib
from alm_jax.data.batch_checks import check_audio_slots, check_one_clip_per_example
from alm_jax.data.pipeline import DataConfig, make_dataset, pad_batch
from alm_jax.data.tokenizer import Tokenizer
from alm_jax.errors import UserError
from alm_jax.models.alm import ALMConfig, AudioLanguageModel
from alm_jax.params import Flat, ParamLayout
from alm_jax.run_config import RunConfig
from alm_jax.train import flops as flops_lib
from alm_jax.train import stages as stages_lib
from alm_jax.train.metrics import MetricsWriter, format_scalars
from alm_jax.train.optimizer import abstract_opt_state, learning_rate_at, make_optimizer
from alm_jax.train.prefetch import BatchPrefetcher
from alm_jax.train.preemption import install_preemption_handler
from alm_jax.train.pretrained import load_pretrained_towers
from alm_jax.train.step import jit_train_step, make_eval_step, model_config_for, stack_micro_batches

log = logging.getLogger("alm_jax.train")

LORA_LEAF = r"(^|/)lora_[ab]$"
# Leaves a later stage may add to an earlier stage's model, initialised fresh: LoRA adapters, clip-number vectors.
NEW_STAGE_LEAF = LORA_LEAF + r"|^bridge/clip_embedding$"
TAGGER_LEAF = r"^tagger/"  # the encoder-pretraining head, dropped when the LLM stages start
TAGGING_TRAINS = r"^(encoder|tagger)/"


class TrainingError(UserError):
  """The run cannot go on (non-finite loss, mismatched workdir)."""


# Compiles shorter than this are not written to the persistent cache: lowered from JAX's 1 s so a small
# model's train and eval steps are kept too (a cache hit still traces and lowers the step: only XLA's
# compile is skipped).
CACHE_MIN_COMPILE_SECONDS = 0.5
_cache_dir_set_here: str | None = None  # the folder the last Trainer pointed JAX's cache at


def use_compilation_cache(setting: str, workdir: str) -> str | None:
  """Points JAX's persistent compilation cache at `train.compilation_cache_dir`; returns the folder in use.

  "" is `<workdir>/compile_cache`; "none" sets no cache (and undoes one an earlier Trainer
  in this process set). JAX_COMPILATION_CACHE_DIR in the environment wins and is left alone.
  JAX opens its cache once per process, so a change of folder (the next stage of a chain
  run in one process) resets it to open the new one.
  """
  global _cache_dir_set_here  # pylint: disable=global-statement
  from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=import-outside-toplevel

  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return os.environ["JAX_COMPILATION_CACHE_DIR"]
  current = jax.config.jax_compilation_cache_dir
  if setting == "none":
    if current and current == _cache_dir_set_here:
      jax.config.update("jax_compilation_cache_dir", None)
      compilation_cache.reset_cache()
      _cache_dir_set_here = None
      return None
    return current
  path = os.path.abspath(os.path.expanduser(setting or os.path.join(workdir, "compile_cache")))
  if current != path:
    jax.config.update("jax_compilation_cache_dir", path)
    compilation_cache.reset_cache()
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", CACHE_MIN_COMPILE_SECONDS)
  _cache_dir_set_here = path
  return path


class MetricWindow:
  """The train metrics between fetch points (on the devices) and of the current log window (on the host).

  `add` keeps a step's metric dict as the step returned it, without waiting for it.
  `fetch` copies all pending steps to the host in one transfer, raises TrainingError
  at the first step whose update was refused as non-finite, and adds the rest to the
  log window; wall time counts from `resume_clock` to the end of the fetch, less any
  compile time, so validation, saving and logging stay out of the step times.
  `summary` averages the log window and starts a new one.
  """

  def __init__(self):
    self.pending: list[tuple[int, dict, float]] = []  # (step number, device metrics, step FLOPs per device)
    self._clear()
    self._clock_start = time.perf_counter()
    self._compile_start = 0.0

  def _clear(self) -> None:
    self.steps = 0
    self.sums = {"loss": 0.0, "grad_norm": 0.0, "token_accuracy": 0.0}
    self.tokens = self.flops = self.seconds = 0.0

  def resume_clock(self, compile_seconds: float) -> None:
    """Starts timing the next steps (`compile_seconds`: the Trainer's compile total now)."""
    self._clock_start = time.perf_counter()
    self._compile_start = compile_seconds

  def add(self, step: int, metrics: dict, step_flops: float) -> None:
    self.pending.append((step, metrics, step_flops))

  def fetch(self, compile_seconds: float, latest_saved: Callable[[], Any]) -> None:
    """Brings the pending steps to the host; raises TrainingError naming the first non-finite step."""
    if not self.pending:
      return
    host = jax.device_get([m for _, m, _ in self.pending])
    self.seconds += time.perf_counter() - self._clock_start - (compile_seconds - self._compile_start)
    for (step, _, step_flops), metrics in zip(self.pending, host):
      if not metrics["finite"]:
        self.pending = []
        raise TrainingError(
            f"non-finite loss ({float(metrics['loss'])}) or gradient norm ({float(metrics['grad_norm'])}) at "
            f"step {step}; the update was not applied and nothing was saved after step {latest_saved()}")
      for k in self.sums:
        self.sums[k] += float(metrics[k])
      self.tokens += float(metrics["tokens"])
      self.flops += step_flops
      self.steps += 1
    self.pending = []

  def summary(self, peak_flops: float) -> dict[str, float]:
    """Means over the log window's steps (step time and throughput from its wall time); starts a new window."""
    n = max(self.steps, 1)
    seconds = max(self.seconds, 1e-9)
    out = {k: v / n for k, v in self.sums.items()}
    out["step_time"] = self.seconds / n
    out["tokens_per_s"] = self.tokens / seconds
    out["mfu"] = flops_lib.mfu(self.flops / n, self.seconds / n, peak_flops)
    self._clear()
    return out


def load_tokenizer(data: DataConfig, template: str) -> Tokenizer:
  """The run's tokenizer: `data.tokenizer`, or tokenizer.json beside the data."""
  path = data.tokenizer or (data.path if os.path.isdir(data.path) else os.path.dirname(data.path))
  return Tokenizer.load(path, template)


def resolve_model_config(model: ALMConfig, tokenizer: Tokenizer) -> ALMConfig:
  """Fills `audio_token_id` from the tokenizer and checks the vocabulary fits."""
  from alm_jax.config import ConfigError  # pylint: disable=import-outside-toplevel

  if tokenizer.vocab_size > model.llm.vocab_size:
    raise ConfigError("config.model.llm.vocab_size",
                      f"{model.llm.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} tokens")
  audio_id = tokenizer.audio_id
  if model.audio_token_id not in (-1, audio_id):
    raise ConfigError("config.model.audio_token_id",
                      f"{model.audio_token_id} differs from the tokenizer's placeholder id {audio_id}")
  return dataclasses.replace(model, audio_token_id=audio_id)


@dataclasses.dataclass
class TrainState:
  """What a step consumes and produces (flat dicts of sharded arrays)."""

  step: int
  trainable: Flat
  frozen: Flat
  opt_state: Any


def batch_rows(mesh, rules, global_batch_size: int) -> list[int]:
  """The global batch rows this process's devices hold (what it loads), in the order it supplies them."""
  spec = sharding_lib.batch_shardings({"rows": np.zeros((global_batch_size,))}, mesh, rules)["rows"]
  return [int(r) for r in distributed.process_rows(spec, (global_batch_size,))]


def _local_batch_to_global(batch: dict, mesh, rules, global_batch_size: int | None = None) -> dict:
  """Makes one global batch from this process's rows (each row carries its own clips).

  Every process's rows come from the same global batch, so their shapes agree without asking the others.
  """
  return distributed.global_batch(batch, mesh, rules, global_batch_size)


def _micro_batches_to_global(batches: list[dict], mesh, rules, pad_id: int, global_batch_size: int) -> dict:
  """k local micro-batches -> one global batch with a leading micro-batch axis (see `make_train_step`).

  The micro-batches are padded to their largest (L, K) so they stack.
  """
  length = max(b["tokens"].shape[1] for b in batches)
  windows = max(b["audio"].shape[1] for b in batches)
  stacked = stack_micro_batches([pad_batch(b, length=length, windows=windows, pad_id=pad_id) for b in batches])
  axes = {k: (None, "batch") + (None,) * (v.ndim - 2) for k, v in stacked.items()}
  return distributed.global_batch(stacked, mesh, rules, global_batch_size, axes=axes)


def _check_tagging_stage(stage: str, trainable: list[str]) -> None:
  """The tagging loss reaches only the encoders and the head; anything else would just decay."""
  from alm_jax.config import ConfigError  # pylint: disable=import-outside-toplevel

  outside = [p for p in trainable if not re.match(TAGGING_TRAINS, p)]
  if outside:
    raise ConfigError("config.train.stage",
                      f"stage {stage!r} trains {outside[0]} (and {len(outside) - 1} more) but train.objective='tagging' "
                      "reaches only encoder/ and tagger/; use a stage like [['^encoder/', True], ['^tagger/', True]]")
  if not any(p.startswith("tagger/") for p in trainable):
    raise ConfigError("config.train.stage", f"stage {stage!r} freezes tagger/, which train.objective='tagging' trains")


class Trainer:
  """One stage of training in one workdir."""

  def __init__(self, cfg: RunConfig, workdir: str, *, template: str | None = None, quiet: bool = False,
               guard_transfers: bool = False):
    """`guard_transfers`: run the steps between fetch points under JAX's device-to-host transfer
    guard, so a transfer there (a metric fetched every step) raises; for tests. On GPU/TPU only:
    CPU arrays already live in host memory, so on CPU the guard sees nothing (tests/test_quiet_loop.py
    watches host reads itself)."""
    self.cfg = cfg
    self.guard_transfers = guard_transfers
    self.workdir = os.path.abspath(workdir)
    self.main = distributed.is_main_process()
    self.quiet = quiet or not self.main
    self.mesh = sharding_lib.make_mesh(cfg.mesh)
    self.rules = cfg.mesh.logical_rules
    self.tokenizer = load_tokenizer(cfg.data, template or cfg.data.template)
    self.model_cfg = resolve_model_config(cfg.model, self.tokenizer)
    self.objective = cfg.train.objective  # `tagging`: the head exists only while the encoders pretrain alone
    if self.objective == "tagging" and cfg.data.packing:
      # The tagger pools a row's windows as one clip; packing would also save nothing there (its cost is per
      # window, not per token), so tagging rows hold one example each.
      cfg = self.cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, packing=False))
    self.model_cfg = model_config_for(self.model_cfg, self.objective)
    # Special tokens end answers but are not words a clip can be tagged with.
    self.ignore_tag_ids = tuple(sorted({i for i in (self.tokenizer.end_of_turn_id, self.tokenizer.eos_id,
                                                    self.tokenizer.pad_id) if i is not None}))
    self.spec = self.model_cfg.token_spec()
    self.layout = ParamLayout(lambda rngs: AudioLanguageModel(self.model_cfg, rngs=rngs))
    self.layout.check_divisible(self.mesh, self.rules)
    sharding_lib.assert_params_sufficiently_sharded(self.layout.abstract_sharded(self.mesh, self.rules), self.mesh,
                                                    cfg.mesh.sharding_tolerance)
    self.compute_dtype = jnp.bfloat16 if cfg.train.compute_dtype == "bfloat16" else jnp.float32
    self.mask = stages_lib.trainable_mask(self.layout.abstract, cfg.train.stage_config)
    self.trainable_paths = [p for p, t in self.mask.items() if t]
    self.frozen_paths = [p for p, t in self.mask.items() if not t]
    if self.objective == "tagging":
      _check_tagging_stage(cfg.train.stage, self.trainable_paths)
    self.tx = make_optimizer(cfg.train.optimizer, {p: self.layout.abstract[p] for p in self.trainable_paths},
                             cfg.train.steps)
    self.checkpointer = ckpt_lib.TrainCheckpointer(os.path.join(self.workdir, "checkpoints"), cfg.train.checkpoint)
    self._compiled: dict[tuple, Any] = {}
    self._step_flops: dict[tuple, float] = {}
    self.compile_seconds = 0.0  # spent compiling so far (kept out of step times)
    self.accum = cfg.train.grad_accum_steps
    # Every process forms the same global batches; this one loads the rows its devices hold.
    self.rows = batch_rows(self.mesh, self.rules, cfg.data.batch_size)

  # ---------------------------------------------------------------------------
  # Output.

  def say(self, text: str) -> None:
    if not self.quiet:
      tqdm.write(text)

  # ---------------------------------------------------------------------------
  # Parameters and optimizer state.

  def _abstract(self, paths) -> dict[str, jax.ShapeDtypeStruct]:
    return self.layout.abstract_sharded(self.mesh, self.rules, paths)

  def _init_opt_state(self, trainable: Flat) -> Any:
    target = abstract_opt_state(self.tx, self._abstract(self.trainable_paths))
    shardings = jax.tree.map(lambda a: a.sharding, target)
    return jax.jit(self.tx.init, out_shardings=shardings)(trainable)

  def _split(self, params: Flat) -> tuple[Flat, Flat]:
    trainable = {p: params[p] for p in self.trainable_paths}
    frozen = {p: params[p] for p in self.frozen_paths}
    return trainable, frozen

  def _start_params(self) -> tuple[Flat, str]:
    """Fresh parameters for step 0: init_from, else pretrained towers, else random."""
    train = self.cfg.train
    params = self.layout.init(train.seed, self.mesh, self.rules)
    if train.init_from:
      restored = ckpt_lib.restore_params_only(
          train.init_from, self._abstract(self.layout.paths), allow_missing=NEW_STAGE_LEAF,
          ignore_unused=None if self.model_cfg.tagging_head else TAGGER_LEAF)
      fresh = sorted(set(params) - set(restored))
      params.update(restored)
      note = f"initialised from {train.init_from}"
      return params, note + (f" ({len(fresh)} new leaves freshly initialised, e.g. {fresh[0]})" if fresh else "")
    loaded = load_pretrained_towers(train.pretrained, self.layout, self.mesh, self.rules, self.model_cfg)
    params.update(loaded.params)
    return params, loaded.note or f"random initialisation (seed {train.seed})"

  def initial_state(self, iterator: Any) -> TrainState:
    """Resumes from this workdir's latest checkpoint, or starts a fresh stage."""
    latest = self.checkpointer.latest_step()
    if latest is not None:
      meta = self.checkpointer.metadata(latest)
      if meta.stage != self.cfg.train.stage:
        raise TrainingError(
            f"{self.workdir}: holds a '{meta.stage}' run; train stage '{self.cfg.train.stage}' in a new workdir "
            "with --config.train.init_from pointing here")
      if meta.mask != self.mask:
        raise TrainingError(f"{self.workdir}: the trainable mask differs from the checkpoint's; use a new workdir")
      restored = self.checkpointer.restore(
          latest, self._abstract(self.layout.paths),
          abstract_opt_state(self.tx, self._abstract(self.trainable_paths)), data_iterator=iterator)
      trainable, frozen = self._split(restored.params)
      self.say(f"resumed from step {latest} in {self.checkpointer_dir}")
      return TrainState(latest, trainable, frozen, restored.opt_state)
    params, note = self._start_params()
    self.say(note)
    trainable, frozen = self._split(params)
    return TrainState(0, trainable, frozen, self._init_opt_state(trainable))

  @property
  def checkpointer_dir(self) -> str:
    return os.path.join(self.workdir, "checkpoints")

  # ---------------------------------------------------------------------------
  # Compilation.

  def compiled_train_step(self, state: TrainState, batch: dict) -> Any:
    """The train step compiled for this batch shape (memory and FLOPs reported once)."""
    key = tuple((k, v.shape) for k, v in sorted(batch.items()))
    if key in self._compiled:
      return self._compiled[key]
    jitted = jit_train_step(self.layout, self.tx, self.mesh, self.rules, trainable_paths=self.trainable_paths,
                            frozen_paths=self.frozen_paths, batch_shardings=jax.tree.map(lambda x: x.sharding, batch),
                            compute_dtype=self.compute_dtype, objective=self.objective,
                            ignore_ids=self.ignore_tag_ids, grad_accum_steps=self.accum)
    start = time.perf_counter()
    compiled = jitted.lower(state.trainable, state.frozen, state.opt_state, batch).compile()
    self.compile_seconds += time.perf_counter() - start
    self._compiled[key] = compiled
    # Cost analysis counts a loop body once: the micro-batch scan runs it `accum` times.
    self._step_flops[key] = flops_lib.compiled_flops(compiled) * self.accum
    mem = flops_lib.memory_summary(compiled)
    tokens, audio = batch["tokens"].shape, batch["audio"].shape
    shape = f"L={tokens[-1]} K={audio[-2]}" + (f" x{self.accum} micro-batches" if self.accum > 1 else "")
    self.say(f"compiled train step for {shape} in {time.perf_counter() - start:.1f}s; {mem}")
    return compiled

  # ---------------------------------------------------------------------------
  # Validation.

  def validate(self, state: TrainState) -> dict[str, float] | None:
    """Mean loss over `train.eval_batches` validation batches (None when there is no split)."""
    if self.cfg.train.eval_batches == 0:
      return None
    try:
      dataset = make_dataset(self.cfg.data, self.spec, self.tokenizer, split="validation", rows=self.rows)
    except UserError as e:
      self.say(f"no validation: {e}")
      return None
    if not hasattr(self, "_eval_step"):
      eval_fn = make_eval_step(self.layout, self.compute_dtype, objective=self.objective,
                               ignore_ids=self.ignore_tag_ids)
      self._eval_step = jax.jit(sharding_lib.bind_rules(eval_fn, self.mesh, self.rules))
    total = weight = correct = 0.0
    for i, local in enumerate(iter(dataset)):
      if i >= self.cfg.train.eval_batches:
        break
      batch = _local_batch_to_global(local, self.mesh, self.rules, self.cfg.data.batch_size)
      metrics = jax.device_get(self._eval_step(state.trainable, state.frozen, batch))
      n = float(metrics["target_tokens"])
      total += float(metrics["loss"]) * n
      correct += float(metrics["token_accuracy"]) * n
      weight += n
    if weight == 0:
      return None
    return {"loss": total / weight, "token_accuracy": correct / weight}

  # ---------------------------------------------------------------------------
  # The loop.

  def save(self, state: TrainState, iterator: Any, metrics: dict[str, float] | None = None) -> None:
    """Checkpoints `state`; `iterator`: the data iterator's state as the step left it (see `BatchPrefetcher`)."""
    params = {**state.trainable, **state.frozen}
    saved = self.checkpointer.save(state.step, params, state.opt_state, stage=self.cfg.train.stage, mask=self.mask,
                                   config=self.cfg.to_dict() | {"model": dataclasses.asdict(self.model_cfg)},
                                   data_iterator=iterator, metrics=metrics or {})
    if saved:
      self.say(f"saved checkpoint at step {state.step} in {self.checkpointer_dir}")

  def next_global_batch(self, iterator: Any) -> dict:
    """One step's global batch: `grad_accum_steps` local batches from `iterator`, checked and put on the devices."""
    locals_ = [next(iterator) for _ in range(self.accum)]
    for local in locals_:
      check_audio_slots(local, self.spec, self.model_cfg.audio_token_id)
      if self.objective == "tagging":
        check_one_clip_per_example(local, self.model_cfg.audio_token_id)
    if self.accum > 1:
      return _micro_batches_to_global(locals_, self.mesh, self.rules, self.tokenizer.pad_id, self.cfg.data.batch_size)
    return _local_batch_to_global(locals_[0], self.mesh, self.rules, self.cfg.data.batch_size)

  def _steady(self) -> Any:
    """The context the steps between fetch points run in: no device-to-host transfer when guarded."""
    if self.guard_transfers:
      return jax.transfer_guard_device_to_host("disallow_explicit")
    return contextlib.nullcontext()

  def run(self) -> dict[str, Any]:
    """Trains to `train.steps`; returns the last logged metrics."""
    cfg = self.cfg
    train = cfg.train
    self.compilation_cache_dir = use_compilation_cache(train.compilation_cache_dir, self.workdir)
    if self.main:  # the run directory carries its tokenizer, so checkpoints are self-contained
      os.makedirs(self.workdir, exist_ok=True)
      self.tokenizer.save(os.path.join(self.workdir, "tokenizer.json"))
    dataset = make_dataset(cfg.data, self.spec, self.tokenizer, split="train", seed=cfg.data.seed, rows=self.rows)
    iterator = iter(dataset)
    state = self.initial_state(iterator)
    if state.step == 0 or not self.quiet:
      self.say(stages_lib.mask_table({**self.layout.abstract}, self.mask))
    if state.step >= train.steps:
      self.say(f"nothing to do: the workdir is already at step {state.step} of {train.steps}")
      return {}
    # The frozen weights stay as loaded (float32 masters): the step casts its own compute copy, so a bf16
    # run saves them bit for bit.
    peak, peak_source = flops_lib.peak_flops(jax.local_devices(), train.peak_flops_per_device)
    self.say(f"MFU is measured per device against {peak / 1e12:.3g} TFLOP/s ({peak_source})")
    writer = MetricsWriter(self.workdir, enabled=self.main, resume_step=state.step + 1)
    watcher = install_preemption_handler(sync_every=train.sync_every)
    # Batches are read ahead of the step, so a checkpoint saves the state recorded with the last consumed one.
    prefetcher = BatchPrefetcher(iterator, lambda: self.next_global_batch(iterator), train.prefetch_batches,
                                 limit=train.steps - state.step)
    window = MetricWindow()
    last: dict[str, float] = {}
    progress = tqdm(total=train.steps, initial=state.step, disable=self.quiet, desc=f"train[{train.stage}]",
                    dynamic_ncols=True)
    eval_every = train.eval_every or train.checkpoint_every
    try:
      window.resume_clock(self.compile_seconds)
      while state.step < train.steps:
        with self._steady():  # nothing here waits for the devices
          batch = prefetcher.next()
          compiled = self.compiled_train_step(state, batch)
          state.trainable, state.opt_state, metrics = compiled(state.trainable, state.frozen, state.opt_state, batch)
          state.step += 1
          window.add(state.step, metrics, self._step_flops[tuple((k, v.shape) for k, v in sorted(batch.items()))])
          del batch, metrics
          prefetcher.fill()  # the next batches load and transfer while this step runs
        progress.update(1)
        final = state.step == train.steps
        log_now = state.step % train.log_every == 0 or final
        eval_now = state.step % eval_every == 0 or final
        save_now = state.step % train.checkpoint_every == 0 or final
        stop = watcher.should_stop(state.step, sync=save_now)
        if not (log_now or eval_now or save_now or stop):
          continue
        # A fetch point: the window's metrics come to the host, and a non-finite step stops the run before
        # anything after it is saved.
        window.fetch(self.compile_seconds, self.checkpointer.latest_step)
        if log_now:
          last = window.summary(peak)
          last["learning_rate"] = learning_rate_at(train.optimizer, train.steps, state.step - 1)
          writer.write(state.step, last)
          progress.set_postfix_str(format_scalars({k: last[k] for k in ("loss", "learning_rate", "grad_norm")}))
        val = None
        if eval_now:
          val = self.validate(state)
          if val is not None:
            writer.write(state.step, val, prefix="val_")
            self.say(f"step {state.step}: validation {format_scalars(val)}")
        if save_now or stop:
          self.save(state, prefetcher.consumed_state(), {"val_loss": val["loss"]} if val else None)
        if stop:
          self.say(f"preempted: saved step {state.step}, exiting")
          break
        window.resume_clock(self.compile_seconds)
    finally:
      progress.close()
      writer.close()
      watcher.uninstall()
      self.checkpointer.wait()
      self.checkpointer.close()
    return {"step": state.step, **last}
