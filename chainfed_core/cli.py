"""The command line: ``python -m chainfed_core --out runs/demo data.dataset=sarcasm fed.rounds=12``.

A run's config is a JSON file (``--config``, optional) plus ``section.field=value``
overrides, checked before anything heavy is loaded: the config's keys, types and ranges
(:mod:`chainfed_core.config`), the data set's name or files (:func:`chainfed_core.data.check_dataset`)
and the model's name. A user error prints one line, ``error: <message>``, and exits with
status 2 (``--debug`` shows the traceback instead). ``--help`` lists every config field with
its default and help text, read from the config dataclasses.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import textwrap
import typing
from pathlib import Path
from typing import Any

from .assets import ASSETS, AssetError
from .config import RunConfig, Config, allowed_values, bounds_text
from .data import SYNTHETIC, check_dataset
from .records import RECORD_FILE

PROG = "python -m chainfed_core"
USER_ERROR, RUN_FAILED = 2, 1


class UsageError(ValueError):
    """A command line the parser refuses (missing --out, unknown option)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(f"{message} (see {PROG} --help)")


# ---------------------------------------------------------------------- the config
def _read_config_file(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; ValueError naming the file (and the line) otherwise."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{path}: no such config file") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a UTF-8 text file") from None
    except OSError as err:
        raise ValueError(f"{path}: cannot read the config file: {err.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}, line {err.lineno}, column {err.colno}: invalid JSON: {err.msg}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object of config sections, got {type(data).__name__}")
    return data


def _refuse_constant(name: str):
    raise ValueError(name)


def _value(raw: str) -> Any:
    """An override's value: JSON where it parses (numbers, true, null, lists, objects), else the text."""
    try:
        return json.loads(raw, parse_constant=_refuse_constant)  # NaN / Infinity stay text
    except ValueError:
        return raw


