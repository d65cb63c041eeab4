"""Whisper encoder parity with transformers (float32, random weights, real file formats).

A small random `transformers.WhisperModel` with an unusual shape (3 layers,
6 heads, width 48, FFN 80) is saved with `save_pretrained` (or as an
openai-whisper `.pt`), imported, and compared on 30 s log-Mel windows from
`WhisperFeatureExtractor`; the pooled + padding-masked variant is compared with
`Qwen2AudioEncoder` / `AudioFlamingo3Encoder` holding the same weights.
"""

import functools
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from alm_jax.checkpoints import mapping
from alm_jax.checkpoints import whisper as ckpt
from alm_jax.config import ConfigError, from_dict
from alm_jax.errors import CheckpointError
from alm_jax.models import attention, whisper
from alm_jax.models.audio_slots import AudioTokenSpec
from alm_jax.models.partitioning import LOGICAL_AXES

SAMPLES = (480_000, 117_123)  # one full 30 s window, one 7.3 s clip padded to 30 s
TOLERANCE = 1e-5  # max abs diff relative to the output scale: 10x tighter than the issue asks (we reach ~1e-6)


def _hf_config(n_mels: int, positions: int = 1500) -> transformers.WhisperConfig:
  return transformers.WhisperConfig(
      num_mel_bins=n_mels,
      d_model=48,
      encoder_layers=3,
      encoder_attention_heads=6,
      encoder_ffn_dim=80,
      decoder_layers=1,
      decoder_attention_heads=6,
      decoder_ffn_dim=32,
      vocab_size=128,
      max_source_positions=positions,
      max_target_positions=16,
      pad_token_id=0,
      bos_token_id=1,
      eos_token_id=2,
      decoder_start_token_id=1,
      suppress_tokens=None,
      begin_suppress_tokens=None,
  )


def _randomize(module: torch.nn.Module, seed: int) -> None:
  """Perturbs every parameter (norm scales and biases too) so no detail hides behind 1s and 0s.

  Query and key weights get std 0.25 so attention logits have std ~3: peaked
  softmaxes, where a wrong scale or mask shows.
  """
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if re.search(r"(q|k)_proj\.weight$", name):
        p.copy_(torch.randn(p.shape, generator=gen) * 0.25)
        continue
      scale = 0.2 if p.ndim == 1 else 0.5 * p.std().item() + 0.02
      p.add_(torch.randn(p.shape, generator=gen) * scale)


def _hf_model(n_mels: int, seed: int) -> transformers.WhisperModel:
  torch.manual_seed(seed)
  model = transformers.WhisperModel(_hf_config(n_mels)).eval()
  _randomize(model.encoder, seed)
  return model


def _features(n_mels: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """`(input_features [B, n_mels, 3000], frame attention mask [B, 3000])` of random audio."""
  rng = np.random.default_rng(seed)
  audio = [rng.normal(scale=0.1, size=n).astype(np.float32) for n in SAMPLES]
  extractor = transformers.WhisperFeatureExtractor(feature_size=n_mels)
  out = extractor(audio, sampling_rate=16000, return_attention_mask=True, return_tensors="np")
  return out["input_features"].astype(np.float32), out["attention_mask"].astype(bool)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, mel, mask):
  return nnx.merge(graphdef, state)(mel, mask)


def _encode(model: whisper.WhisperEncoder, mel: np.ndarray, mask: np.ndarray | None = None):
  """Runs our encoder jitted on `[B, n_mels, T]` HF-layout features."""
  graphdef, state = nnx.split(model)
  mel = jnp.asarray(mel).transpose(0, 2, 1)
  hidden, valid = _forward(graphdef, state, mel, None if mask is None else jnp.asarray(mask))
  return np.asarray(hidden), np.asarray(valid)


def _assert_close(ours: np.ndarray, ref: np.ndarray) -> float:
  assert ours.shape == ref.shape
  err = float(np.abs(ours - ref).max() / np.abs(ref).max())
  assert err <= TOLERANCE, f"max abs diff {err:.2e} of the output scale"
  return err


