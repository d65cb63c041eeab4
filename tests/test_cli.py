"""The `alm-jax` command line: help for every subcommand, config validation as one-line errors."""

import pytest

from alm_jax import cli
from tests.helpers import TINY, alm_jax


def test_every_subcommand_has_help(capsys):
  for name in cli.COMMANDS:
    with pytest.raises(SystemExit) as exit_info:
      cli.main([name, "--help"])
    assert exit_info.value.code == 0
    assert "usage: alm-jax" in capsys.readouterr().out


@pytest.mark.parametrize(
    "override, key",
    [
        ("--config.train.stepz=3", "config.train.stepz"),  # unknown key
        ("--config.train.steps=ten", "config.train.steps"),  # wrong type
        ("--config.model.llm.num_kv_heads=3", "config.model.llm.num_kv_heads"),  # 4 heads not divisible by 3
        ("--config.model.bridge.qformer.llm_dim=100", "config.model.bridge"),  # bridge width != LLM width
        ("--config.model.audio.window_seconds=60.0", "config.model.audio.window_seconds"),  # > position table
        ("--config.train.stage=warmup", "config.train.stage"),  # unknown stage
        ("--config.mesh.shape=(3,1,1)", "config.mesh.shape"),  # does not divide the device count
    ],
)
def test_bad_config_is_one_line_naming_the_key(override, key, tmp_path):
  result = alm_jax("train", "--config", TINY, "--workdir", str(tmp_path / "w"), "--config.data.path=/nonexistent",
                   override, timeout=120)
  assert result.returncode == 2, result.stderr
  lines = [l for l in result.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
  assert key in lines[0], lines[0]


def test_missing_config_file(tmp_path):
  result = alm_jax("train", "--config", str(tmp_path / "nope.py"), "--workdir", str(tmp_path), timeout=60)
  assert result.returncode == 2
  assert "nope.py" in result.stderr and "Traceback" not in result.stderr