def config_from_args(config_path: str | None, overrides: list[str]) -> RunConfig:
    """A RunConfig from an optional JSON file plus ``section.field=value`` overrides
    (values parsed as JSON when they parse, else kept as strings). Every problem is a
    one-line ``ValueError`` naming the file, the override or the config field."""
    data = _read_config_file(Path(config_path)) if config_path else {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        names = key.split(".")
        if not sep or not all(names):
            raise ValueError(f"override {item!r} is not section.field=value (e.g. fed.rounds=3)")
        node = data
        *parents, leaf = names
        for depth, name in enumerate(parents):
            node = node.setdefault(name, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {'.'.join(names[:depth + 1])} is a value, not a section")
        node[leaf] = _value(raw)
    return RunConfig.from_dict(data)


def _check_model(name: str) -> None:
    """A local model folder, a tiny-<family> test model or a model asset (its files are not read)."""
    if name.startswith("tiny") or Path(name).expanduser().is_dir():
        return
    if name not in ASSETS or ASSETS[name].kind != "model":
        models = sorted(a.name for a in ASSETS.values() if a.kind == "model")
        raise ValueError(f"ModelConfig.name: {name!r} is neither a local model folder nor a model asset "
                         f"({', '.join(models)}) nor tiny-<family>[-L<layers>][-H<hidden>]")


def check_inputs(config: RunConfig) -> None:
    """What can be checked before any model or data is loaded: the data set and the model exist."""
    if config.data.dataset != SYNTHETIC:
        check_dataset(config.data.dataset)
    _check_model(config.model.name)


# ---------------------------------------------------------------------- --help
def _is_section(hint: Any) -> bool:
    return isinstance(hint, type) and issubclass(hint, Config)


def _shown(value: Any) -> str:
    """A default as it is typed in an override."""
    return value if isinstance(value, str) else json.dumps(value)


def _field_lines(cls: type, prefix: str, width: int) -> list[str]:
    """``prefix.field=default  help (allowed values or range)`` for each plain field of ``cls``."""
    hints, lines = typing.get_type_hints(cls), []
    for f in dataclasses.fields(cls):
        if _is_section(hints[f.name]):
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        allowed = allowed_values(hints[f.name])
        if "choices" in f.metadata:
            allowed = f.metadata["choices"]()
        body = textwrap.wrap(f.metadata["help"], width - 34) or [""]
        for note in (f"one of: {', '.join(map(str, allowed))}" if allowed else "", bounds_text(f.metadata)):
            if note and len(body[-1]) + len(note) + 3 <= width - 34:
                body[-1] += f" [{note}]"
            elif note:
                body += textwrap.wrap(f"[{note}]", width - 34)
        name = f"{prefix}{f.name}={_shown(default)}"
        first = f"  {name:<32}{body[0]}" if len(name) <= 30 else f"  {name}\n{'':34}{body[0]}"
        lines += [first, *(f"{'':34}{b}" for b in body[1:])]
    return lines


def config_help(width: int = 100) -> str:
    """Every config field of every section with its default and help text, from the dataclasses."""
    lines = ["config (section.field=value overrides; a value is read as JSON where it parses, else as text):",
             *_field_lines(RunConfig, "", width)]
    hints = typing.get_type_hints(RunConfig)
    for f in dataclasses.fields(RunConfig):
        if _is_section(hints[f.name]):
            lines += ["", f" {f.name}: {f.metadata['help']}", *_field_lines(hints[f.name], f"{f.name}.", width)]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
                     description="Run a federated experiment in-process; rerunning the same command on the "
                                 "same --out resumes it from its last checkpoint.",
                     epilog=f"{config_help()}\n\nexample:\n  {PROG} --out runs/demo data.dataset=sarcasm "
                            "data.max_train_examples=1000 fed.rounds=12")
    parser.add_argument("--config", metavar="FILE", help="a RunConfig as JSON (overrides apply on top of it)")
    parser.add_argument("--out", metavar="DIR", help="output folder: checkpoint, metrics.jsonl, record.json")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value", help="e.g. fed.rounds=3")
    return parser


# ---------------------------------------------------------------------- the run
def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def summary(out: Path, record: dict) -> str:
    """The output folder's files, what each holds, and the final result in one line."""
    from .checkpoint import CHECKPOINT_FILE, METRICS_FILE

    about = {CHECKPOINT_FILE: "server state after the last round (rerunning this command resumes from it)",
             METRICS_FILE: "one JSON line per round: loss, accuracy, clients, bytes, failures, timings",
             RECORD_FILE: "the run: config, seed, code version, wall time, peak memory, every round"}
    files = sorted(p for p in out.iterdir() if p.is_file() and not p.name.startswith("."))
    lines = [f"{out}/"] + [f"  {p.name:<16}{_size(p.stat().st_size):>9}  {about.get(p.name, '')}".rstrip()
                           for p in files]
    final, rounds = record.get("final") or {}, len(record.get("history", []))
    accuracy = final.get("test_accuracy")
    result = f"final test accuracy {accuracy:.3f}" if isinstance(accuracy, float) else "no test accuracy"
    lines.append(f"{result} after {rounds} round{'s' * (rounds != 1)} ({record['wall_s']:.1f} s); "
                 f"record: {out / RECORD_FILE}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse, check, run. A user error prints one ``error:`` line and returns 2 (with
    ``--debug`` it raises); a run in which every client failed returns 1."""
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        args = _parser().parse_args(argv)
        config = config_from_args(args.config, args.overrides)
        check_inputs(config)
        if args.print_config:
            print(json.dumps(config.to_dict(), indent=1))
            return 0
        if not args.out:
            raise UsageError(f"the following arguments are required: --out (see {PROG} --help)")
        return _run(config, Path(args.out), progress=not args.no_progress, debug=debug)
    except (ValueError, OSError, AssetError) as err:  # a config, data, file or model problem the user can fix
        if debug:
            raise
        return _error(str(err), USER_ERROR)


def _run(config: RunConfig, out: Path, *, progress: bool, debug: bool) -> int:
    from .display import quiet_libraries
    quiet_libraries()                            # no transformers load report or loading bars in a terminal run
    from .federated import RunFolderLocked, run  # after the checks: this loads torch and transformers
    from .rounds import AllClientsFailed

    try:
        record = run(config, out, progress=progress)
    except RunFolderLocked as err:
        if debug:
            raise
        return _error(str(err), USER_ERROR)
    except AllClientsFailed as err:
        if debug:
            raise
        return _error(f"{err}; record: {out / RECORD_FILE}", RUN_FAILED)
    except KeyboardInterrupt:
        return _error(f"interrupted; rerun the same command to resume from {out}", 130)
    print(summary(out, record))
    return 0


def _error(message: str, status: int) -> int:
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    return status
