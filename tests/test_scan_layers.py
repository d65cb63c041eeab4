"""Scanned layers (`scan_layers=True`, the default) equal the unrolled loop, for every tower, and compile to one
layer body whatever the depth."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alm_jax.checkpoints import mapping
from alm_jax.models.beats import BeatsConfig, BeatsEncoder
from alm_jax.models.llm import LLM, LLMConfig
from alm_jax.models.whisper import WhisperConfig, WhisperEncoder

LLM_CFG = LLMConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                    qk_norm=True, lora_rank=2, lora_targets=("q", "down"), remat="full")
WHISPER_CFG = WhisperConfig(n_mels=16, d_model=32, num_layers=2, num_heads=4, ffn_dim=64, max_positions=16,
                            mask_padding=True)
BEATS_CFG = BeatsConfig(n_mels=32, patch_size=16, patch_dim=16, width=32, num_layers=2, num_heads=4, ffn_dim=64,
                        conv_pos=4, conv_pos_groups=2, num_buckets=8, max_distance=16)


def _llm_loss(model, x):
  logits, _ = model(x, mask=jnp.arange(x.shape[1])[None, :] < jnp.array([[6], [4]]))
  return jnp.mean(jax.nn.logsumexp(logits, -1)), logits


def _encoder_loss(model, x):
  mask = jnp.arange(x.shape[1])[None, :] < jnp.array([[x.shape[1]], [x.shape[1] // 2]])
  hidden, valid = model(x, mask)
  return jnp.sum(jnp.where(valid[..., None], hidden, 0.0) ** 2) / hidden.size, hidden


CASES = {
    "llm": (lambda cfg: LLM(cfg, rngs=nnx.Rngs(0)), LLM_CFG, lambda: jnp.arange(12, dtype=jnp.int32).reshape(2, 6),
            _llm_loss),
    "whisper": (lambda cfg: WhisperEncoder(cfg, rngs=nnx.Rngs(0)), WHISPER_CFG,
                lambda: jax.random.normal(jax.random.key(1), (2, 24, 16)), _encoder_loss),
    "beats": (lambda cfg: BeatsEncoder(cfg, rngs=nnx.Rngs(0)), BEATS_CFG,
              lambda: jax.random.normal(jax.random.key(2), (2, 48, 32)), _encoder_loss),
}


def _stacked_from(unrolled: dict, stacked_targets: dict) -> dict:
  """The unrolled model's weights in the stacked layout (what checkpoint import does)."""
  out = {}
  for path, entry in mapping.layer_view(stacked_targets).items():
    value = np.asarray(unrolled[path][...])
    if entry.index is None:
      out[entry.path] = value
    else:
      out.setdefault(entry.path, np.zeros(stacked_targets[entry.path].shape, value.dtype))[entry.index] = value
  return out


def _with(model: nnx.Module, flat: dict) -> tuple[nnx.GraphDef, nnx.State]:
  graphdef, state = nnx.split(model)
  leaves = [(k, v.replace(jnp.asarray(flat["/".join(map(str, k))]))) for k, v in nnx.to_flat_state(state)]
  return graphdef, nnx.from_flat_state(leaves)


@pytest.mark.parametrize("tower", sorted(CASES))
def test_scanned_tower_equals_the_unrolled_loop_in_value_and_gradient(tower):
  build, cfg, inputs, loss = CASES[tower]
  unrolled = build(dataclasses.replace(cfg, scan_layers=False))
  rng = np.random.default_rng(0)
  flat = {p: rng.normal(size=v.shape).astype(np.float32) * 0.2 for p, v in mapping.flat_paths(unrolled).items()}
  stacked = build(dataclasses.replace(cfg, scan_layers=True))
  assert any(v.shape[:1] == (cfg.num_layers,) and "/" in p for p, v in mapping.flat_paths(stacked).items())
  x = inputs()
  results = []
  for model, params in ((unrolled, flat), (stacked, _stacked_from(flat, mapping.flat_paths(stacked)))):
    graphdef, state = _with(model, params)
    (value, out), grads = jax.jit(jax.value_and_grad(lambda s: loss(nnx.merge(graphdef, s), x), has_aux=True))(state)
    results.append((value, out, {p: np.asarray(g[...]) for p, g in mapping.flat_paths(grads).items()}))
  (want_v, want_out, want_g), (v, out, g) = results
  np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(v, want_v, rtol=1e-6)
  for path, entry in mapping.layer_view(g).items():
    got = g[entry.path] if entry.index is None else g[entry.path][entry.index]
    np.testing.assert_allclose(got, want_g[path], rtol=1e-4, atol=1e-6, err_msg=path)


def _compiled_text(num_layers: int, scan: bool) -> str:
  cfg = dataclasses.replace(LLM_CFG, num_layers=num_layers, scan_layers=scan, lora_rank=0)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: LLM(cfg, rngs=nnx.Rngs(0))))
  step = jax.jit(lambda s, x: _llm_loss(nnx.merge(graphdef, s), x)[0])
  return step.lower(state, jax.ShapeDtypeStruct((2, 6), jnp.int32)).compile().as_text()


def test_scanned_program_has_one_layer_body_whatever_the_depth():
  """The reason to scan: 1 and 6 layers compile to programs of nearly the same size, run by a while loop;
  unrolled, the program grows with every layer."""
  scanned = [_compiled_text(n, True) for n in (1, 6)]
  unrolled = [len(_compiled_text(n, False)) for n in (1, 6)]
  assert "while" in scanned[1] and "known_trip_count" in scanned[1]
  scanned = [len(text) for text in scanned]
  assert scanned[1] < 1.3 * scanned[0]  # measured 1.15x (86,882 → 99,854 characters)
  assert unrolled[1] > 3 * unrolled[0]  # measured 3.8x (76,199 → 290,547)


def test_a_whisper_without_layers_has_no_zero_size_parameters_and_saves(tmp_path):
  """Zero layers (the demo's Whisper front end; the other towers need one) is an empty list in both
  forms: a zero-size stacked parameter could not be saved by Orbax."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  build, cfg, make_input, loss = CASES["whisper"]
  model = build(dataclasses.replace(cfg, num_layers=0, scan_layers=True))
  flat = mapping.flat_paths(model)
  assert flat and all(np.size(v) for v in flat.values())
  assert not any("layers" in p.split("/") for p in flat)
  loss(model, make_input())
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / "ckpt", nnx.state(model))
