"""Weights tags: the one place that builds, parses and matches the ``weights`` string of a store.

A tag names the weights that produced a set of features, and is a Zarr node name in the store:

* ``random-s<seed>``: seeded random initialisation (``random`` alone asks for any seed);
* a named tag known to the encoder (``imagenet``, ``ciga-simclr`` ...);
* ``file-<stem>-<sha256[:8]>``: an explicit weights file (the short hash keeps two files with
  the same name apart);
* ``pretrain-<name>-<sha256[:8]>``: an encoder `featstore pretrain` wrote (its file is
  ``pretrain-<name>.pt``);
* any of these + ``-stain-<method>-<sha8>``: features of stain-normalised tiles
  (``imagenet-stain-macenko-1a2b3c4d``; the hash is the fitted normaliser's), so raw and
  normalised features of one encoder coexist. A request ``imagenet-stain-macenko`` finds the
  one stored fit; ``imagenet`` finds only the raw features.

No torch import here: the store reads tags without loading the encoder stack.
"""

from __future__ import annotations

import functools

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

_TAG_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
_RANDOM = re.compile(r"^random-s(\d+)$")
_FILE = re.compile(r"^file-(.+)-([0-9a-f]{8})$")
_PRETRAIN = re.compile(r"^pretrain-(.+)-([0-9a-f]{8})$")
#: Stain normalisers a tag can name (featstore.stain.NORMALISERS minus "none"); a closed list, so a
#: file stem containing "-stain-" is never mistaken for one.
STAIN_METHODS = ("macenko", "reinhard")
_STAIN = re.compile(rf"^(.+)-stain-((?:{'|'.join(STAIN_METHODS)})(?:-[0-9a-f]{{8}})?)$")
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


@dataclass(frozen=True)
class WeightsTag:
    """A parsed weights tag; ``str(tag)`` is the string stored with the features."""

    kind: str                   # "random" | "named" | "file" | "pretrain"
    name: str                   # "random", "imagenet", "ciga-simclr", or the file stem
    seed: int | None = None     # random only (None: any seed, as asked with ``random``)
    sha8: str | None = None     # file only
    stain: str | None = None    # "macenko-1a2b3c4d" (a fit), "macenko" (a request: any fit), None (raw tiles)

    @classmethod
    def random(cls, seed: int) -> "WeightsTag":
        """The tag of seeded random weights: ``random-s<seed>``."""
        return cls("random", "random", seed=int(seed))

    @classmethod
    def named(cls, name: str) -> "WeightsTag":
        """A tag known to an encoder's registry spec (``imagenet`` ...)."""
        return cls("named", str(name))

    @classmethod
    def for_file(cls, path: str | Path, sha256: str | None = None) -> "WeightsTag":
        """The tag of an explicit weights file: ``file-<stem>-<sha256[:8]>``.

        A fine-tuned ``encoder.pt`` takes its run folder's name as the stem, so two runs'
        checkpoints read differently in a store listing.
        """
        path = Path(path)
        stem = path.stem
        if stem == "encoder" and path.parent.name:
            stem = path.parent.name
        sha = sha256 or file_sha256(path)
        if stem.startswith("pretrain-") and len(stem) > len("pretrain-"):
            return cls("pretrain", _TAG_SAFE.sub("_", stem[len("pretrain-"):]), sha8=sha[:8])
        return cls("file", _TAG_SAFE.sub("_", stem), sha8=sha[:8])

    @classmethod
    def parse(cls, text: str) -> "WeightsTag":
        """``random-s3`` -> random seed 3, ``random`` -> random any seed, ``file-x-1a2b3c4d``, else named."""
        text = str(text).strip()
        m = _STAIN.match(text)
        if m:
            from dataclasses import replace

            return replace(cls.parse(m.group(1)), stain=m.group(2))
        if text == "random":
            return cls("random", "random")
        m = _RANDOM.match(text)
        if m:
            return cls.random(int(m.group(1)))
        m = _FILE.match(text)
        if m:
            return cls("file", m.group(1), sha8=m.group(2))
        m = _PRETRAIN.match(text)
        if m:
            return cls("pretrain", m.group(1), sha8=m.group(2))
        return cls.named(text)

    def __str__(self) -> str:
        return self.weights + (f"-stain-{self.stain}" if self.stain else "")

    @property
    def weights(self) -> str:
        """The encoder's weights tag without the stain part (what ``create_encoder`` takes)."""
        if self.kind == "random":
            return "random" if self.seed is None else f"random-s{self.seed}"
        if self.kind in ("file", "pretrain"):
            return f"{self.kind}-{self.name}-{self.sha8}"
        return self.name

    def with_stain(self, stain: str | None) -> "WeightsTag":
        """This tag for features of tiles normalised by *stain* (``macenko-<sha8>``; None: raw)."""
        from dataclasses import replace

        return replace(self, stain=stain)

    def matches(self, requested: str | "WeightsTag") -> bool:
        """Whether a request finds this tag: ``random`` finds any ``random-s<N>``, a stain method
        without its hash any fit of that method, else equality; raw never answers a stain request
        nor the reverse."""
        req = requested if isinstance(requested, WeightsTag) else WeightsTag.parse(requested)
        if (req.stain is None) != (self.stain is None):
            return False
        if req.stain is not None and req.stain != self.stain and not (
                "-" not in req.stain and str(self.stain).split("-")[0] == req.stain):
            return False
        if req.kind == "random" and req.seed is None:
            return self.kind == "random"
        return req.weights == self.weights


_WEIGHT_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


@functools.lru_cache(maxsize=64)
def _file_tag(path: str, size: int, mtime_ns: int) -> str:
    return str(WeightsTag.for_file(path))


def requested_tag(text: str) -> str:
    """A weights request as the store knows it: a weights *file* (``…/encoder.pt``, a pretrain
    checkpoint) becomes its tag (``file-…``/``pretrain-…-<sha8>``), anything else is returned as is.
    Hashing is cached per (path, size, mtime), so asking for the same file again is free."""
    p = Path(str(text)).expanduser()
    if p.suffix.lower() not in _WEIGHT_FILE_SUFFIXES or not p.is_file():
        return str(text)
    st = p.stat()
    return _file_tag(str(p.resolve()), st.st_size, st.st_mtime_ns)


__all__ = ["STAIN_METHODS", "WeightsTag", "file_sha256", "requested_tag"]
