"""featstore's public API: every re-exported name resolves, and reading a store needs no torch."""

from __future__ import annotations

import subprocess
import sys

import featstore


def test_every_exported_name_resolves_to_its_module_object():
    import featstore.store
    import featstore.read.tilesource

    for name in featstore.__all__:
        assert getattr(featstore, name) is not None, name
    assert featstore.open_store is featstore.store.open_store
    assert featstore.TileSource is featstore.read.tilesource.TileSource
    assert set(featstore.__all__) <= set(dir(featstore))


def test_unknown_name_is_an_attribute_error():
    try:
        featstore.no_such_thing  # noqa: B018
    except AttributeError as exc:
        assert "no_such_thing" in str(exc)
    else:
        raise AssertionError("featstore.no_such_thing resolved")


def test_opening_a_store_does_not_import_torch(tmp_path):
    code = ("import sys, featstore\n"
            f"featstore.open_store_writer({str(tmp_path / 's.zarr')!r})\n"
            f"st = featstore.open_store({str(tmp_path / 's.zarr')!r}); st.slide_ids()\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr
