"""README's "Data preparation" commands run as written (issue 35, item 8: its `--vocab-size 128000`
example failed on the built-in corpus, and no command trained on one's own corpus on a CPU)."""

import re
import shlex
from pathlib import Path

import pytest

from data_prep.cli import build_parser
from data_prep.cli import main as data_prep

README = Path(__file__).resolve().parents[1] / "README.md"


def _section_commands(title: str) -> list[list[list[str]]]:
    """Each bash block of README's section `title`: its commands, continuation lines joined, comments dropped."""
    text = README.read_text()
    section = text[text.index(f"## {title}\n"):]
    section = section[:section.index("\n## ", 1)]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    return [[shlex.split(line, comments=True) for line in block.replace("\\\n", " ").splitlines() if line.strip()]
            for block in blocks]


def _train_config(argv: list[str]):
    """What `python -m deberta_ds.train ARGS` builds before its first step: the run config and its data,
    checked against the tokenizer and the model (no training)."""
    from deberta_ds.train import parse_args
    from deberta_ds.training.run_config import load_run_config
    from tests.train_helpers import trainer_data

    args = parse_args(argv)
    config = load_run_config(args.config, args.overrides)
    return config, trainer_data(config)


@pytest.mark.slow
def test_the_data_preparation_commands_run_as_written(tmp_path, monkeypatch):
    """The built-in corpus block runs end to end in a fresh folder (each command exits 0 and the
    training command's data checks pass); the own-corpus block's commands parse."""
    built_in, own = _section_commands("Data preparation")
    monkeypatch.chdir(tmp_path)
    for command in built_in:
        assert command[:2] == ["python", "-m"], command
        if command[2] == "data_prep":
            assert data_prep(command[3:]) == 0, command
        else:
            assert command[2] == "deberta_ds.train", command
            config, (samples, valid, meta) = _train_config(command[3:])
            assert config.data.tokenizer == "data/tok" and meta.pieces == 8000 and len(valid) > 0
    for command in own:
        assert command[:3] == ["python", "-m", "data_prep"], command
        build_parser().parse_args(command[3:])
