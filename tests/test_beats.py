"""BEATs encoder parity with the reference PyTorch code (speechbrain's port of microsoft/unilm BEATs).

The reference file `speechbrain/lobes/models/beats.py` is loaded on its own
(`pip install --no-deps speechbrain`) with its two unused imports stubbed
(torchaudio's Kaldi fbank, speechbrain's `length_to_mask`); its fbank step is
bypassed so both sides see the same features. Random weights go through a real
official-format `.pt` (`{"cfg", "model"}` with `weight_g`/`weight_v`), which
the reference itself loads.
"""

import contextlib
import functools
import importlib.util
import os
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from alm_jax.checkpoints import beats_pt, mapping
from alm_jax.config import ConfigError
from alm_jax.errors import CheckpointError
from alm_jax.models import beats
from alm_jax.models.audio_slots import AudioTokenSpec
from alm_jax.models.partitioning import LOGICAL_AXES

TOLERANCE = 1e-5  # max abs diff relative to the output scale: 10x tighter than the issue asks (we reach ~1e-6)

# iter3-like structure at a tiny width: DeepNorm, relative position bias with gates, k128/g16 pos conv.
ITER3_CFG = dict(
    input_patch_size=16, embed_dim=32, conv_bias=False, encoder_layers=3, encoder_embed_dim=48,
    encoder_ffn_embed_dim=72, encoder_attention_heads=6, activation_fn="gelu", layer_norm_first=False,
    deep_norm=True, conv_pos=128, conv_pos_groups=16, relative_position_embedding=True, num_buckets=320,
    max_distance=800, gru_rel_pos=True, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
    encoder_layerdrop=0.0, dropout_input=0.0, finetuned_model=True, predictor_class=5,
)
# The other switches: no gates, no DeepNorm, patch width = encoder width (no projection), conv bias, odd kernel.
PLAIN_CFG = dict(
    ITER3_CFG, embed_dim=48, conv_bias=True, deep_norm=False, gru_rel_pos=False, conv_pos=31, conv_pos_groups=4,
    encoder_layers=2, max_distance=1280, finetuned_model=False,
)


@contextlib.contextmanager
def _stubbed_modules(stubs: dict):
  saved = {name: sys.modules.get(name) for name in stubs}
  sys.modules.update(stubs)
  try:
    yield
  finally:
    for name, module in saved.items():
      if module is None:
        sys.modules.pop(name, None)
      else:
        sys.modules[name] = module


@functools.cache
def _reference_module():
  """speechbrain's BEATs port, loaded as a lone file (its package needs deps we do not install)."""
  spec = importlib.util.find_spec("speechbrain")
  if spec is None or spec.origin is None:
    pytest.skip("the reference needs `pip install --no-deps speechbrain`")
  path = os.path.join(os.path.dirname(spec.origin), "lobes", "models", "beats.py")

  def length_to_mask(length, max_len=None, dtype=None, device=None):
    return torch.arange(max_len)[None, :] < torch.round(length)[:, None]

  kaldi = types.ModuleType("torchaudio.compliance.kaldi")
  dataio = types.ModuleType("speechbrain.dataio.dataio")
  dataio.length_to_mask = length_to_mask
  stubs = {
      "torchaudio": types.ModuleType("torchaudio"),
      "torchaudio.compliance": types.ModuleType("torchaudio.compliance"),
      "torchaudio.compliance.kaldi": kaldi,
      "speechbrain": types.ModuleType("speechbrain"),
      "speechbrain.dataio": types.ModuleType("speechbrain.dataio"),
      "speechbrain.dataio.dataio": dataio,
  }
  stubs["torchaudio"].compliance = stubs["torchaudio.compliance"]
  stubs["torchaudio.compliance"].kaldi = kaldi
  with _stubbed_modules(stubs):
    module_spec = importlib.util.spec_from_file_location("reference_beats", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
  return module


def _write_official_pt(cfg: dict, path: str, seed: int) -> dict:
  """A random reference model saved as the official format: `{"cfg", "model"}`, old weight-norm names."""
  ref = _reference_module()
  original = ref.BEATsConfig
  ref.BEATsConfig = lambda _=None: original(cfg)
  try:
    model = ref.BEATs(ckp_path=None, freeze=True)
  finally:
    ref.BEATsConfig = original
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():  # every weight perturbed: norms, biases, gates, tables
      # Logits of std ~3 (peaked softmaxes), a position bias and gates that move them by O(1).
      strong = {"q_proj.weight": 0.25, "k_proj.weight": 0.25, "relative_attention_bias.weight": 1.5,
                "grep_linear.weight": 0.3}
      std = next((v for k, v in strong.items() if name.endswith(k)), None)
      if std is not None:
        p.copy_(torch.randn(p.shape, generator=gen) * std)
        continue
      p.add_(torch.randn(p.shape, generator=gen) * (0.2 if p.ndim == 1 else 0.5 * p.std().item() + 0.05))
  state = {}
  for name, tensor in model.state_dict().items():
    name = name.replace(".parametrizations.weight.original0", ".weight_g")
    name = name.replace(".parametrizations.weight.original1", ".weight_v")
    state[name] = tensor.clone()
  torch.save({"cfg": cfg, "model": state}, path)
  return state


def _reference_forward(path: str, fbank: np.ndarray, valid_frames: list[int]) -> np.ndarray:
  """The reference's `extract_features` from the `.pt` at `path`, fed our fbank (fbank step bypassed)."""
  model = _reference_module().BEATs(ckp_path=path, freeze=True)
  batch, frames, _ = fbank.shape
  features = torch.from_numpy(fbank)
  model.preprocess = lambda source, fbank_mean, fbank_std: features.clone()
  # One dummy "sample" per frame, so the reference's sample→frame mask reduction is the identity.
  wav_lens = torch.tensor([n / frames for n in valid_frames], dtype=torch.float64)
  with torch.inference_mode():
    out = model.extract_features(torch.zeros(batch, frames), wav_lens)
  return out[0].numpy()


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, fbank, mask):
  return nnx.merge(graphdef, state)(fbank, mask)


