"""Faults (issue 19, item 3): a full disk, an object store that stops answering, Ctrl-C, and two
runs writing one ``--out``. Each is met with one clear line and a non-zero exit, nothing
half-written is visible, and a rerun of the same command finishes with the numbers a clean run
gives.

Everything is real: pyramidal TIFF slides, Zarr stores on a real tmpfs and on a real S3 server
(moto's, behind a TCP proxy this file pauses), the real CLIs in subprocesses that get a real
SIGINT once they are provably mid-run (the store or the run folder shows progress).
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import featstore
from featstore.errors import StoreError
from featstore.cli import featstore_app, mil_app
from featstore.synth import rectangles_slide, write_pyramid_tiff
from mil.outlock import LOCK_NAME
from mil.run import RunWriter, load_run
from tests.mil.conftest import KEY, planted_cohort, write_labels

REPO = Path(__file__).parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "300"}
FS = "from featstore.cli import featstore_app; featstore_app()"
MIL = "from featstore.cli import mil_app; mil_app()"
#: resnet18, random weights, 32 px tiles at 1 µm/px; 64 px inputs so a slide takes a visible moment
FAST = ["--encoder", "resnet18", "--weights", "random", "--resize", "64", "--precision", "fp32",
        "--batch-size", "8", "--workers", "1", "--minus", "0", "--patch-size", "32", "--mpp", "1.0"]
SLIDES = ["s0", "s1", "s2", "s3"]


def run(app, args, **env):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "300", **env})


def spawn(code: str, args, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *[str(a) for a in args]], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**ENV, **env})


def wait_until(proc: subprocess.Popen, ready, what: str, timeout: float = 60.0) -> None:
    """Poll *ready()* until true while *proc* runs; fail if the process ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the process ended (exit {proc.returncode}) before {what}\n{out[-2000:]}\n{err[-3000:]}")
        try:
            if ready():
                return
        except Exception:  # noqa: BLE001 -- a store or file caught mid-write: look again
            pass
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"timed out waiting for {what}")


def interrupt(proc: subprocess.Popen) -> tuple[str, str]:
    """Ctrl-C: SIGINT, then the exit must be 130 with ONE "interrupted" line and no traceback."""
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, f"exit {proc.returncode}\n{out[-2000:]}\n{err[-3000:]}"
    text = out + err
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]
    lines = [ln for ln in text.splitlines() if "interrupted" in ln.lower()]
    assert len(lines) == 1 and lines[0].startswith("interrupted:"), text[-3000:]
    return out, err


def one_error_line(text: str, *words: str) -> str:
    assert "Traceback" not in text, text[-4000:]
    lines = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, text[-4000:]
    for w in words:
        assert w.lower() in lines[0].lower(), (w, lines[0])
    return lines[0]


def features_of(store, slides=SLIDES, **open_kw) -> dict[str, np.ndarray]:
    """The complete features of *store*; only slides marked complete are returned."""
    st = featstore.open_store(store, **open_kw)
    return {s: st.features(s, "resnet18", 0) for s in slides if st.has_features(s, "resnet18", 0)}


def assert_same(got: dict, clean: dict, slides=SLIDES) -> None:
    assert sorted(got) == sorted(slides), sorted(got)
    for s in slides:
        assert np.array_equal(got[s], clean[s]), s


# ------------------------------------------------------------------------------------- cohort

@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """4 slides: three of 64 tiles, the last (s3) of 128, so its features are the biggest write."""
    d = tmp_path_factory.mktemp("faults_cohort")
    for i, (w, h) in enumerate([(512, 512)] * 3 + [(1024, 512)]):
        write_pyramid_tiff(d / f"s{i}.tif", rectangles_slide((w, h), [(0, 0, w, h)], seed=i), mpp=0.5)
    return d


@pytest.fixture(scope="module")
def clean(cohort, tmp_path_factory):
    """(store, features) of an uninterrupted extraction of the cohort."""
    store = tmp_path_factory.mktemp("clean") / "clean.zarr"
    res = run(featstore_app, ["extract", cohort, "--store", store, *FAST])
    assert res.exit_code == 0, res.output
    return store, features_of(store)


# ---------------------------------------------------------------------------- 1. disk full

def _tmpfs_bytes(root: Path) -> int:
    """What a directory tree takes on tmpfs: whole 4 KiB pages per file."""
    return sum(-(-p.stat().st_size // 4096) * 4096 for p in root.rglob("*") if p.is_file())


def _mount(mnt: Path, kib: int) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(mnt)],
                          capture_output=True).returncode == 0


