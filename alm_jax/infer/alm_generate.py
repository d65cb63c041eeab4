"""Answering prompts about audio: prompt batches → one jitted program (features →
encoders → bridge → splice → prefill → while-loop decode) → text.

Prompts are tokenised with the model family's chat template and the same
placeholder counts as training (`audio_slots`), batched to fixed shapes
(batch, token-length bucket, window bucket) so a handful of programs serve any
number of prompts.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Sequence

import jax
import numpy as np

from jax.sharding import NamedSharding, PartitionSpec

from alm_jax import distributed
from alm_jax import sharding as sharding_lib
from alm_jax.checkpoints.bundle import ModelBundle
from alm_jax.data.batch_checks import check_audio_slots
from alm_jax.data.examples import cut_windows
from alm_jax.data.pipeline import collate
from alm_jax.errors import DataError
from alm_jax.infer import placement
from alm_jax.infer.generate import GenerateOutput, bucket_length, decode
from alm_jax.infer.sampling import SamplingConfig
from alm_jax.models.audio_slots import num_audio_tokens
from alm_jax.models.partitioning import logical_to_spec
from alm_jax.params import ParamLayout


@dataclasses.dataclass(frozen=True)
class Prompt:
  """A conversation so far (ending with a user turn) and its clips' PCM in order (16 kHz float32)."""

  messages: tuple[Mapping[str, str], ...]
  audio: tuple[np.ndarray, ...] = ()


def user_prompt(text: str, audio: Sequence[np.ndarray] = ()) -> Prompt:
  """A single-turn prompt; clips without `<audio N>` markers go at the start of the turn."""
  return Prompt(({"role": "user", "content": text},), tuple(audio))


def generate_fn(layout: ParamLayout, *, max_new_tokens: int, sampling: SamplingConfig = SamplingConfig(),
                pad_id: int = 0) -> Callable:
  """The generation program for one shape bucket: `fn(params, batch, seed, stops) -> GenerateOutput`.

  params: the layout's flat parameters (any float dtype: the model computes in theirs); batch: a
  collated batch (`tokens`, `token_mask`, `audio`, `audio_samples`, `audio_clip`); seed: int32 [2]
  (seed, call number) for the sampling key; stops: int32 [N] stop ids padded with -1. Features,
  encoders, bridge, splice, prefill and the while-loop decode are one program; `ALMGenerator` jits it
  over its mesh and `alm-jax compile --mode generate` compiles the same function for a pod.
  """

  def answer(params, batch, seed, stops):
    model = layout.model(params)
    embeddings = model.input_embeddings(batch)
    key = jax.random.fold_in(jax.random.key(seed[0]), seed[1])
    return decode(model.llm, embeddings=embeddings, mask=batch["token_mask"], key=key,
                  max_new_tokens=max_new_tokens, sampling=sampling, stop_tokens=stops, pad_id=pad_id)

  return answer


