"""The `train` section of a run config: stage, schedule, checkpoints, start point."""

from __future__ import annotations

import dataclasses
from typing import Literal

from alm_jax.checkpoints.orbax import CheckpointConfig
from alm_jax.config import require
from alm_jax.train.optimizer import OptimizerConfig
from alm_jax.train.stages import StageConfig


@dataclasses.dataclass(frozen=True)
class PretrainedConfig:
  """Separately released towers a fresh run starts from (empty = random init).

  `whisper`: a Hugging Face Whisper folder or an openai-whisper `.pt`;
  `beats`: an official BEATs `.pt`; `llm`: a Hugging Face Qwen2/Qwen3/Llama
  folder. Ignored when the run resumes or uses `train.init_from`.
  """

  whisper: str = ""
  beats: str = ""
  llm: str = ""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """How one stage trains.

  Attributes:
    stage / stages / freeze: which parameters train (see `train.stages`).
    objective: `lm`, next-token loss on the answers; `tagging`, the encoders
      alone learn each clip's answer words through a tagging head
      (`alm_jax.models.tagging`; one clip per example), the way released
      encoders come pretrained. Later stages ignore the head.
    steps: optimizer updates of this stage (the run's last step).
    log_every: steps between metric lines (console, TensorBoard, metrics.jsonl).
    checkpoint_every: steps between checkpoints (a final one is always written).
    eval_every: steps between validation-loss passes (0: at every checkpoint).
    eval_batches: validation batches per pass (0: no validation).
    init_from: a workdir, checkpoints folder or step folder of the previous
      stage (or an `import-hf` output) whose parameters start this stage.
    pretrained: released tower checkpoints for a run with no `init_from`.
    seed: parameter initialisation and sampling seed.
    compute_dtype: activations/matmuls dtype; parameters and optimizer state
      stay float32 (master weights).
    grad_accum_steps: micro-batches per optimizer update: the step splits each
      batch into k micro-batches and scans over them inside the jitted step,
      averaging their gradients (the same update as the whole batch at once,
      with a k-th of the activation memory).
    optimizer / checkpoint: see `OptimizerConfig`, `CheckpointConfig`.
    peak_flops_per_device: for the MFU estimate; 0 measures a matmul at start.
    sync_every: steps between cross-process checks that every process agrees
      to stop (a preemption notice on any process), and always at a
      checkpoint step. Each check is an all-gather that runs on the devices
      behind the queued train steps, so the host waits for them to finish and
      stops running ahead; default 10 keeps that to one step in ten, while a
      preempted run still stops within 9 steps, well inside the usual grace
      period before SIGKILL. A single-process run stops on the next step.
    prefetch_batches: global batches loaded and put on the devices ahead of
      the step that consumes them, while the device computes (0: load each
      batch when its step starts). Checkpoints still save the data iterator as
      it was right after the last batch a step consumed, so resume is exact.
    compilation_cache_dir: JAX's persistent compilation cache, so a rerun or a
      resumed run loads the compiled train and eval steps instead of compiling
      them again: "" is `<workdir>/compile_cache`, "none" sets no cache, any
      other value is the folder (stages that share one share their compiled
      steps). Ignored when the environment sets JAX_COMPILATION_CACHE_DIR.
  """

  stage: str = "full"
  stages: dict = dataclasses.field(default_factory=dict)
  freeze: tuple[str, ...] = ()
  objective: Literal["lm", "tagging"] = "lm"
  steps: int = 1000
  log_every: int = 10
  checkpoint_every: int = 500
  eval_every: int = 0
  eval_batches: int = 4
  init_from: str = ""
  pretrained: PretrainedConfig = PretrainedConfig()
  seed: int = 0
  compute_dtype: Literal["float32", "bfloat16"] = "float32"
  grad_accum_steps: int = 1
  optimizer: OptimizerConfig = OptimizerConfig()
  checkpoint: CheckpointConfig = CheckpointConfig(keep_last=2)
  peak_flops_per_device: float = 0.0
  sync_every: int = 10
  prefetch_batches: int = 2
  compilation_cache_dir: str = ""

  def __post_init__(self):
    require(self.steps >= 1, "config.train.steps", f"must be >= 1, got {self.steps}")
    require(self.log_every >= 1, "config.train.log_every", f"must be >= 1, got {self.log_every}")
    require(self.checkpoint_every >= 1, "config.train.checkpoint_every", f"must be >= 1, got {self.checkpoint_every}")
    require(self.eval_every >= 0, "config.train.eval_every", f"must be >= 0, got {self.eval_every}")
    require(self.eval_batches >= 0, "config.train.eval_batches", f"must be >= 0, got {self.eval_batches}")
    require(self.grad_accum_steps >= 1, "config.train.grad_accum_steps", f"must be >= 1, got {self.grad_accum_steps}")
    require(self.peak_flops_per_device >= 0, "config.train.peak_flops_per_device", "must be >= 0")
    require(self.sync_every >= 1, "config.train.sync_every", f"must be >= 1, got {self.sync_every}")
    require(self.prefetch_batches >= 0, "config.train.prefetch_batches", f"must be >= 0, got {self.prefetch_batches}")
    self.stage_config  # validates stage, stages and freeze

  @property
  def stage_config(self) -> StageConfig:
    return StageConfig(stage=self.stage, stages=self.stages, freeze=self.freeze)
