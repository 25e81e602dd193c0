"""JPEG streams as TIFF slides store them: shared tables, colour space, completeness.

A tiled TIFF keeps one JPEG stream per tile. Aperio (and others) strip the quantisation and
Huffman tables out of every tile into one ``JPEGTables`` tag, and often store the stream in RGB
without the Adobe marker that would tell a decoder so (libjpeg then assumes YCbCr and the
colours come out wrong). These helpers turn such a tile into a stand-alone JPEG any decoder
(PIL, torchvision/nvJPEG) reads correctly, and split a full JPEG the other way for the
synthetic slides of the tests. Only JPEG markers are parsed here; TIFF is tifffile's job.
"""

from __future__ import annotations

SOI, EOI = b"\xff\xd8", b"\xff\xd9"
_SOS, _SOF_MARKERS = 0xDA, {0xC0, 0xC1, 0xC2}
_TABLE_MARKERS = {0xDB, 0xC4, 0xDD}          # DQT, DHT, DRI
# APP14 "Adobe", version 100, flags 0/0, transform 0: the components are R, G, B (no YCbCr).
ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"


def segments(jpeg: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of each header segment after SOI; the last is SOS to the end."""
    if jpeg[:2] != SOI:
        raise ValueError("not a JPEG stream (no SOI marker)")
    out, i = [], 2
    while i + 4 <= len(jpeg):
        if jpeg[i] != 0xFF:
            raise ValueError(f"JPEG stream: no marker at byte {i}")
        marker = jpeg[i + 1]
        if marker == 0xFF:                   # fill byte
            i += 1
            continue
        if marker == 0xD9:
            out.append((marker, i, i + 2))
            break
        length = int.from_bytes(jpeg[i + 2:i + 4], "big")
        if marker == _SOS:
            out.append((marker, i, len(jpeg)))
            break
        out.append((marker, i, i + 2 + length))
        i += 2 + length
    return out


def split_tables(jpeg: bytes, component_ids: bytes | None = None) -> tuple[bytes, bytes]:
    """(JPEGTables, abbreviated tile stream) of a full JPEG, as an Aperio writer stores them.

    APP markers are dropped from the tile. *component_ids* (3 bytes) rewrites the frame's and
    the scan's component ids (Aperio writes 0, 1, 2 for an RGB stream).
    """
    tables, tile = [SOI], [SOI]
    for marker, start, end in segments(jpeg):
        seg = jpeg[start:end]
        if marker in _TABLE_MARKERS:
            tables.append(seg)
        elif 0xE0 <= marker <= 0xEF:
            continue
        else:
            if component_ids is not None and (marker in _SOF_MARKERS or marker == _SOS):
                seg = _set_ids(seg, marker, component_ids)
            tile.append(seg)
    tables.append(EOI)
    return b"".join(tables), b"".join(tile)


def _set_ids(seg: bytes, marker: int, ids: bytes) -> bytes:
    b = bytearray(seg)
    if marker == _SOS:
        n, first, step = b[4], 5, 2
    else:
        n, first, step = b[9], 10, 3
    for k in range(min(n, len(ids))):
        b[first + k * step] = ids[k]
    return bytes(b)


def complete(tile: bytes, tables: bytes | None, rgb: bool) -> bytes:
    """A stand-alone JPEG of a TIFF tile: the shared *tables* spliced in after SOI and, when
    the TIFF says the stream is RGB (*rgb*), an Adobe marker so every decoder keeps it RGB."""
    parts = [SOI]
    if rgb and b"Adobe" not in tile[:64]:
        parts.append(ADOBE_RGB)
    if tables:
        parts.append(tables[2:-2] if tables.endswith(EOI) else tables[2:])
    parts.append(tile[2:])
    return b"".join(parts)


def is_whole(tile: bytes) -> bool:
    """True when the stream ends with EOI (trailing padding allowed): a cut-off tile does not.

    libjpeg decodes a truncated stream without an error, grey-filling what is missing; this
    check keeps such a tile from becoming plausible-looking garbage features.
    """
    end = len(tile)
    while end > 2 and tile[end - 1] == 0:
        end -= 1
    return tile[end - 2:end] == EOI


__all__ = ["ADOBE_RGB", "EOI", "SOI", "complete", "is_whole", "segments", "split_tables"]
