"""Weights: resolve a ``--weights`` value to a file, read it safely, map its keys onto timm's.

``--weights`` is one of
  * ``random``: seeded random initialisation (no file);
  * a tag known to the encoder (``imagenet``, ``ciga-simclr``, ``mormont-mtdp``, ``kang-bt``),
    looked up offline in ``$FEATSTORE_WEIGHTS``, ``$TORCH_HOME/hub/checkpoints`` and the
    Hugging Face cache; ``TAG=PATH`` gives the tag's file explicitly;
  * a path to ``.pth .pt .bin .ckpt .torch .safetensors``: torchvision, timm,
    ``{"state_dict": ...}``, ``{"model": ...}`` or a featstore fine-tuned checkpoint.
Nothing touches the network unless ``allow_download=True``. Checkpoints are read with
``torch.load(weights_only=True)``: a file that pickles code is refused.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from featstore.encoders.registry import EncoderSpec, WeightsSpec
from featstore.errors import EncoderError, WeightsError, WeightsNotFoundError

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "featstore-encoder/1"
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".torch", ".safetensors")
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.", "backbone.", "encoder.")
LAYOUT_PREFIXES = ("resnet.", "features.")   # authors' wrappers, stripped only if they help
_TAG_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class ResolvedWeights:
    """Where an encoder's weights come from (before reading the file)."""

    tag: str                          # the weights_tag recorded with the features
    kind: str                         # "random" | "named" | "file"
    path: Path | None = None
    spec: WeightsSpec | None = None   # the named tag's spec, if any
    seed: int | None = None


@dataclass
class Checkpoint:
    """A state dict read from a file, with its sha256 and featstore metadata (if any)."""

    state_dict: dict[str, torch.Tensor]
    sha256: str
    meta: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- where files live

def weights_dirs() -> list[Path]:
    """Directories searched for named weights files, in order."""
    dirs = []
    if os.environ.get("FEATSTORE_WEIGHTS"):
        dirs.append(Path(os.environ["FEATSTORE_WEIGHTS"]).expanduser())
    dirs.append(Path(torch.hub.get_dir()) / "checkpoints")
    return dirs


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache directory (same rules as huggingface_hub)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "huggingface" / "hub"


def _hf_dir(repo: str) -> Path:
    return hf_hub_cache() / f"models--{repo.replace('/', '--')}" / "snapshots"


def expected_paths(wspec: WeightsSpec) -> list[str]:
    """Every place a named tag's file is looked for (HF snapshots as a glob pattern)."""
    out = [str(d / f) for f in wspec.files for d in weights_dirs()]
    if wspec.hf_repo:
        out.append(str(_hf_dir(wspec.hf_repo) / "*" / "model.safetensors"))
    return out


def find_weights(wspec: WeightsSpec) -> Path | None:
    """The first existing file for a named tag, or None. Only looks at the disk."""
    for f in wspec.files:
        for d in weights_dirs():
            if (d / f).is_file():
                return d / f
    if wspec.hf_repo and _hf_dir(wspec.hf_repo).is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            hits = sorted(_hf_dir(wspec.hf_repo).glob(f"*/{name}"))
            if hits:
                return hits[0]
    return None


def _download(wspec: WeightsSpec) -> Path:
    """Fetch a named tag's file (only called with allow_download=True)."""
    if wspec.files and wspec.urls:
        dest = weights_dirs()[-1] / wspec.files[0]
        dest.parent.mkdir(parents=True, exist_ok=True)
        log.info("downloading %s to %s", wspec.urls[0], dest)
        torch.hub.download_url_to_file(wspec.urls[0], str(dest), progress=False)
        return dest
    if wspec.hf_repo:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(wspec.hf_repo, "model.safetensors"))
    raise WeightsNotFoundError(f"weights tag {wspec.tag} has no download address; supply the file")


def file_tag(path: Path) -> str:
    """weights_tag of an explicit file: ``file-<stem>-<sha256[:8]>`` (safe as a Zarr node name).

    The short hash keeps two files with the same name (e.g. two fine-tuned ``encoder.pt``)
    apart in one store; for a fine-tuned run the run folder's name is used as the stem.
    """
    stem = path.stem
    if stem == "encoder" and path.parent.name:
        stem = path.parent.name
    return f"file-{_TAG_SAFE.sub('_', stem)}-{file_sha256(path)[:8]}"


