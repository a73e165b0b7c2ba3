"""Bad settings as `python -m deberta_ds.train` meets them (its main(), in this process): each is
refused with a message naming the field before anything starts; config texts are parsed within
bounds (alias bombs, deep nesting); the command line's own friction (--config, --show-config,
overrides after --resume)."""

import json
import sys

import pytest
import yaml

from deberta_ds import train
from deberta_ds.config import MAX_DEPTH, to_dict
from deberta_ds.training.run_config import RunConfig
from tests.proc_helpers import REPO, run_bounded, write_run
from tests.train_helpers import tiny_run


@pytest.fixture
def no_start(monkeypatch):
    """Fail the test if DeepSpeed's process set-up is reached: every refusal here comes before it."""
    def started(**_):
        raise AssertionError("DeepSpeed was started before the input was refused")
    monkeypatch.setattr(train, "setup_process", started)


def refused(capsys, argv: list[str]) -> str:
    assert train.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err, err
    return err


NONSENSE = [  # (override, the message's start)
    ("optim.lr=.inf", "error: optim.lr: inf is not a learning rate"),
    ("optim.lr=1e4", "error: optim.lr: 10000.0 is not a learning rate"),
    ("optim.generator_lr=0", "error: optim.generator_lr: 0 is not a learning rate"),
    ("optim.generator_lr=-1e-3", "error: optim.generator_lr: -0.001 is not a learning rate"),
    ("optim.generator_lr=.nan", "error: optim.generator_lr: nan is not a learning rate"),
    ("optim.eps=0", "error: optim.eps: 0 must be in (0, 1)"),
    ("optim.eps=.nan", "error: optim.eps: nan must be in (0, 1)"),
    ("optim.weight_decay=-0.1", "error: optim.weight_decay: -0.1 must be finite and >= 0"),
    ("optim.weight_decay=.nan", "error: optim.weight_decay: nan must be finite"),
    ("optim.clip_grad=-1", "error: optim.clip_grad: -1 must be finite and >= 0"),
    ("optim.clip_grad=.nan", "error: optim.clip_grad: nan must be finite"),
    ("optim.min_lr_ratio=1.5", "error: optim.min_lr_ratio: 1.5 must be in [0, 1]"),
    ("rtd.rtd_lambda=.inf", "error: rtd.rtd_lambda: must be positive and finite"),
    ("rtd.temperature=.inf", "error: rtd.temperature: must be positive and finite"),
    ("model_overrides.initializer_range=-1", "error: model_overrides.initializer_range: must be positive"),
    ("model_overrides.initializer_range=.inf", "error: model_overrides.initializer_range: must be positive"),
    (f"seed={2 ** 70}", f"error: seed: {2 ** 70} must be in [0, 2**63)"),
    ("data.seed=-1", "error: data.seed: -1 must be in [0, 2**63)"),
    ("train.exit_after_steps=0", "error: train.exit_after_steps: must be >= 1"),
    ("train.exit_after_steps=-1", "error: train.exit_after_steps: must be >= 1"),
    ("train.max_nonfinite_steps=0", "error: train.max_nonfinite_steps: must be >= 1"),
    ("train.steps=[1, 2", "error: override 'train.steps=[1, 2': not valid YAML"),
    ("train.ds_overrides={zero_optimizaton: {stage: 2}}", "error: train.ds_overrides: unknown DeepSpeed section(s) "
                                                          "['zero_optimizaton']"),
    ("train.ds_overrides={zero_optimization: 5}", "error: train.ds_overrides.zero_optimization: 5 has the wrong type"),
    ("train.ds_overrides={zero_optimization: {reduce_bucket: 5}}",
     "error: train.ds_overrides.zero_optimization: reduce_bucket: Extra inputs are not permitted"),
]


@pytest.mark.parametrize("override,message", NONSENSE, ids=[o for o, _ in NONSENSE])
def test_nonsense_settings_are_refused_naming_the_field(override, message, train_shards, tmp_path, capsys, no_start):
    config = str(write_run(tmp_path / "run.json", tiny_run(train_shards, tmp_path / "out")))
    assert refused(capsys, ["--config", config, override]).startswith(message)
    assert not (tmp_path / "out").exists()


def test_tp_flag_zero_or_negative_is_refused(train_shards, tmp_path, capsys, no_start):
    config = str(write_run(tmp_path / "run.json", tiny_run(train_shards, tmp_path / "out")))
    for tp in ("0", "-2"):
        assert refused(capsys, ["--config", config, "--tp", tp]).startswith(f"error: train.tp: must be >= 1, got {tp}")


def test_a_deepspeed_json_that_is_not_an_object_or_nested_too_deep_is_named(train_shards, tmp_path, capsys, no_start):
    for name, text in (("list.json", "[1, 2]"), ("deep.json", "[" * 5000 + "]" * 5000)):
        (tmp_path / name).write_text(text)
        run = tiny_run(train_shards, tmp_path / "out", train={"ds_config": str(tmp_path / name)})
        error = refused(capsys, ["--config", str(write_run(tmp_path / "run.json", run))])
        assert f"train.ds_config: {tmp_path / name}" in error
        assert ("must be a JSON object" if name == "list.json" else f"nested deeper than {MAX_DEPTH} levels") in error