@pytest.fixture(scope="module", params=[80, 128], ids=["80mel", "128mel"])
def saved(request, tmp_path_factory):
  """A random HF WhisperModel saved with `save_pretrained`, its features and our import."""
  n_mels = request.param
  model = _hf_model(n_mels, seed=n_mels)
  folder = tmp_path_factory.mktemp(f"whisper{n_mels}")
  model.save_pretrained(folder)
  features, frame_mask = _features(n_mels)
  with torch.inference_mode():
    ref = model.encoder(torch.from_numpy(features)).last_hidden_state.numpy()
  config, state = ckpt.load_whisper_hf(str(folder))
  return dict(hf=model, folder=folder, features=features, mask=frame_mask, ref=ref, config=config, state=state)


def test_hf_folder_import_matches_transformers_on_30s(saved):
  config = saved["config"]
  assert (config.n_mels, config.d_model, config.num_layers, config.num_heads, config.ffn_dim) == (
      saved["features"].shape[1], 48, 3, 6, 80)
  assert not config.pool and not config.mask_padding
  model = ckpt.whisper_model(config, saved["state"])
  hidden, valid = _encode(model, saved["features"])
  _assert_close(hidden, saved["ref"])
  assert valid.shape == (2, 1500) and valid.all()


def test_frame_mask_gives_valid_counts_and_leaves_plain_whisper_unmasked(saved):
  model = ckpt.whisper_model(saved["config"], saved["state"])
  hidden, valid = _encode(model, saved["features"], saved["mask"])
  _assert_close(hidden, saved["ref"])  # plain Whisper attends to padding, as the reference does
  spec = AudioTokenSpec(frame_source="whisper")
  assert valid.sum(-1).tolist() == [spec.encoder_frames(n) for n in SAMPLES] == [1500, 367]
  assert all(v[: int(v.sum())].all() for v in valid)  # valid frames form a prefix


def _pooled_reference(kind: str, hf: transformers.WhisperModel, features: np.ndarray, frame_mask: np.ndarray):
  """Qwen2-Audio / AF3 encoder output, with the encoder weights of `hf`, padding masked as those models do."""
  if kind == "qwen2_audio":
    cfg = transformers.Qwen2AudioEncoderConfig(**{k: getattr(hf.config, k) for k in (
        "num_mel_bins", "d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim",
        "max_source_positions")})
    encoder = transformers.Qwen2AudioEncoder(cfg).eval()
  else:
    cfg = transformers.AudioFlamingo3EncoderConfig(**{k: getattr(hf.config, k) for k in (
        "num_mel_bins", "d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim",
        "max_source_positions")})
    encoder = transformers.AudioFlamingo3Encoder(cfg).eval()
  missing, unexpected = encoder.load_state_dict(hf.encoder.state_dict(), strict=False)
  assert not missing and not unexpected
  feats, mask = torch.from_numpy(features), torch.from_numpy(frame_mask).long()
  with torch.inference_mode():
    if kind == "qwen2_audio":  # as Qwen2AudioForConditionalGeneration builds the encoder's mask
      lengths, _ = encoder._get_feat_extract_output_lengths(mask.sum(-1))
      frames = (features.shape[-1] - 2) // 2 + 1
      mask_2d = (torch.arange(frames)[None, :] < lengths[:, None]).long()
      attn = transformers.masking_utils.create_bidirectional_mask(
          config=encoder.config, inputs_embeds=torch.zeros(len(feats), frames, 1), attention_mask=mask_2d)
      return encoder(feats, attention_mask=attn).last_hidden_state.numpy()
    return encoder(feats, input_features_mask=mask).last_hidden_state.numpy()


