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

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from featstore.checkpoint import file_sha256, file_tag, is_encoder_checkpoint, load_torch_file
from featstore.encoders.registry import EncoderSpec, WeightsSpec
from featstore.errors import EncoderError, WeightsError, WeightsNotFoundError
from featstore.tags import WeightsTag

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".torch", ".safetensors")
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.", "backbone.", "encoder.")
LAYOUT_PREFIXES = ("resnet.", "features.")   # authors' wrappers, stripped only if they help


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


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache directory, by huggingface_hub's rules read now.

    huggingface_hub reads ``HF_HUB_CACHE`` / ``HF_HOME`` once, at import; reading them at call
    time lets a later change (a test, a notebook cell) count. Unset, its own default is used.
    """
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


_HF_FILES = ("model.safetensors", "pytorch_model.bin")


def find_hf_cached(repo: str) -> Path | None:
    """A cached ``model.safetensors`` (else ``pytorch_model.bin``) of hub *repo*, or None.

    The ``main`` revision first (what ``hf_hub_download`` records), then any cached snapshot
    (e.g. copied in by hand, without ``refs/``), found by the hub's own cache scanner.
    """
    from huggingface_hub import CacheNotFound, scan_cache_dir, try_to_load_from_cache

    cache = hf_cache_dir()
    for name in _HF_FILES:
        hit = try_to_load_from_cache(repo, name, cache_dir=cache)
        if isinstance(hit, str):
            return Path(hit)
    try:
        repos = [r for r in scan_cache_dir(cache).repos if r.repo_id == repo and r.repo_type == "model"]
    except (CacheNotFound, OSError):
        return None
    revisions = sorted((rev for r in repos for rev in r.revisions), key=lambda rev: rev.commit_hash)
    for name in _HF_FILES:
        for rev in revisions:
            hits = [f.file_path for f in rev.files if f.file_name == name]
            if hits:
                return Path(hits[0])
    return None


def expected_paths(wspec: WeightsSpec) -> list[str]:
    """Every place a named tag's file is looked for (HF snapshots as a glob pattern)."""
    out = [str(d / f) for f in wspec.files for d in weights_dirs()]
    if wspec.hf_repo:
        from huggingface_hub.file_download import repo_folder_name

        repo_dir = repo_folder_name(repo_id=wspec.hf_repo, repo_type="model")
        out.append(str(hf_cache_dir() / repo_dir / "snapshots" / "*" / "model.safetensors"))
    return out


def find_weights(wspec: WeightsSpec) -> Path | None:
    """The first existing file for a named tag, or None. Only looks at the disk."""
    for f in wspec.files:
        for d in weights_dirs():
            if (d / f).is_file():
                return d / f
    return find_hf_cached(wspec.hf_repo) if wspec.hf_repo else None


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
        from huggingface_hub.errors import EntryNotFoundError

        for name in _HF_FILES:     # UNI, Virchow2 ... publish only pytorch_model.bin
            try:
                return Path(hf_hub_download(wspec.hf_repo, name))
            except EntryNotFoundError:
                continue
    raise WeightsNotFoundError(f"weights tag {wspec.tag} has no download address; supply the file")


def resolve_weights(spec: EncoderSpec, weights: str, *, seed: int = 0,
                    allow_download: bool = False) -> ResolvedWeights:
    """Turn a ``--weights`` value into a :class:`ResolvedWeights`; fails fast, offline."""
    weights = str(weights).strip()
    if weights == "random":
        return ResolvedWeights(tag=str(WeightsTag.random(seed)), kind="random", seed=seed)
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
                + (f"; licence: {wspec.licence}" if wspec.licence else "")
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
        obj = load_torch_file(path)
    meta: dict[str, Any] = {}
    if is_encoder_checkpoint(obj):
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

# transformers ViTModel / Dinov2Model key -> timm VisionTransformer key (q/k/v fused after).
_HF_RENAMES = tuple((re.compile(p), r) for p, r in (
    (r"^(?:vit\.|dinov2\.)", ""),
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.register_tokens$", "reg_token"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^encoder\.layer\.(\d+)\.(?:layernorm_before|norm1)\.", r"blocks.\1.norm1."),
    (r"^encoder\.layer\.(\d+)\.(?:layernorm_after|norm2)\.", r"blocks.\1.norm2."),
    (r"^encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.", r"blocks.\1.attn.\2."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"blocks.\1.mlp.fc1."),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"blocks.\1.mlp.fc2."),
    (r"^encoder\.layer\.(\d+)\.mlp\.", r"blocks.\1.mlp."),
    (r"^encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1$", r"blocks.\1.ls\2.gamma"),
    (r"^layernorm\.", "norm."),
))
_HF_DROP = re.compile(r"^(?:vit\.|dinov2\.)?(?:pooler\.|embeddings\.mask_token$)")
_QKV = re.compile(r"^(blocks\.\d+\.attn)\.(query|key|value)\.(weight|bias)$")


def _rename(key: str, rules: tuple) -> str:
    for pat, rep in rules:
        key = pat.sub(rep, key)
    return key