class ALMGenerator:
  """Batched, jitted generation for a loaded `ModelBundle`, over the bundle's mesh.

  Each call answers up to `batch_size` prompts of this process. The prompts of every process (of every
  `BatchGroup`: processes holding the same batch rows supply the same prompts) form one global batch
  split over the mesh's batch axes, the weights and KV cache split as the rules say, so every device
  of every host works on each call; all processes must call together (`alm-jax eval` does, in lockstep).
  """

  def __init__(self, bundle: ModelBundle, *, max_new_tokens: int = 64, sampling: SamplingConfig = SamplingConfig(),
               batch_size: int = 8, length_bucket: int = 64, seed: int = 0):
    self.bundle = bundle
    self.spec = bundle.config.token_spec()
    self.tokenizer = bundle.tokenizer
    self.max_new_tokens = int(max_new_tokens)
    self.sampling = sampling
    self.batch_size = int(batch_size)
    self.length_bucket = int(length_bucket)
    self.seed = int(seed)
    self._calls = 0
    stops = {t for t in (self.tokenizer.end_of_turn_id, self.tokenizer.eos_id) if t is not None}
    stops |= set(bundle.config.llm.eos_token_ids)
    self.stop_tokens = sorted(stops)
    mesh, rules = bundle.mesh, bundle.rules
    if mesh is None or rules is None:
      raise ValueError("the bundle has no mesh: load it with checkpoints.bundle.load_bundle")
    self.group = placement.batch_group(mesh, rules)
    local_shards = sharding_lib.batch_shard_count(mesh, rules) // self.group.count
    # Rows this process supplies per call: the batch size rounded up to fill its devices' batch shards.
    self.rows = bucket_length(self.batch_size, local_shards)
    self.global_rows = self.rows * self.group.count
    fn = generate_fn(bundle.layout, max_new_tokens=self.max_new_tokens, sampling=sampling,
                     pad_id=self.tokenizer.pad_id)
    replicated = NamedSharding(mesh, PartitionSpec())
    rows = NamedSharding(mesh, logical_to_spec(("batch", None), rules))
    self._answer = jax.jit(sharding_lib.bind_rules(fn, mesh, rules),
                           in_shardings=({p: v.sharding for p, v in bundle.params.items()}, None, replicated,
                                         replicated),
                           out_shardings=GenerateOutput(rows, NamedSharding(mesh, logical_to_spec(("batch",), rules))))
    self._replicated = replicated

  def encode(self, prompts: Sequence[Prompt]) -> dict[str, np.ndarray]:
    """Tokenises and windows up to `batch_size` prompts into one padded batch."""
    if len(prompts) > self.batch_size:
      raise ValueError(f"{len(prompts)} prompts exceed the batch size {self.batch_size}")
    if not prompts:
      raise ValueError("no prompts to encode")
    examples = []
    limit = self.spec.max_windows * self.spec.window_samples
    for i, prompt in enumerate(prompts):
      pcms = [np.asarray(p, np.float32)[:limit] for p in prompt.audio]
      counts = [num_audio_tokens(p.size, self.spec) for p in pcms]
      segments = self.tokenizer.render(list(prompt.messages), counts, add_generation_prompt=True)
      tokens, loss_mask, _ = self.tokenizer.encode_segments(segments)
      order = [s.clip for s in segments if s.kind == "audio"]
      examples.append({"status": "ok", "pos": i, "id": i, "tokens": tokens, "loss_mask": loss_mask,
                       **cut_windows(pcms, order, self.spec), "clips": len(order)})
    length = bucket_length(max(e["tokens"].size for e in examples), self.length_bucket)
    windows = max(len(e["window_samples"]) for e in examples)
    windows = 1 << max(0, windows - 1).bit_length()  # window slots per row: a power-of-two bucket
    if jax.process_count() > 1:  # one global batch: every process pads to the largest shapes of any
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

      shapes = np.asarray(multihost_utils.process_allgather(np.asarray([length, windows], np.int32)))
      length, windows = (int(v) for v in shapes.reshape(-1, 2).max(axis=0))
    batch = collate(examples, self.rows, length, windows, self.spec, self.tokenizer.pad_id)
    check_audio_slots(batch, self.spec, self.bundle.config.audio_token_id)
    return batch

  def generate_ids(self, prompts: Sequence[Prompt]) -> list[list[int]]:
    """Generated token ids per prompt of this process (stop token removed)."""
    batch = self.encode(prompts)
    batch.pop("example_id", None)
    mesh, rules = self.bundle.mesh, self.bundle.rules
    batch = distributed.global_batch(batch, mesh, rules, global_batch_size=self.global_rows)
    seed = np.asarray([self.seed, self._calls], np.int32)
    self._calls += 1
    stops = np.asarray(self.stop_tokens + [-1] * (8 - len(self.stop_tokens) % 8), np.int32)
    seed, stops = (jax.make_array_from_process_local_data(self._replicated, x) for x in (seed, stops))
    out = self._answer(self.bundle.params, batch, seed, stops)
    tokens, lengths = placement.local_rows(out.tokens), placement.local_rows(out.lengths)
    results = []
    for row in range(len(prompts)):
      ids = [int(t) for t in tokens[row, : lengths[row]]]
      if ids and ids[-1] in self.stop_tokens:
        ids = ids[:-1]
      results.append(ids)
    return results

  def __call__(self, prompts: Sequence[Prompt]) -> list[str]:
    """Answers, one string per prompt (any number of prompts, batched)."""
    answers = []
    for start in range(0, len(prompts), self.batch_size):
      chunk = prompts[start : start + self.batch_size]
      answers += [self.tokenizer.decode(ids).strip() for ids in self.generate_ids(chunk)]
    return answers


def check_prompt_audio(prompt: Prompt) -> None:
  """Raises `DataError` for a prompt without any clip (the model needs audio)."""
  if not prompt.audio:
    raise DataError("a prompt needs at least one audio clip")
