"""featstore.core.config: the strict loader and the typer commands generated from one declaration."""

from __future__ import annotations

import re

from dataclasses import dataclass, fields

import pytest
import typer
from typer.testing import CliRunner

from featstore.core.config import Config, ConfigError, Options, coerce_fields, config_command, from_dict, help_of, option
from featstore.config import ExtractConfig
from featstore.tiling import TilingConfig, TilingError
from mil.config import FinetuneConfig, RunSpec, TrainConfig
from mil.errors import MilError


def _pair(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"--sizes {text!r}: give comma-separated integers") from None


@dataclass(frozen=True)
class Inner(Config):
    depth: int = option(2, "How deep.")


@dataclass(frozen=True)
class Toy(Config):
    name: str = option(help="A required name.")
    epochs: int = option(50, "Maximum epochs per fold.")
    rate: float = option(0.5, "A rate.")
    sizes: tuple[int, ...] = option((4, 2), "Sizes, comma-separated.", parse=_pair,
                                    show=lambda t: ",".join(map(str, t)))
    fold: str | None = option(None, "A fold.")
    tags: list[str] = option(default_factory=list, help="Tags (repeat).")
    fast: bool = option(False, "Go fast.")
    k: int = option(8, "Tiles.", flags=("--k", "-k"))
    hidden_knob: int = option(3, "Not on the command line.", cli=False)
    inner: Inner = option(default_factory=Inner, help="Nested.", cli=False)


def test_from_dict_builds_converts_and_nests():
    t = Toy.from_dict({"name": "a", "rate": 1, "sizes": [1, 2], "inner": {"depth": 5}, "fold": None})
    assert t == Toy(name="a", rate=1.0, sizes=(1, 2), inner=Inner(depth=5))
    assert isinstance(t.rate, float) and isinstance(t.sizes, tuple)
    assert Toy.from_dict({"name": "a", "rate": "1e-4"}).rate == 1e-4  # PyYAML reads 1e-4 as a string
    assert from_dict(Toy, {"name": "b", "inner": Inner(7)}).inner.depth == 7


def test_unknown_key_names_the_key_path_and_the_valid_keys():
    with pytest.raises(ConfigError) as ei:
        Toy.from_dict({"name": "a", "epoch": 3}, where="mil")
    msg = str(ei.value)
    assert "mil.epoch" in msg and "did you mean 'epochs'" in msg
    assert "valid: name, epochs, rate, sizes" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match=r"unknown keys \['mil.inner.dpth'\].*valid: depth"):
        Toy.from_dict({"name": "a", "inner": {"dpth": 1}}, where="mil")


@pytest.mark.parametrize("data, words", [
    ({"name": "a", "epochs": "ten"}, ["epochs", "'ten'", "int"]),
    ({"name": "a", "epochs": True}, ["epochs", "True", "int"]),
    ({"name": "a", "fast": "yes"}, ["fast", "'yes'", "bool"]),
    ({"name": 3}, ["name", "3", "str"]),
    ({"name": "a", "rate": "fast"}, ["rate", "'fast'", "float"]),
    ({"name": "a", "sizes": [1, "x"]}, ["sizes", "'x'", "list of int"]),
    ({"name": "a", "fold": 2}, ["fold", "2", "str or null"]),
    ({"name": "a", "inner": 3}, ["inner", "3", "mapping (Inner)"]),
    ({"name": "a", "inner": {"depth": 1.5}}, ["inner.depth", "1.5", "int"]),
])
def test_wrong_types_name_the_key_the_value_and_the_type(data, words):
    with pytest.raises(ConfigError) as ei:
        Toy.from_dict(data, where="x")
    assert all(w in str(ei.value) for w in words), str(ei.value)


def test_missing_keys_and_post_init_errors_carry_the_path():
    with pytest.raises(ConfigError, match=r"missing keys \['enc.name'\]"):
        Toy.from_dict({}, where="enc")
    with pytest.raises(ConfigError, match=r"^mil.optimizer 'sgd' must be one of adam, adamw$"):
        TrainConfig.from_dict({"optimizer": "sgd"}, where="mil")
    with pytest.raises(MilError, match="optimizer 'sgd'"):  # without a path: the config's own error
        TrainConfig.from_dict({"optimizer": "sgd"})


