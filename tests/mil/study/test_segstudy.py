"""The ``task: segmentation`` study: YAML validation in one line, a sweep init x arch x fraction x
seed trained once, a report whose Welch p equals scipy's on the runs' Dice, and reruns reusing
every finished run."""

from __future__ import annotations

import csv
import json

import pytest
import yaml
from scipy import stats

from featstore import create_encoder
from featstore.checkpoint import save_encoder
from featstore.synth import write_gland_dataset
from mil.study.errors import StudyError
from mil.study.forms import load_study
from mil.study.segstudy import SegStudy, SegStudyConfig


def _yaml(tmp_path, **over) -> object:
    doc = {"tasks": "segmentation", "images": "he/images", "test_images": "dark/images",
           "encoders": [{"name": "resnet18", "weights": ["random", "other/encoder.pt"]}],
           "archs": ["unet"], "seeds": [0, 1, 2], "train_fractions": [0.5, 1.0],
           "seg": {"epochs": 1, "crop": 64, "batch_size": 4, "n_boot": 0, "test": 0.25}, "out": "out", **over}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture()
def cohort(tmp_path):
    write_gland_dataset(tmp_path / "he", 12, seed=0, size=(64, 64))
    write_gland_dataset(tmp_path / "dark", 4, seed=1, size=(64, 64), style="he-dark")
    save_encoder(create_encoder("resnet18", "random", levels=(0,), seed=99), tmp_path / "other" / "encoder.pt", level=0)
    return tmp_path


@pytest.mark.parametrize("over, needle", [
    ({"archs": ["unet", "segformer"]}, "archs: 'segformer' is not one of"),
    ({"seg": {"epochs": "many"}}, "seg.epochs"),
    ({"seg": {"seed": 3}}, "seed"),                            # set by the study, from seeds
    ({"seg": {"colour": True}}, "colour"),
    ({"train_fractions": [0.0]}, "train_fractions"),
    ({"encoders": [{"name": "resnet18", "weights": ["nothere/enc.pt"]}]}, "nothere/enc.pt does not exist"),
    ({"encoders": [{"name": "resnet999"}]}, "encoders[0].name"),
    ({"tasks": "segmentaton"}, "choose patch or segmentation"),
])
def test_bad_yaml_is_one_line_naming_the_key(cohort, over, needle):
    with pytest.raises(StudyError) as e:
        load_study(_yaml(cohort, **over))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_sweep_report_and_rerun(cohort):
    cfg = load_study(_yaml(cohort))
    assert isinstance(cfg, SegStudyConfig) and cfg.encoders[0].weights[1] == str(cohort / "other" / "encoder.pt")
    res = SegStudy(cfg).run()
    assert res.failures == [] and res.new_work == {"seg_runs": 12, "reused_runs": 0}
    runs = sorted(p.name for p in (cohort / "out" / "seg" / "runs").iterdir())
    assert len(runs) == 12 and "resnet18-encoder-unet-f0.5-s2" in runs
    # the fractions of one seed are nested: the f0.5 training images are a prefix of f1's
    split = lambda f: json.loads((cohort / "out" / "seg" / "runs" / f"resnet18-random-unet-f{f}-s1" /  # noqa: E731
                                  "config.json").read_text())["split"]
    assert split(1)["test"] == split(0.5)["test"]
    assert split(1)["train"][:len(split(0.5)["train"])] == split(0.5)["train"]
    rows = list(csv.DictReader(open(cohort / "out" / "report" / "table.csv")))
    assert len(rows) == 2 * 2 * 2     # inits x evaluation sets x fractions
    metrics = {}
    for run in (cohort / "out" / "seg" / "runs").iterdir():
        metrics[run.name] = json.loads((run / "metrics.json").read_text())
    for s in ("test", "ood:dark"):
        alt = [metrics[f"resnet18-encoder-unet-f1-s{k}"][s]["dice"] for k in range(3)]
        base = [metrics[f"resnet18-random-unet-f1-s{k}"][s]["dice"] for k in range(3)]
        row = next(r for r in rows if r["method"] == f"unet {s}" and r["weights"] != "random" and float(r["fraction"]) == 1)
        assert row["baseline"] == "random"
        want = stats.ttest_ind(alt, base, equal_var=False).pvalue
        assert float(row["dice_p_welch"]) == pytest.approx(want, rel=1e-6)
    report = res.report.read_text()
    assert "ood:dark" in report and "Welch p against random" in report and "dice_vs_fraction.png" in report
    page = res.report.with_name("report.html").read_text()
    assert "<table>" in page and "ood:dark" in page and 'src="dice_vs_fraction.png"' in page
    again = SegStudy(load_study(_yaml(cohort))).run()
    assert again.new_work == {"seg_runs": 0, "reused_runs": 12}
    changed = SegStudy(load_study(_yaml(cohort, seeds=[0], train_fractions=[1.0],
                                        seg={"epochs": 2, "crop": 64, "batch_size": 4, "n_boot": 0,
                                             "test": 0.25}))).run()
    assert changed.new_work == {"seg_runs": 2, "reused_runs": 0}   # another epochs value is another run


def test_slides_as_the_training_set_and_a_bad_key_in_their_mapping(tmp_path):
    from featstore.synth import write_gland_slides

    slides, labels = write_gland_slides(tmp_path / "site-a", 3, seed=0)
    src = {"slides": "site-a/slides", "annotations": "site-a/labels", "mpp": 1.0, "patch": 96}
    doc = {"task": "segmentation", "images": src, "encoders": ["resnet18"], "out": "out",
           "seg": {"epochs": 1, "crop": 96, "mask_kind": "multiclass", "classes": 3, "n_boot": 0, "test": 0.34,
                   "val": 0.0}}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({**doc, "images": {**src, "zoom": 2}}))
    with pytest.raises(StudyError, match=r"images.*zoom"):
        load_study(path)
    path.write_text(yaml.safe_dump(doc))
    res = SegStudy(load_study(path)).run()
    assert res.failures == [] and res.new_work["seg_runs"] == 1
    cfg = json.loads((tmp_path / "out" / "seg" / "runs" / "resnet18-random-unet-f1-s0" / "config.json").read_text())
    assert cfg["images"] == str(slides) and cfg["class_ids"] == {"1": 1, "2": 2}
    # patches are split by slide: the test slide's 4 patches, none of them trained on
    test, train = cfg["split"]["test"], cfg["split"]["train"]     # 3 slides x 4 patches, in slide order
    assert len(test) == 4 and len({i // 4 for i in test}) == 1 and not {i // 4 for i in test} & {i // 4 for i in train}
