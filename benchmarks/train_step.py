"""Train-step speed and MFU of our jitted JAX step, beside the same step in PyTorch with transformers.

Three models, float32, on this machine's CPU, AdamW over all parameters
(gradient clipping at 1.0, weight decay 0.01, lr 1e-4):

* `tiny demo`: configs/tiny.py's model (Whisper + BEATs + window Q-former +
  Qwen2-style LLM) on its own, since transformers has no counterpart;
* `Qwen2-Audio tiny` and `Qwen2-Audio ~100M`: the architecture both sides
  implement (Whisper encoder with padding mask and average pooling, one-Linear
  projector, Qwen2 LLM with a separate lm_head), built as our `ALMConfig` and as
  `transformers.Qwen2AudioForConditionalGeneration` from it
  (`hf_alm.alm_config_to_hf`), our random weights copied across. The encoder
  window is `2 * max_positions` mel frames on both sides (the HF encoder insists
  on exactly that many), so both encode the same padded windows with the same
  masks; the first-step losses are printed to show they compute the same thing.

Ours is `train.step.make_train_step` jitted as the trainer jits it (donated
params and optimizer state, one CPU device mesh) on a batch built to the
pipeline's batch contract (one clip per example, placeholder spans sized by
`audio_slots.num_audio_tokens`; PCM in, log-Mel computed inside the step).
The PyTorch step gets the same clips as log-Mel features computed up front
(what its data loader would hand it), `labels` masked to the answer tokens, and
runs zero_grad, forward + loss, backward, clip_grad_norm_ and AdamW.step.

Compilation (ours) and the first step (both) are excluded and printed apart.
Timed steps alternate between the two frameworks, with a pause between so
neither runtime's spinning worker threads slow the other; medians of
`--repeats`. MFU = FLOPs of the compiled step / median step time / the
measured float32 matmul peak (`flops.measured_peak_flops`, the best of one
measurement before and one after the timing). The FLOPs are
`alm_jax.roofline.roofline(compiled).flops`: the dots and convolutions of the
optimised program, each times the trip counts of the while loops around it.
XLA's cost analysis counts a while-loop body once, and here the scanned layers
(`scan_layers`) of the LLM, Whisper and BEATs and, on CPU, our blocked Whisper
attention (a `lax.map` over query blocks) are all loops, so its count is far
too low; it is printed beside the roofline count for comparison, as is
PyTorch's own FlopCounterMode count of one untimed step (matmuls and
convolutions only, like the roofline count; XLA's counts every op).

Setup (model init, one compilation per model, first steps) takes a minute or
two on 2 cores and each repeat some 20-30 s more, so the defaults should
finish in about 4-5 minutes on an idle 2-core CPU (longer under load).

  python benchmarks/train_step.py [--repeats 5] [--batch 4] [--tiny-batch 16] [--skip-100m]
"""

from __future__ import annotations

import _run_info  # noqa: E402  (benchmarks/_run_info.py: date, machine and load of the run)

import argparse
import dataclasses
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

PAUSE_S = 1.0  # between timed steps of different runtimes
PEAK_MATMUL = 2048  # n of the n x n float32 matmul whose speed is the peak
LR = 1e-4
# Token ids of the demo tokenizer's special tokens (alm_jax.data.templates.TINY_SPECIAL_TOKENS, in order); every
# model here uses the same layout, text tokens above them.
PAD, ENDOFTEXT, IM_START, IM_END, AUDIO_BOS, AUDIO, AUDIO_EOS = range(7)
FIRST_TEXT = 7

# Qwen2-Audio-shaped comparison models: encoder, LLM, window seconds, clip seconds range.
#   tiny: the demo's sizes (configs/tiny.py: its Whisper widths and layers, its LLM, its window), 128 mels.
#   100m: Whisper-base-sized encoder (512 x 6 layers), LLM 512 x 8 layers (FFN 3072, 8 heads / 2 kv heads),
#         vocab 32000, 10 s windows (500 positions; 1000 mel frames on both sides).
QWEN2_AUDIO_SIZES = {
    "tiny": dict(encoder="demo", llm="demo", window="demo", clip=(1.5, 3.0)),
    "100m": dict(encoder=dict(d_model=512, num_layers=6, num_heads=8, ffn_dim=2048),
                 llm=dict(vocab_size=32000, hidden_size=512, intermediate_size=3072, num_layers=8, num_heads=8,
                          num_kv_heads=2, rope_theta=1000000.0, max_position_embeddings=4096),
                 window=10.0, clip=(2.5, 5.0)),
}
N_MELS = 128  # Qwen2-Audio's front end
PROMPT_TOKENS = (8, 20)  # instruction text after the audio (inclusive range)
ANSWER_TOKENS = (16, 40)  # answer text the loss is on


def _parse() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--repeats", type=int, default=5, help="timed steps per implementation and model")
  parser.add_argument("--batch", type=int, default=4, help="examples per step of the ~100M models")
  parser.add_argument("--tiny-batch", type=int, default=0,
                      help="examples per step of the tiny models (default: configs/tiny.py data.batch_size)")
  parser.add_argument("--skip-100m", action="store_true", help="only the tiny models (a quick smoke run)")
  parser.add_argument("--seed", type=int, default=0)
  return parser.parse_args()


# ---------------------------------------------------------------------------
# Models and batches.


def qwen2_audio_config(size: str, demo: Any) -> Any:
  """Our `ALMConfig` of a Qwen2-Audio-shaped model (`QWEN2_AUDIO_SIZES[size]`; "demo": as the `demo` ALMConfig)."""
  from alm_jax.models.alm import ALMConfig, AudioConfig, BridgeConfig, FrontendConfig
  from alm_jax.models.llm import LLMConfig
  from alm_jax.models.projector import ProjectorConfig
  from alm_jax.models.whisper import CPU_ATTENTION_BLOCK, WhisperConfig

  size_cfg = QWEN2_AUDIO_SIZES[size]
  window = demo.audio.window_seconds if size_cfg["window"] == "demo" else size_cfg["window"]
  encoder = size_cfg["encoder"]
  if encoder == "demo":
    w = demo.whisper
    encoder = dict(d_model=w.d_model, num_layers=w.num_layers, num_heads=w.num_heads, ffn_dim=w.ffn_dim)
  # The CPU choices (this benchmark runs on the CPU): blocked Whisper attention, rfft one window at a time.
  whisper = WhisperConfig(n_mels=N_MELS, max_positions=round(window * 50), pool=True, mask_padding=True,
                          attention_block=CPU_ATTENTION_BLOCK, **encoder)
  if size_cfg["llm"] == "demo":
    llm = dataclasses.replace(demo.llm, tie_embeddings=False)  # neither HF class ties its head
  else:
    llm = LLMConfig(family="qwen2", tie_embeddings=False, **size_cfg["llm"])
  projector = ProjectorConfig(in_dim=whisper.d_model, out_dim=llm.hidden_size, num_layers=1)
  return ALMConfig(encoders=("whisper",), whisper=whisper, encoder_norm=False, trim_padding=True,
                   bridge=BridgeConfig(kind="mlp", mlp=projector), llm=llm,
                   audio=AudioConfig(window_seconds=window, max_windows=1),
                   frontend=FrontendConfig(method="fft", examples_per_step=1), audio_token_id=AUDIO)