_SCENARIO = """set -u
cd {repo}
head -c {ballast} /dev/zero > {mnt}/ballast
{py} -c '{fs}' extract {slides} --store {mnt}/s.zarr {fast} > {tmp}/out1 2> {tmp}/err1; echo $? > {tmp}/rc1
cp -a {mnt}/s.zarr {tmp}/full.zarr
rm {mnt}/ballast
{py} -c '{fs}' extract {slides} --store {mnt}/s.zarr {fast} > {tmp}/out2 2> {tmp}/err2; echo $? > {tmp}/rc2
cp -a {mnt}/s.zarr {tmp}/freed.zarr
"""


def _disk_full_in_namespace(tmp, mnt, kib, ballast, cohort):
    """Fallback when this process may not mount: the whole scenario in a user+mount namespace;
    the store is copied out after each run (the tmpfs dies with the namespace)."""
    if shutil.which("unshare") is None:
        pytest.skip("a tmpfs cannot be mounted here (not root, no unshare): the disk-full case needs one")
    script = _SCENARIO.format(repo=REPO, ballast=ballast, mnt=mnt, py=sys.executable, fs=FS, slides=cohort,
                              fast=" ".join(FAST), tmp=tmp)
    res = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                          f"mount -t tmpfs -o size={kib}k tmpfs {mnt} && {script}"],
                         capture_output=True, text=True, env=ENV, timeout=300)
    if not (tmp / "rc1").exists():
        pytest.skip(f"neither mount nor unshare --user --mount works here: {res.stderr.strip()[:300]}")
    read = lambda name: (tmp / name).read_text()  # noqa: E731
    return ((int(read("rc1")), read("out1") + read("err1"), tmp / "full.zarr"),
            (int(read("rc2")), read("out2") + read("err2"), tmp / "freed.zarr"))


def _disk_full_mounted(tmp, mnt, ballast, cohort):
    (mnt / "ballast").write_bytes(b"\0" * ballast)
    res = run(featstore_app, ["extract", cohort, "--store", mnt / "s.zarr", *FAST])
    shutil.copytree(mnt / "s.zarr", tmp / "full.zarr")
    first = (res.exit_code, res.output, tmp / "full.zarr")
    (mnt / "ballast").unlink()                                              # free the space
    res = run(featstore_app, ["extract", cohort, "--store", mnt / "s.zarr", *FAST])
    return first, (res.exit_code, res.output, mnt / "s.zarr")


def test_disk_full_during_extraction_stops_in_one_line_and_a_rerun_completes(cohort, clean, tmp_path):
    """The tmpfs holds every slide's tiling but not the last slide's features (128 KiB short by
    64 KiB): exit 1, one "no space left" line, the slide in progress not complete anywhere in the
    read API, the others intact; with the ballast file deleted, the same command finishes them all
    with the clean run's exact features."""
    clean_store, clean_feats = clean
    fits = _tmpfs_bytes(clean_store) - 64 * 1024       # s3's features chunk is 128 KiB
    ballast = 512 * 1024
    kib = (fits + ballast) // 1024
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if not os.environ.get("FAULTS_FORCE_UNSHARE") and _mount(mnt, kib):   # the env var: test the fallback
        try:
            first, second = _disk_full_mounted(tmp_path, mnt, ballast, cohort)
            second = (*second[:2], shutil.copytree(second[2], tmp_path / "freed.zarr"))
        finally:
            subprocess.run(["umount", "-l", str(mnt)], check=False)
    else:
        first, second = _disk_full_in_namespace(tmp_path, mnt, kib, ballast, cohort)

    rc, text, full = first
    assert rc != 0, text
    line = one_error_line(text, "no space left", "s3")
    assert str(mnt) in line and "rerun" in line
    assert sum("no space left" in ln.lower() for ln in text.splitlines()) == 1, text
    st = featstore.open_store(full)
    assert st.has_tiling("s3"), "the tiling should have fit: size the tmpfs again"
    assert not st.has_features("s3", "resnet18", 0)
    with pytest.raises(StoreError, match="no complete features"):
        st.features("s3", "resnet18", 0)
    assert "s3" not in {s for s, (_, keys) in st.coverage().items() if keys}
    got = features_of(full)
    assert sorted(got) == ["s0", "s1", "s2"]                                # completed work is kept
    for s, x in got.items():
        assert np.array_equal(x, clean_feats[s]), s
    assert not list((full / ".locks").glob("*.lock")) if (full / ".locks").exists() else True

    rc, text, freed = second
    assert rc == 0, text
    assert "done 1, already complete 3" in text, text
    assert_same(features_of(freed), clean_feats)


