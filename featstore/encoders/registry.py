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
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from featstore.errors import EncoderError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VIT_ALL_STRIDE = 4      # a ViT's "--minus all" = every 4th block from the last


@dataclass(frozen=True)
class WeightsSpec:
    """A named set of weights the user can ask for with ``--weights TAG``.

    ``files`` are the file names looked for in the weights directories (first found wins);
    ``urls`` the matching download addresses (used only with ``allow_download``);
    ``hf_repo`` a timm Hugging Face repository whose cached ``model.safetensors`` also counts.
    ``drop_prefixes``: keys of the authors' checkpoint that are not part of the encoder (e.g.
    multi-task heads) and are dropped before the key check. ``mean``/``std`` override the
    encoder's normalisation when the authors trained with other statistics.

    Published foundation models (featstore.encoders.foundation) also carry the exact
    architecture: ``timm_kwargs`` are merged over the entry's (LayerScale, registers, SwiGLU,
    depth / width), ``layout`` names the key mapper of the authors' checkpoint
    (featstore.encoders.weights.LAYOUTS; "" = the family's), ``input_size`` /
    ``interpolation`` / ``resize_size`` (resize to it, then centre-crop ``input_size``) /
    ``pooling`` override the entry's preprocessing and pooling; ``licence`` says who may use
    the file and where a gated one is requested.
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
    layout: str = ""
    timm_kwargs: Mapping[str, Any] = field(default_factory=dict)
    input_size: int | None = None
    interpolation: str | None = None
    resize_size: int | None = None
    pooling: str | None = None
    licence: str = ""

    def __post_init__(self) -> None:
        if self.urls and len(self.urls) != len(self.files):
            raise ValueError(f"WeightsSpec {self.tag}: urls must match files one to one")
        object.__setattr__(self, "timm_kwargs", MappingProxyType(dict(self.timm_kwargs)))


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
    resize_size: int | None = None  # resize tiles to this side, then centre-crop input_size

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


def block_levels(depth: int, dim: int, stride: int) -> dict[str, Any]:
    """ViT steps / taps / dims / ``--minus all`` for *depth* blocks of width *dim*:
    minus K = ``blocks.{depth-1-K}``; all = every *stride*-th block from the last."""
    blocks = tuple(f"blocks.{i}" for i in range(depth))
    return {"steps": ("patch_embed", *blocks, "norm"), "taps": tuple(reversed(blocks)),
            "dims": (dim,) * depth, "all_levels": tuple(range(0, depth, stride))}


_PREPROCESSING = ("input_size", "interpolation", "resize_size", "pooling", "mean", "std")
_SHAPE_KWARGS = ("depth", "embed_dim")


def tagged_spec(spec: EncoderSpec, wspec: WeightsSpec | None) -> EncoderSpec:
    """The spec a model with weights *wspec* is built and run with: the entry's, with the tag's
    timm kwargs merged over its own, its preprocessing / pooling, and (when the tag changes
    depth or width) the block levels recomputed. Unchanged when the tag overrides nothing."""
    if wspec is None:
        return spec
    changes: dict[str, Any] = {f: getattr(wspec, f) for f in _PREPROCESSING
                               if getattr(wspec, f) is not None}
    if wspec.timm_kwargs:
        kw = {**spec.timm_kwargs, **wspec.timm_kwargs}
        changes["timm_kwargs"] = kw
        if any(k in wspec.timm_kwargs for k in _SHAPE_KWARGS):
            if spec.family not in ("vit", "dinov2"):
                raise EncoderError(f"encoder {spec.name}: weights tag {wspec.tag} sets depth / "
                                   "embed_dim, which only a ViT entry can take")
            changes.update(block_levels(int(kw.get("depth", len(spec.taps))),
                                        int(kw.get("embed_dim", spec.dims[0])), VIT_ALL_STRIDE))
    return replace(spec, **changes) if changes else spec


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


def parse_levels(text: str | None, encoder: str | None = None, *, option: str = "--minus",
                 weights: str | None = None) -> tuple[int, ...] | None:
    """``"1"`` -> (1,); ``"0, 2,3"`` -> (0, 2, 3) (sorted, unique); None or "" -> None.

    ``"all"`` is the spec's ``all_levels`` of *encoder* (every level of a CNN, every 4th block
    of a ViT; 0..3 when no encoder is named; a *weights* tag that changes the depth, e.g.
    UNI2-h's 24 blocks, counts). *option* names the command option in the
    one-line :class:`EncoderError`.
    """
    if text is None or not str(text).strip():
        return None
    text = str(text)
    if text.strip().lower() == "all":
        if encoder is None:
            return (0, 1, 2, 3)
        spec, tag = get_spec(encoder), str(weights or "").partition("=")[0]
        return tagged_spec(spec, spec.weights.get(tag)).all_levels
    try:
        levels = tuple(sorted({int(p) for p in text.split(",") if p.strip()}))
    except ValueError:
        raise EncoderError(f"{option} {text!r}: give levels as comma-separated integers, "
                           "e.g. 1 or 0,1,2,3 or all") from None
    if not levels or min(levels) < 0:
        raise EncoderError(f"{option} {text!r}: levels are integers >= 0 ('minus K')")
    return levels
