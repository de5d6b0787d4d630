"""Sizes, booleans and `-o` options, spelled as qemu-img takes them.

A format declares its `-o` options once, as a schema in its FormatSpec
(name → Option); `parse` checks what a user gave against it and returns
every option typed, with the defaults filled in.  Range checks that
depend on the format (a power of two, a minimum) stay with the format.
"""

import re
import typing

from .errors import UsageError

_SIZE = re.compile(r"^(\d+)([kKmMgGtTpPeE]?)(?:i?B)?$")
_UNITS = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}

TRUE = ("on", "yes", "true", "1")
FALSE = ("off", "no", "false", "0")


def parse_size(text, what="size"):
    """'10G' → bytes, binary units as qemu-img takes them."""
    m = _SIZE.match(text.strip())
    if not m:
        raise UsageError(f"{what} {text!r} is not a number (e.g. 512, 64k, "
                         "10G)")
    return int(m.group(1)) << _UNITS[m.group(2).lower()]


def parse_bool(key, value):
    """on/off as qemu spells it (yes/no, true/false and 1/0 too)."""
    v = value.strip().lower()
    if v in TRUE:
        return True
    if v in FALSE:
        return False
    raise UsageError(f"{key}={value}: expected on or off")


def split_options(text):
    """'a=1,b=2' → {'a': '1', 'b': '2'}."""
    opts = {}
    for item in filter(None, (text or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"option {item!r}: expected KEY=VALUE")
        opts[key.strip()] = value.strip()
    return opts


class Option(typing.NamedTuple):
    """One `-o` option: its kind ("size", "bool", "int", "choice"), its
    default (already typed) and, for a choice, the accepted spellings
    mapped to values."""
    kind: str
    default: object
    choices: typing.Optional[dict] = None

    def parse(self, key, text):
        if self.kind == "size":
            return parse_size(text, key)
        if self.kind == "bool":
            return parse_bool(key, text)
        if self.kind == "int":
            if not text.strip().isdigit():
                raise UsageError(f"{key}={text}: expected a number")
            return int(text)
        if text not in self.choices:
            raise UsageError(f"{key}={text}: expected one of "
                             + ", ".join(self.choices))
        return self.choices[text]


def size(default):
    return Option("size", default)


def boolean(default=False):
    return Option("bool", default)


def integer(default):
    return Option("int", default)


def choice(default, values):
    """One of `values`: names, each its own value, or a dict of spellings
    and what they stand for (compat "1.1" meaning version 3)."""
    table = values if isinstance(values, dict) else {v: v for v in values}
    return Option("choice", default, table)


def parse(schema, given, fmt):
    """The options in `given` (name → text) checked against `schema`,
    typed, with every default filled in."""
    unknown = sorted(set(given) - set(schema))
    if unknown:
        known = ", ".join(schema) or "none"
        raise UsageError(f"{fmt} does not take -o {','.join(unknown)} "
                         f"(known: {known})")
    return {key: opt.parse(key, given[key]) if key in given else opt.default
            for key, opt in schema.items()}