# ------------------------------------------------------------------- 2. S3 stops answering

class PausableProxy:
    """127.0.0.1:port -> target port. :meth:`pause` closes the listener and every open connection
    (clients get "connection refused" / resets, as from a stopped server); :meth:`resume` listens again."""

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self.resume()

    def resume(self) -> None:
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", self.port))
        ls.listen(64)
        self._listener = ls
        threading.Thread(target=self._accept, args=(ls,), daemon=True).start()

    def pause(self) -> None:
        ls, self._listener = self._listener, None
        if ls is not None:
            try:
                ls.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            ls.close()
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()

    def _accept(self, ls: socket.socket) -> None:
        while True:
            try:
                client, _ = ls.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns.update((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while True:
                ready, _, _ = select.select([a, b], [], [], 1.0)
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    (b if s is a else a).sendall(data)
        except (OSError, ValueError):
            pass
        finally:
            for s in (a, b):
                try:
                    s.close()
                except OSError:
                    pass
            with self._lock:
                self._conns.difference_update((a, b))


@pytest.fixture()
def moto_s3():
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    import s3fs

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("moto server did not start")
                time.sleep(0.05)
        direct = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "testing", "secret": "testing"}
        s3fs.S3FileSystem(skip_instance_cache=True, **direct).makedirs("faults", exist_ok=True)
        yield port, direct
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_s3_unreachable_mid_extraction_then_a_rerun_resumes(cohort, clean, moto_s3):
    """The S3 server is unreachable for 3 s right after the first slide completes: either the
    client's retries carry the run through, or it stops with ONE line naming the store (exit 1,
    no traceback) and no unfinished slide visible. A rerun then leaves the store equal to a clean run."""
    port, direct = moto_s3
    proxy = PausableProxy(port)
    aws = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}"}
    url, slides = "s3://faults/x.zarr", SLIDES[:2]
    files = [cohort / f"{s}.tif" for s in slides]
    proc = spawn(FS, ["extract", *files, "--store", url, *FAST], **aws)
    peek = lambda: featstore.open_store(url, storage_options=direct).has_features("s0", "resnet18", 0)  # noqa: E731
    wait_until(proc, peek, "the first slide was complete on S3", timeout=90)
    proxy.pause()
    time.sleep(3.0)
    proxy.resume()
    out, err = proc.communicate(timeout=180)
    text = out + err
    assert "Traceback" not in text and "Exception ignored" not in text, text[-4000:]
    got = features_of(url, slides, storage_options=direct)
    for s, x in got.items():                                      # whatever is visible is whole
        assert np.array_equal(x, clean[1][s]), s
    if proc.returncode == 0:                                      # the retries carried it through
        assert f"done {len(slides)}" in out, text
        assert sorted(got) == slides
    else:
        assert proc.returncode == 1, text
        one_error_line(err, url, "unreachable", "rerun")
        assert sorted(got) != slides

    # the rerun is a new process, as a user's would be (this one's s3fs instances are cached per
    # argument set, and may point at other tests' servers)
    rerun = spawn(FS, ["extract", *files, "--store", url, *FAST], **aws)
    out, err = rerun.communicate(timeout=180)
    assert rerun.returncode == 0, out + err[-3000:]
    assert f"already complete {len(got)}" in out, out
    assert_same(features_of(url, slides, storage_options=direct), clean[1], slides)
    assert not featstore.open_store(url, storage_options=direct).failures()


# ------------------------------------------------------------------------------ 3. Ctrl-C

def test_ctrl_c_during_extract_keeps_finished_slides_and_a_rerun_completes(cohort, clean, tmp_path):
    store = tmp_path / "s.zarr"
    proc = spawn(FS, ["extract", cohort, "--store", store, *FAST])
    wait_until(proc, lambda: featstore.open_store(store).has_features("s0", "resnet18", 0), "s0 was complete")
    interrupt(proc)
    got = features_of(store)
    assert "s0" in got and sorted(got) != SLIDES, sorted(got)             # provably mid-run
    for s, x in got.items():
        assert np.array_equal(x, clean[1][s]), s
    assert not list((store / ".locks").glob("*.lock")), "claims of unfinished slides left behind"
    res = run(featstore_app, ["extract", cohort, "--store", store, *FAST])
    assert res.exit_code == 0, res.output
    assert f"already complete {len(got)}" in res.output, res.output
    assert_same(features_of(store), clean[1])