def resolve_weights(spec: EncoderSpec, weights: str, *, seed: int = 0,
                    allow_download: bool = False) -> ResolvedWeights:
    """Turn a ``--weights`` value into a :class:`ResolvedWeights`; fails fast, offline."""
    weights = str(weights).strip()
    if weights == "random":
        return ResolvedWeights(tag=f"random-s{seed}", kind="random", seed=seed)
    tag, _, explicit = weights.partition("=")
    if explicit and tag in spec.weights:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise WeightsNotFoundError(f"weights file {path} for tag {tag} does not exist")
        return ResolvedWeights(tag=tag, kind="named", path=path, spec=spec.weights[tag])
    if weights in spec.weights:
        wspec = spec.weights[weights]
        path = find_weights(wspec)
        if path is None and allow_download:
            path = _download(wspec)
        if path is None:
            where = " or ".join(expected_paths(wspec))
            raise WeightsNotFoundError(
                f"{spec.name} weights '{weights}' not found offline; put the file at {where} "
                f"(or pass --weights {weights}=PATH, or --allow-download)"
            )
        return ResolvedWeights(tag=weights, kind="named", path=path, spec=wspec)
    path = Path(weights).expanduser()
    if path.suffix.lower() in WEIGHT_SUFFIXES or path.exists():
        if not path.is_file():
            raise WeightsNotFoundError(f"weights file {path} does not exist; check the path")
        for wspec in spec.weights.values():   # a paper's own file name keeps its tag and layout
            if path.name in wspec.files:
                return ResolvedWeights(tag=wspec.tag, kind="named", path=path, spec=wspec)
        return ResolvedWeights(tag=file_tag(path), kind="file", path=path)
    raise EncoderError(
        f"unknown weights {weights!r} for {spec.name}; use random, "
        f"{', '.join(spec.weights)}, TAG=PATH, or a path ending in {'/'.join(WEIGHT_SUFFIXES)}"
    )


# ---------------------------------------------------------------- reading files

