"""Chat templates of the supported model families, written as code (no jinja).

A template turns a conversation plus each clip's placeholder count into a list
of segments: template text (may hold special tokens), user/assistant content
(encoded so that it can never produce a special token), and audio spans of `n`
placeholder tokens. Segments the model must predict — each assistant answer and
its end-of-turn token — are flagged `target`. Exact strings follow the
reference processors (REFERENCE.md):

* `qwen2-audio`: ChatML with the default system prompt; each clip is
  `Audio k: <|audio_bos|><|AUDIO|>×n<|audio_eos|>\\n` before the text.
* `af3`: ChatML with the default system prompt; `<sound>×n` per clip.
* `musicflamingo`: as `af3`, each clip's span wrapped in `<|sound_bos|>…<|sound_eos|>`.
* `qwen2.5-omni`: ChatML with the Qwen2.5-Omni system prompt (the one its model
  card asks for); each clip is `<|audio_bos|><|AUDIO|>×n<|audio_eos|>` before the text.
* `salmonn`: `<s>USER: <Speech>…</Speech> {q}\\nASSISTANT:{a}</s>` (Vicuna); the
  placeholder is `<unk>` so the LLM vocabulary needs no new row.
* `llama3`: Llama 3 headers; clips use reserved special tokens 0/1/2 as
  begin/end/placeholder.
* `tiny`: compact ChatML without a system prompt for the built-in demo model.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, NamedTuple, Sequence

from alm_jax.data.records import split_clip_markers
from alm_jax.errors import DataError


class Segment(NamedTuple):
  """A piece of a rendered conversation.

  kind: `text` (template text, special tokens recognised), `content`
  (conversation text, special tokens not recognised) or `audio` (`value` is the
  placeholder count). `clip` is the 0-based clip index of an audio span.
  """

  kind: str
  value: str | int
  target: bool = False
  clip: int = -1


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  """A family's chat format and the special tokens the pipeline needs from its vocabulary.

  Attributes:
    name: family name (`TEMPLATES` key).
    style: `chatml`, `vicuna` or `llama3` turn layout.
    audio_token: the placeholder token repeated once per audio embedding.
    audio_bos / audio_eos: markers around each clip's span (None: none).
    clip_prefix: text before a clip; `{k}` is its 1-based number.
    clip_suffix: text after a clip's span (after `audio_eos`).
    joiner: text between the clips placed at the start of a turn and its text.
    system: default system prompt (None: no system turn unless given).
    end_of_turn: token closing every turn (the model predicts it after an answer).
    eos: end-of-text token; pad: padding token candidates (first present wins,
      falling back to `eos`); bos: token opening the sequence (None: none).
  """

  name: str
  style: str
  audio_token: str
  end_of_turn: str
  eos: str
  audio_bos: str | None = None
  audio_eos: str | None = None
  clip_prefix: str = ""
  clip_suffix: str = ""
  joiner: str = ""
  system: str | None = None
  pad: tuple[str, ...] = ()
  bos: str | None = None

  @property
  def special_tokens(self) -> tuple[str, ...]:
    """Tokens that must exist in the vocabulary as single tokens."""
    tokens = [self.audio_token, self.end_of_turn, self.eos, self.audio_bos, self.audio_eos, self.bos]
    if self.style == "chatml":
      tokens += ["<|im_start|>", "<|im_end|>"]
    elif self.style == "llama3":
      tokens += ["<|start_header_id|>", "<|end_header_id|>"]
    return tuple(dict.fromkeys(t for t in tokens if t))

  # -- rendering --------------------------------------------------------------

  def _clip(self, k: int, n: int) -> list[Segment]:
    out = []
    head = self.clip_prefix.format(k=k + 1) + (self.audio_bos or "")
    if head:
      out.append(Segment("text", head))
    out.append(Segment("audio", int(n), clip=k))
    tail = (self.audio_eos or "") + self.clip_suffix
    if tail:
      out.append(Segment("text", tail))
    return out

  def _user_content(self, text: str, clip_tokens: Sequence[int], leading: Sequence[int], queue, used: set):
    """User text with clips spliced at its markers; `leading` clips go first, unnamed markers take `queue`."""
    out: list[Segment] = []
    for k in leading:
      used.add(k)
      out += self._clip(k, clip_tokens[k])
    wrote_text = False
    parts = split_clip_markers(text)
    for i, part in enumerate(parts):
      if i % 2:  # a marker
        k = next(queue) if part is None else part
        if k < 0 or k >= len(clip_tokens):
          raise DataError(f"clip marker <audio {k + 1}> but the example has {len(clip_tokens)} clip(s)")
        if k in used:
          raise DataError(f"clip {k + 1} is placed twice")
        used.add(k)
        out += self._clip(k, clip_tokens[k])
        continue
      piece = part
      if not wrote_text and out:
        piece = piece.lstrip()  # "<sound>\nQ", "<audio 1> Q": clips start the turn, then the text
      if not wrote_text and not piece.strip():
        continue
      if not wrote_text and out and self.joiner:
        out.append(Segment("text", self.joiner))
      out.append(Segment("content", piece))
      wrote_text = True
    return out

  def render(
      self, messages: Sequence[Mapping[str, str]], clip_tokens: Sequence[int], *, add_generation_prompt: bool = False
  ) -> list[Segment]:
    """Renders a conversation; `clip_tokens[k]` is clip k's placeholder count.

    Clips not placed by a marker go, in order, at the start of the first user
    turn. With `add_generation_prompt` the result ends with the assistant
    header, ready for decoding.
    """
    if not messages:
      raise DataError("empty conversation")
    named, unnamed = set(), 0
    for m in messages:
      if m["role"] == "user":
        for p in split_clip_markers(m["content"])[1::2]:
          if p is None:
            unnamed += 1
          else:
            named.add(p)
    free = [k for k in range(len(clip_tokens)) if k not in named]
    if unnamed > len(free):
      raise DataError(f"{unnamed} unnumbered clip marker(s) but only {len(free)} clip(s) left to place")
    # Unnumbered markers take the free clips in order; the rest lead the first user turn.
    queue, leading = iter(free[:unnamed]), free[unnamed:]
    used: set[int] = set()
    turns = _TURNS[self.style]
    out: list[Segment] = []
    if self.bos:
      out.append(Segment("text", self.bos))
    msgs = list(messages)
    if msgs[0]["role"] != "system" and self.system is not None:
      msgs.insert(0, {"role": "system", "content": self.system})
    first_user = True
    for m in msgs:
      role, content = m["role"], m["content"]
      if role == "user":
        body = self._user_content(content, clip_tokens, leading if first_user else (), queue, used)
        out += turns(self, role, body, first_user)
        first_user = False
      else:
        body = [Segment("content", content, target=role == "assistant")] if content else []
        out += turns(self, role, body, first_user)
    missing = [k + 1 for k in range(len(clip_tokens)) if k not in used]
    if missing:
      raise DataError(f"clip(s) {missing} are not placed (no user turn)")
    if add_generation_prompt:
      out += _GENERATION[self.style](self)
    return out

  def render_text(self, segments: Sequence[Segment]) -> str:
    """The rendered string, each audio span written as `n` placeholder tokens (for inspection)."""
    return "".join(self.audio_token * s.value if s.kind == "audio" else s.value for s in segments)


def _chatml(t: ChatTemplate, role: str, body: list[Segment], first: bool) -> list[Segment]:
  del first
  target = role == "assistant"
  return [Segment("text", f"<|im_start|>{role}\n"), *body, Segment("text", t.end_of_turn, target),
          Segment("text", "\n")]


def _chatml_generation(t: ChatTemplate) -> list[Segment]:
  del t
  return [Segment("text", "<|im_start|>assistant\n")]


def _vicuna(t: ChatTemplate, role: str, body: list[Segment], first: bool) -> list[Segment]:
  if role == "system":
    return [*body, Segment("text", "\n")]
  if role == "user":
    return [Segment("text", "USER: " if first else "\nUSER: "), *body, Segment("text", "\nASSISTANT:")]
  return [*body, Segment("text", t.end_of_turn, True)]


def _vicuna_generation(t: ChatTemplate) -> list[Segment]:
  del t
  return []  # the user turn already ends with "ASSISTANT:"


def _llama3(t: ChatTemplate, role: str, body: list[Segment], first: bool) -> list[Segment]:
  del first
  target = role == "assistant"
  header = Segment("text", f"<|start_header_id|>{role}<|end_header_id|>\n\n")
  return [header, *body, Segment("text", t.end_of_turn, target)]


def _llama3_generation(t: ChatTemplate) -> list[Segment]:
  del t
  return [Segment("text", "<|start_header_id|>assistant<|end_header_id|>\n\n")]


_TURNS: dict[str, Callable] = {"chatml": _chatml, "vicuna": _vicuna, "llama3": _llama3}
_GENERATION: dict[str, Callable] = {"chatml": _chatml_generation, "vicuna": _vicuna_generation,
                                    "llama3": _llama3_generation}

QWEN_SYSTEM = "You are a helpful assistant."
OMNI_SYSTEM = ("You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving "
               "auditory and visual inputs, as well as generating text and speech.")

TEMPLATES: dict[str, ChatTemplate] = {
    "qwen2-audio": ChatTemplate(
        name="qwen2-audio", style="chatml", audio_token="<|AUDIO|>", audio_bos="<|audio_bos|>",
        audio_eos="<|audio_eos|>", clip_prefix="Audio {k}: ", clip_suffix="\n", system=QWEN_SYSTEM,
        end_of_turn="<|im_end|>", eos="<|endoftext|>", pad=("<|endoftext|>",),
    ),
    "qwen2.5-omni": ChatTemplate(
        name="qwen2.5-omni", style="chatml", audio_token="<|AUDIO|>", audio_bos="<|audio_bos|>",
        audio_eos="<|audio_eos|>", system=OMNI_SYSTEM, end_of_turn="<|im_end|>", eos="<|endoftext|>",
        pad=("<|endoftext|>",),
    ),
    "af3": ChatTemplate(
        name="af3", style="chatml", audio_token="<sound>", system=QWEN_SYSTEM, end_of_turn="<|im_end|>",
        eos="<|endoftext|>", pad=("<|endoftext|>",),
    ),
    "musicflamingo": ChatTemplate(
        name="musicflamingo", style="chatml", audio_token="<sound>", audio_bos="<|sound_bos|>",
        audio_eos="<|sound_eos|>", system=QWEN_SYSTEM, end_of_turn="<|im_end|>", eos="<|endoftext|>",
        pad=("<|endoftext|>",),
    ),
    "salmonn": ChatTemplate(
        name="salmonn", style="vicuna", audio_token="<unk>", clip_prefix="<Speech>", clip_suffix="</Speech>",
        joiner=" ", end_of_turn="</s>", eos="</s>", pad=("</s>",), bos="<s>",
    ),
    "llama3": ChatTemplate(
        name="llama3", style="llama3", audio_token="<|reserved_special_token_2|>",
        audio_bos="<|reserved_special_token_0|>", audio_eos="<|reserved_special_token_1|>",
        end_of_turn="<|eot_id|>", eos="<|end_of_text|>", pad=("<|finetune_right_pad_id|>", "<|end_of_text|>"),
        bos="<|begin_of_text|>",
    ),
    "tiny": ChatTemplate(
        name="tiny", style="chatml", audio_token="<|AUDIO|>", audio_bos="<|audio_bos|>", audio_eos="<|audio_eos|>",
        end_of_turn="<|im_end|>", eos="<|endoftext|>", pad=("<|pad|>",),
    ),
}

# Special tokens of the demo tokenizer trained by `alm_jax.data.tokenizer.train_bpe` (pad is id 0).
TINY_SPECIAL_TOKENS = ("<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|audio_bos|>", "<|AUDIO|>",
                       "<|audio_eos|>")


def get_template(name: str) -> ChatTemplate:
  """The family's template by name; unknown names raise `DataError` listing the known ones."""
  if name not in TEMPLATES:
    raise DataError(f"unknown chat template {name!r} (known: {', '.join(TEMPLATES)})")
  return TEMPLATES[name]
