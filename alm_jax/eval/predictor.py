"""A checkpoint as an evaluation `Predictor`: items → prompts with their audio → answers."""

from __future__ import annotations

from typing import Sequence

from alm_jax.audio.io import load_audio
from alm_jax.eval.items import EvalItem
from alm_jax.infer.alm_generate import ALMGenerator, user_prompt


class ALMPredictor:
  """Answers `EvalItem`s with an `ALMGenerator` (one batched call per `predict`)."""

  def __init__(self, generator: ALMGenerator):
    self.generator = generator
    self.sample_rate = generator.spec.sample_rate
    self.group = generator.group  # which items this process answers (`runner.predict_share`)

  def predict(self, items: Sequence[EvalItem]) -> list[str]:
    prompts = [user_prompt(item.prompt, [load_audio(p, sample_rate=self.sample_rate) for p in item.audio])
               for item in items]
    return self.generator(prompts)