def make_batch(cfg: Any, batch: int, clip_seconds: tuple[float, float], lengths: Callable[[int], int],
               rng: Any) -> dict[str, Any]:
  """A batch of the pipeline's contract: one clip per example, ChatML-like text, loss on the answer.

  Row: im_start, 2 text, audio_bos, n placeholders (n from `num_audio_tokens`), audio_eos, instruction,
  im_end, im_start, 2 text, answer, im_end. `lengths(longest)` picks the padded length L.
  """
  import numpy as np

  from alm_jax.data.batch_checks import check_audio_slots
  from alm_jax.models.audio_slots import num_audio_tokens

  spec = cfg.token_spec()
  vocab = cfg.llm.vocab_size
  text = lambda n: list(rng.integers(FIRST_TEXT, vocab, n))
  rows, masks, samples, pcm = [], [], [], []
  for _ in range(batch):
    n_samples = int(rng.uniform(*clip_seconds) * spec.sample_rate)
    t = np.arange(n_samples) / spec.sample_rate
    clip = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 2000) * t) + 0.05 * rng.normal(size=n_samples)
    placeholders = num_audio_tokens(n_samples, spec)
    prompt = ([IM_START] + text(2) + [AUDIO_BOS] + [AUDIO] * placeholders + [AUDIO_EOS]
              + text(int(rng.integers(PROMPT_TOKENS[0], PROMPT_TOKENS[1] + 1))) + [IM_END, IM_START] + text(2))
    answer = text(int(rng.integers(ANSWER_TOKENS[0], ANSWER_TOKENS[1] + 1))) + [IM_END]
    rows.append(prompt + answer)
    masks.append([0.0] * len(prompt) + [1.0] * len(answer))
    samples.append(n_samples)
    pcm.append(clip.astype(np.float32))
  length = lengths(max(len(r) for r in rows))
  out = {
      "tokens": np.full((batch, length), PAD, np.int32),
      "token_mask": np.zeros((batch, length), bool),
      "loss_mask": np.zeros((batch, length), np.float32),
      "audio": np.zeros((batch, 1, spec.window_samples), np.float32),  # one window slot per row, one clip
      "audio_samples": np.asarray(samples, np.int32)[:, None],
      "audio_clip": np.zeros((batch, 1), np.int32),
  }
  for i, (row, mask) in enumerate(zip(rows, masks)):
    out["tokens"][i, :len(row)] = row
    out["token_mask"][i, :len(row)] = True
    out["loss_mask"][i, :len(row)] = mask
    out["audio"][i, 0, :samples[i]] = pcm[i]
  check_audio_slots(out, spec, cfg.audio_token_id)
  return out


def describe_batch(batch: dict[str, Any], window: float) -> str:
  """`B x L tok, B clips a-b s in w s windows` for the table."""
  (rows, length), seconds = batch["tokens"].shape, batch["audio_samples"][:, 0] / 16000
  return f"{rows} x {length} tok, {rows} clips {seconds.min():.1f}-{seconds.max():.1f} s in {window:g} s windows"


# ---------------------------------------------------------------------------
# The two train steps.


class OurStep:
  """Our jitted train step (as `Trainer.compiled_train_step` builds it) on one model and batch."""

  def __init__(self, cfg: Any, batch: dict[str, Any], seed: int):
    import jax
    import jax.numpy as jnp

    from alm_jax import roofline
    from alm_jax import sharding as sharding_lib
    from alm_jax.models.alm import AudioLanguageModel
    from alm_jax.params import ParamLayout, count
    from alm_jax.train.optimizer import OptimizerConfig, abstract_opt_state, make_optimizer
    from alm_jax.train.program import BATCH_DTYPES, batch_spec_sharding
    from alm_jax.train.step import make_train_step

    self.cfg = cfg
    mesh_cfg = sharding_lib.MeshConfig()
    mesh, rules = sharding_lib.make_mesh(mesh_cfg, jax.devices()[:1]), mesh_cfg.logical_rules
    layout = ParamLayout(lambda rngs: AudioLanguageModel(cfg, rngs=rngs))
    params = layout.init(seed, mesh, rules)
    self.params_count = count(params)
    self.initial = {p: jax.device_get(v) for p, v in params.items()}  # for the torch copy (params get donated)
    opt_cfg = OptimizerConfig(learning_rate=LR, warmup_steps=0, decay="constant", weight_decay=0.01, grad_clip_norm=1.0)
    tx = make_optimizer(opt_cfg, layout.abstract, total_steps=1000)
    trainable_s = layout.shardings(mesh, rules)
    opt_target = abstract_opt_state(tx, layout.abstract_sharded(mesh, rules))
    opt_s = jax.tree.map(lambda a: a.sharding, opt_target)
    self.trainable, self.frozen = params, {}
    self.opt_state = jax.jit(tx.init, out_shardings=opt_s)(params)
    self.batch = {k: jax.device_put(jnp.asarray(v, BATCH_DTYPES[k]), batch_spec_sharding(k, v.ndim, mesh, rules))
                  for k, v in batch.items() if k in BATCH_DTYPES}
    self.tokens = int(batch["token_mask"].sum())
    batch_s = jax.tree.map(lambda x: x.sharding, self.batch)

    step = sharding_lib.bind_rules(make_train_step(layout, tx, jnp.float32), mesh, rules)
    jitted = jax.jit(step, in_shardings=(trainable_s, {}, opt_s, batch_s), out_shardings=(trainable_s, opt_s, None),
                     donate_argnums=(0, 2))
    start = time.perf_counter()
    self.compiled = jitted.lower(self.trainable, self.frozen, self.opt_state, self.batch).compile()
    self.compile_s = time.perf_counter() - start
    counted = roofline.roofline(self.compiled)  # dots and convolutions, loop trip counts included
    self.flops = counted.flops
    self.flops_xla = counted.cost_analysis_flops or 0.0  # XLA's cost analysis: each loop body once
    self.unknown_loops = len(counted.unknown_loops)
    start = time.perf_counter()
    self.first_loss = float(self.step()["loss"])
    self.first_step_s = time.perf_counter() - start

  def step(self) -> dict[str, Any]:
    import jax

    self.trainable, self.opt_state, metrics = self.compiled(self.trainable, self.frozen, self.opt_state, self.batch)
    return jax.block_until_ready((self.trainable, self.opt_state, metrics))[2]

  def front_end_s(self, repeats: int = 3) -> float:
    """Seconds of the log-Mel front end alone on this batch (it is inside our step, not in the torch one)."""
    import jax

    from alm_jax.audio import features

    mel = jax.jit(lambda pcm: features.whisper_log_mel(pcm, n_mels=self.cfg.whisper.n_mels, method="fft",
                                                             examples_per_step=1))
    mel(self.batch["audio"][:, 0]).block_until_ready()
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      mel(self.batch["audio"][:, 0]).block_until_ready()
      times.append(time.perf_counter() - start)
    return statistics.median(times)