def test_machine_limits_are_refused_before_deepspeed_starts(train_shards, tmp_path, capsys, no_start, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.delenv("DEBERTA_DS_CPU_FP16", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the interpreter (set for the tests) runs fused on a CPU
    config = str(write_run(tmp_path / "run.json", tiny_run(train_shards, tmp_path / "out")))
    assert "error: train.precision: fp16 needs a GPU" in refused(capsys, ["--config", config, "train.precision=fp16"])
    assert "error: model_overrides.attention_impl: fused needs a CUDA GPU" in refused(
        capsys, ["--config", config, "model_overrides.attention_impl=fused"])


def test_data_errors_come_before_deepspeed_starts(train_shards, tmp_path, capsys, no_start):
    run = tiny_run(train_shards, tmp_path / "out", data={"train": [str(tmp_path / "gone")]})
    config = str(write_run(tmp_path / "run.json", run))
    assert str(tmp_path / "gone") in refused(capsys, ["--config", config])


def test_latest_that_is_a_directory_is_named(train_shards, tmp_path, capsys, no_start):
    (tmp_path / "out" / "checkpoints" / "latest").mkdir(parents=True)
    config = str(write_run(tmp_path / "run.json", tiny_run(train_shards, tmp_path / "out")))
    latest = tmp_path / "out" / "checkpoints" / "latest"
    assert f"error: {latest}: is not a file" in refused(capsys, ["--config", config])


def test_a_yaml_alias_bomb_and_deep_nesting_are_refused_quickly(tmp_path):
    """Nine levels of nine aliases: 9**9 strings once expanded. Refused by the bounded parser, in a
    child process (if the bound were lost, the test would fail by its time limit, not hang the suite)."""
    levels = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("model_overrides:\n" + "".join(f"  {line}\n" for line in levels))
    assert len(bomb.read_bytes()) < 700
    deep = tmp_path / "deep.yaml"
    deep.write_text("train: " + "[" * 200 + "]" * 200 + "\n")
    script = ("import sys\nfrom deberta_ds.training.run_config import load_run_config\n"
              "from deberta_ds.errors import UserError\n"
              "for path, override in ((sys.argv[1], []), (sys.argv[2], []), (None, ['train.steps=' + sys.argv[3]])):\n"
              "    try:\n        load_run_config(path, override)\n    except UserError as error:\n"
              "        print('refused:', str(error).splitlines()[0][:300])\n")
    result = run_bounded([sys.executable, "-c", script, str(bomb), str(deep), "{a: " * 100 + "1" + "}" * 100],
                         timeout_s=120, cwd=REPO)
    lines = result.stdout.splitlines()
    assert result.returncode == 0 and len(lines) == 3, result.stdout + result.stderr[-2000:]
    assert lines[0].startswith(f"refused: --config {bomb}: expands to more than 100,000 values")
    assert lines[1].startswith(f"refused: --config {deep}: not valid YAML: nested deeper than {MAX_DEPTH} levels")
    assert lines[2].startswith("refused: override 'train.steps={a: {a: ") and "nested deeper" in lines[2]


def test_a_yaml_1_1_exponent_hint_shows_the_spelling_that_works(train_shards, tmp_path, capsys, no_start):
    path = tmp_path / "run.yaml"
    text = yaml.safe_dump(tiny_run(train_shards, tmp_path / "out", optim={"lr": "LR"}))
    for written, hint in (("2e-3", "write 2.0e-3"), ("1.0e9", "write 1.0e+9"), ("5E4", "write 5.0e+4")):
        path.write_text(text.replace("lr: LR", f"lr: {written}"))
        assert f"optim.lr: '{written}' is not of type float (YAML 1.1 reads {written} as text: {hint})" in refused(
            capsys, ["--config", str(path)])


def test_forgetting_config_is_refused_naming_it_and_show_config_lists_every_key(capsys, no_start):
    error = refused(capsys, [])
    assert "error: --config: missing" in error and "quickstart" in error and "--show-config" in error
    assert train.main(["--show-config"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown == to_dict(RunConfig())  # every key with its default
    assert train.main(["--show-config", "--config", "quickstart", "train.steps=7"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["train"]["steps"] == 7


def test_overrides_may_follow_resume():
    args = train.parse_args(["--config", "c.yaml", "train.steps=3", "--resume", "auto", "optim.lr=1e-3"])
    assert args.resume == "auto" and args.overrides == ["train.steps=3", "optim.lr=1e-3"]


def test_a_large_json_of_the_programs_own_is_read_and_still_bounded_in_depth():
    """JSON has no aliases: a COMPLETE listing 30,000 checkpoint files (120,000 values, past the YAML alias
    bound) parses; the same data as YAML is refused by that bound, and JSON nested past MAX_DEPTH still is."""
    from deberta_ds.config import parse_config_text
    from deberta_ds.errors import UserError

    listing = {"files": {f"rank_{i}.pt": {"bytes": i, "sha256": "0" * 64, "kind": "w"} for i in range(30_000)}}
    assert parse_config_text(json.dumps(listing), "json", "COMPLETE") == listing
    with pytest.raises(UserError, match="expands to more than 100,000 values"):
        parse_config_text(yaml.safe_dump(listing), "yaml", "run.yaml")
    with pytest.raises(UserError, match=f"nested deeper than {MAX_DEPTH} levels"):
        parse_config_text("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1), "json", "COMPLETE")
