"""Configuration: precedence, overrides, validation messages, batch arithmetic, every shipped config."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from ds_train.config import (
    DS_CONFIG_DIR,
    Config,
    ConfigError,
    TrainConfig,
    batch_arithmetic,
    deepspeed_config,
    load_config,
    resolve_precision,
)
from ds_train.config_cli import field_docs, parse_args
from ds_train.data.tokenizer import DEFAULT_VOCAB_SIZE
from ds_train.errors import UsageError
from ds_train.train import main

RECIPES = sorted((DS_CONFIG_DIR / "recipes").glob("*.yaml"))
MACHINES = sorted((DS_CONFIG_DIR / "machines").glob("*.yaml"))
DS_JSONS = sorted(DS_CONFIG_DIR.glob("*.json"))


def test_defaults_are_the_embedded_job():
    cfg = load_config()
    assert (cfg.model.flavor, cfg.objective.name, cfg.objective.separation) == ("tiny", "code_clm", "partial")
    assert cfg.data.source == "mined" and cfg.train.deepspeed == ["zero2.json"]
    cfg.validate(world_size=1)


def test_precedence_defaults_yaml_cli(tmp_path):
    a = tmp_path / "a.yaml"
    b = tmp_path / "b.yaml"
    a.write_text(yaml.safe_dump({"train": {"max_steps": 7, "micro_batch_size": 3}, "optim": {"lr": 0.5}}))
    b.write_text(yaml.safe_dump({"train": {"max_steps": 9}}))
    cfg = load_config([str(a), str(b)], ["--train.max_steps=11", "--objective.separation=full"])
    assert cfg.train.max_steps == 11  # CLI beats both files
    assert cfg.train.micro_batch_size == 3  # first file kept where the second is silent
    assert cfg.optim.lr == 0.5 and cfg.objective.separation == "full"
    assert cfg.optim.min_lr == Config().optim.min_lr  # default where nobody spoke


def test_required_override_names_exist():
    names = ["run.dir=x", "train.max_steps=5", "checkpoint.every_steps=2", "model.flavor=debug",
             "objective.name=prefix_code_clm", "objective.separation=none", "data.source=a.jsonl"]
    cfg = load_config(None, [f"--{n}" for n in names])
    assert (cfg.run.dir, cfg.train.max_steps, cfg.checkpoint.every_steps) == ("x", 5, 2)
    assert (cfg.model.flavor, cfg.objective.name, cfg.objective.separation) == ("debug", "prefix_code_clm", "none")
    assert cfg.data.source == "a.jsonl"


def test_list_override_and_scientific_floats():
    cfg = load_config(None, ["--train.deepspeed=zero3.json,bf16.json", "--optim.lr=3e-4"])
    assert cfg.train.deepspeed == ["zero3.json", "bf16.json"] and cfg.optim.lr == pytest.approx(3e-4)


def test_every_problem_reported_at_once(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["--train.max_stepz=3", "--model.nope=1", "--train.max_steps=abc", "noequals"])
    msg = str(err.value)
    assert "unknown config key 'train.max_stepz'" in msg
    assert "unknown config key 'model.nope'" in msg
    assert "train.max_steps='abc': expected an integer" in msg
    assert "override 'noequals'" in msg
    assert len(msg.splitlines()) == 4

    cfg = load_config(None, ["--objective.name=clm", "--objective.separation=half", "--model.flavor=huge",
                             "--train.precision=fp8", "--optim.lr=-1", "--checkpoint.every_steps=0",
                             "--train.deepspeed=missing.json"])
    with pytest.raises(ConfigError) as err:
        cfg.validate(world_size=1)
    lines = str(err.value).splitlines()
    for needle in ("objective.name='clm'", "objective.separation='half'", "model.flavor='huge'",
                   "train.precision='fp8'", "optim.lr=-1.0", "checkpoint.every_steps=0", "'missing.json' not found"):
        assert sum(needle in line for line in lines) == 1, (needle, lines)


def test_bad_yaml_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    section = tmp_path / "section.yaml"
    section.write_text("train: 5\n")
    with pytest.raises(ConfigError) as err:
        load_config([str(bad), str(listy), str(section), str(tmp_path / "none.yaml")])
    msg = str(err.value)
    assert "not valid YAML" in msg and "expected a mapping" in msg and "train: expected a section" in msg
    assert "none.yaml' not found" in msg


@pytest.mark.parametrize(
    ("micro", "accum", "glob", "world", "expect"),
    [(4, 0, 0, 1, (4, 1, 4)), (4, 3, 0, 2, (4, 3, 24)), (4, 0, 32, 2, (4, 4, 32)), (2, 2, 8, 2, (2, 2, 8))],
)
def test_batch_arithmetic(micro, accum, glob, world, expect):
    b = batch_arithmetic(TrainConfig(micro_batch_size=micro, grad_accum=accum, global_batch_size=glob), world)
    assert (b.micro, b.accum, b.global_) == expect
    assert b.micro * b.accum * world == b.global_


@pytest.mark.parametrize(("micro", "accum", "glob", "world", "needle"), [
    (4, 0, 30, 2, "not a multiple of micro_batch_size x world size = 4 x 2 = 8"),
    (4, 3, 30, 2, "!= micro_batch_size x grad_accum x world size = 4 x 3 x 2 = 24"),
    (0, 1, 0, 1, "must be positive"),
])
def test_impossible_batch_arithmetic(micro, accum, glob, world, needle):
    cfg = load_config(None, [f"--train.micro_batch_size={micro}", f"--train.grad_accum={accum}",
                             f"--train.global_batch_size={glob}"])
    with pytest.raises(ConfigError) as err:
        cfg.validate(world_size=world)
    assert needle in str(err.value)


def test_batch_written_into_deepspeed_config():
    cfg = load_config(None, ["--train.micro_batch_size=2", "--train.global_batch_size=12",
                             "--train.deepspeed=zero3_offload.json", "--optim.grad_clip=0.5"])
    b = batch_arithmetic(cfg.train, 3)
    ds = deepspeed_config(cfg, b, "bf16")
    batch = (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"])
    assert batch == (2, 2, 12)
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] and "fp16" not in ds
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["offload_param"]["device"] == "cpu"


def test_one_rank_zero2_drops_overlap_comm_and_bf16_skips_the_overflow_scan():
    cfg = load_config(None, ["--train.deepspeed=zero2.json"])
    one, two = (deepspeed_config(cfg, batch_arithmetic(cfg.train, w), "bf16") for w in (1, 2))
    assert one["zero_optimization"]["overlap_comm"] is False  # nothing to overlap; it syncs the device
    assert two["zero_optimization"]["overlap_comm"] is True  # as ds_configs/zero2.json says
    assert one["bf16"] == {"enabled": True, "check_grad_overflow": False}  # our own non-finite check serves


def test_deepspeeds_throughput_timer_never_synchronises_the_device(tmp_path):
    """DeepSpeed's throughput timer is on and synchronising by default (a device sync at every forward
    and step(), which keeps the host from running ahead); the merged config turns it off, as DeepSpeed's
    own parser reads it, unless a listed JSON sets it."""
    from deepspeed.utils.config import get_timers_config

    assert get_timers_config({}).synchronized  # DeepSpeed's default, which the merged config must override
    cfg = load_config(None, ["--train.deepspeed=zero2.json"])
    timers = get_timers_config(deepspeed_config(cfg, batch_arithmetic(cfg.train, 1), "bf16"))
    assert not timers.enabled and not timers.synchronized
    listed = tmp_path / "timers.json"
    listed.write_text(json.dumps({"timers": {"throughput": {"enabled": True, "synchronized": True}}}))
    cfg = load_config(None, [f"--train.deepspeed=zero2.json,{listed}"])
    assert get_timers_config(deepspeed_config(cfg, batch_arithmetic(cfg.train, 1), "bf16")).synchronized


def test_precision_resolution_and_fp16_on_cpu():
    assert resolve_precision(TrainConfig(), has_gpu=False, bf16_ok=False) == "fp32"
    assert resolve_precision(TrainConfig(), has_gpu=True, bf16_ok=True) == "bf16"
    assert resolve_precision(TrainConfig(deepspeed=["zero2.json", "fp16.json"]), True, True) == "fp16"
    cfg = load_config(None, ["--train.deepspeed=zero2.json,fp16.json"])
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        cfg.validate(world_size=1, has_gpu=False)
    cfg.validate(world_size=1, has_gpu=True)
    ds = deepspeed_config(cfg, batch_arithmetic(cfg.train, 1), "fp16")
    assert ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0


@pytest.mark.parametrize("path", DS_JSONS, ids=lambda p: p.name)
def test_every_deepspeed_json_loads(path):
    data = json.loads(path.read_text())
    cfg = load_config(None, [f"--train.deepspeed={path.name}"])
    cfg.validate(world_size=2, has_gpu=True)
    ds = deepspeed_config(cfg, batch_arithmetic(cfg.train, 2), "fp32")
    if "zero_optimization" in data:
        assert ds["zero_optimization"] == data["zero_optimization"]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
@pytest.mark.parametrize("machine", MACHINES, ids=lambda p: p.name)
def test_every_recipe_with_every_machine_validates(recipe, machine, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # machine files name relative paths; make them exist here
    for section in yaml.safe_load(machine.read_text()).values():
        for key, value in section.items():
            if key in ("tokenizer", "init_from"):
                Path(value).mkdir(parents=True, exist_ok=True)
    cfg = load_config([str(recipe), str(machine)])
    cfg.validate(world_size=1 if machine.name == "one-gpu.yaml" else 8, has_gpu=True)  # the machine's GPUs


def test_cli_override_forms():
    files, overrides, print_only = parse_args(["a.yaml", "--train.max_steps", "5", "--run.dir=x", "--local_rank=0"])
    assert files == ["a.yaml"] and overrides == ["--train.max_steps=5", "--run.dir=x"] and not print_only
    assert parse_args(["--print-config"])[2]


def test_config_errors_are_usage_errors_and_one_vocabulary_default():
    assert issubclass(ConfigError, UsageError)
    assert Config().data.vocab_size == DEFAULT_VOCAB_SIZE


def _every_field():
    for section in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[section.name]
        for f in dataclasses.fields(cls):
            yield section.name, cls, f


def _docs_in_source(cls) -> dict[str, str]:
    """The docstring line(s) under each `name: type = default` line of a config class, read by a regex."""
    src = inspect.getsource(cls)
    return {m.group(1): " ".join(m.group(2).split())
            for m in re.finditer(r'^    (\w+): [^\n]*\n    """(.*?)"""', src, re.S | re.M)}


def test_help_lists_every_field_with_its_docstring_and_default(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    flat = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    defaults = Config()
    for section, cls, f in _every_field():
        assert f"--{section}.{f.name}" in flat
        doc = _docs_in_source(cls).get(f.name)
        assert doc, f"{section}.{f.name} has no docstring"
        assert field_docs(cls)[f.name] == doc
        default = getattr(getattr(defaults, section), f.name)
        shown = (",".join(default) or "(empty)") if isinstance(default, list) else (
            str(default).lower() if isinstance(default, bool) else ("''" if default == "" else str(default)))
        assert f"{' '.join(doc.split())} (default: {shown})" in flat, (section, f.name)


def test_field_docs_reads_the_source():
    docs = field_docs(TrainConfig)
    assert docs["max_steps"] == "Optimizer steps to train for (the learning-rate schedule spans them)."
    assert docs["stop_at_step"].startswith("Stop this invocation after this step") and "\n" not in docs["stop_at_step"]


def test_print_config_round_trips_through_yaml(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    a = tmp_path / "a.yaml"
    a.write_text(yaml.safe_dump({"train": {"micro_batch_size": 3, "grad_accum": 2}, "optim": {"lr": 2e-4}}))
    args = [str(a), "--print-config", "--objective.separation=full", "--train.deepspeed=zero3.json,bf16.json",
            "--export.enabled=false", "--run.dir", str(tmp_path / "never")]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert not (tmp_path / "never").exists()  # printing runs nothing
    data = yaml.safe_load(printed)
    assert data["train"]["global_batch_size"] == 3 * 2 * 2 and data["train"]["grad_accum"] == 2
    out = tmp_path / "printed.yaml"
    out.write_text(printed)
    again = load_config([str(out)])
    want = load_config([str(a)], ["--objective.separation=full", "--train.deepspeed=zero3.json,bf16.json",
                                  "--export.enabled=false", f"--run.dir={tmp_path / 'never'}",
                                  "--train.global_batch_size=12"])
    assert again == want
    assert again.optim.lr == 2e-4 and again.train.deepspeed == ["zero3.json", "bf16.json"]
    assert again.export.enabled is False


def test_ds_train_print_config_writes_only_yaml_to_stdout(tmp_path):
    """The console script, as a user runs it (no DS_ACCELERATOR): stdout is the YAML alone, also on a
    machine without a GPU, where importing DeepSpeed would log a line to stdout."""
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    proc = subprocess.run([sys.executable, "-c", "import sys; from ds_train.cli import main; sys.exit(main())",
                           "--print-config", "--train.max_steps=7"], env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert yaml.safe_load(proc.stdout) == {**Config().to_dict(), "train": {
        **Config().to_dict()["train"], "max_steps": 7, "grad_accum": 1, "global_batch_size": 8}}


def test_print_config_refuses_a_bad_config_in_lines(capsys):
    assert main(["--print-config", "--train.max_stepz=3", "--optim.lr=abc"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("ds-train: ") for line in err), err