_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, computed once per (path, mtime, size) in this process."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_mtime_ns, st.st_size)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL [\w.]+", str(exc))
        if not found:
            why = re.search(r"WeightsUnpickler error:\s*(.+)", str(exc))
            detail = why.group(1).strip() if why else str(exc).splitlines()[0]
            raise WeightsError(f"{path} is not a readable torch checkpoint: {detail}") from None
        what = f" ({found.group(0)})"
        raise WeightsError(
            f"{path} pickles Python objects beyond tensors{what}; refused (weights_only). "
            "If you trust it, re-save only its state_dict with torch.save()"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise WeightsError(f"{path} is not a readable torch checkpoint: {first}") from None


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def read_checkpoint(path: str | Path, encoder: str) -> Checkpoint:
    """Read a weights file for *encoder* into a flat state dict (keys not yet mapped)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f"weights file {path} does not exist; check the path")
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as exc:
            raise WeightsError(f"{path} is not a readable safetensors file: {exc}") from None
    else:
        obj = _torch_load(path)
    meta: dict[str, Any] = {}
    if isinstance(obj, Mapping) and obj.get("format") == CHECKPOINT_FORMAT:
        if obj.get("encoder") != encoder:
            raise WeightsError(
                f"{path} is a featstore checkpoint of encoder {obj.get('encoder')!r}, not "
                f"{encoder!r}; extract it with --encoder {obj.get('encoder')}"
            )
        meta = {k: v for k, v in obj.items() if k not in ("state_dict", "format")}
        obj = obj.get("state_dict")
    elif not _is_tensor_dict(obj) and isinstance(obj, Mapping):
        for key in ("state_dict", "model", "model_state_dict"):
            if _is_tensor_dict(obj.get(key)):
                obj = obj[key]
                break
    if not _is_tensor_dict(obj):
        keys = list(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
        raise WeightsError(
            f"{path} holds no state dict of tensors (top level: {keys}); expected a state dict, "
            "{'state_dict': ...} or {'model': ...}"
        )
    return Checkpoint(state_dict=dict(obj), sha256=file_sha256(path), meta=meta)


# ---------------------------------------------------------------- mapping keys

_DENSE_LEGACY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def _densenet_keys(key: str) -> str:
    """torchvision's old DenseNet keys ``norm.1`` -> ``norm1`` (timm and new torchvision)."""
    m = _DENSE_LEGACY.match(key)
    return m.group(1) + m.group(2) if m else key


KEY_MAPPERS: dict[str, Callable[[str], str]] = {
    "resnet": lambda k: k,        # torchvision ResNet keys are timm's keys
    "densenet": _densenet_keys,
    "efficientnet": lambda k: k,  # timm layout only (torchvision's differs; not mapped)
}


def _short(keys: list[str], n: int = 5) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def map_state_dict(sd: Mapping[str, torch.Tensor], model_sd: Mapping[str, torch.Tensor],
                   spec: EncoderSpec, *, drop_prefixes: tuple[str, ...] = (),
                   strict: bool = True, source: str = "weights") -> dict[str, torch.Tensor]:
    """Map a checkpoint's keys onto the timm model's and check them.

    Drops *drop_prefixes* keys, maps the family's legacy keys, strips wrapper prefixes
    (``module.`` ... when every key has one, and any of them or ``resnet.``/``features.``
    wherever stripping matches more model keys), loads the classifier head only if it fits (never used, so an
    absent or different head is ignored), and ignores missing ``num_batches_tracked``.
    Missing or unexpected keys are refused unless ``strict=False``; shape mismatches always.
    """
    mapper = KEY_MAPPERS.get(spec.family, lambda k: k)
    model_keys = set(model_sd)

    def remap(d: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {mapper(k): v for k, v in d.items()}

    def overlap(d: Mapping[str, torch.Tensor]) -> int:
        return len(set(remap(d)) & model_keys)

    cur = {k: v for k, v in sd.items() if not k.startswith(drop_prefixes)} if drop_prefixes else dict(sd)
    changed = True
    while changed and cur:
        changed = False
        for p in WRAPPER_PREFIXES + LAYOUT_PREFIXES:
            have = [k.startswith(p) for k in cur]
            if not any(have):
                continue
            stripped = {(k[len(p):] if k.startswith(p) else k): v for k, v in cur.items()}
            gain = overlap(stripped) - overlap(cur)
            if gain > 0 or (gain == 0 and all(have) and p in WRAPPER_PREFIXES):
                cur, changed = stripped, True
                break
    cur = remap(cur)
    heads = spec.head_prefixes
    cur = {k: v for k, v in cur.items()   # the head loads if it fits, else is ignored
           if not k.startswith(heads) or (k in model_keys and v.shape == model_sd[k].shape)}
    unexpected = [k for k in cur if k not in model_keys]
    missing = [k for k in model_keys if k not in cur and not k.startswith(heads)
               and not k.endswith("num_batches_tracked")]
    shapes = [f"{k} {tuple(cur[k].shape)} vs {tuple(model_sd[k].shape)}"
              for k in cur if k in model_keys and cur[k].shape != model_sd[k].shape]
    if shapes:
        raise WeightsError(f"{source}: {len(shapes)} tensors have the wrong shape for "
                           f"{spec.name}: {_short(shapes, 3)}; is it a {spec.name} checkpoint?")
    if missing or unexpected:
        msg = (f"{source} does not match {spec.name}: {len(missing)} missing keys "
               f"[{_short(missing)}], {len(unexpected)} unexpected keys [{_short(unexpected)}]")
        if strict:
            raise WeightsError(msg + "; pass strict=False (--no-strict) to load the rest")
        log.warning("%s; loading the %d matching tensors (strict=False)", msg,
                    len(cur) - len(unexpected))
    return {k: v for k, v in cur.items() if k in model_keys}


def load_weights(model: torch.nn.Module, spec: EncoderSpec, resolved: ResolvedWeights, *,
                 strict: bool = True) -> Checkpoint | None:
    """Load *resolved* into the full timm *model* in place; None for random weights."""
    if resolved.path is None:
        return None
    ckpt = read_checkpoint(resolved.path, spec.name)
    drop = resolved.spec.drop_prefixes if resolved.spec else ()
    mapped = map_state_dict(ckpt.state_dict, model.state_dict(), spec, drop_prefixes=drop,
                            strict=strict, source=str(resolved.path))
    with torch.no_grad():
        model.load_state_dict(mapped, strict=False)
    return ckpt


# ---------------------------------------------------------------- fine-tuned checkpoints

def save_encoder_checkpoint(encoder: Any, path: str | Path, *, level: int,
                            extra: Mapping[str, Any] | None = None) -> Path:
    """Write *encoder* (a featstore Encoder) as a ``featstore-encoder/1`` checkpoint.

    The state dict is the FULL timm model (fine-tuned prefix + the parent's untouched deeper
    stages), so the file loads with ``--weights PATH`` at any level. *extra* must be plain
    data (str, numbers, lists, dicts) so that ``weights_only`` loading accepts it. The write
    is atomic (temporary file + rename).
    """
    path = Path(path)
    payload: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "encoder": encoder.name,
        "state_dict": {k: v.detach().cpu().clone() for k, v in encoder.full_state_dict().items()},
        "parent_weights": encoder.weights_tag,
        "parent_sha256": encoder.weights_sha256,
        "level": int(level),
        "preprocessing": encoder.preprocessing(),
    }
    payload.update(dict(extra or {}))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path
