"""YAML config files of the trainer: read (``--config``), and the resolved one every run writes.

A config's keys are the command-line options' names (``batch-size`` or ``batch_size``);
its values become arguments placed before the command line's, so argparse checks them
exactly as typed ones and the command line wins. ``--config`` also takes the name of a
preset shipped in ``margin_ext/train/presets``; a preset's relative ``val`` files are
read from the ``--data`` folder.

The resolved ``config.yaml`` holds every option of a run (defaults resolved where the
run resolves them), written one ``key: value`` line each with JSON scalars, a subset of
YAML that needs no YAML library to write; given back to ``--config`` it reproduces the run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from margin_ext.safe_files import read_regular, write_text_atomically

from .extras import require


class OptionError(ValueError):
    """An option value that cannot work; the message names the option and the value."""


PRESETS = Path(__file__).resolve().parent / "presets"
MAX_CONFIG_BYTES = 1 << 20  # a config is a page of options
MAX_CONFIG_NODES = 10_000  # values after YAML's aliases are expanded: a config has a hundred
MAX_CONFIG_DEPTH = 32

# Options that steer one invocation rather than describe the run.
NOT_RECORDED = ("config", "resume", "stop_after_steps", "overwrite")


def find_config(name: str) -> Path:
    path = Path(name)
    if path.exists():  # a FIFO or a folder is refused when read, not taken for a preset's name
        return path
    preset = PRESETS / f"{name}.yaml"
    if path.suffix == "" and preset.is_file():
        return preset
    known = ", ".join(sorted(p.stem for p in PRESETS.glob("*.yaml")))
    raise OptionError(f"--config {name}: no such file, nor a preset (presets: {known})")


def load_config(name: str) -> dict:
    """The mapping of a config file: at most MAX_CONFIG_BYTES, and MAX_CONFIG_NODES values once YAML's
    aliases are expanded (an alias bomb of a few hundred bytes would otherwise expand to billions)."""
    path = find_config(name)
    yaml = require("yaml", "--config", package="pyyaml")
    try:
        values = _safe_load_bounded(yaml, read_regular(path, MAX_CONFIG_BYTES, text=True))
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise OptionError(f"--config {path}: not a readable YAML file ({reason})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise OptionError(f"--config {path}: expected a mapping of option names to values, "
                          f"got a {type(values).__name__}")
    return values


def _safe_load_bounded(yaml, text: str):
    """yaml.safe_load, after counting the values the document expands to (ValueError past the bounds)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _count_nodes(yaml, node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _count_nodes(yaml, root) -> int:
    """Values of the document with every alias expanded; a node reached twice (an alias) counts twice."""
    sizes = {}

    def size(node, depth):
        if depth > MAX_CONFIG_DEPTH:  # also ends a recursive alias
            raise ValueError(f"values nested more than {MAX_CONFIG_DEPTH} deep")
        if id(node) in sizes:
            return sizes[id(node)]
        if isinstance(node, yaml.MappingNode):
            children = [child for pair in node.value for child in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = node.value
        else:
            children = []
        total = 1
        for child in children:
            total += size(child, depth + 1)
            if total > MAX_CONFIG_NODES:
                raise ValueError(f"more than {MAX_CONFIG_NODES} values once its aliases are expanded")
        sizes[id(node)] = total
        return total

    return size(root, 0)


def config_arguments(name: str, parser: argparse.ArgumentParser, argv) -> list:
    """The config file's options as command-line arguments, minus those that ``argv`` gives."""
    path = find_config(name)
    actions = {action.dest: action for action in parser._actions if action.option_strings}
    given = {actions[dest] for dest in _dests_given(argv, parser)}
    # an option of a mutually exclusive group given on the command line replaces the whole group
    overridden = set(given)
    for group in parser._mutually_exclusive_groups:
        if given & set(group._group_actions):
            overridden |= set(group._group_actions)

    arguments = []
    for key, value in load_config(name).items():
        dest = str(key).replace("-", "_")
        action = actions.get(dest)
        if action is None or dest in ("config", "help"):
            raise OptionError(f"--config {path}: unknown option {key!r}")
        if action in overridden or value is None:
            continue
        flag = action.option_strings[0]
        if isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                raise OptionError(f"--config {path}: {key}={value!r} is invalid: expected true or false")
            arguments += [flag] if value else []
        elif isinstance(action, argparse._AppendAction):
            for item in value if isinstance(value, list) else [value]:
                arguments += [flag, _text(item)]
        else:
            if isinstance(value, (list, dict)):
                raise OptionError(f"--config {path}: {key}={value!r} is invalid: expected a single value")
            arguments += [flag, _text(value)]
    return arguments


def resolve_preset_paths(options, name: str, parser: argparse.ArgumentParser, argv) -> None:
    """A preset's relative --val files are in the --data folder (the one of --data's .rec file)."""
    if find_config(name).parent != PRESETS or "val" in _dests_given(argv, parser):
        return
    if options.val in ("none", "synthetic"):
        return
    data = Path(options.data)
    folder = data.parent if data.suffix == ".rec" else data
    options.val = ",".join(str(folder / item.strip()) if not Path(item.strip()).is_absolute() else item.strip()
                           for item in options.val.split(",") if item.strip())


def _dests_given(argv, parser) -> set:
    """Destinations of the options that appear in ``argv`` (``--flag value`` or ``--flag=value``)."""
    by_flag = {flag: action.dest for action in parser._actions for flag in action.option_strings}
    dests = set()
    for token in argv:
        flag = token.split("=", 1)[0]
        if flag in by_flag:
            dests.add(by_flag[flag])
        elif flag.startswith("--"):
            # argparse accepts unambiguous prefixes of long options
            matches = {dest for name, dest in by_flag.items() if name.startswith(flag)}
            if len(matches) == 1:
                dests |= matches
    return dests


def _text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def resolved_options(options, **resolved) -> dict:
    """The run's options as config keys (``batch-size``), with ``resolved`` values put in."""
    values = {key: value for key, value in vars(options).items() if key not in NOT_RECORDED}
    values.update(resolved)
    return {key.replace("_", "-"): value for key, value in values.items() if value is not None}


def write_config(path: Path, values: dict, header: str = "") -> Path:
    """``values`` as ``key: <JSON>`` lines (valid YAML), written atomically."""
    lines = [f"# {line}" for line in header.splitlines()]
    lines += [f"{key}: {json.dumps(value)}" for key, value in values.items()]
    return write_text_atomically(path, "\n".join(lines) + "\n")
