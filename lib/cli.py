"""
The command line of train.py and finetune.py: `--key=value` overrides of a config dataclass, checked before any
work starts, and --help written from the comments beside each key; a bad record under --strict ends the command with
one line (strict_stops).
"""
import difflib
import functools
import inspect
import re
import sys
from dataclasses import fields

from lib import formats


def key_help(config_cls):
    """{key: the comment written beside it in the dataclass, with the comment lines indented below it}: the
    text of --help. (A comment line at the keys' own indentation heads a group of keys and is not help.)"""
    helps, key = {}, None
    for line in inspect.getsource(config_cls).splitlines():
        indent = len(line) - len(line.lstrip())
        field_match = re.match(r"\s+(\w+): \w+ = [^#]*?(?:#\s*(.*))?$", line)
        if field_match:
            key, key_indent = field_match.group(1), indent
            helps[key] = field_match.group(2) or ""
        elif key and line.lstrip().startswith("#") and indent > key_indent:
            helps[key] += " " + line.strip().lstrip("#").strip()
        else:
            key = None
    return helps


def parse_overrides(argv, config_cls, intro, choices):
    """`--key=value` or `--key value` overrides of a config dataclass; a bare `--flag` sets a bool to true.
    Unknown keys, values of the wrong type and values outside `choices` are errors with a one-line message,
    raised before any work starts; `--help` prints `intro` and every key with its default and its meaning.
    Returns (config, {key: value given})."""
    cfg, types = config_cls(), {f.name: f.type for f in fields(config_cls)}
    if any(a in ("-h", "--help") for a in argv):
        helps = key_help(config_cls)
        print(intro + "\n\nConfig keys (--key=value or --key value), with their defaults:")
        for f in fields(config_cls):
            print(f"  {'--' + f.name + '=' + str(getattr(cfg, f.name)):<32} {helps.get(f.name, '')}")
        sys.exit(0)
    given, i = {}, 0
    while i < len(argv):
        arg, i = argv[i], i + 1
        if not arg.startswith("--"):
            raise SystemExit(f"error: expected --key=value or --key value, got {arg!r} (see --help)")
        key, eq, val = arg[2:].partition("=")
        if key not in types:
            close = difflib.get_close_matches(key, list(types), n=1)
            raise SystemExit(f"error: unknown config key {key!r}" + (f"; did you mean --{close[0]}?" if close else "")
                             + " (see --help)")
        typ = types[key]
        if not eq:  # the value is the next word; a bool flag may stand alone
            if typ is bool and (i == len(argv) or argv[i].startswith("--")):
                val = "true"
            elif i < len(argv):
                val, i = argv[i], i + 1
            else:
                raise SystemExit(f"error: --{key} needs a value")
        if typ is bool:
            if val.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise SystemExit(f"error: --{key} takes true/false, not {val!r}")
            given[key] = val.lower() in ("1", "true", "yes")
        else:
            try:
                given[key] = typ(val)
            except ValueError:
                raise SystemExit(f"error: --{key} takes a {typ.__name__}, not {val!r}")
        if key in choices and given[key] not in choices[key]:
            raise SystemExit(f"error: --{key} must be one of {', '.join(choices[key])}, not {val!r}")
    for key, val in given.items():
        setattr(cfg, key, val)
    return cfg, given


def strict_stops(main):
    """Decorates a command's main: a bad record under --strict (formats.StrictError, maybe raised in a DataLoader
    worker) ends the command with its one line (formats.strict_exit), not a traceback."""
    @functools.wraps(main)
    def run(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except formats.StrictError as e:
            raise formats.strict_exit(e) from None
    return run
