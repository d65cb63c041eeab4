"""The built-in synthetic audio-QA corpus (`alm-jax data synth`): no downloads, deterministic by seed.

Twelve MMAU-style multiple-choice question types — three per category — plus
plain transcription and captioning pairs for the projector stage:

* speech: which phrase is said, which digit is said, how many words are said
  (espeak-ng voices at several speeds and pitches);
* sound: which event, how many times it occurs, in which order two events occur
  (beep, chirp, noise burst, clicking, siren, buzz);
* music: which chord (major, minor, diminished, augmented), how the second part
  of a melody differs (faster, slower, higher, lower), which instrument (piano,
  organ, guitar, flute);
* multi-audio (three clips each): which clip contains speech / music / a sound
  effect, which two clips contain the same kind of sound, how many clips
  contain speech.

Every question is answerable from the audio by a small model: short clips of a
fixed length per question type (so placeholder counts carry no answer), closed
option sets, four options drawn from the same set, the answer's value cycled
evenly and its position uniform — a text-only model stays at chance.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import time
from typing import Callable, Sequence

import numpy as np

from alm_jax.audio import synth as S
from alm_jax.data.records import DEFAULT_PROMPTS, TASK_CAPTION, TASK_MCQ, TASK_TRANSCRIBE, format_mcq
from alm_jax.errors import DataError

SPLITS = ("train", "validation", "test")
SPLIT_FRACTIONS = {"validation": 0.1, "test": 0.1}
CATEGORIES = ("speech", "sound", "music", "multi-audio")

PHRASES = ("good morning", "thank you", "open the door", "see you later", "how are you", "it is raining",
           "turn left", "let us go")
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
COUNTS = ("one", "two", "three", "four")
EVENTS = ("beep", "chirp", "noise burst", "clicking", "siren", "buzz")
EVENT_PHRASE = {"beep": "a beep", "chirp": "a chirp", "noise burst": "a noise burst", "clicking": "clicking",
                "siren": "a siren", "buzz": "a buzz"}
CHORD_NAMES = {q: f"{'an' if q[0] in 'aeiou' else 'a'} {q} chord" for q in S.CHORDS}
CHANGES = ("faster", "slower", "higher", "lower")
ORDINAL_CLIPS = ("the first clip", "the second clip", "the third clip", "none of the clips")
PAIRS = ("the first and second", "the first and third", "the second and third", "none of them")
SPEECH_CLIP_COUNTS = ("none", "one", "two", "three")


@dataclasses.dataclass(frozen=True)
class Item:
  """What a generator makes: clips and either a question with its answer, or a text pair."""

  clips: list
  answer: str
  question: str | None = None
  options: tuple[str, ...] = ()  # closed set to draw distractors from (or the exact four options)
  fixed_options: bool = False  # options are exactly these four (answer among them)
  category: str | None = None  # overrides the kind's category (music captions)
  meta: dict | None = None  # what each clip holds (written to the manifest's "meta" for analysis)


# --- helpers ------------------------------------------------------------------


def _voice(rng: np.random.Generator) -> dict:
  return {"voice": S.VOICES[rng.integers(len(S.VOICES))], "rate": int(rng.integers(130, 201)),
          "pitch": int(rng.integers(25, 76))}


def _words(words: Sequence[str], rng: np.random.Generator, gap=(0.15, 0.3)) -> np.ndarray:
  """Words spoken one by one by one voice, with clear pauses between them."""
  v = _voice(rng)
  parts = [S.speak(w, **v) for w in words]
  return S.concat(parts, [float(rng.uniform(*gap)) for _ in parts[1:]])


def _event(name: str, rng: np.random.Generator, short: bool = False, narrow: bool = False) -> np.ndarray:
  """One sound event of class `name`, its parameters drawn from `rng` (`narrow`: little variation)."""
  top = 0.3 if short else 0.5
  dur = float(rng.uniform(0.2, top))
  if narrow:
    dur = float(rng.uniform(0.4, 0.5))
  if name == "beep":
    return S.tone(rng.uniform(900, 1000) if narrow else rng.uniform(500, 1500), dur)
  if name == "chirp":
    return S.chirp(rng.uniform(200, 500), rng.uniform(2000, 4000), dur)
  if name == "noise burst":
    return S.noise_burst(dur, rng, color=("white", "pink")[rng.integers(2)])
  if name == "clicking":
    return S.clicks(rng.uniform(14, 25), dur + 0.1)
  if name == "siren":
    if narrow:
      return S.siren(rng.uniform(850, 950), 300, 6, dur + 0.3)
    return S.siren(rng.uniform(700, 1100), rng.uniform(200, 350), rng.uniform(5, 8), dur + (0.1 if short else 0.3))
  if name == "buzz":
    return S.buzz(rng.uniform(90, 180), dur)
  raise ValueError(name)


def _finish(clip: np.ndarray, seconds_: float, rng: np.random.Generator) -> np.ndarray:
  """Fixed length, random placement, light background noise, peak 0.6."""
  return S.normalize(S.add_noise(S.fit(clip, seconds_, rng), rng, float(rng.uniform(25, 40))), 0.6)


def _other(pool: Sequence[str], exclude: Sequence[str], rng: np.random.Generator) -> str:
  rest = [p for p in pool if p not in exclude]
  return rest[rng.integers(len(rest))]


# --- question generators: (rng, value) -> Item; `value` picks the answer from a closed set ----


def speech_phrase(rng, value):
  phrase = PHRASES[value % len(PHRASES)]
  return Item([_finish(S.speak(phrase, **_voice(rng)), 2.5, rng)], phrase, "What does the speaker say?", PHRASES)


def speech_digit(rng, value):
  digit = DIGITS[value % len(DIGITS)]
  return Item([_finish(S.speak(digit, **_voice(rng)), 1.5, rng)], digit, "Which digit is spoken?", DIGITS)


def speech_count(rng, value):
  n = value % 4 + 1
  words = [DIGITS[i] for i in rng.integers(0, len(DIGITS), n)]
  return Item([_finish(_words(words, rng), 3.0, rng)], COUNTS[n - 1], "How many words are spoken?", COUNTS, True)


def sound_event(rng, value):
  name = EVENTS[value % len(EVENTS)]
  options = tuple(EVENT_PHRASE[e] for e in EVENTS)
  return Item([_finish(_event(name, rng), 2.0, rng)], EVENT_PHRASE[name], "Which sound is heard?", options)


def sound_count(rng, value):
  n = value % 4 + 1
  name = EVENTS[rng.integers(len(EVENTS))]
  hits = [_event(name, rng, short=True) for _ in range(n)]
  clip = S.concat(hits, [float(rng.uniform(0.2, 0.35)) for _ in hits[1:]])
  return Item([_finish(clip, 3.0, rng)], COUNTS[n - 1], "How many times is the sound heard?", COUNTS, True)


def sound_order(rng, value):
  a, b, c, d = (EVENTS[i] for i in rng.permutation(len(EVENTS))[:4])
  pair = lambda x, y: f"{EVENT_PHRASE[x]}, then {EVENT_PHRASE[y]}"  # noqa: E731
  # Options: the pair both ways and another pair both ways, so knowing which two
  # sounds occur gives 50 %, and only the order gives the rest.
  options = [pair(a, b), pair(b, a), pair(c, d), pair(d, c)]
  first, second = (a, b) if value % 2 == 0 else (b, a)
  clip = S.concat([_event(first, rng), _event(second, rng)], float(rng.uniform(0.25, 0.4)))
  answer = pair(first, second)
  return Item([_finish(clip, 2.5, rng)], answer, "In what order are the sounds heard?", tuple(options), True)


CHORD_ROOTS = (60, 65, 67)  # C4, F4, G4


def music_chord(rng, value):
  quality = tuple(S.CHORDS)[value % len(S.CHORDS)]
  instrument = S.INSTRUMENTS[rng.integers(len(S.INSTRUMENTS))]
  clip = S.chord(instrument, int(CHORD_ROOTS[rng.integers(len(CHORD_ROOTS))]), quality, float(rng.uniform(1.0, 1.3)),
                 rng)
  return Item([_finish(clip, 1.5, rng)], CHORD_NAMES[quality], "Which chord is played?",
              tuple(CHORD_NAMES.values()), True)


SCALE = (0, 2, 4, 5, 7, 9, 11, 12)


def _pattern(rng) -> list[int]:
  base = int(rng.integers(55, 68))
  return [base + SCALE[i] for i in rng.choice(len(SCALE), 4, replace=False)]


def music_compare(rng, value):
  change = CHANGES[value % len(CHANGES)]
  instrument = S.INSTRUMENTS[rng.integers(len(S.INSTRUMENTS))]
  notes, d = _pattern(rng), float(rng.uniform(0.26, 0.34))
  if change == "faster":
    second, d2 = notes + notes, d / 2
  elif change == "slower":
    second, d2 = notes[:2], d * 2
  else:
    second, d2 = [m + (12 if change == "higher" else -12) for m in notes], d
  clip = S.concat([S.melody(instrument, notes, d, rng), S.melody(instrument, second, d2, rng)],
                  float(rng.uniform(0.25, 0.4)))
  return Item([_finish(clip, 3.0, rng)], change, "How does the second part of the melody differ from the first?",
              CHANGES, True)


def music_instrument(rng, value):
  instrument = S.INSTRUMENTS[value % len(S.INSTRUMENTS)]
  notes = _pattern(rng)[: int(rng.integers(3, 5))]
  clip = S.melody(instrument, notes, float(rng.uniform(0.3, 0.45)), rng)
  return Item([_finish(clip, 2.0, rng)], instrument, "Which instrument is playing?", S.INSTRUMENTS, True)


CLIP_KINDS = ("speech", "music", "a sound effect")


def _clip_of_kind(kind: str, rng) -> np.ndarray:
  """A clip of one broad kind: a spoken phrase or digit, a chord or melody, or a sound event."""
  if kind == "speech":
    return S.speak((PHRASES + DIGITS)[rng.integers(len(PHRASES) + len(DIGITS))], **_voice(rng))
  if kind == "music":
    instrument = S.INSTRUMENTS[rng.integers(len(S.INSTRUMENTS))]
    if rng.random() < 0.5:
      return S.chord(instrument, int(CHORD_ROOTS[rng.integers(3)]), tuple(S.CHORDS)[rng.integers(4)], 1.0, rng)
    return S.melody(instrument, _pattern(rng)[:3], 0.3, rng)
  return _event(EVENTS[rng.integers(len(EVENTS))], rng)


# Rationales for the multi-clip questions (`meta.rationale`, learned with `data.clip_rationale`): each clip in
# turn, with the one-step judgement the answer is read from, so no step compares more than two things.
CLIP_ORDINALS = ("first", "second", "third")


def _yes_no(labels: Sequence[str], target: str) -> str:
  """"first music no, second speech yes, …": each clip's kind and whether it is the one asked about."""
  return ", ".join(f"{CLIP_ORDINALS[k]} {label} {'yes' if label == target else 'no'}" for k, label in enumerate(labels))


