"""`featstore view`: serve a store's slides (and a run's attention) to a local browser."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from featstore.core.ui import out_console


def view(
    store: Annotated[Optional[str], typer.Argument(help="Feature store made by `featstore extract` (optional with "
                                                        "--seg: the slides are then those of the class maps).")] = None,
    run: Annotated[Optional[list[Path]], typer.Option(help="A `mil train` run folder, or a folder of runs such as a "
                                                           "study's runs/ (repeat): predictions in the list, attention "
                                                           "overlay and top-k tiles on each slide; ?run=NAME picks "
                                                           "one.")] = None,
    slides: Annotated[Optional[list[Path]], typer.Option(help="Folders the slide files may be read from (repeat); "
                                                              "default: only the files the store recorded.")] = None,
    host: Annotated[str, typer.Option(help="Address to bind (127.0.0.1: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0: any free one).")] = 8765,
    device: Annotated[str, typer.Option(help="Device for the run's attention: cpu | cuda | auto.")] = "cpu",
    seg: Annotated[Optional[Path], typer.Option(help="Class maps of `mil seg predict-slides --out DIR`: a "
                                                     "segmentation overlay (opacity slider, legend) and each "
                                                     "class's area in the list.")] = None,
) -> None:
    """Open a local web viewer: the slides with labels, predictions and metrics; each slide at full resolution
    with its tissue tiles, the run's attention overlay (opacity slider, colour bar), top-k tiles and
    segmentation class maps."""
    from werkzeug.serving import make_server

    from featstore.store import open_store
    from mil.errors import MilError
    from mil.viewer.app import create_app
    from mil.viewer.data import ViewerData, find_runs
    from mil.viewer.seg import SegMaps

    dirs = tuple(Path(d) for d in slides or ())
    missing = [str(d) for d in dirs if not d.is_dir()]
    if missing:
        raise MilError(f"--slides {', '.join(missing)}: not a folder")
    if store is None and seg is None:
        raise MilError("give a feature STORE, or --seg DIR of class maps (`mil seg predict-slides`), or both")
    data = ViewerData(None if store is None else open_store(store), find_runs(run) if run else {}, dirs, device,
                      None if seg is None else SegMaps(seg))
    _check_port(host, port)
    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)   # no line per tile request
    server = make_server(host, port, create_app(data), threaded=True)
    out_console.print(f"featstore view: http://{host}:{server.server_port}/  ({len(data.slide_ids())} slides, "
                      f"{len(data.runs)} run(s); Ctrl-C stops)", highlight=False)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def _check_port(host: str, port: int) -> None:
    """One line, in the tool's style, for an address werkzeug could not bind (it would print its own
    two lines and exit)."""
    import socket

    from mil.errors import MilError

    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.bind((host, port))
    except OSError as exc:
        raise MilError(f"--host {host} --port {port}: cannot listen there ({exc.strerror}); pick another "
                       "--port (0: any free one)") from None


def register(featstore_app: typer.Typer) -> None:
    featstore_app.command("view")(view)
