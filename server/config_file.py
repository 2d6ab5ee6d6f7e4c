"""``csps serve --config FILE.yaml``: any ``csps serve`` flag as a YAML key; flags on the command line win.

    # serve.yaml
    model: dummy:tiny
    max-model-len: 1024          # or max_model_len; vLLM's names work too (tensor-parallel-size, ...)
    enable-prefix-caching: false # booleans: true gives --flag, false gives --no-flag
    allowed-origins: [https://app.example]

Each key becomes the flag of the same name and is parsed by the same parser as the command line (same
types, choices and errors). Which flags the command line gave explicitly is recorded by the parser's
actions (``track_explicit_flags``), so a flag given on the command line wins over the file even when it
is given before ``--config`` or set to its default value.
"""

from __future__ import annotations

import argparse

import yaml

EXPLICIT = "_explicit_flags"  # namespace attribute: the dests the command line set


def _mark(namespace: argparse.Namespace, dest: str) -> None:
    seen = getattr(namespace, EXPLICIT, None)
    if seen is None:
        seen = set()
        setattr(namespace, EXPLICIT, seen)
    seen.add(dest)


class Store(argparse.Action):
    """argparse's default 'store' action that also records that the flag was given."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values)
        _mark(namespace, self.dest)


class StoreConst(argparse.Action):
    def __init__(self, option_strings, dest, const=None, default=None, required=False, help=None) -> None:
        super().__init__(option_strings, dest, nargs=0, const=const, default=default, required=required, help=help)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, self.const)
        _mark(namespace, self.dest)


class StoreTrue(StoreConst):
    def __init__(self, option_strings, dest, default=False, required=False, help=None) -> None:
        super().__init__(option_strings, dest, const=True, default=default, required=required, help=help)


class BooleanOptional(argparse.BooleanOptionalAction):
    def __call__(self, parser, namespace, values, option_string=None) -> None:
        super().__call__(parser, namespace, values, option_string)
        _mark(namespace, self.dest)


def track_explicit_flags(parser: argparse.ArgumentParser) -> None:
    """Make the arguments added to ``parser`` from now on record themselves when given."""
    parser.register("action", None, Store)
    parser.register("action", "store", Store)
    parser.register("action", "store_true", StoreTrue)
    parser.register("action", "store_const", StoreConst)


def flags_from_yaml(path: str) -> list[str]:
    """The YAML mapping in ``path`` as command-line flags."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot read the config file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise argparse.ArgumentTypeError(f"the config file {path} is not valid YAML: {e}") from None
    if data is None:
        return []
    if not isinstance(data, dict):
        raise argparse.ArgumentTypeError(f"the config file {path} must hold a mapping of flag names to values")
    argv: list[str] = []
    for key, value in data.items():
        name = str(key).strip().lstrip("-").replace("_", "-")
        if name == "config":
            raise argparse.ArgumentTypeError(f"{path}: a config file cannot name another config file")
        if value is None:
            continue
        if value is True:
            argv.append(f"--{name}")
        elif value is False:
            if not name.startswith("no-"):  # 'no-prefix-caching: false' is the default anyway
                argv.append(f"--no-{name}")
        elif isinstance(value, list):
            argv += [f"--{name}", *(str(v) for v in value)]
        elif isinstance(value, dict):
            raise argparse.ArgumentTypeError(f"{path}: the value of '{key}' must be a scalar or a list")
        else:
            argv.append(f"--{name}={value}")
    return argv


class ConfigFileAction(argparse.Action):
    """``--config FILE``: parse the file's flags with this parser; set those the command line did not give."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        try:
            argv = flags_from_yaml(values)
        except argparse.ArgumentTypeError as e:
            parser.error(str(e))
        from_file, unknown = parser.parse_known_args(argv, argparse.Namespace())
        if unknown:
            parser.error(f"unknown setting(s) in {values}: {' '.join(unknown)}")
        given_on_cli = getattr(namespace, EXPLICIT, set())
        for dest in getattr(from_file, EXPLICIT, set()):
            if dest not in given_on_cli:
                setattr(namespace, dest, getattr(from_file, dest))
        setattr(namespace, self.dest, values)