def _likeness(labels: Sequence[str]) -> str:
  """"first beep, second siren, third beep like first": each clip's sound and the earlier clip it repeats."""
  parts = []
  for k, label in enumerate(labels):
    earlier = labels.index(label)
    parts.append(f"{CLIP_ORDINALS[k]} {label}" + (f" like {CLIP_ORDINALS[earlier]}" if earlier < k else ""))
  return ", ".join(parts)


def multi_which(rng, value):
  v = value % 4  # the clip holding the target kind, or 3: none of them
  target = CLIP_KINDS[rng.integers(len(CLIP_KINDS))]
  others = [k for k in CLIP_KINDS if k != target]
  kinds = [others[rng.integers(len(others))] for _ in range(3)]
  if v < 3:
    kinds[v] = target
  clips = [_finish(_clip_of_kind(k, rng), 1.5, rng) for k in kinds]
  return Item(clips, ORDINAL_CLIPS[v], f"Which clip contains {target}?", ORDINAL_CLIPS, True,
              meta={"clip_labels": kinds, "rationale": _yes_no(kinds, target)})


SAME_EVENTS = ("beep", "noise burst", "clicking", "siren")  # the most distinct events


def multi_same(rng, value):
  v = value % 4
  a, b, c = (SAME_EVENTS[i] for i in rng.permutation(len(SAME_EVENTS))[:3])
  names = {0: [a, a, b], 1: [a, b, a], 2: [b, a, a], 3: [a, b, c]}[v]
  clips = [_finish(_event(n, rng, narrow=True), 1.5, rng) for n in names]
  return Item(clips, PAIRS[v], "Which two clips contain the same kind of sound?", PAIRS, True,
              meta={"clip_labels": names, "rationale": _likeness(names)})


