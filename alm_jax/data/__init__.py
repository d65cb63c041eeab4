"""Data: sources (manifest, ArrayRecord, TFDS), the grain pipeline, tokenizer + chat templates, synthetic corpus.

Public names are re-exported lazily so that light users (the `data synth`
command, its worker processes) do not import grain and JAX.
"""

import importlib

_EXPORTS = {
    "DataConfig": "pipeline", "make_dataset": "pipeline", "batch_shapes": "pipeline", "pad_batch": "pipeline",
    "tokenizer_file": "pipeline", "BATCH_KEYS": "pipeline",
    "Tokenizer": "tokenizer", "train_bpe": "tokenizer",
    "ChatTemplate": "templates", "TEMPLATES": "templates", "get_template": "templates",
    "Record": "records", "Clip": "records", "format_mcq": "records", "parse_record": "records",
    "open_source": "sources", "pack_manifest": "sources", "to_record": "sources",
    "write_corpus": "synth",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
  if name in _EXPORTS:
    return getattr(importlib.import_module(f"alm_jax.data.{_EXPORTS[name]}"), name)
  raise AttributeError(f"module 'alm_jax.data' has no attribute {name!r}")
