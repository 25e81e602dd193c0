"""One declaration per config: each dataclass field carries its default and its help text, and
from that declaration come the strict dict loader and the typer options.

Declare::

    @dataclass
    class TrainConfig(Config):
        epochs: int = option(50, "Maximum epochs per fold.")
        hidden: tuple[int, ...] = option((256, 64), "Instance MLP widths, comma-separated.",
                                         parse=parse_widths, show=",".join)
        k: int = option(64, "Tiles per slide.", flags=("--k",))
        n_boot: int = option(1000, "Bootstrap resamples.", cli=False)   # not a command-line option

Load (strict; used for study YAML sections, store metadata, config.json)::

    TrainConfig.from_dict({"epochs": 5}, where="mil")     # == from_dict(TrainConfig, ...)
    # unknown key  -> ConfigError "unknown keys ['mil.epoch'] (did you mean 'epochs'?); valid: ..."
    # wrong type   -> ConfigError "mil.epochs: expected int, got 'ten' (str)"
    # nested dataclass fields are built recursively from mappings, with their path.

Generate a command (typer reads the synthesized signature)::

    @config_command(spec=RunSpec, cfg=TrainConfig)
    def train(spec: RunSpec, cfg: TrainConfig, verbose: bool = False) -> None: ...

    app.command("train")(train)   # --store ... --epochs 50 ... plus the command's own options

Each field becomes ``--field-name`` (or ``flags``) with its help and default; a field with a
``parse`` takes text on the command line (its default shown through ``show``) and is parsed
before the dataclass is built. :class:`Options` selects fields (``exclude``) or turns every
option into an override (default None, the command receives a dict of what was given).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import types
import typing
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, Optional, Union

from featstore.core.errors import ConfigError, CoreError

_MISSING = dataclasses.MISSING


def option(default: Any = _MISSING, help: str = "", *, default_factory: Any = _MISSING,
           flags: Sequence[str] = (), parse: Callable[[str], Any] | None = None,
           show: Callable[[Any], str] | None = None, cli: bool = True,
           choices: Collection[Any] | Callable[[], Collection[Any]] | None = None,
           ge: float | None = None, gt: float | None = None, le: float | None = None,
           lt: float | None = None) -> Any:
    """A dataclass field carrying its help text, how it appears on the command line and what
    values it takes.

    ``flags``: option names (default ``--field-name``); ``parse``: text -> value for options
    given as text (e.g. ``--hidden 256,64``), with ``show`` rendering the default as that text;
    ``cli=False`` keeps the field out of generated commands (it keeps its default there).
    ``choices`` (a collection, or a function returning one so a registry is read lazily) and the
    bounds ``ge``/``gt``/``le``/``lt`` are checked wherever a value enters: the YAML / dict
    loader names the key path (``extract.reader``), a generated command names the flag
    (``--reader``), and direct construction (``Config.__post_init__``) names the flag too. None
    passes (optional fields); a sequence is checked element by element.
    """
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    meta = {"help": help, "flags": tuple(flags), "parse": parse, "show": show, "cli": cli, "choices": choices,
            "bounds": bounds}
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def flag_of(f: dataclasses.Field) -> str:
    """The long command-line flag of field *f* (``--field-name`` unless declared otherwise)."""
    return next((x for x in f.metadata.get("flags", ()) if x.startswith("--")), "--" + f.name.replace("_", "-"))


_OPS = {"ge": (">=", lambda v, b: v >= b), "gt": (">", lambda v, b: v > b),
        "le": ("<=", lambda v, b: v <= b), "lt": ("<", lambda v, b: v < b)}


def _rule(bounds: Mapping[str, float]) -> str:
    """``>= 1``, or an interval such as ``in (0, 1]`` when both ends are declared."""
    lo = next(((k, v) for k, v in bounds.items() if k in ("ge", "gt")), None)
    hi = next(((k, v) for k, v in bounds.items() if k in ("le", "lt")), None)
    if lo and hi:
        return f"in {'[' if lo[0] == 'ge' else '('}{lo[1]:g}, {hi[1]:g}{']' if hi[0] == 'le' else ')'}"
    k, v = lo or hi
    return f"{_OPS[k][0]} {v:g}"


def _show_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(_show_value(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return repr(value) if isinstance(value, str) else f"{value}"


def check_value(f: dataclasses.Field, value: Any, name: str) -> str | None:
    """What is wrong with *value* for field *f* under its declared choices and bounds, worded
    ``<name> <value> must be ...`` with *name* the key path or flag it came from; None if fine."""
    choices, bounds = f.metadata.get("choices"), f.metadata.get("bounds") or {}
    if value is None or (choices is None and not bounds):
        return None
    allowed = tuple(choices()) if callable(choices) else choices
    for v in value if isinstance(value, (list, tuple)) else (value,):
        if allowed is not None and v not in allowed:
            return f"{name} {_show_value(value)} must be one of {', '.join(map(str, allowed))}"
        numeric = isinstance(v, (int, float)) and not isinstance(v, bool)
        if numeric and not all(_OPS[k][1](v, b) for k, b in bounds.items()):
            return f"{name} {_show_value(value)} must be {_rule(bounds)}"
    return None


def check_fields(cfg: Any, *, names: Mapping[str, str] | None = None) -> None:
    """Raise ``cfg.config_error`` for the first field of dataclass *cfg* outside its declared
    choices or bounds, named by *names* (field -> key path or flag; default: the flag)."""
    for f in dataclasses.fields(cfg):
        problem = check_value(f, getattr(cfg, f.name), (names or {}).get(f.name) or flag_of(f))
        if problem:
            raise getattr(cfg, "config_error", ConfigError)(problem)


def help_of(f: dataclasses.Field) -> str:
    """The help text declared on a field ('' when it was declared without :func:`option`)."""
    return f.metadata.get("help", "")


class Config:
    """Mixin of every config dataclass: the one strict :func:`from_dict` as a classmethod.

    ``config_error`` is the error type raised for this config (a package's own subclass, e.g.
    TilingError, so callers catching it keep working).
    """

    config_error: ClassVar[type[Exception]] = ConfigError

    def __post_init__(self) -> None:
        """Check the declared choices and bounds; a config's own ``__post_init__`` calls this
        first (``super().__post_init__()``) and then checks what spans several fields."""
        check_fields(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "") -> Any:
        """Build the config from a mapping, strictly (see :func:`from_dict`)."""
        return from_dict(cls, data, where=where)


# ------------------------------------------------------------------ loading

class _Mismatch(Exception):
    """A value does not fit a type (turned into one ConfigError naming the key by the caller)."""


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "null"
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin in (tuple, list, Sequence) and args:
        return f"a list of {_type_name(args[0])}"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _sequence(tp: Any, value: Any, path: str, error: type[Exception]) -> list:
    if not isinstance(value, (list, tuple)):
        raise _Mismatch
    args = typing.get_args(tp)
    elem = args[0] if args else Any
    if len(args) > 1 and args[1] is not Ellipsis:  # fixed-length tuple[int, str]
        if len(args) != len(value):
            raise _Mismatch
        return [_coerce(a, v, f"{path}[{i}]", error) for i, (a, v) in enumerate(zip(args, value))]
    return [_coerce(elem, v, f"{path}[{i}]", error) for i, v in enumerate(value)]


def _scalar(tp: Any, value: Any) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 (PyYAML) reads 1e-4 as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
    elif not isinstance(tp, type) or isinstance(value, tp):
        return value
    raise _Mismatch


def _coerce(tp: Any, value: Any, path: str, error: type[Exception]) -> Any:
    """*value* checked against (and converted to) type *tp*; raises _Mismatch if it does not fit."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Annotated:
        return _coerce(typing.get_args(tp)[0], value, path, error)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is not type(None):
                try:
                    return _coerce(a, value, path, error)
                except _Mismatch:
                    continue
        raise _Mismatch
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, Mapping):
            return from_dict(tp, value, where=path, error=error)
        raise _Mismatch
    if origin is tuple:
        return tuple(_sequence(tp, value, path, error))
    if origin in (list, Sequence) or tp in (list, tuple):
        return _sequence(tp, value, path, error)
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise _Mismatch
        return dict(value)
    return _scalar(tp, value)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def coerce_fields(cls: type, data: Mapping[str, Any], *, where: str = "", exclude: Collection[str] = (),
                  error: type[Exception] | None = None) -> dict[str, Any]:
    """The keyword arguments for dataclass *cls* in *data*, type-checked and converted.

    Unknown keys (and keys in *exclude*) raise one error naming them with their path and the
    valid keys; a value of the wrong type raises one naming the key, the value and the type.
    Nothing is constructed, so a caller can validate a subset of a config's fields.
    """
    error = error or getattr(cls, "config_error", ConfigError)
    if not isinstance(data, Mapping):
        raise error(f"{where or cls.__name__}: expected a mapping of keys, got {data!r}")
    valid = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in exclude]
    unknown = [str(k) for k in data if k not in valid]
    if unknown:
        close = difflib.get_close_matches(unknown[0], valid, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise error(f"unknown keys {[_join(where, k) for k in unknown]}{hint}; valid: {', '.join(valid)}")
    hints = _hints(cls)
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    out = {}
    for key, value in data.items():
        path = _join(where, key)
        try:
            out[key] = _coerce(hints[key], value, path, error)
        except _Mismatch:
            raise error(f"{path}: expected {_type_name(hints[key])}, got {value!r} "
                        f"({type(value).__name__})") from None
        problem = check_value(by_name[key], out[key], path)
        if problem:
            raise error(problem)
    return out


def from_dict(cls: type, data: Mapping[str, Any], *, where: str = "", exclude: Collection[str] = (),
              error: type[Exception] | None = None) -> Any:
    """Build dataclass *cls* from *data*, strictly: the one loader of every config.

    ``where`` is the key path of *data* in its file (``mil``, ``encoders[0]``), used in every
    message; the error type is *error*, else ``cls.config_error``, else :class:`ConfigError`.
    A missing required key, an unknown key or a wrong type fails in one line; so does the
    config's own validation (``__post_init__``), prefixed with *where* when given.
    """
    error = error or getattr(cls, "config_error", ConfigError)
    kwargs = coerce_fields(cls, data, where=where, exclude=exclude, error=error)
    missing = [_join(where, f.name) for f in dataclasses.fields(cls) if f.init and f.name not in kwargs
               and f.default is _MISSING and f.default_factory is _MISSING]
    if missing:
        raise error(f"missing keys {missing}")
    try:
        return cls(**kwargs)
    except CoreError as exc:
        if not where:
            raise
        raise error(f"{where}: {exc}") from None


# ------------------------------------------------------------------ commands

@dataclasses.dataclass(frozen=True)
class Options:
    """Which fields of a config dataclass become options of a generated command.

    ``exclude``: fields left out (they keep their defaults, or the command sets them).
    ``overrides``: every option defaults to None ("not given") and the command receives a dict
    of the options given instead of the built dataclass (e.g. tiling options that default to
    a store's recorded tiling); the help then says the declared default, then ``note``.
    """

    cls: type
    exclude: tuple[str, ...] = ()
    overrides: bool = False
    note: str = ""

    def fields(self) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(self.cls)
                if f.init and f.metadata.get("cli", True) and f.name not in self.exclude]