def multi_speech(rng, value):
  n = value % 4
  speech_at = set(rng.permutation(3)[:n].tolist())
  kinds = ["speech" if k in speech_at else CLIP_KINDS[1 + rng.integers(2)] for k in range(3)]
  clips = [_finish(_clip_of_kind(k, rng), 1.5, rng) for k in kinds]
  return Item(clips, SPEECH_CLIP_COUNTS[n], "How many of the clips contain speech?", SPEECH_CLIP_COUNTS, True,
              meta={"clip_labels": kinds, "rationale": _yes_no(kinds, "speech")})


def transcribe(rng, value):
  if value % 2 == 0:
    text = PHRASES[rng.integers(len(PHRASES))]
    clip = S.speak(text, **_voice(rng))
  else:
    words = [DIGITS[i] for i in rng.integers(0, len(DIGITS), int(rng.integers(1, 5)))]
    text, clip = " ".join(words), _words(words, rng)
  return Item([_finish(clip, 3.0, rng)], text)


def caption(rng, value):
  kind = value % 4
  if kind == 0:
    name = EVENTS[rng.integers(len(EVENTS))]
    clip, text = _event(name, rng), EVENT_PHRASE[name]
  elif kind == 1:
    a, b = (EVENTS[i] for i in rng.permutation(len(EVENTS))[:2])
    clip = S.concat([_event(a, rng), _event(b, rng)], 0.3)
    text = f"{EVENT_PHRASE[a]} followed by {EVENT_PHRASE[b]}"
  elif kind == 2:
    instrument, quality = S.INSTRUMENTS[rng.integers(4)], tuple(S.CHORDS)[rng.integers(4)]
    clip = S.chord(instrument, int(CHORD_ROOTS[rng.integers(3)]), quality, 1.2, rng)
    text = f"a {instrument} playing {CHORD_NAMES[quality]}"
    return Item([_finish(clip, 2.5, rng)], text, category="music")
  else:
    instrument = S.INSTRUMENTS[rng.integers(4)]
    clip = S.melody(instrument, _pattern(rng), float(rng.uniform(0.25, 0.45)), rng)
    return Item([_finish(clip, 2.5, rng)], f"a {instrument} playing a melody", category="music")
  return Item([_finish(clip, 2.5, rng)], text)


