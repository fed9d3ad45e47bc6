"""Config loading, before any process group: floats written `1e-4`, broken YAML reported in one line with its
position."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from kclip.cli import main
from kclip.config import ConfigError, load_config
from kclip.validate import validate


@pytest.fixture(scope="module")
def mds(tmp_path_factory) -> Path:
    """What validate() reads of a dataset: index.json and the shard files' existence (no data is opened)."""
    folder = tmp_path_factory.mktemp("mds")
    (folder / "shard.00000.mds").write_bytes(b"")
    shard = {"samples": 64, "raw_data": {"basename": "shard.00000.mds"}}
    (folder / "index.json").write_text(json.dumps({"shards": [shard]}))
    return folder


def smoke(mds: Path, *overrides: str):
    return load_config("smoke", [f"data.train={mds}", *overrides])


def test_floats_with_an_exponent_load_from_the_command_line_and_from_yaml(mds, tmp_path):
    cfg = smoke(mds, "optim.lr=1e-4", "optim.eps=1E-8", "concepts.tau=5e-2")
    assert (cfg.optim.lr, cfg.optim.eps, cfg.concepts.tau) == (1e-4, 1e-8, 5e-2)
    validate(cfg, world_size=1, cuda=False)
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 5e-4\n  weight_decay: 1e-2\n"
                    "teacher:\n  random_config: {hidden_size: 48, rms_norm_eps: 1e-5}\n")
    cfg = load_config(str(path))
    assert (cfg.optim.lr, cfg.optim.weight_decay) == (5e-4, 1e-2)
    # Nested in a dict field, which goes to transformers unchecked: a string here would fail far from the config.
    assert cfg.teacher.random_config["rms_norm_eps"] == 1e-5
    with pytest.raises(ConfigError, match=r"^optim.lr: expected float, got '1e-4'$"):
        smoke(mds, "optim.lr='1e-4'")  # quoted, it is a string, as YAML says


@pytest.mark.parametrize("content, override, expected", [
    (b"train:\n  steps: 10\n  global_batch_size: 16: 3\n", None,
     "invalid YAML in {path} at line 3, column 24: mapping values are not allowed here"),
    (b"optim:\n  lr: [1e-4\n", None,
     "invalid YAML in {path} at line 3, column 1: expected ',' or ']', but got '<stream end>'"),
    (b"train:\n  steps: \xff\n", None, "invalid YAML in {path}: "),
    (None, "train.steps=[1",
     "train.steps: invalid YAML in override 'train.steps=[1' at line 1, column 15: expected ',' or ']', but got"),
], ids=["file-syntax", "file-unclosed", "file-not-utf8", "override"])
def test_broken_yaml_is_one_line_with_its_position(tmp_path, capsys, content, override, expected):
    path = tmp_path / "broken.yaml"
    path.write_bytes(content or b"train:\n  steps: 10\n")
    argv = ["train", "--config", str(path), "--output", str(tmp_path / "run"), *([override] if override else [])]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("kclip: error: ") and expected.format(path=path) in err, err