def test_a_package_config_raises_its_own_error_type():
    with pytest.raises(TilingError, match="patch_sise"):
        TilingConfig.from_dict({"patch_sise": 256})
    assert "config_error" not in {f.name for f in fields(TilingConfig)}


def test_coerce_fields_validates_a_subset_without_building():
    kw = coerce_fields(ExtractConfig, {"batch_size": 8, "precision": "fp32"}, where="extract",
                       exclude=("encoder", "levels", "weights", "tiling"))
    assert kw == {"batch_size": 8, "precision": "fp32"}
    with pytest.raises(ConfigError, match=r"unknown keys \['extract.weights'\]"):
        coerce_fields(ExtractConfig, {"weights": "imagenet"}, where="extract", exclude=("weights",))


def test_every_field_of_the_real_configs_declares_its_help():
    for cls in (TrainConfig, RunSpec, FinetuneConfig, ExtractConfig, TilingConfig):
        assert all(help_of(f) for f in fields(cls)), cls.__name__


def _app(received: dict) -> typer.Typer:
    app = typer.Typer(add_completion=False)

    @app.callback()
    def _main() -> None:
        pass

    tiling_options = Options(TilingConfig, exclude=("thumb_mpp",), overrides=True, note="or the store's")

    @config_command(cfg=Toy, tiling=tiling_options)
    def run(cfg: Toy, tiling: dict, verbose: bool = False) -> None:
        """Run the toy."""
        received.update(cfg=cfg, tiling=tiling, verbose=verbose)

    app.command("run")(run)
    return app


def _invoke(app, *args):
    return CliRunner().invoke(app, list(args), terminal_width=200, env={"COLUMNS": "200"})


def test_a_generated_command_lists_the_fields_with_help_and_defaults():
    res = _invoke(_app({}), "run", "--help")
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    for piece in ("Run the toy.", "--name", "A required name.", "[required]", "--epochs",
                  "Maximum epochs per fold. [default: 50]", "Sizes, comma-separated. [default: 4,2]",
                  "--fast --no-fast", "--k", "-k", "--verbose", "--patch-size",
                  "Patch side in pixels at --mpp (default 512, or the store's)."):
        assert piece in text, piece
    assert "--hidden-knob" not in text and "--inner" not in text and "--thumb-mpp" not in text


def test_values_reach_the_dataclass():
    got: dict = {}
    res = _invoke(_app(got), "run", "--name", "a", "--epochs", "7", "--sizes", "3,2,1", "--fold", "f1",
                  "--tags", "x", "--tags", "y", "--fast", "-k", "5", "--mpp", "1.0", "--verbose")
    assert res.exit_code == 0, res.output
    assert got["cfg"] == Toy(name="a", epochs=7, sizes=(3, 2, 1), fold="f1", tags=["x", "y"], fast=True, k=5)
    assert got["tiling"] == {"mpp": 1.0} and got["verbose"] is True
    res = _invoke(_app(got), "run", "--name", "b")
    assert res.exit_code == 0 and got["cfg"] == Toy(name="b") and got["tiling"] == {}


def test_a_parse_error_reaches_the_caller_and_clashing_names_are_refused():
    res = _invoke(_app({}), "run", "--name", "a", "--sizes", "3,x")
    assert isinstance(res.exception, ConfigError) and "--sizes '3,x'" in str(res.exception)
    with pytest.raises(TypeError, match=r"\['epochs'\]"):
        @config_command(cfg=Toy)
        def clash(cfg: Toy, epochs: int = 1) -> None:
            """Two --epochs."""