@pytest.fixture(scope="module")
def mil_cohort(tmp_path_factory):
    """A real store of 16 planted bags and its labels."""
    tmp = tmp_path_factory.mktemp("faults_mil")
    store, rows, _, _ = planted_cohort(tmp / "c.zarr", 16, dim=16, n_inst=(20, 40), k=3, seed=3)
    return store, write_labels(tmp / "labels.csv", rows)


def _train_args(mil_cohort, out):
    store, labels = mil_cohort
    return ["train", "--store", store, "--labels", labels, "--out", out, "--encoder", KEY.encoder, "--minus",
            KEY.minus, "--folds", "2", "--epochs", "40", "--patience", "0", "--hidden", "32", "--attn-dim", "8"]


@pytest.fixture(scope="module")
def clean_train(mil_cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean_train") / "run"
    res = run(mil_app, _train_args(mil_cohort, out))
    assert res.exit_code == 0, res.output
    return out


def _same_run(a: Path, b: Path) -> None:
    for name in ("metrics.json", "history.json"):
        assert json.loads((a / name).read_text()) == json.loads((b / name).read_text()), name
    assert (a / "predictions.csv").read_text() == (b / "predictions.csv").read_text()
    assert not (a / LOCK_NAME).exists() and not (b / LOCK_NAME).exists()


def _unfinished_run_is_not_mistaken(out: Path) -> None:
    """An interrupted run folder: no config.json, no claim left, and no reader takes it as a run."""
    assert out.is_dir() and not (out / "config.json").exists()
    assert not (out / LOCK_NAME).exists(), "the interrupted run kept its claim on --out"
    res = run(mil_app, ["predict", "--run", out, "--store", "nowhere.zarr"])
    one_error_line(res.output, str(out), "not a finished run")


def _interrupt_then_rerun(args, out) -> None:
    """Ctrl-C once the command has claimed *out*; the folder is not taken for a finished run, and
    the same command then runs to the end."""
    proc = spawn(MIL, args)
    wait_until(proc, lambda: (out / LOCK_NAME).is_file(), f"{args[0]} claimed --out")
    interrupt(proc)
    _unfinished_run_is_not_mistaken(out)
    res = run(mil_app, args)
    assert res.exit_code == 0, res.output


def test_ctrl_c_during_mil_train_then_the_same_command_reruns(mil_cohort, clean_train, tmp_path):
    """There is no per-fold resume in `mil train`: the strongest true behaviour is that the rerun is
    accepted (not "already holds a run"), replaces the partial folder and equals a clean run."""
    out = tmp_path / "run"
    _interrupt_then_rerun(_train_args(mil_cohort, out), out)
    load_run(out)
    _same_run(out, clean_train)


@pytest.fixture(scope="module")
def ft_parent(tmp_path_factory):
    """(slides, parent run) for `mil finetune`: 6 slides of 16 tiles, a split column, a trained run."""
    root = tmp_path_factory.mktemp("faults_ft")
    slides = root / "slides"
    slides.mkdir()
    rows = []
    for i in range(6):
        write_pyramid_tiff(slides / f"f{i}.tif", rectangles_slide((512, 512), [(0, 0, 512, 512)], seed=i), mpp=0.5)
        rows.append({"slide_id": f"f{i}", "label": ["normal", "tumor"][i % 2],
                     "split": ["train", "train", "val", "val", "test", "test"][i]})
    store = root / "c.zarr"
    res = run(featstore_app, ["extract", slides, "--store", store, *FAST[:-6], "--minus", "2", "--patch-size", "64",
                              "--mpp", "1.0"])
    assert res.exit_code == 0, res.output
    labels = write_labels(root / "labels.csv", rows)
    parent = root / "run"
    res = run(mil_app, ["train", "--store", store, "--labels", labels, "--out", parent, "--encoder", "resnet18",
                        "--minus", "2", "--epochs", "2", "--hidden", "16", "--attn-dim", "8"])
    assert res.exit_code == 0, res.output
    return slides, parent


def _ft_args(ft_parent, out):
    slides, parent = ft_parent
    return ["finetune", "--run", parent, "--out", out, "--slides", slides, "--k", "4", "--epochs", "6",
            "--micro-batch", "4", "--precision", "fp32", "--workers", "1", "--threads", "1", "--eval-batch", "16"]


def test_ctrl_c_during_mil_finetune_then_the_same_command_reruns(ft_parent, tmp_path):
    out = tmp_path / "ft"
    _interrupt_then_rerun(_ft_args(ft_parent, out), out)
    clean = tmp_path / "ft-clean"
    res = run(mil_app, _ft_args(ft_parent, clean))
    assert res.exit_code == 0, res.output
    _same_run(out, clean)
    a = torch.load(out / "encoder.pt", map_location="cpu", weights_only=True)["state_dict"]
    b = torch.load(clean / "encoder.pt", map_location="cpu", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


TINY_CLI = ("from tests.featstore.pretrain.conftest import register_tiny; register_tiny(); "
            "from featstore.cli import featstore_app; featstore_app()")


def _pretrain_args(store, out):
    return ["pretrain", "--store", store, "--out", out, "--encoder", "test_tiny_vit", "--epochs", "2",
            "--batch-size", "16", "--lr", "2e-3", "--decoder-dim", "32", "--decoder-depth", "1",
            "--decoder-heads", "2", "--holdout", "4", "--precision", "fp32", "--checkpoint-every", "4",
            "--device", "cpu"]


def test_ctrl_c_during_pretrain_resumes_from_its_checkpoint_to_the_same_weights(clean, tmp_path, monkeypatch):
    """`featstore pretrain` checkpoints every N steps: the rerun resumes there (not from step 0)
    and ends with exactly the weights of an uninterrupted run."""
    from featstore.checkpoint import read_encoder_checkpoint
    from featstore.encoders import registry
    from featstore.pretrain.run import STATE
    from tests.featstore.pretrain.conftest import TINY, tiny_vit_spec

    monkeypatch.setitem(registry._REGISTRY, TINY, tiny_vit_spec())
    store, out = clean[0], tmp_path / "pt"
    state = out / "f1" / STATE
    proc = spawn(TINY_CLI, _pretrain_args(store, out))
    wait_until(proc, lambda: len(torch.load(state, weights_only=True)["losses"]) >= 8, "two checkpoints")
    interrupt(proc)
    assert state.is_file() and not (out / "f1" / "provenance.json").exists()
    # the rerun and the clean run in child processes too (side by side, one thread each): same
    # threads as the interrupted one, so the float sums (and so the weights) can be compared exactly
    children = [spawn(TINY_CLI, _pretrain_args(store, dest)) for dest in (out, tmp_path / "pt-clean")]
    for child in children:
        o, e = child.communicate(timeout=240)
        assert child.returncode == 0, o + e[-3000:]
    prov = json.loads((out / "f1" / "provenance.json").read_text())
    assert prov["resumed_at_step"] >= 8 and not state.exists()
    ckpt = lambda d: read_encoder_checkpoint(next((d / "f1").glob("pretrain-*.pt")))["state_dict"]  # noqa: E731
    a, b = ckpt(out), ckpt(tmp_path / "pt-clean")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert prov["loss_per_step"] == json.loads((tmp_path / "pt-clean" / "f1" / "provenance.json").read_text())[
        "loss_per_step"]


# --------------------------------------------------------------- 4. two runs, one --out

def test_two_mil_trains_on_one_out_the_second_refuses(mil_cohort, clean_train, tmp_path):
    """Started together: one claims --out and finishes (its run equals a clean one), the other
    exits 1 with one line naming the directory, having written nothing."""
    out = tmp_path / "shared"
    procs = [spawn(MIL, _train_args(mil_cohort, out)) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    codes = sorted(p.returncode for p in procs)
    texts = [o + e for o, e in outs]
    assert codes == [0, 1], (codes, [t[-2000:] for t in texts])
    loser = texts[[p.returncode for p in procs].index(1)]
    one_error_line(loser, str(out), "in use by another run", "pid")
    load_run(out)
    _same_run(out, clean_train)


def test_a_stale_claim_is_replaced_and_a_live_one_refused(tmp_path):
    """The claim on --out: a lock of a dead process (same host) is taken over; one of a live
    process is refused by name; a finished or failed writer leaves no lock behind."""
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "since": "then"}))
    w = RunWriter(out)                                                      # stale: replaced
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
    w.finish({"kind": "train"})
    assert not (out / LOCK_NAME).exists()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (out / LOCK_NAME).write_text(json.dumps({"pid": live.pid, "host": socket.gethostname(), "since": "now"}))
        from mil.errors import MilError

        with pytest.raises(MilError, match=rf"--out {out} is in use by another run \(pid {live.pid}"):
            RunWriter(out, overwrite=True)
        assert (out / "config.json").exists()                               # the refusal touched nothing
    finally:
        live.kill()
        live.wait()
    with RunWriter(out, overwrite=True):                                    # its owner is gone now
        pass
    assert not (out / LOCK_NAME).exists() and not (out / "config.json").exists()
