"""Encoder registry: one frozen :class:`EncoderSpec` per encoder is the only source of truth.

A spec says which timm architecture to build (with which ``timm_kwargs``), the order in which
its top-level modules run (``steps``), which module output makes each truncation level
(``taps``, level 0 = "minus 0" = the final features), the token/channel width per level, the
default pooling, the levels ``--minus all`` means, the preprocessing, and the weight tags that
are known for it. The ``family`` selects how the model is run (featstore.encoders.runners).
Everything else (the model, the CLI table, the docs table) is derived.
"""

from __future__ import annotations

import fnmatch
import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from featstore.errors import EncoderError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class WeightsSpec:
    """A named set of weights the user can ask for with ``--weights TAG``.

    ``files`` are the file names looked for in the weights directories (first found wins);
    ``urls`` the matching download addresses (used only with ``allow_download``);
    ``hf_repo`` a timm Hugging Face repository whose cached ``model.safetensors`` also counts.
    ``drop_prefixes``: keys of the authors' checkpoint that are not part of the encoder (e.g.
    multi-task heads) and are dropped before the key check. ``mean``/``std`` override the
    encoder's normalisation when the authors trained with other statistics.
    """

    tag: str
    files: tuple[str, ...] = ()
    urls: tuple[str, ...] = ()
    hf_repo: str | None = None
    drop_prefixes: tuple[str, ...] = ()
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    citation: str = ""
    source: str = ""
    note: str = ""

    def __post_init__(self) -> None:
        if self.urls and len(self.urls) != len(self.files):
            raise ValueError(f"WeightsSpec {self.tag}: urls must match files one to one")


@dataclass(frozen=True)
class EncoderSpec:
    """Everything known about one encoder; see the module docstring."""

    name: str
    timm_name: str
    family: str
    steps: tuple[str, ...]          # top-level module paths, in execution order
    taps: tuple[str, ...]           # taps[K] = module whose output is level "minus K"
    dims: tuple[int, ...]           # dims[K] = channels / token width of taps[K]
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    head_prefixes: tuple[str, ...] = ("fc.",)   # classifier keys: never used, may be absent
    weights: Mapping[str, WeightsSpec] = field(default_factory=dict)
    description: str = ""
    pooling: str = "avg"            # default pooling of every level (the family's runner knows it)
    all_levels: tuple[int, ...] = ()    # what "--minus all" means; () = every level
    timm_kwargs: Mapping[str, Any] = field(default_factory=dict)   # plain data, to create_model

    def __post_init__(self) -> None:
        if len(self.taps) != len(self.dims):
            raise ValueError(f"EncoderSpec {self.name}: taps and dims differ in length")
        missing = [t for t in self.taps if t not in self.steps]
        if missing:
            raise ValueError(f"EncoderSpec {self.name}: taps {missing} are not steps")
        if any(not 0 <= k < len(self.taps) for k in self.all_levels):
            raise ValueError(f"EncoderSpec {self.name}: all_levels must be within 0..{len(self.taps) - 1}")
        object.__setattr__(self, "all_levels", tuple(sorted(set(self.all_levels))) or self.levels)
        object.__setattr__(self, "weights", MappingProxyType(dict(self.weights)))
        object.__setattr__(self, "timm_kwargs", MappingProxyType(dict(self.timm_kwargs)))

    @property
    def levels(self) -> tuple[int, ...]:
        """All truncation levels this encoder offers (0 = full network)."""
        return tuple(range(len(self.taps)))

    def dim(self, level: int) -> int:
        """Embedding dim of truncation level *level*."""
        return self.dims[self.check_level(level)]

    def check_level(self, level: int) -> int:
        """Return *level* if valid, else raise a one-line :class:`EncoderError`."""
        if not isinstance(level, int) or isinstance(level, bool) or not 0 <= level < len(self.taps):
            raise EncoderError(
                f"encoder {self.name} has truncation levels 0..{len(self.taps) - 1} "
                f"(minus K), got {level!r}; pick one of {list(self.levels)}"
            )
        return level

    def weights_spec(self, tag: str) -> WeightsSpec:
        """The :class:`WeightsSpec` of a named tag (not "random" or a path)."""
        try:
            return self.weights[tag]
        except KeyError:
            raise EncoderError(
                f"encoder {self.name} has no weights tag {tag!r}; known tags: random, "
                f"{', '.join(self.weights)}, or a path to a weights file"
            ) from None


_REGISTRY: dict[str, EncoderSpec] = {}
_ZOO_MODULES = ("featstore.encoders.zoo",)


def register_encoder(spec: EncoderSpec) -> EncoderSpec:
    """Add *spec* to the registry (a name may be registered once)."""
    if spec.name in _REGISTRY and _REGISTRY[spec.name] != spec:
        raise ValueError(f"encoder {spec.name} is already registered with a different spec")
    _REGISTRY[spec.name] = spec
    return spec


def _ensure_zoo() -> None:
    for mod in _ZOO_MODULES:
        importlib.import_module(mod)


def list_encoders(pattern: str = "*") -> list[str]:
    """Registered encoder names matching a shell-style wildcard, sorted ("res*", "*b[0-3]")."""
    _ensure_zoo()
    return sorted(n for n in _REGISTRY if fnmatch.fnmatchcase(n, pattern.lower()))


def get_spec(name: str) -> EncoderSpec:
    """The spec of encoder *name*; unknown names raise :class:`EncoderError`."""
    _ensure_zoo()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise EncoderError(
            f"unknown encoder {name!r}; known: {', '.join(sorted(_REGISTRY))} "
            "(see `featstore encoders`)"
        ) from None


def parse_levels(text: str | None, encoder: str | None = None, *, option: str = "--minus"
                 ) -> tuple[int, ...] | None:
    """``"1"`` -> (1,); ``"0, 2,3"`` -> (0, 2, 3) (sorted, unique); None or "" -> None.

    ``"all"`` is the spec's ``all_levels`` of *encoder* (every level of a CNN, every 4th block
    of a ViT; 0..3 when no encoder is named). *option* names the command option in the
    one-line :class:`EncoderError`.
    """
    if text is None or not str(text).strip():
        return None
    text = str(text)
    if text.strip().lower() == "all":
        return get_spec(encoder).all_levels if encoder is not None else (0, 1, 2, 3)
    try:
        levels = tuple(sorted({int(p) for p in text.split(",") if p.strip()}))
    except ValueError:
        raise EncoderError(f"{option} {text!r}: give levels as comma-separated integers, "
                           "e.g. 1 or 0,1,2,3 or all") from None
    if not levels or min(levels) < 0:
        raise EncoderError(f"{option} {text!r}: levels are integers >= 0 ('minus K')")
    return levels