def _encode(model: beats.BeatsEncoder, fbank: np.ndarray, mask: np.ndarray | None):
  graphdef, state = nnx.split(model)
  tokens, valid = _forward(graphdef, state, jnp.asarray(fbank), None if mask is None else jnp.asarray(mask))
  return np.asarray(tokens), np.asarray(valid)


def _assert_close(ours: np.ndarray, ref: np.ndarray) -> float:
  assert ours.shape == ref.shape
  err = float(np.abs(ours - ref).max() / np.abs(ref).max())
  assert err <= TOLERANCE, f"max abs diff {err:.2e} of the output scale"
  return err


CASES = {
    # name: (cfg, fbank frames, valid frames per example)
    "iter3_30s": (ITER3_CFG, 2998, [2998, 1203]),
    "plain_5s": (PLAIN_CFG, 498, [498, 250]),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
  cfg, frames, valid_frames = CASES[request.param]
  path = str(tmp_path_factory.mktemp("beats") / "beats.pt")
  weights = _write_official_pt(cfg, path, seed=len(request.param))
  fbank = np.random.default_rng(0).normal(size=(len(valid_frames), frames, 128)).astype(np.float32)
  ref = _reference_forward(path, fbank, valid_frames)
  mask = np.arange(frames)[None, :] < np.asarray(valid_frames)[:, None]
  return dict(name=request.param, cfg=cfg, path=path, weights=weights, fbank=fbank, mask=mask,
              valid_frames=valid_frames, ref=ref)


def test_official_pt_import_matches_reference_with_padding(case):
  config, state = beats_pt.load_beats(case["path"])
  assert config.num_layers == case["cfg"]["encoder_layers"] and config.width == 48
  model = beats_pt.beats_model(config, state)
  tokens, valid = _encode(model, case["fbank"], case["mask"])
  _assert_close(tokens, case["ref"])
  steps = case["fbank"].shape[1] // 16
  assert tokens.shape == (2, steps * 8, 48) and valid.shape == (2, steps * 8)
  frames, frame_valid = model.time_frames(jnp.asarray(tokens), jnp.asarray(valid))
  assert frames.shape == (2, steps, 48)
  np.testing.assert_allclose(frames, tokens.reshape(2, steps, 8, 48).mean(2), atol=1e-6)
  spec = AudioTokenSpec(frame_source="beats")
  samples = [400 + 160 * (n - 1) for n in case["valid_frames"]]  # audio giving exactly n fbank frames
  assert np.asarray(frame_valid).sum(-1).tolist() == [spec.encoder_frames(n) for n in samples]


def test_unpadded_input_needs_no_mask(case):
  """Without a mask every token attends everywhere: compare the full-length example to the reference."""
  config, state = beats_pt.load_beats(case["path"])
  tokens, valid = _encode(beats_pt.beats_model(config, state), case["fbank"][:1], None)
  _assert_close(tokens, case["ref"][:1])
  assert valid.all()


@pytest.mark.parametrize("case", ["iter3_30s"], indirect=True)
def test_save_round_trips_through_reference(case, tmp_path):
  config, state = beats_pt.load_beats(case["path"])
  path = str(tmp_path / "again.pt")
  beats_pt.save_beats(config, state, path)
  again_config, again = beats_pt.load_beats(path)
  assert again_config == config
  for key, leaf in mapping.flat_paths(again).items():
    np.testing.assert_array_equal(leaf[...], mapping.flat_paths(state)[key][...])
  # The reference loads our file too (its predictor, which we do not keep, aside).
  saved = torch.load(path, weights_only=True)
  reference = case["weights"]
  for name, tensor in saved["model"].items():
    torch.testing.assert_close(tensor, reference[name], rtol=0, atol=0)
  assert set(reference) - set(saved["model"]) == {"predictor.weight", "predictor.bias"}


@pytest.mark.parametrize("case", ["plain_5s"], indirect=True)
def test_parametrization_names_are_accepted(case, tmp_path):
  checkpoint = torch.load(case["path"], weights_only=True)
  model = checkpoint["model"]
  model["encoder.pos_conv.0.parametrizations.weight.original0"] = model.pop("encoder.pos_conv.0.weight_g")
  model["encoder.pos_conv.0.parametrizations.weight.original1"] = model.pop("encoder.pos_conv.0.weight_v")
  torch.save(checkpoint, tmp_path / "sb.pt")
  _, state = beats_pt.load_beats(str(tmp_path / "sb.pt"))
  _, official = beats_pt.load_beats(case["path"])
  np.testing.assert_array_equal(state["pos_conv"]["weight_v"][...], official["pos_conv"]["weight_v"][...])


@pytest.mark.parametrize("case", ["plain_5s"], indirect=True)
def test_wrong_shape_is_one_line_error_naming_the_key(case, tmp_path):
  checkpoint = torch.load(case["path"], weights_only=True)
  checkpoint["model"]["encoder.layers.1.fc1.weight"] = checkpoint["model"]["encoder.layers.1.fc1.weight"][:, :-1]
  checkpoint["model"]["encoder.extra.weight"] = torch.zeros(2)
  torch.save(checkpoint, tmp_path / "bad.pt")
  with pytest.raises(CheckpointError) as info:
    beats_pt.load_beats(str(tmp_path / "bad.pt"))
  message = str(info.value)
  assert "\n" not in message and "2 mismatch(es)" in message
  assert "encoder.layers.1.fc1.weight: shape" in message and "does not fit layers/1/mlp/fc1/kernel" in message
  assert "encoder.extra.weight: unexpected tensor" in message
  torch.save({"model": {}}, tmp_path / "nocfg.pt")
  with pytest.raises(CheckpointError, match="not a BEATs checkpoint"):
    beats_pt.load_beats(str(tmp_path / "nocfg.pt"))


def test_relative_position_buckets_match_reference():
  ref = _reference_module()
  attn = ref.MultiheadAttention(12, 2, self_attention=True, has_relative_attention_bias=True, num_buckets=320,
                                max_distance=800)
  length = 1500
  rel = torch.arange(length)[None, :] - torch.arange(length)[:, None]
  want = attn._relative_positions_bucket(rel, bidirectional=True).numpy()
  np.testing.assert_array_equal(np.asarray(beats.relative_position_buckets(length, 320, 800)), want)


def test_config_from_official_cfg_and_validation():
  config = beats_pt.from_beats_cfg(dict(ITER3_CFG, encoder_layers=12, encoder_embed_dim=768,
                                        encoder_ffn_embed_dim=3072, encoder_attention_heads=12, embed_dim=512))
  assert config == beats.BeatsConfig()  # the dataclass defaults are the released iter3 shape
  assert config.deep_norm_alpha == pytest.approx(24**0.25)
  with pytest.raises(ConfigError, match="beats.layer_norm_first"):
    beats_pt.from_beats_cfg(dict(ITER3_CFG, layer_norm_first=True))
  with pytest.raises(ConfigError, match="beats.num_heads"):
    beats.BeatsConfig(width=48, num_heads=5, conv_pos_groups=4)


def test_params_carry_logical_axes():
  abstract = beats_pt.abstract_model(beats_pt.from_beats_cfg(ITER3_CFG))
  for path, leaf in mapping.flat_paths(abstract).items():
    axes = leaf.get_metadata()["out_sharding"]
    assert len(axes) == len(leaf.shape) and all(a is None or a in LOGICAL_AXES for a in axes), path