@pytest.mark.parametrize("saved", [128], ids=["128mel"], indirect=True)  # Qwen2-Audio and AF3 use 128 bins
@pytest.mark.parametrize("kind", ["qwen2_audio", "audioflamingo3"])
def test_pooled_masked_variant_matches_hf_encoders(saved, kind):
  ref = _pooled_reference(kind, saved["hf"], saved["features"], saved["mask"])
  config = from_dict(whisper.WhisperConfig, {**vars(saved["config"]), "pool": True, "mask_padding": True})
  hidden, valid = _encode(ckpt.whisper_model(config, saved["state"]), saved["features"], saved["mask"])
  _assert_close(hidden, ref)
  spec = AudioTokenSpec(frame_source="whisper", pool=True)
  assert valid.shape == (2, 750)
  assert valid.sum(-1).tolist() == [spec.encoder_frames(n) for n in SAMPLES] == [750, 183]
  # Without the padding mask the clip's real frames would differ: the mask matters.
  unmasked = from_dict(whisper.WhisperConfig, {**vars(config), "mask_padding": False})
  hidden_unmasked, _ = _encode(ckpt.whisper_model(unmasked, saved["state"]), saved["features"], saved["mask"])
  assert np.abs(hidden_unmasked[1, :183] - ref[1, :183]).max() > 100 * TOLERANCE * np.abs(ref).max()


def test_shorter_window_uses_first_rows_of_position_table(saved):
  """1000 mel frames (10 s) vs a reference built for 500 positions with the table's first rows."""
  hf = saved["hf"]
  short = transformers.models.whisper.modeling_whisper.WhisperEncoder(
      _hf_config(hf.config.num_mel_bins, positions=500)).eval()
  weights = hf.encoder.state_dict()
  weights["embed_positions.weight"] = weights["embed_positions.weight"][:500]
  short.load_state_dict(weights)
  features = saved["features"][:, :, :1000]
  with torch.inference_mode():
    ref = short(torch.from_numpy(features)).last_hidden_state.numpy()
  hidden, valid = _encode(ckpt.whisper_model(saved["config"], saved["state"]), features)
  _assert_close(hidden, ref)
  assert valid.shape == (2, 500)


def _openai_state_dict(hf: transformers.WhisperModel) -> dict:
  """The HF weights under openai-whisper names (as openai's AudioEncoder/TextDecoder register them)."""
  renames = [
      (r"^embed_positions\.weight$", "positional_embedding"),
      (r"^layer_norm\.", "ln_post."),
      (r"^layers\.(\d+)\.self_attn\.q_proj\.", r"blocks.\1.attn.query."),
      (r"^layers\.(\d+)\.self_attn\.k_proj\.", r"blocks.\1.attn.key."),
      (r"^layers\.(\d+)\.self_attn\.v_proj\.", r"blocks.\1.attn.value."),
      (r"^layers\.(\d+)\.self_attn\.out_proj\.", r"blocks.\1.attn.out."),
      (r"^layers\.(\d+)\.self_attn_layer_norm\.", r"blocks.\1.attn_ln."),
      (r"^layers\.(\d+)\.final_layer_norm\.", r"blocks.\1.mlp_ln."),
      (r"^layers\.(\d+)\.fc1\.", r"blocks.\1.mlp.0."),
      (r"^layers\.(\d+)\.fc2\.", r"blocks.\1.mlp.2."),
  ]
  out = {}
  for name, tensor in hf.encoder.state_dict().items():
    for pattern, repl in renames:
      name = re.sub(pattern, repl, name)
    out["encoder." + name] = tensor.clone().half()  # released .pt files are float16
  out["decoder.token_embedding.weight"] = torch.zeros(128, 48)
  out["decoder.blocks.0.attn.query.weight"] = torch.zeros(48, 48)
  return out


