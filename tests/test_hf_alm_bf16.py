"""bf16 inference parity: the tiny Qwen2-Audio and AF3 models of test_hf_alm.py, imported with `alm-jax import-hf`,
restored in bfloat16 (`load_bundle(run, dtype="bfloat16")`), against the same checkpoint loaded by transformers in
bfloat16 (`from_pretrained(folder, dtype=torch.bfloat16)`): logits within bf16 tolerance, the same greedy tokens,
and parameters that are bf16 on device without a float32 copy ever placed there. float32 parity is test_hf_alm.py.

The reference is `from_pretrained(..., dtype=bfloat16)`, not `model.to(torch.bfloat16)`: `.to` also rounds the
rotary `inv_freq` buffer to bf16 (from_pretrained keeps it float32, as we do), which puts transformers' own bf16
logits 0.07-0.20 of their scale from its float32 ones on these prompts (0.03-0.05 loaded with from_pretrained);
that is an artefact of the cast, not bf16 inference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from alm_jax.checkpoints.bundle import load_bundle
from alm_jax.cli import main as cli_main
from alm_jax.infer.alm_generate import ALMGenerator, user_prompt
from test_hf_alm import FAMILIES, PROMPTS, Setup, clips_of, hf_inputs, max_rel_error, reference

# Max |ours - theirs| over the logits' scale (max |theirs|), per prompt, both sides bf16. Measured (one clip / two
# clips / 45 s): qwen2-audio 0.032 / 0.031 / 0.032, af3 0.035 / 0.032 / 0.040. That is bf16 noise: our float32
# model against transformers' bf16 one is as far (0.033 / 0.032 / 0.033 and 0.049 / 0.049 / 0.049), because these
# models' sharp attention (q/k weights scaled up so audio matters) amplifies one-ulp roundings ~10x through two
# layers; whether the weights really are bf16 is checked by dtype below, not by this tolerance. Defects are far
# above the noise: every LLM RMSNorm without its scale gives 1.06 / 1.02 / 1.06 (qwen2-audio) and 0.85 / 0.85 / 0.85
# (af3); the Whisper final LayerNorm skipped 0.87 / 0.82 / 0.88 and 0.82 / 1.08 / 0.89; rotary frequencies rounded
# to bf16 (what `model.to(torch.bfloat16)` does to transformers) 0.15 / 0.08 / 0.11 and 0.04 / 0.08 / 0.21.
# 0.08 is twice the largest measured error, and every one of those defects exceeds it on some prompt.
REL_BF16 = 0.08
MAX_NEW_TOKENS = 32
BF16_MANTISSA_BITS = 7


@pytest.fixture(scope="module", params=list(FAMILIES))
def bf16(request, tmp_path_factory) -> Setup:
  """One family imported from transformers and restored in bf16; `ref` is transformers' bf16 model of the folder."""
  family = request.param
  root = tmp_path_factory.mktemp(family)
  src, run = str(root / "hf"), str(root / "run")
  _, tok = reference(family, src, seed=1 if family == "af3" else 0)  # as test_hf_alm's fixture
  assert cli_main(["import-hf", src, run]) == 0
  bundle = load_bundle(run, dtype="bfloat16")
  # Every prompt in one batch: one compiled forward and one generation program serve all three.
  generator = ALMGenerator(bundle, max_new_tokens=MAX_NEW_TOKENS, batch_size=len(PROMPTS), length_bucket=128)
  ref = FAMILIES[family]["model"].from_pretrained(src, dtype=torch.bfloat16).eval()
  return Setup(family, src, run, ref, tok, bundle, generator, {})


def _bf16_inputs(setup: Setup, clips: list[np.ndarray], text: str) -> dict:
  """The reference processors' inputs with the features in bf16 (AF3's encoder does not cast them itself)."""
  inputs = hf_inputs(setup.family, setup.tok, clips, text)
  inputs["input_features"] = inputs["input_features"].to(torch.bfloat16)
  return {k: v for k, v in inputs.items() if k != "counts"}


def test_parameters_are_restored_in_bf16_without_a_float32_copy_on_device(bf16, monkeypatch):
  """Every leaf is bf16, and every floating shard placed on a device during the restore already was: a 7B model
  must not pass through a float32 copy in device memory on its way to bf16."""
  params = bf16.bundle.params
  assert bf16.bundle.dtype == "bfloat16"
  assert {p for p, v in params.items() if v.dtype != jnp.bfloat16} == set()
  # Restore again, watching what goes onto devices: Orbax casts each shard on the host before placing it.
  placed = []
  real_put = jax.device_put

  def spy(x, *args, **kwargs):
    jax.tree.map(lambda a: placed.append((np.shape(a), np.dtype(getattr(a, "dtype", np.float32)))), x)
    return real_put(x, *args, **kwargs)

  monkeypatch.setattr(jax, "device_put", spy)
  again = load_bundle(bf16.run, dtype="bfloat16")
  monkeypatch.undo()
  assert len(placed) >= len(params)  # every parameter went through the spy
  floats = {str(d) for _, d in placed if np.issubdtype(d, np.floating) or d == jnp.bfloat16}
  assert floats == {"bfloat16"}, floats
  for path, value in again.params.items():
    np.testing.assert_array_equal(np.asarray(value, np.float32), np.asarray(params[path], np.float32), path)