def _cli_type(tp: Any) -> Any:
    """A field's type as typer understands it (Optional[...] unions, lists for sequences)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        inner = _cli_type(rest[0]) if len(rest) == 1 else str
        return Optional[inner] if type(None) in args else inner
    if origin in (tuple, list, Sequence):
        return list[args[0] if args else str]
    return tp


def _default(f: dataclasses.Field) -> Any:
    if f.default is not _MISSING:
        return f.default
    if f.default_factory is not _MISSING:
        return f.default_factory()
    return inspect.Parameter.empty


def _parameter(f: dataclasses.Field, tp: Any, opts: Options) -> inspect.Parameter:
    """One typer option parameter for field *f*."""
    import typer

    meta, default = f.metadata, _default(f)
    parse, show = meta.get("parse"), meta.get("show")
    help_text = meta.get("help", "")
    cli_tp = str if parse else _cli_type(tp)
    if parse and default is not inspect.Parameter.empty and default is not None:
        default = (show or str)(default)
    if opts.overrides:
        shown = "none" if default is inspect.Parameter.empty else default
        help_text = f"{help_text.rstrip('.')} (default {shown}{', ' + opts.note if opts.note else ''})."
        cli_tp, default = Optional[cli_tp], None
    if isinstance(default, (list, tuple)):
        default = list(default)
    annotated = Annotated[cli_tp, typer.Option(*meta.get("flags", ()), help=help_text)]
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotated)


def _build(opts: Options, values: dict[str, Any]) -> Any:
    """The dataclass (or, for overrides, the dict of given values) from the parsed options."""
    by_name = {f.name: f for f in opts.fields()}
    out = {}
    for name, value in values.items():
        parse = by_name[name].metadata.get("parse")
        if opts.overrides and value is None:
            continue
        out[name] = parse(value) if parse and isinstance(value, str) else value
        if isinstance(out[name], list) and typing.get_origin(_hints(opts.cls)[name]) is tuple:
            out[name] = tuple(out[name])
        problem = check_value(by_name[name], out[name], flag_of(by_name[name]))
        if problem:
            raise getattr(opts.cls, "config_error", ConfigError)(problem)
    return out if opts.overrides else opts.cls(**out)


def config_command(**configs: type | Options) -> Callable[[Callable], Callable]:
    """Decorator: a typer command whose options are the fields of the given configs.

    Each keyword names a parameter of the decorated function that receives the built config
    (a dataclass, or an :class:`Options`); the function's other parameters stay options of
    their own. Field names must be unique across the configs and the function.
    """
    def decorate(fn: Callable) -> Callable:
        specs = {k: v if isinstance(v, Options) else Options(v) for k, v in configs.items()}
        own_hints = typing.get_type_hints(fn, include_extras=True)
        params: list[inspect.Parameter] = []
        owner: dict[str, list[str]] = {}
        for p in inspect.signature(fn).parameters.values():  # a config's options stand where it does
            if p.name not in specs:
                params.append(p.replace(annotation=own_hints.get(p.name, p.annotation),
                                        kind=inspect.Parameter.KEYWORD_ONLY))
                continue
            opts = specs[p.name]
            hints = _hints(opts.cls)
            for f in opts.fields():
                params.append(_parameter(f, hints[f.name], opts))
                owner.setdefault(p.name, []).append(f.name)
        missing = sorted(set(specs) - set(inspect.signature(fn).parameters))
        if missing:
            raise TypeError(f"{fn.__name__}: no parameter {missing} to receive the built config")
        names = [p.name for p in params]
        clash = sorted({n for n in names if names.count(n) > 1})
        if clash:
            raise TypeError(f"{fn.__name__}: options {clash} are declared twice (configs and parameters)")

        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            built = {key: _build(specs[key], {n: kwargs.pop(n) for n in owner.get(key, [])}) for key in specs}
            return fn(**kwargs, **built)

        del command.__wrapped__  # typer must see the synthesized signature, not fn's
        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return decorate


__all__ = ["Config", "ConfigError", "Options", "check_fields", "check_value", "coerce_fields", "config_command",
           "flag_of", "from_dict", "help_of", "option"]