class TorchStep:
  """The same model in transformers (our initial weights) and a PyTorch AdamW training step on the same batch."""

  def __init__(self, cfg: Any, batch: dict[str, Any], initial: dict[str, Any]):
    import jax
    import numpy as np
    import torch
    import transformers

    from alm_jax.audio import features
    from alm_jax.checkpoints import hf_alm, mapping

    self.torch = torch
    hf_config = transformers.Qwen2AudioConfig.from_dict(hf_alm.alm_config_to_hf(cfg, "qwen2-audio"))
    self.model = transformers.Qwen2AudioForConditionalGeneration(hf_config).train()
    names = hf_alm.name_map(cfg, "qwen2-audio", "modern")  # the in-memory module names
    state = {name: torch.tensor(array) for name, array in mapping.export_params(initial, names)}
    result = self.model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("inv_freq")]
    if missing or result.unexpected_keys:
      raise RuntimeError(f"weight copy: missing {missing[:4]}, unexpected {result.unexpected_keys[:4]}")
    self.params_count = sum(p.numel() for p in self.model.parameters())
    self.attention = hf_config.text_config._attn_implementation

    mel = jax.jit(lambda pcm: features.whisper_log_mel(pcm, n_mels=cfg.whisper.n_mels))(batch["audio"][:, 0])
    mel = np.asarray(mel).transpose(0, 2, 1)  # [W, n_mels, frames], HF's layout
    frame_mask = np.asarray(features.whisper_frame_mask(batch["audio_samples"][:, 0], mel.shape[-1]))
    labels = np.where((batch["loss_mask"] > 0) & batch["token_mask"], batch["tokens"], -100)
    self.inputs = dict(
        input_ids=torch.from_numpy(batch["tokens"].astype(np.int64)),
        attention_mask=torch.from_numpy(batch["token_mask"].astype(np.int64)),
        input_features=torch.from_numpy(np.ascontiguousarray(mel)),
        feature_attention_mask=torch.from_numpy(frame_mask.astype(np.int64)),
        labels=torch.from_numpy(labels.astype(np.int64)),
    )
    self.params = [p for p in self.model.parameters() if p.requires_grad]
    self.optimizer = torch.optim.AdamW(self.params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    start = time.perf_counter()
    self.first_loss = self.step()
    self.first_step_s = time.perf_counter() - start

  def step(self) -> float:
    self.optimizer.zero_grad(set_to_none=True)
    loss = self.model(**self.inputs).loss
    loss.backward()
    self.torch.nn.utils.clip_grad_norm_(self.params, 1.0)
    self.optimizer.step()
    return float(loss.detach())

  def counted_flops(self) -> float:
    """FLOPs of one (untimed) step by PyTorch's FlopCounterMode: matmuls and convolutions.

    Attention runs on the math backend here, as matmuls the counter sees (it has no formula for the CPU flash
    kernel the timed steps use).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel([SDPBackend.MATH]):
      self.step()
    return float(counter.get_total_flops())


# ---------------------------------------------------------------------------
# Timing.


def alternate(runners: dict[str, Callable[[], Any]], repeats: int, load: list[float]) -> dict[str, list[float]]:
  """Wall seconds of `repeats` calls of each runner, alternating between them with a pause before each."""
  times: dict[str, list[float]] = {name: [] for name in runners}
  for _ in range(repeats):
    for name, fn in runners.items():
      time.sleep(PAUSE_S)  # let the other runtime's worker threads stop spinning
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
    load.append(os.getloadavg()[0])
  return times


@dataclasses.dataclass
class Row:
  """One model's results."""

  name: str
  params: int
  batch: str
  tokens: int
  ours: OurStep
  ours_s: list[float]
  torch_s: list[float] | None = None
  torch_params: int = 0
  torch_flops: float = 0.0
  torch_first_s: float = 0.0
  torch_first_loss: float = float("nan")
  front_end_s: float = 0.0
  torch_attention: str = ""


def main() -> int:
  args = _parse()
  total_start = time.perf_counter()
  import jax
  import numpy as np
  import torch
  import transformers

  from alm_jax.run_config import load_run_config
  from alm_jax.train import flops as flops_lib

  tiny = load_run_config("configs/tiny.py")
  demo_cfg = dataclasses.replace(tiny.model, audio_token_id=AUDIO)
  tiny_batch = args.tiny_batch or tiny.data.batch_size
  rng = np.random.default_rng(args.seed)
  load = [os.getloadavg()[0]]
  # The peak is measured before and after the timing (bypassing measured_peak_flops' cache) and the best kept:
  # one best-of-5 measurement reads far low whenever other processes share the cores.
  peaks = [flops_lib.measured_peak_flops.__wrapped__(PEAK_MATMUL)]
  print(f"measured float32 matmul peak ({PEAK_MATMUL}^3): {peaks[0] / 1e9:.1f} GFLOP/s", flush=True)

  def bucket(longest: int) -> int:
    return next((b for b in tiny.data.length_buckets if b >= longest), -(-longest // 32) * 32)

  rows: list[Row] = []
  # The demo model on its own: its own batch size, length buckets and 1.5-3 s synthetic clips.
  batch = make_batch(demo_cfg, tiny_batch, (1.5, 3.0), bucket, rng)
  ours = OurStep(demo_cfg, batch, args.seed)
  print(f"tiny demo: {ours.params_count / 1e6:.2f}M params, compiled in {ours.compile_s:.1f} s", flush=True)
  times = alternate({"ours": ours.step}, args.repeats, load)
  rows.append(Row("tiny demo (Whisper+BEATs+Q-former)", ours.params_count,
                  describe_batch(batch, demo_cfg.audio.window_seconds), ours.tokens, ours, times["ours"]))

  sizes = [("tiny", tiny_batch)] + ([] if args.skip_100m else [("100m", args.batch)])
  for size, batch_size in sizes:
    cfg = qwen2_audio_config(size, tiny.model)
    batch = make_batch(cfg, batch_size, QWEN2_AUDIO_SIZES[size]["clip"], lambda n: -(-n // 32) * 32, rng)
    ours = OurStep(cfg, batch, args.seed)
    ref = TorchStep(cfg, batch, ours.initial)
    ours.initial = None
    print(f"Qwen2-Audio {size}: {ours.params_count / 1e6:.2f}M params, compiled in {ours.compile_s:.1f} s, "
          f"first-step loss ours {ours.first_loss:.5f} / torch {ref.first_loss:.5f}", flush=True)
    torch_flops = ref.counted_flops()
    times = alternate({"ours": ours.step, "torch": ref.step}, args.repeats, load)
    label = "Qwen2-Audio-shaped " + ("tiny" if size == "tiny" else "~100M")
    rows.append(Row(label, ours.params_count, describe_batch(batch, cfg.audio.window_seconds), ours.tokens, ours,
                    times["ours"], times["torch"], ref.params_count, torch_flops, ref.first_step_s, ref.first_loss,
                    ours.front_end_s(), ref.attention))
    del ref

  peaks.append(flops_lib.measured_peak_flops.__wrapped__(PEAK_MATMUL))
  peak = max(peaks)
  print(f"\nTrain step, float32, AdamW over all parameters, CPU ({os.cpu_count()} cores, jax {jax.__version__}, "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads (default), transformers "
        f"{transformers.__version__}); median of {args.repeats} alternating steps; measured matmul peak "
        f"{peak / 1e9:.1f} GFLOP/s (best of {' and '.join(f'{p / 1e9:.0f}' for p in peaks)}, before and after)\n")
  print("| model | params | batch | our step s | our tokens/s | our MFU | torch step s | ratio (torch/ours) |")
  print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
  for row in rows:
    ours_s = statistics.median(row.ours_s)
    mfu = row.ours.flops / ours_s / peak
    torch_s = statistics.median(row.torch_s) if row.torch_s else None
    torch_cells = f"{torch_s:.3f} | {torch_s / ours_s:.2f}x" if torch_s else "- | -"
    params = f"{row.params / 1e6:.1f}M"
    if row.torch_params not in (0, row.params):
      params += f" (torch {row.torch_params / 1e6:.1f}M)"
    print(f"| {row.name} | {params} | {row.batch} | {ours_s:.3f} | {row.tokens / ours_s:.0f} | "
          f"{mfu:.1%} | {torch_cells} |")

  print("\n| model | roofline GFLOP/step | XLA cost analysis | torch counted GFLOP | our compile s | "
        "our 1st step s | torch 1st step s | 1st-step loss ours / torch | our min-max s | torch min-max s |")
  print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | --- |")
  for row in rows:
    o, t = row.ours, row.torch_s
    cells = [
        f"{o.flops / 1e9:.1f}" + (f" ({o.unknown_loops} loops counted once)" if o.unknown_loops else ""),
        f"{o.flops_xla / 1e9:.1f}", f"{row.torch_flops / 1e9:.1f}" if t else "-",
        f"{o.compile_s:.1f}", f"{o.first_step_s:.2f}", f"{row.torch_first_s:.2f}" if t else "-",
        f"{o.first_loss:.5f} / " + (f"{row.torch_first_loss:.5f}" if t else "-"),
        f"{min(row.ours_s):.3f}-{max(row.ours_s):.3f}", f"{min(t):.3f}-{max(t):.3f}" if t else "-",
    ]
    print(f"| {row.name} | " + " | ".join(cells) + " |")

  print("\nNotes: tokens/s counts LLM tokens (text and audio placeholders, not padding). Our step computes the "
        "log-Mel features from PCM inside the step; the torch step gets them precomputed (our front end alone: "
        + ", ".join(f"{r.front_end_s * 1e3:.0f} ms for {r.name}" for r in rows if r.torch_s)
        + f"). transformers attention: {', '.join(sorted({r.torch_attention for r in rows if r.torch_s}))}. "
        "torch's FlopCounterMode counts matmuls and convolutions (attention included, counted on the math "
        "backend), as the roofline count does ours (dots and convolutions, loops times their trip counts); XLA's "
        "cost analysis counts every op but each loop body once. HF keeps the Whisper position table frozen, ours "
        "trains it.")
  print(f"1-min load average {min(load):.1f}-{max(load):.1f} (other processes share these cores); "
        f"whole run {time.perf_counter() - total_start:.0f} s.")
  return 0


if __name__ == "__main__":
  _run_info.stamp(__file__, "start")
  code = main()
  _run_info.stamp(__file__, "end")
  raise SystemExit(code)