@pytest.mark.parametrize("saved", [80], ids=["80mel"], indirect=True)
def test_openai_pt_import_matches_transformers(saved, tmp_path):
  hf = saved["hf"]
  dims = dict(n_mels=80, n_audio_ctx=1500, n_audio_state=48, n_audio_head=6, n_audio_layer=3, n_vocab=128,
              n_text_ctx=16, n_text_state=48, n_text_head=6, n_text_layer=1)
  # float16 storage: compare with the reference holding the same rounded weights
  state_dict = _openai_state_dict(hf)
  path = str(tmp_path / "tiny.pt")
  torch.save({"dims": dims, "model_state_dict": state_dict}, path)
  config, state = ckpt.load_whisper_openai(path)
  assert config == saved["config"]
  rounded = transformers.models.whisper.modeling_whisper.WhisperEncoder(_hf_config(80)).eval()
  rounded.load_state_dict({k: v.half().float() for k, v in hf.encoder.state_dict().items()})
  with torch.inference_mode():
    ref = rounded(torch.from_numpy(saved["features"])).last_hidden_state.numpy()
  hidden, _ = _encode(ckpt.whisper_model(config, state), saved["features"])
  _assert_close(hidden, ref)
  # A checkpoint without the (sinusoidal) position buffer gets the sinusoids.
  del state_dict["encoder.positional_embedding"]
  torch.save({"dims": dims, "model_state_dict": state_dict}, path)
  _, state = ckpt.load_whisper_openai(path)
  np.testing.assert_allclose(
      state["embed_positions"][...], transformers.models.whisper.modeling_whisper.sinusoids(1500, 48).numpy(),
      atol=2e-4)


@pytest.mark.parametrize("saved", [80], ids=["80mel"], indirect=True)
def test_export_round_trips_through_transformers(saved, tmp_path):
  files = ckpt.export_whisper_hf(saved["config"], saved["state"], str(tmp_path), prefix="encoder.")
  assert files == ["model.safetensors"]
  reloaded = transformers.WhisperModel.from_pretrained(str(tmp_path)).eval()
  with torch.inference_mode():
    out = reloaded.encoder(torch.from_numpy(saved["features"])).last_hidden_state.numpy()
  np.testing.assert_allclose(out, saved["ref"], atol=1e-6, rtol=0)
  config, state = ckpt.load_whisper_hf(str(tmp_path))
  assert config == saved["config"]
  for path, leaf in mapping.flat_paths(state).items():
    np.testing.assert_array_equal(leaf[...], mapping.flat_paths(saved["state"])[path][...])
  # The WhisperForConditionalGeneration layout (`model.encoder.`), both ways.
  generation = tmp_path / "generation"
  ckpt.export_whisper_hf(saved["config"], saved["state"], str(generation))
  assert any(k.startswith("model.encoder.layers.2.") for k in load_file(generation / "model.safetensors"))
  reloaded = transformers.WhisperForConditionalGeneration.from_pretrained(str(generation)).eval()
  with torch.inference_mode():
    out = reloaded.model.encoder(torch.from_numpy(saved["features"])).last_hidden_state.numpy()
  np.testing.assert_allclose(out, saved["ref"], atol=1e-6, rtol=0)
  assert ckpt.load_whisper_hf(str(generation))[0] == saved["config"]


@pytest.mark.parametrize("saved", [80], ids=["80mel"], indirect=True)
def test_wrong_shape_is_one_line_error_naming_the_key(saved, tmp_path):
  tensors = load_file(os.path.join(saved["folder"], "model.safetensors"))
  tensors["encoder.layers.1.fc1.weight"] = tensors["encoder.layers.1.fc1.weight"][:-1]
  del tensors["encoder.layers.2.self_attn.k_proj.weight"]
  save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
  (tmp_path / "config.json").write_text((saved["folder"] / "config.json").read_text())
  with pytest.raises(CheckpointError) as info:
    ckpt.load_whisper_hf(str(tmp_path))
  message = str(info.value)
  assert "\n" not in message and "2 mismatch(es)" in message
  assert re.search(r"encoder\.layers\.1\.fc1\.weight: shape \(\d+, \d+\) does not fit", message)
  assert "encoder.layers.2.self_attn.k_proj.weight: missing" in message


@pytest.mark.parametrize("saved", [128], ids=["128mel"], indirect=True)
def test_prefix_detection_for_qwen2_audio_layout(saved, tmp_path):
  """An encoder under `audio_tower.` beside LLM tensors, with a Qwen2-Audio composite config."""
  tensors = load_file(os.path.join(saved["folder"], "model.safetensors"))
  tensors = {"audio_tower." + k[len("encoder."):]: v for k, v in tensors.items() if k.startswith("encoder.")}
  tensors["language_model.lm_head.weight"] = np.zeros((4, 4), np.float32)
  save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
  hf = saved["hf"].config
  audio_config = dict(model_type="qwen2_audio_encoder", num_mel_bins=128, d_model=48, encoder_layers=3,
                      encoder_attention_heads=6, encoder_ffn_dim=80, max_source_positions=1500)
  (tmp_path / "config.json").write_text(
      json.dumps({"model_type": "qwen2_audio", "audio_config": audio_config}))
  config, state = ckpt.load_whisper_hf(str(tmp_path))
  assert config.pool and config.mask_padding and config.d_model == hf.d_model
  for path, leaf in mapping.flat_paths(state).items():
    np.testing.assert_array_equal(leaf[...], mapping.flat_paths(saved["state"])[path][...])