def test_mil_train_options_come_from_the_declarations():
    from featstore.cli import mil_app

    res = _invoke(mil_app, "train", "--help")
    text = " ".join(res.output.replace("│", " ").split())  # a long help wraps inside rich's box
    hidden = ("n_boot", "target")     # cli=False: set by code (target: per --targets column)
    for f in (*fields(RunSpec), *fields(TrainConfig)):
        flag = "--" + f.name.replace("_", "-")
        shown = re.search(re.escape(flag) + r"(?![\w-])", text) is not None   # --target is not --targets
        assert shown == (f.name not in hidden), flag
        if f.name not in hidden:
            assert " ".join(help_of(f).split()) in text, f.name
    assert "[default: 256,64]" in text and "[default: 0.0002]" in text
    res = _invoke(mil_app, "train", "--store", "s", "--encoder", "e", "--labels", "l", "--out", "o",
                  "--hidden", "25x")
    assert res.exit_code == 1 and "--hidden '25x': give comma-separated integers, e.g. 256,64" in res.output


# ------------------------------------------------------------------ declared choices and bounds
_LOADED: list[str] = []


def _modes() -> tuple[str, ...]:
    _LOADED.append("modes")          # a registry read only when a value is checked
    return ("fast", "exact")


@dataclass(frozen=True)
class Bounded(Config):
    reader: str = option("fast", "Reader.", choices=_modes)
    batch_size: int = option(8, "Batch.", ge=1)
    share: float = option(0.5, "A share.", gt=0, le=1)
    fractions: tuple[float, ...] = option((1.0,), "Shares.", gt=0, le=1, parse=lambda s: tuple(map(float, s.split(","))),
                                          show=lambda t: ",".join(map(str, t)))
    limit: int | None = option(None, "Optional.", ge=0)


@pytest.mark.parametrize("data, message", [
    ({"reader": "slow"}, "x.reader 'slow' must be one of fast, exact"),
    ({"batch_size": 0}, "x.batch_size 0 must be >= 1"),
    ({"share": 0}, "x.share 0 must be in (0, 1]"),
    ({"share": float("nan")}, "x.share nan must be in (0, 1]"),
    ({"fractions": [0.5, 1.5]}, "x.fractions 0.5,1.5 must be in (0, 1]"),
    ({"limit": -1}, "x.limit -1 must be >= 0"),
])
def test_a_yaml_value_outside_its_declaration_names_the_key_path(data, message):
    with pytest.raises(ConfigError) as ei:
        Bounded.from_dict(data, where="x")
    assert str(ei.value) == message


def test_direct_construction_names_the_flag_and_none_passes():
    with pytest.raises(ConfigError, match=r"^--batch-size 0 must be >= 1$"):
        Bounded(batch_size=0)
    assert Bounded(limit=None).limit is None and Bounded(reader="exact").reader == "exact"
    assert "modes" in _LOADED


def test_a_command_line_value_outside_its_declaration_names_the_flag():
    app = typer.Typer()

    @app.command()
    @config_command(cfg=Bounded)
    def run(cfg: Bounded) -> None:
        print(cfg.batch_size)

    for args, message in ((["--batch-size", "0"], "--batch-size 0 must be >= 1"),
                          (["--reader", "slow"], "--reader 'slow' must be one of fast, exact"),
                          (["--fractions", "0.5,2"], "--fractions 0.5,2 must be in (0, 1]")):
        res = CliRunner().invoke(app, args)
        assert isinstance(res.exception, ConfigError) and str(res.exception) == message, res.output
    assert CliRunner().invoke(app, ["--batch-size", "3"]).output.strip() == "3"


def test_package_configs_check_their_declarations_in_one_style():
    with pytest.raises(TilingError, match=r"^tiling.min_tissue 1.5 must be in \[0, 1\]$"):
        TilingConfig.from_dict({"min_tissue": 1.5}, where="tiling")
    with pytest.raises(MilError, match=r"^--eval-tiles 'some' must be one of all, topk$"):
        FinetuneConfig(eval_tiles="some")
    with pytest.raises(ConfigError, match=r"^extract.reader 'tiff' must be one of "):
        ExtractConfig.from_dict({"encoder": "resnet18", "reader": "tiff"}, where="extract")
