"""The training loss in chunks of positions equals the loss on whole logits, and never holds them whole.

Small on purpose (a few seconds in all): the output head of a one-layer `LLM` with weights from numpy, tied and
untied, on shapes where the last chunk is ragged and the weights are uneven; the compiled program's buffers;
and the ALM's own loss traced (not compiled) with and without `loss_chunk_tokens`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alm_jax import aot
from alm_jax.config import ConfigError, from_dict
from alm_jax.models.alm import ALMConfig, AudioLanguageModel, chunked_cross_entropy
from alm_jax.models.llm import LLM, LLMConfig


def _head(tied: bool, vocab: int, width: int) -> LLM:
  """A one-layer LLM (only its output head is used) with random weights from numpy: no compiled init."""
  cfg = LLMConfig(vocab_size=vocab, hidden_size=width, intermediate_size=8, num_layers=1, num_heads=2, num_kv_heads=2,
                  tie_embeddings=tied)
  graph, state = nnx.split(nnx.eval_shape(lambda: LLM(cfg, rngs=None)))
  rng = np.random.default_rng(0)
  leaves = [(path, var.replace(jnp.asarray(rng.normal(size=var.get_value().shape), jnp.float32)))
            for path, var in nnx.to_flat_state(state)]
  return nnx.merge(graph, nnx.from_flat_state(leaves))


def _loss_fn(model: LLM, targets: np.ndarray, weights: np.ndarray, chunk: int):
  """(head state, hidden) → (mean weighted cross-entropy, weighted correct count), as `ALM.loss` reduces them."""
  graph = nnx.graphdef(model)

  def loss(state, hidden):
    total, correct = chunked_cross_entropy(nnx.merge(graph, state).logits, hidden, targets, weights, chunk)
    return total / weights.sum(), correct

  return loss


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_chunked_loss_and_gradient_equal_the_whole_logits_ones(tied):
  # 11 positions in chunks of 4: the last chunk is ragged (3 real positions, 1 padded). Weights 0, 0.5 and 1,
  # with the last position weighted: dropping, or weighting, the padded tail changes the loss.
  rows, length, vocab, width, chunk = 2, 11, 32, 8, 4
  model = _head(tied, vocab, width)
  rng = np.random.default_rng(1)
  hidden = jnp.asarray(rng.normal(size=(rows, length, width)), jnp.float32)
  targets = rng.integers(0, vocab, (rows, length)).astype(np.int32)
  weights = rng.choice(np.float32([0.0, 0.5, 1.0]), (rows, length))
  weights[:, -1] = 1.0
  state = nnx.state(model)

  @jax.jit
  def both(state, hidden):  # one compile for both paths
    grads = lambda chunk: jax.value_and_grad(_loss_fn(model, targets, weights, chunk), (0, 1), has_aux=True)
    return grads(0)(state, hidden), grads(chunk)(state, hidden)

  ((whole, whole_correct), whole_grads), ((chunked, correct), chunked_grads) = both(state, hidden)
  np.testing.assert_allclose(chunked, whole, rtol=1e-6)
  assert float(correct) == float(whole_correct)
  # Every gradient (the head's weight, the hidden states; the unused decoder layer's are zero on both paths)
  # within 1e-6 of its own largest entry.
  leaves, _ = jax.tree_util.tree_flatten_with_path(whole_grads)
  for (path, g), c in zip(leaves, jax.tree.leaves(chunked_grads)):
    g, c = np.asarray(g), np.asarray(c)
    assert np.abs(c - g).max() <= 1e-6 * np.abs(g).max(), jax.tree_util.keystr(path)
  head = "['embed']['embedding']" if tied else "['lm_head']['kernel']"
  head_grad = [g for path, g in jax.tree_util.tree_flatten_with_path(whole_grads[0])[0]
               if jax.tree_util.keystr(path).startswith(head)]
  assert len(head_grad) == 1 and np.abs(np.asarray(head_grad[0])).max() > 0  # the head in use gets a gradient
  assert np.abs(np.asarray(whole_grads[1])[:, -1]).max() > 0  # the last, ragged chunk's positions count


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_the_compiled_chunked_loss_never_holds_every_positions_logits(tied):
  # Vocabulary-dominated shapes, so the logits are the largest thing in the program: [2, 64, 512] float32 is
  # 256 KiB, one chunk [2, 8, 512] 32 KiB, the head's weight 16 KiB.
  rows, length, vocab, width, chunk = 2, 64, 512, 8, 8
  model = _head(tied, vocab, width)
  hidden = jax.ShapeDtypeStruct((rows, length, width), jnp.float32)
  targets = np.zeros((rows, length), np.int32)
  weights = np.ones((rows, length), np.float32)
  whole_logits = rows * length * vocab * 4

  def compiled(chunk):
    fn = jax.jit(jax.value_and_grad(_loss_fn(model, targets, weights, chunk), (0, 1), has_aux=True))
    program = fn.lower(nnx.state(model), hidden).compile()
    return aot.largest_arrays(program.as_text(), top=1)[0], program.memory_analysis().temp_size_in_bytes

  largest, temporaries = compiled(0)
  assert largest["bytes"] >= whole_logits and temporaries >= whole_logits, (largest, temporaries)  # the check bites
  largest, temporaries = compiled(chunk)
  # With chunks (and the chunk body rematerialised) no buffer is larger than one chunk's logits, and the
  # temporaries of the loss and its gradient hold a few chunks' worth, not the whole sequence's.
  assert largest["bytes"] <= rows * chunk * vocab * 4, largest
  assert temporaries < whole_logits / 2, temporaries


# A whisper-only ALM with an MLP bridge, as small as the configs allow: the loss's wiring, not the towers.
VOCAB = 96
ALM = dict(encoders=("whisper",), audio_token_id=5, audio=dict(window_seconds=0.5, max_windows=1),
           whisper=dict(n_mels=80, d_model=16, num_layers=0, num_heads=2, ffn_dim=32, max_positions=25),
           bridge=dict(kind="mlp", mlp=dict(in_dim=16, out_dim=16, num_layers=1)),
           llm=dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                    num_kv_heads=2, tie_embeddings=False))


def _logits_shapes(jaxpr) -> list[tuple[int, ...]]:
  """Shapes of the float32 arrays of rank >= 3 with last dimension VOCAB (logits, their softmax and gradient) that
  a jaxpr computes, and the jaxprs inside its scans, remats and jits."""
  shapes = []
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      shape = tuple(getattr(var.aval, "shape", ()))
      if len(shape) >= 3 and shape[-1] == VOCAB and var.aval.dtype == jnp.float32:
        shapes.append(shape)
    for value in eqn.params.values():
      for item in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(item, jax.extend.core.ClosedJaxpr):
          shapes += _logits_shapes(item.jaxpr)
        elif isinstance(item, jax.extend.core.Jaxpr):
          shapes += _logits_shapes(item)
  return shapes


def test_the_alm_loss_computes_its_logits_in_chunks():
  rows, length, chunk = 2, 24, 5
  spec = from_dict(ALMConfig, ALM).token_spec()
  batch = dict(tokens=jnp.zeros((rows, length), jnp.int32), token_mask=jnp.ones((rows, length), bool),
               loss_mask=jnp.ones((rows, length), jnp.float32),
               audio=jnp.zeros((rows, 1, spec.window_samples), jnp.float32),
               audio_samples=jnp.zeros((rows, 1), jnp.int32), audio_clip=jnp.zeros((rows, 1), jnp.int32))
  shapes = {}
  for name, chunk_tokens in (("whole", 0), ("chunked", chunk)):
    cfg = from_dict(ALMConfig, dict(ALM, loss_chunk_tokens=chunk_tokens))
    graph, state = nnx.split(nnx.eval_shape(lambda: AudioLanguageModel(cfg, rngs=None)))
    loss = lambda s: nnx.merge(graph, s).loss(batch)
    shapes[name] = _logits_shapes(jax.make_jaxpr(jax.value_and_grad(loss, has_aux=True))(state).jaxpr)
  assert (rows, length - 1, VOCAB) in shapes["whole"]  # the check bites
  assert shapes["chunked"] and set(shapes["chunked"]) == {(rows, chunk, VOCAB)}, shapes["chunked"]


def test_loss_chunk_must_not_be_negative():
  with pytest.raises(ConfigError, match="loss_chunk_tokens"):
    from_dict(ALMConfig, dict(ALM, loss_chunk_tokens=-1))
