"""A command-line setting declared once: default, flag, help text and parser on one dataclass field.

``RunConfig`` (src/config.py) and the ``Settings`` of every analysis (src/analysis/*), metric
(src/sensitivity/metrics.py) and perturbation (src/sensitivity/perturb.py) declare their fields
with ``option(...)``. src/cli.py builds argparse from these fields (every flag absent from
the namespace unless given) and ``parse_given`` turns the given strings into values with each
field's parser, so each default is written in exactly one place: the field.

A parser is ``parse(text, flag) -> value`` and raises ``UserError`` naming the flag. ``used_when``
is ``(requirement, predicate(config))``: a value other than the default while the predicate is
false is an error ("--x has no effect without <requirement>"), so no flag is parsed and ignored.
"""
from __future__ import annotations

import codecs
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

from src.errors import UserError

Parser = Callable[[str, str], Any]


@dataclass(frozen=True)
class Option:
    help: str
    group: str
    parse: Parser | None          # None: a switch (store_true), the default is False
    flag: str | None = None
    metavar: str | None = None
    many: bool = False             # several space-separated values (argparse nargs="+")
    used_when: tuple[str, Callable] | None = None
    show_default: bool = True


def option(default, help: str, *, group: str, parse: Parser | None = None, flag: str | None = None,
           metavar: str | None = None, many: bool = False, used_when=None,
           show_default: bool = True):
    """A dataclass field that is also a command-line flag (``--field-name`` unless ``flag``)."""
    if parse is None and default is not False:
        raise TypeError("an option without a parser is a switch and must default to False")
    meta = Option(help, group, parse, flag, metavar, many, used_when, show_default)
    return dataclasses.field(default=default, metadata={"option": meta})


def options_of(cls) -> list[tuple[dataclasses.Field, Option]]:
    return [(f, f.metadata["option"]) for f in dataclasses.fields(cls) if "option" in f.metadata]


def flag_of(field: dataclasses.Field) -> str:
    meta = field.metadata["option"]
    return meta.flag or "--" + field.name.replace("_", "-")


def shown_default(field: dataclasses.Field) -> str | None:
    """The default as the help text shows it, or None when there is nothing to show."""
    value = field.default
    if not field.metadata["option"].show_default or value in (None, False, (), ""):
        return None
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def placed_options(core, classes) -> list[tuple[type, dataclasses.Field, Option]]:
    """(owner class, field, option) of ``core`` and of every settings class in ``classes``, in
    the order of --help and config.json: the core fields, each class whose ``AFTER`` names a
    core field right after that field, then the other classes in the order given."""
    after: dict[str | None, list[type]] = {}
    for cls in classes:
        after.setdefault(getattr(cls, "AFTER", None), []).append(cls)
    placed = []
    for field, meta in options_of(core):
        placed.append((core, field, meta))
        for cls in after.pop(field.name, ()):
            placed += [(cls, f, m) for f, m in options_of(cls)]
    for cls in after.pop(None, ()):
        placed += [(cls, f, m) for f, m in options_of(cls)]
    if after:
        raise ValueError(f"AFTER names no field of {core.__name__}: {', '.join(after)}")
    return placed


def parse_given(placed, given: dict) -> dict[type, dict]:
    """owner class -> its field values from the flags given (switches True, the rest parsed),
    for the (owner, field, option) entries of ``placed``, parsed in that order."""
    values: dict[type, dict] = {owner: {} for owner, _, _ in placed}
    for owner, field, meta in placed:
        if field.name not in given:
            continue
        raw = given[field.name]
        if meta.parse is None:
            values[owner][field.name] = bool(raw)
        elif meta.many:
            values[owner][field.name] = tuple(meta.parse(text, flag_of(field)) for text in raw)
        else:
            values[owner][field.name] = meta.parse(raw, flag_of(field))
    return values


def unused_settings(settings, config) -> list[str]:
    """Flags of ``settings`` set away from their default although ``used_when`` says they do
    nothing in this ``config``: one message each."""
    return unused_options(((settings, f, m) for f, m in options_of(type(settings))), config)


def unused_options(entries, config) -> list[str]:
    """``unused_settings`` over (settings instance, field, option) entries, in their order."""
    problems = []
    for settings, field, meta in entries:
        if meta.used_when is None or getattr(settings, field.name) == field.default:
            continue
        requirement, used = meta.used_when
        if not used(config):
            problems.append(f"{flag_of(field)} has no effect without {requirement}")
    return problems


# ----------------------------------------------------------------------------- parsers

def text(value: str, flag: str) -> str:
    if not value.strip():
        raise UserError(f"{flag} needs a value")
    return value


def text_file(value: str, flag: str) -> str:
    """A readable, non-empty UTF-8 text file (read in chunks: large corpora are fine)."""
    path = Path(value).expanduser()
    if not path.is_file():
        raise UserError(f"{flag} '{value}' does not exist or is not a file")
    decoder = codecs.getincrementaldecoder("utf-8")()
    has_text = False
    try:
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                has_text = bool(decoder.decode(chunk).strip()) or has_text
            decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise UserError(f"{flag} '{value}' is not UTF-8 text") from None
    except OSError as error:
        raise UserError(f"{flag} '{value}' cannot be read ({error.strerror})") from None
    if not has_text:
        raise UserError(f"{flag} '{value}' is empty: it needs text (documents separated by blank "
                        f"lines, or one per line)")
    return value