def _from_hf_vit(sd: Mapping[str, torch.Tensor], model_sd: Mapping[str, torch.Tensor]
                 ) -> dict[str, torch.Tensor]:
    """transformers ``ViTModel`` / ``Dinov2Model`` state dict -> timm layout: separate
    query/key/value projections concatenated into ``attn.qkv`` (q, k, v order, as timm
    splits it), the pooler and mask token dropped, the position grid fitted."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        if _HF_DROP.match(k):
            continue
        k = _rename(k, _HF_RENAMES)
        m = _QKV.match(k)
        if m:
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = v
        else:
            out[k] = v
    for (attn, kind), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise WeightsError(f"{attn}: the checkpoint lacks {sorted({'query', 'key', 'value'} - set(parts))}")
        out[f"{attn}.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]])
    return _fit_pos_embed(out, model_sd)


_DINOV2_RENAMES = tuple((re.compile(p), r) for p, r in (
    (r"^register_tokens$", "reg_token"),
    (r"^(blocks\.\d+\.mlp)\.w12\.", r"\1.fc1."),     # SwiGLU (ViT-g): fused w1|w2 = timm fc1
    (r"^(blocks\.\d+\.mlp)\.w3\.", r"\1.fc2."),
))


def _from_dinov2(sd: Mapping[str, torch.Tensor], model_sd: Mapping[str, torch.Tensor]
                 ) -> dict[str, torch.Tensor]:
    """facebookresearch/dinov2 state dict -> timm layout: ``register_tokens``, SwiGLU
    ``w12``/``w3`` renamed, ``mask_token`` dropped, position grid (518 px: 37 x 37) fitted."""
    out = {_rename(k, _DINOV2_RENAMES): v for k, v in sd.items() if k != "mask_token"}
    return _fit_pos_embed(out, model_sd)


def _prefix_len(n_pos: int) -> int:
    """Tokens before the square patch grid in a position embedding of *n_pos* rows."""
    side = int(n_pos ** 0.5)
    return n_pos - side * side


def _fit_pos_embed(sd: dict[str, torch.Tensor], model_sd: Mapping[str, torch.Tensor]
                   ) -> dict[str, torch.Tensor]:
    """Fit ``pos_embed`` to the model's: a CLS position the model does not have (timm's
    ``no_embed_class``, used with registers) is added into ``cls_token``; a different patch
    grid is resampled with timm's ``resample_abs_pos_embed`` (bicubic), as timm does at run time."""
    pos, want = sd.get("pos_embed"), model_sd.get("pos_embed")
    if pos is None or want is None or pos.shape == want.shape:
        return sd
    have_p, want_p = _prefix_len(pos.shape[1]), _prefix_len(want.shape[1])
    if have_p == want_p + 1 and "cls_token" in sd:
        sd["cls_token"] = sd["cls_token"] + pos[:, :1]
        pos, have_p = pos[:, 1:], have_p - 1
    if have_p != want_p:
        raise WeightsError(f"pos_embed {tuple(pos.shape)} has {have_p} prefix positions, the model "
                           f"{want_p}; is it the tag's architecture?")
    from timm.layers import resample_abs_pos_embed

    side = int((want.shape[1] - want_p) ** 0.5)
    sd["pos_embed"] = resample_abs_pos_embed(pos, new_size=[side, side], num_prefix_tokens=have_p)
    return sd


LAYOUTS: dict[str, Callable[[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]],
                            dict[str, torch.Tensor]]] = {
    "": lambda sd, model_sd: dict(sd),        # the family's own key mapper only
    "timm": lambda sd, model_sd: _fit_pos_embed(dict(sd), model_sd),
    "hf-vit": _from_hf_vit,                   # transformers ViTModel / Dinov2Model
    "dinov2": _from_dinov2,                   # facebookresearch/dinov2 (torch.hub) checkpoints
}


def _short(keys: list[str], n: int = 5) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def map_state_dict(sd: Mapping[str, torch.Tensor], model_sd: Mapping[str, torch.Tensor],
                   spec: EncoderSpec, *, drop_prefixes: tuple[str, ...] = (),
                   strict: bool = True, source: str = "weights", layout: str = ""
                   ) -> dict[str, torch.Tensor]:
    """Map a checkpoint's keys onto the timm model's and check them.

    Drops *drop_prefixes* keys, strips wrapper prefixes, converts the authors' *layout*
    (:data:`LAYOUTS`: transformers / DINOv2 keys, fused qkv, position grid), maps the family's
    legacy keys, strips wrapper prefixes
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
    if layout not in LAYOUTS:
        raise WeightsError(f"{source}: unknown key layout {layout!r}; known: {', '.join(LAYOUTS)}")
    cur = remap(LAYOUTS[layout](cur, model_sd))
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
    layout = resolved.spec.layout if resolved.spec else ""
    mapped = map_state_dict(ckpt.state_dict, model.state_dict(), spec, drop_prefixes=drop,
                            strict=strict, source=str(resolved.path), layout=layout)
    with torch.no_grad():
        model.load_state_dict(mapped, strict=False)
    return ckpt