def _prompts() -> list[tuple[str, list[np.ndarray], str]]:
  """(name, clips, text) of test_hf_alm's prompts, in order: one batch of them is one compiled program."""
  return [(name, *clips_of(name)) for name in PROMPTS]


def test_bf16_logits_match_transformers_bf16(bf16):
  """Logits of every prompt within `REL_BF16` of transformers' bf16 ones, the prompts tokenised alike."""
  prompts = _prompts()
  batch = bf16.generator.encode([user_prompt(text, clips) for _, clips, text in prompts])
  layout = bf16.bundle.layout
  arrays = {k: jnp.asarray(v) for k, v in batch.items() if k != "example_id"}
  logits = np.asarray(jax.jit(lambda params, b: layout.model(params)(b))(bf16.bundle.params, arrays))
  assert logits.dtype == np.float32  # bf16 head outputs, handed out as float32
  # The audio path computes in bf16 too: the float32 features enter the encoder rounded to its weights' dtype.
  audio = jax.eval_shape(lambda params, b: layout.model(params).audio_tokens(b["audio"], b["audio_samples"],
                                                                               b["audio_clip"]),
                         bf16.bundle.params, arrays)
  assert arrays["audio"].dtype == jnp.float32 and audio[0].dtype == jnp.bfloat16
  for row, (name, clips, text) in enumerate(prompts):
    inputs = _bf16_inputs(bf16, clips, text)
    n = int(batch["token_mask"][row].sum())
    assert batch["tokens"][row, :n].tolist() == inputs["input_ids"][0].tolist()
    with torch.inference_mode():
      theirs = bf16.ref(**inputs).logits[0].float().numpy()
    ours = logits[row, :n]
    err = max_rel_error(ours, theirs)
    agree = float(np.mean(ours.argmax(-1) == theirs.argmax(-1)))
    print(f"{bf16.family} {name}: bf16 max relative logits error {err:.3e}, argmax agrees at {agree:.3f}")
    assert err <= REL_BF16, f"{name}: max error {err:.3g} of the logits' scale"


def _tied(logits: np.ndarray) -> set[int]:
  """Tokens whose bf16 logit is within one bf16 ulp of the largest: greedy's choice among them is rounding."""
  top = float(logits.max())
  ulp = 2.0 ** (np.floor(np.log2(abs(top))) - BF16_MANTISSA_BITS)
  return set(np.flatnonzero(logits >= top - ulp).tolist())


def test_bf16_greedy_generation_matches_transformers_bf16(bf16):
  """The same greedy tokens on every prompt, up to the first step where transformers' bf16 logits hold a tie.

  Logits of scale ~3 are bf16 multiples of 1/64, so over a 320-token vocabulary ties (equal or adjacent bf16
  values) come up: transformers takes the lowest tied id, we take whichever our own last roundings favour, and
  from there the continuations differ. Measured: qwen2-audio two clips and 45 s, af3 two clips (15 tokens to its
  stop) and 45 s identical; qwen2-audio one clip first differs at token 19 (0-based), where transformers' bf16
  logits of ids 0, 31 and 194 are equal (float32 prefers 31 by 0.010, under the ulp of 1/64): transformers says 0,
  we and float32 say 31; af3 one clip first differs at token 19, ids 2 and 247 one ulp apart (we 2, it 247). So a
  differing step must be such a tie, with both tokens among the tied.
  """
  prompts = _prompts()
  answers = bf16.generator.generate_ids([user_prompt(text, clips) for _, clips, text in prompts])
  stops = bf16.generator.stop_tokens
  for (name, clips, text), ours in zip(prompts, answers):
    inputs = _bf16_inputs(bf16, clips, text)
    with torch.inference_mode():
      out = bf16.ref.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, eos_token_id=stops,
                              pad_token_id=bf16.tok.token_to_id("<|endoftext|>"), output_logits=True,
                              return_dict_in_generate=True)
    theirs = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    if theirs and theirs[-1] in stops:
      theirs = theirs[:-1]
    assert len(theirs) >= 8
    first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    if first is None:
      print(f"{bf16.family} {name}: {len(ours)} identical bf16 greedy tokens")
      assert ours == theirs
      continue
    tied = _tied(out.logits[first][0].float().numpy())
    print(f"{bf16.family} {name}: bf16 greedy tokens first differ at {first}: ours {ours[first]}, transformers "
          f"{theirs[first]}, tied there {sorted(tied)}")
    assert ours[:first] == theirs[:first]
    assert theirs[first] in tied and ours[first] in tied and len(tied) > 1