def integer(minimum: int | None = None, maximum: int | None = None) -> Parser:
    def parse(value: str, flag: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise UserError(f"{flag} must be an integer (got '{value}')") from None
        if minimum is not None and number < minimum:
            raise UserError(f"{flag} must be at least {minimum} (got {number})")
        if maximum is not None and number > maximum:
            raise UserError(f"{flag} must be at most {maximum} (got {number})")
        return number
    return parse


def integer_or_word(minimum: int, word: str) -> Parser:
    """An integer, or ``word`` (parsed as None), e.g. a group size or "row"."""
    as_integer = integer(minimum)

    def parse(value: str, flag: str) -> int | None:
        return None if value == word else as_integer(value, flag)
    return parse


def folder(value: str, flag: str) -> str:
    if not Path(value).expanduser().is_dir():
        raise UserError(f"{flag} '{value}' is not a folder")
    return value


def free_names(value: str, flag: str) -> tuple[str, ...]:
    """Comma-separated names checked elsewhere (duplicates dropped, at least one)."""
    names = tuple(dict.fromkeys(n.strip() for n in value.split(",") if n.strip()))
    if not names:
        raise UserError(f"{flag} needs at least one name")
    return names


def number(low: float | None = None, high: float | None = None, *, low_open: bool = False,
           high_open: bool = False) -> Parser:
    """A finite float in the given range (NaN and infinity are always refused)."""
    def parse(value: str, flag: str) -> float:
        try:
            result = float(value)
        except ValueError:
            raise UserError(f"{flag} must be a number (got '{value}')") from None
        if not math.isfinite(result):
            raise UserError(f"{flag} must be a finite number (got {value})")
        too_low = low is not None and (result <= low if low_open else result < low)
        too_high = high is not None and (result >= high if high_open else result > high)
        if too_low or too_high:
            raise UserError(f"{flag} must be {_span(low, high, low_open, high_open)} "
                            f"(got {value})")
        return result
    return parse


def _span(low, high, low_open: bool, high_open: bool) -> str:
    """'in [0, 1]', '> 1', '>= 0', '< 5' ..."""
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    return f"{'<' if high_open else '<='} {high:g}"


def choice(names, aliases: dict[str, str] | None = None) -> Parser:
    """One of ``names`` (or an alias of one, returned as the name it stands for)."""
    aliases = aliases or {}

    def parse(value: str, flag: str) -> str:
        value = aliases.get(value, value)
        if value not in names:
            raise UserError(f"unknown {flag} '{value}'; choose from {', '.join(names)}")
        return value
    return parse


def int_list(minimum: int | None = None, maximum: int | None = None, *,
             distinct: bool = False) -> Parser:
    """Comma-separated integers, at least one, none empty, each in [``minimum``, ``maximum``];
    with ``distinct``, none twice (a repeated seed would count one draw twice)."""
    one = integer(minimum, maximum)

    def parse(value: str, flag: str) -> tuple[int, ...]:
        parts = [p.strip() for p in value.split(",")]
        if not any(parts):
            raise UserError(f"{flag} needs at least one integer, e.g. 0,1,2")
        if not all(parts):
            raise UserError(f"{flag} '{value}' has an empty item; separate integers with single "
                            f"commas, e.g. 0,1,2")
        numbers = tuple(one(p, flag) for p in parts)
        repeated = [n for position, n in enumerate(numbers) if n in numbers[:position]]
        if distinct and repeated:
            raise UserError(f"{flag} '{value}' names {repeated[0]} twice; give each once")
        return numbers
    return parse


def name_list(allowed: Callable[[], dict | tuple], aliases: dict[str, str] | None = None,
              none_word: str | None = None) -> Parser:
    """Comma-separated names, duplicates dropped, each in ``allowed()`` (a callable, so that a
    registry is read when the flag is parsed). ``none_word`` (e.g. "none") gives ()."""
    aliases = aliases or {}

    def parse(value: str, flag: str) -> tuple[str, ...]:
        if none_word is not None and value.strip().lower() in ("", none_word):
            return ()
        names = [aliases.get(p.strip(), p.strip()) for p in value.split(",") if p.strip()]
        known = allowed()
        for name in names:
            if name not in known:
                raise UserError(f"unknown {flag} entry '{name}'; choose from {', '.join(known)}")
        if not names:
            raise UserError(f"{flag} needs at least one name; choose from {', '.join(known)}")
        return tuple(dict.fromkeys(names))
    return parse


class Settings:
    """Base of a settings dataclass (of an analysis, a metric or a perturbation, declared next
    to it): ``problems(config)`` yields one message per invalid combination that per-flag
    parsing cannot see (default: none). ``AFTER``: the RunConfig field after which its flags
    come in --help and config.json (settings that moved out of RunConfig keep their place,
    and config.json, which --resume compares, its key order); None: after the core fields."""
    AFTER: ClassVar[str | None] = None

    def problems(self, config):
        return ()

    def for_job(self, job):
        """These settings as a scoring job runs them (a metric's "auto" decided from the job;
        ``settings_of`` reads them so): as given unless a class decides something."""
        return self