@dataclasses.dataclass(frozen=True)
class Kind:
  """A question or pair type: its category, generator, answer-set size and deck weight."""

  name: str
  category: str
  make: Callable
  values: int  # number of answer values to cycle through evenly
  weight: int = 2
  task: str = TASK_MCQ


KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("speech_phrase", "speech", speech_phrase, len(PHRASES)),
    Kind("speech_digit", "speech", speech_digit, len(DIGITS)),
    Kind("speech_count", "speech", speech_count, 4),
    Kind("sound_event", "sound", sound_event, len(EVENTS)),
    Kind("sound_count", "sound", sound_count, 4),
    Kind("sound_order", "sound", sound_order, 2),
    Kind("music_chord", "music", music_chord, len(S.CHORDS)),
    Kind("music_compare", "music", music_compare, len(CHANGES)),
    Kind("music_instrument", "music", music_instrument, len(S.INSTRUMENTS)),
    # Relations across clips need more examples to learn: multi-audio kinds get a larger share.
    Kind("multi_which", "multi-audio", multi_which, 4, weight=3),
    Kind("multi_same", "multi-audio", multi_same, 4, weight=3),
    Kind("multi_speech", "multi-audio", multi_speech, 4, weight=3),
    Kind("transcribe", "speech", transcribe, 2, weight=6, task=TASK_TRANSCRIBE),
    Kind("caption", "sound", caption, 4, weight=6, task=TASK_CAPTION),
)}


@dataclasses.dataclass(frozen=True)
class Job:
  """One example to build: everything random about it is fixed by (seed, index)."""

  index: int
  split: str
  number: int  # index within the split
  kind: str
  value: int  # answer value (cycled evenly per split and kind)
  position: int  # answer position among the options (cycled evenly, independent of value)
  seed: int


def plan(n: int, seed: int) -> list[Job]:
  """Assigns splits, kinds, answer values and positions for `n` examples (balanced per split)."""
  if n < 1:
    raise DataError(f"--n must be at least 1, got {n}")
  rng = np.random.default_rng(seed)
  sizes = {s: int(round(n * SPLIT_FRACTIONS.get(s, 0.0))) for s in SPLITS[1:]}
  sizes["train"] = n - sum(sizes.values())
  deck = [k.name for k in KINDS.values() for _ in range(k.weight)]
  jobs: list[Job] = []
  for split in SPLITS:
    value_cycles: dict[str, list[int]] = {}
    position_cycles: dict[str, list[int]] = {}
    kinds: list[str] = []
    for number in range(sizes[split]):
      if not kinds:
        kinds = [deck[i] for i in rng.permutation(len(deck))]
      kind = kinds.pop()
      if not value_cycles.get(kind):
        value_cycles[kind] = rng.permutation(KINDS[kind].values).tolist()
      if not position_cycles.get(kind):
        position_cycles[kind] = rng.permutation(4).tolist()
      jobs.append(Job(len(jobs), split, number, kind, value_cycles[kind].pop(), position_cycles[kind].pop(),
                      int(rng.integers(2**31))))
  return jobs