def test_sinusoid_init_matches_reference_table():
  ours = np.asarray(whisper.sinusoids(1500, 64))
  ref = transformers.models.whisper.modeling_whisper.sinusoids(1500, 64).numpy()
  np.testing.assert_allclose(ours, ref, atol=2e-4)  # float32 rounding of t * timescale at t ~ 1500
  assert np.abs(ours[:100] - ref[:100]).max() < 1e-5


def test_config_validation_names_the_key():
  with pytest.raises(ConfigError, match="whisper.num_heads"):
    whisper.WhisperConfig(d_model=48, num_heads=5)
  with pytest.raises(ConfigError, match="config.model.whisper.heads"):
    from_dict(whisper.WhisperConfig, {"heads": 4}, "config.model.whisper")
  assert whisper.WhisperConfig.preset("large-v3").n_mels == 128
  hf = ckpt.config_from_hf({"model_type": "qwen2_audio", "audio_config": {
      "model_type": "qwen2_audio_encoder", "num_mel_bins": 128, "d_model": 1280, "encoder_layers": 32,
      "encoder_attention_heads": 20, "encoder_ffn_dim": 5120}})
  assert hf.pool and hf.mask_padding and hf == whisper.WhisperConfig.preset("large-v3", pool=True,
                                                                            mask_padding=True)


def test_params_carry_logical_axes_and_remat_gives_same_grads():
  config = whisper.WhisperConfig(n_mels=16, d_model=24, num_layers=1, num_heads=3, ffn_dim=40, max_positions=32,
                                 mask_padding=True)
  for path, leaf in mapping.flat_paths(ckpt.abstract_model(config)).items():
    axes = leaf.get_metadata()["out_sharding"]
    assert len(axes) == len(leaf.shape) and all(a is None or a in LOGICAL_AXES for a in axes), path
  rng = np.random.default_rng(0)
  _, abstract_state = nnx.split(ckpt.abstract_model(config))
  state = ckpt.fill_state(abstract_state, {
      path: rng.normal(size=leaf.shape).astype(np.float32) * 0.3
      for path, leaf in mapping.flat_paths(abstract_state).items()})
  mel = rng.normal(size=(2, 40, 16)).astype(np.float32)
  mask = np.arange(40)[None] < np.array([[40], [25]])
  graphdefs = {r: nnx.graphdef(ckpt.abstract_model(from_dict(whisper.WhisperConfig, {**vars(config), "remat": r})))
               for r in ("none", "full")}

  def loss(state, remat):
    hidden, valid = nnx.merge(graphdefs[remat], state)(mel, mask)
    return jnp.sum(jnp.where(valid[..., None], hidden, 0.0) ** 2)

  grad = jax.jit(jax.grad(loss), static_argnums=1)
  g_none, g_full = grad(state, "none"), grad(state, "full")
  for a, b in zip(jax.tree.leaves(g_none), jax.tree.leaves(g_full)):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g_none)) > 0


def test_blocked_attention_equals_one_block():
  q, k, v = np.random.default_rng(0).normal(size=(3, 2, 37, 4, 8)).astype(np.float32) * 2
  valid = np.arange(37)[None] < np.array([[37], [20]])
  attend = jax.jit(lambda q, k, v, block: attention.attention(q, k, v, key_valid=valid, head_block=block),
                   static_argnames="block")
  full = attend(q, k, v, block=0)
  for block in (5, 16, 36):
    np.testing.assert_allclose(attend(q, k, v, block=block), full, atol=1e-5)