def _options(item: Item, position: int, rng: np.random.Generator) -> list[str]:
  if item.fixed_options:
    others = [o for o in item.options if o != item.answer]
  else:
    pool = [o for o in item.options if o != item.answer]
    others = [pool[i] for i in rng.choice(len(pool), 3, replace=False)]
  others = [others[i] for i in rng.permutation(len(others))]
  if len(others) != 3:
    raise AssertionError(f"{item.question}: {len(others) + 1} options")
  return others[:position] + [item.answer] + others[position:]


def build_example(job: Job, out_dir: str) -> dict:
  """Synthesises one example, writes its clips under `out_dir/audio/SPLIT/` and returns its manifest line."""
  from alm_jax.audio.io import write_wav  # pylint: disable=import-outside-toplevel

  kind = KINDS[job.kind]
  rng = np.random.default_rng([job.seed, job.index])
  item = kind.make(rng, job.value)
  ident = f"{job.split}-{job.number:06d}"
  paths = []
  for k, clip in enumerate(item.clips):
    rel = f"audio/{job.split}/{ident}_{k}.wav"
    write_wav(os.path.join(out_dir, rel), clip)
    paths.append(rel)
  line = {"id": ident, "audio": paths}
  if kind.task == TASK_MCQ:
    options = _options(item, job.position, rng)
    line["conversation"] = [{"role": "user", "content": format_mcq(item.question, options)},
                            {"role": "assistant", "content": item.answer}]
    line.update(question=item.question, choices=options, answer=item.answer)
  else:
    line["text"] = item.answer
  line.update(category=item.category or kind.category, sub_category=kind.name, task=kind.task, split=job.split)
  if item.meta:
    line["meta"] = item.meta
  return line


def _build_chunk(args) -> list[dict]:
  jobs, out_dir = args
  return [build_example(j, out_dir) for j in jobs]


def corpus_texts(lines: Sequence[dict]) -> list[str]:
  """Every text a model sees in the corpus (prompts, questions, options, answers)."""
  texts = list(DEFAULT_PROMPTS.values())
  for line in lines:
    if "conversation" in line:
      texts += [m["content"] for m in line["conversation"]]
    else:
      texts.append(line["text"])
  return texts


def write_corpus(out_dir: str, n: int, *, seed: int = 0, workers: int | None = None, vocab_size: int = 1024,
                 progress: bool = False) -> dict:
  """Builds the corpus: `out_dir/{train,validation,test}.jsonl`, `audio/`, `tokenizer.json`, `corpus.json`.

  Returns the summary written to corpus.json (counts per split, category and
  question type, build time). Output depends only on `n` and `seed`.
  """
  from alm_jax.data.tokenizer import train_bpe  # pylint: disable=import-outside-toplevel

  start = time.time()
  jobs = plan(n, seed)
  os.makedirs(out_dir, exist_ok=True)
  workers = max(1, min(os.cpu_count() or 1, 8) if workers is None else workers)
  chunk = max(1, min(32, -(-len(jobs) // (4 * workers))))
  chunks = [(jobs[i : i + chunk], out_dir) for i in range(0, len(jobs), chunk)]
  lines: list[dict] = []
  bar = None
  if progress:
    import tqdm  # pylint: disable=import-outside-toplevel

    bar = tqdm.tqdm(total=len(jobs), unit="ex", desc="synth")
  if workers == 1:
    results = map(_build_chunk, chunks)
    pool = None
  else:
    # spawn: the caller may already run JAX threads, which fork would copy in a broken state.
    pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    results = pool.map(_build_chunk, chunks)
  try:
    for part in results:
      lines += part
      if bar is not None:
        bar.update(len(part))
  finally:
    if pool is not None:
      pool.shutdown(cancel_futures=True)
    if bar is not None:
      bar.close()
  by_split = collections.defaultdict(list)
  for line in lines:
    by_split[line["split"]].append(line)
  for split in SPLITS:
    tmp = os.path.join(out_dir, f"{split}.jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
      for line in by_split[split]:
        f.write(json.dumps(line) + "\n")
    os.replace(tmp, os.path.join(out_dir, f"{split}.jsonl"))
  tokenizer = train_bpe(corpus_texts(lines), vocab_size=vocab_size)
  tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
  summary = {
      "n": n, "seed": seed, "vocab_size": tokenizer.vocab_size,
      "splits": {s: len(by_split[s]) for s in SPLITS},
      "categories": dict(collections.Counter(f"{l['split']}/{l['category']}" for l in lines)),
      "question_types": dict(collections.Counter(f"{l['split']}/{l['sub_category']}" for l in lines)),
  }
  with open(os.path.join(out_dir, "corpus.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=1, sort_keys=True)  # no timings: the folder depends only on n and seed
  return {**summary, "seconds": round(time.time() - start, 2)}
