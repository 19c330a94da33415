"""Task definitions: RSNA 2024 as the built-in default, another task read from task.yaml, its
label tables, and the per-condition scores (quadratic-weighted kappa, ROC AUC, ...)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from spinegrade.evaluation import grades
from spinegrade.rsna.tables import label_matrix, load_train, matrix_to_wide
from spinegrade.task import (
    CONDITION_GROUP,
    CONDITIONS,
    LABEL_COLUMNS,
    MIRROR_CONDITION,
    RSNA_2024,
    SPIDER_DISCS,
    TASK_FILE,
    TaskError,
    dataset_task,
    load_task,
    save_task,
    task_from_dict,
)
from spinegrade.training.losses import grading_loss, select_heads


def test_rsna_is_the_default_and_agrees_with_the_package_vocabulary(tmp_path: Path) -> None:
    assert RSNA_2024.columns == LABEL_COLUMNS and RSNA_2024.is_rsna
    assert RSNA_2024.groups == ("spinal", "foraminal", "subarticular")
    for c in RSNA_2024.conditions:
        assert c.group == CONDITION_GROUP[c.name] and c.mirror == MIRROR_CONDITION[c.name]
    # Left and right share one output (mirrored crops): one head a group, three grades.
    assert [RSNA_2024.heads(g) for g in RSNA_2024.groups] == [(CONDITIONS[0],), (CONDITIONS[1],),
                                                             (CONDITIONS[3],)]  # fmt: skip
    assert RSNA_2024.head_of("right_subarticular_stenosis") == 0 and RSNA_2024.n_classes == 3
    assert dataset_task(tmp_path) is RSNA_2024  # a folder without task.yaml grades RSNA
    save_task(RSNA_2024, tmp_path / TASK_FILE)
    assert load_task(tmp_path / TASK_FILE) is RSNA_2024


def test_a_task_of_its_own_round_trips_and_shares_one_network_per_group(tmp_path: Path) -> None:
    path = tmp_path / TASK_FILE
    save_task(SPIDER_DISCS, path)
    assert load_task(path) == SPIDER_DISCS
    disc = SPIDER_DISCS
    assert disc.groups == ("disc",) and disc.n_classes == 5 and not disc.is_rsna
    assert disc.heads("disc") == disc.condition_names  # five findings, five outputs, one crop
    assert [disc.head_of(n) for n in disc.condition_names] == [0, 1, 2, 3, 4]
    assert disc.condition("pfirrmann").columns == ("grade_1", "grade_2", "grade_3", "grade_4",
                                                   "grade_5")  # fmt: skip
    # A hand-written task.yaml: grades, columns and weights may be left to their defaults.
    path.write_text(
        yaml.safe_dump(
            {
                "name": "modic",
                "conditions": [
                    {"name": "modic", "grades": ["0", "1", "2", "3"], "group": "endplate",
                     "series": "Sagittal T2/STIR", "view": "sagittal", "anchor": "disc_centre"}
                ],
            }
        )
    )  # fmt: skip
    task = dataset_task(tmp_path)
    assert task.columns[0] == "modic_l1_l2" and task.condition("modic").class_weights == (1.0,) * 4


@pytest.mark.parametrize(
    "change, message",
    [
        ({"metric": "rsna2024"}, "rsna2024 metric belongs to the built-in RSNA task"),
        ({"levels": ["t12_l1"]}, "levels must be"),
        ({"colour": "red"}, "unknown keys"),
        ({"conditions": [{"name": "x", "grades": ["a"]}]}, "lacks|two or more"),
    ],
)
def test_bad_task_files_name_the_file_and_the_problem(tmp_path: Path, change, message) -> None:
    data = {**SPIDER_DISCS.to_dict(), **change}
    path = tmp_path / TASK_FILE
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(TaskError, match=message) as err:
        load_task(path)
    assert str(path) in str(err.value)


def test_a_one_sided_mirror_is_refused() -> None:
    data = RSNA_2024.to_dict()
    data["name"] = "half"
    data["metric"] = "grades"
    data["conditions"] = data["conditions"][:2]  # left foramen without its right
    with pytest.raises(TaskError, match="mirrors 'right_neural_foraminal_narrowing'"):
        task_from_dict(data)


def _disc_labels(rng: np.random.Generator, n: int) -> np.ndarray:
    codes = np.stack(
        [rng.integers(0, len(SPIDER_DISCS.column_condition(c).grades), n)
         for c in SPIDER_DISCS.columns],
        axis=1,
    )  # fmt: skip
    codes[0, :3] = -1  # empty cells stay empty
    return codes


def test_labels_of_another_task_read_and_write_by_grade_name(tmp_path: Path) -> None:
    codes = _disc_labels(np.random.default_rng(0), 4)
    wide = matrix_to_wide([11, 12, 13, 14], codes, SPIDER_DISCS)
    assert wide.loc[1, "disc_bulging_l3_l4"] in ("absent", "present")
    assert wide.loc[1, "pfirrmann_l1_l2"] == str(codes[1, 0] + 1)
    wide.to_csv(tmp_path / "train.csv", index=False)
    back = load_train(tmp_path / "train.csv", SPIDER_DISCS)
    assert np.array_equal(label_matrix(back, SPIDER_DISCS), codes)
    wide.loc[2, "pfirrmann_l4_l5"] = "Severe"  # an RSNA grade in a Pfirrmann column
    with pytest.raises(ValueError, match=r"pfirrmann_l4_l5: unknown grade 'Severe'.*'1', '2'"):
        label_matrix(wide, SPIDER_DISCS)


def test_kappa_auc_and_accuracy_match_hand_computed_values() -> None:
    y = np.array([0, 1, 2, 2])
    # Predicted grades 0, 2, 2, 1: observed/expected disagreement by squared distance.
    probs = np.eye(3)[[0, 2, 2, 1]] * 0.9 + 0.1 / 3
    s = grades.condition_scores(y, probs, ordinal=True)
    # Observed: (1,2) and (2,1) cost (1/2)^2 each -> 0.5. Expected from the margins r = c =
    # (1, 1, 2): sum_ij r_i c_j (i - j)^2 = 9 + 3 + 10 = 22, x 1/4 (weights) / 4 (n) = 1.375.
    assert s["qwk"] == pytest.approx(1 - 0.5 / 1.375)
    assert s["within_one"] == 1.0 and s["exact"] == 0.5
    assert s["balanced_accuracy"] == pytest.approx((1 + 0 + 0.5) / 3)
    p_true = probs[np.arange(4), y]
    assert s["log_loss"] == pytest.approx(-np.log(p_true).mean())
    scores = np.array([[0.9, 0.1], [0.4, 0.6], [0.6, 0.4], [0.2, 0.8]])
    b = grades.condition_scores(np.array([0, 0, 1, 1]), scores, ordinal=False)
    assert b["roc_auc"] == pytest.approx(3 / 4) and "qwk" not in b
    const = grades.condition_scores(y, np.tile([0.2, 0.5, 0.3], (4, 1)), ordinal=True)
    assert const["qwk"] == 0.0  # one predicted grade agrees no better than chance


def test_scores_of_a_task_beside_its_constants() -> None:
    task = SPIDER_DISCS
    codes = _disc_labels(np.random.default_rng(1), 30)
    ids = list(range(100, 130))
    wide = matrix_to_wide(ids, codes, task)
    perfect = np.zeros((len(task.columns), task.n_classes))
    frames = {}
    for r, sid in enumerate(ids):
        p = perfect.copy()
        for j, k in enumerate(codes[r]):
            p[j, max(k, 0)] = 1.0
        frames[sid] = p
    table = grades.predictions_frame(frames, task)
    assert table.columns.tolist() == ["row_id", "grade_1", "grade_2", "grade_3", "grade_4",
                                      "grade_5", "absent", "present"]  # fmt: skip
    assert len(table) == 30 * 25 and table["row_id"].is_monotonic_increasing
    binary_rows = table[table["row_id"].str.contains("bulging")]
    assert binary_rows["grade_1"].isna().all() and binary_rows["absent"].notna().all()
    best = grades.score_grades(wide, table, task)
    assert best["conditions"]["pfirrmann"]["qwk"] == pytest.approx(1.0)
    assert best["conditions"]["disc_bulging"]["roc_auc"] == pytest.approx(1.0)
    prior = grades.prior_probs(wide, task)
    assert np.allclose(prior.sum(axis=1), 1) and (prior[5:, 2:] == 0).all()  # binary: 2 grades
    constant = grades.score_grades(wide, grades.constant_frame(ids, prior, task), task)
    assert constant["score"] > best["score"]
    with pytest.raises(ValueError, match="no prediction for 101_"):
        grades.score_grades(wide, table[~table["row_id"].str.startswith("101_")], task)


def test_a_row_is_scored_on_its_own_output_and_grades() -> None:
    logits = torch.randn(3, 5, 5, requires_grad=True)
    head, n_grades = torch.tensor([0, 2, 4]), torch.tensor([5, 2, 2])
    chosen = select_heads(logits, head, n_grades)
    assert chosen.shape == (3, 1, 5)
    probs = chosen.softmax(-1)[:, 0]
    assert (
        float(probs[1:, 2:].detach().sum()) < 1e-6
    )  # a binary finding never spends mass on grade 3
    assert torch.equal(chosen[1, 0, :2], logits[1, 2, :2])
    loss = grading_loss(chosen, torch.tensor([[4], [1], [0]]), class_weights=[1.0] * 5)["loss"]
    loss.backward()
    assert torch.isfinite(loss) and float(logits.grad[1, 2, :2].abs().sum()) > 0
    assert float(logits.grad[1, 0].abs().sum()) == 0  # other outputs untouched by this row


def test_conditions_read_on_one_crop_are_taught_by_one_item() -> None:
    from spinegrade.config import load_config
    from spinegrade.data.grader_dataset import GraderDataset, collate_levels, crop_bundles
    from spinegrade.data.studies import StudyData
    from spinegrade.localization.points import StudyPoints
    from spinegrade.models.registry import build_grader
    from spinegrade.task import LEVELS
    from spinegrade.training.stages import _GraderLoss
    from stack_factory import make_stack

    # RSNA: every condition has a crop of its own (a side or an anchor apart).
    for group in RSNA_2024.groups:
        assert all(len(b) == 1 for b in crop_bundles(RSNA_2024.group_conditions(group), RSNA_2024))
    # SPIDER: the five disc findings are read on one sagittal crop per disc.
    disc = SPIDER_DISCS.group_conditions("disc")
    assert crop_bundles(disc, SPIDER_DISCS) == [tuple(disc)]
    stack = make_stack([0, 1, 0], [0, 0, -1], [0.0, 0.0, 0.0], shape=(9, 96, 96))
    stack.volume[:] = np.random.default_rng(0).integers(0, 255, stack.volume.shape)
    points = StudyPoints()
    for j, _level in enumerate(LEVELS):
        points.disc[j] = [0.0, 0.0, 30.0 - 15.0 * j]
    labels = np.full(len(SPIDER_DISCS.columns), -1, np.int64)
    for c in SPIDER_DISCS.columns[:15]:  # three of the five findings graded, two left empty
        labels[SPIDER_DISCS.column_index(c)] = 1
    study = StudyData(7, {"Sagittal T2/STIR": [stack]}, points, labels)
    cfg = load_config("quick", ["crops.size=32", "crops.slices=3"])
    ds = GraderDataset([study], {7: points}, "disc", cfg.crops, augment=True, task=SPIDER_DISCS)
    assert len(ds) == 1  # was one item per finding: the same crop cut five times an epoch
    item = ds[0]
    assert item["labels"].shape == (len(LEVELS), len(disc))
    assert (item["labels"][:, :3] == 1).all() and (item["labels"][:, 3:] == -1).all()
    batch = collate_levels([item])
    assert batch["labels"].shape == (5, 5) and batch["head"][0].tolist() == [0, 1, 2, 3, 4]
    model = build_grader(cfg, n_targets=len(disc), n_classes=5, pretrained=False)
    _GraderLoss(cfg, "disc", SPIDER_DISCS)(model, batch)["loss"].backward()
    grad = model.head[-1].weight.grad.reshape(len(disc), 5, -1).abs().sum(dim=(1, 2))
    assert (grad[:3] > 0).all() and (grad[3:] == 0).all()  # one crop, three graded outputs


def test_soft_ordinal_targets_spread_to_neighbouring_grades_only_where_ordinal() -> None:
    from spinegrade.training.losses import ordinal_targets, soft_weighted_ce, weighted_ce

    labels = torch.tensor([2, 0, 1, -1])  # Pfirrmann 3, a binary "absent", "present", unlabelled
    grades = torch.tensor([5, 2, 2, 5])
    ordinal = torch.tensor([True, False, False, True])
    q = ordinal_targets(labels, grades, ordinal, 5, sigma=0.7)
    assert torch.allclose(q[:3].sum(-1), torch.ones(3)) and float(q[3].sum()) == 0
    # Symmetric about the true grade, falling with the distance, nothing on grades beyond 5.
    assert q[0, 1] == pytest.approx(float(q[0, 3])) and q[0, 2] > q[0, 1] > q[0, 0] > 0
    assert torch.equal(q[1], torch.tensor([1.0, 0, 0, 0, 0]))  # binary: one-hot
    assert torch.equal(q[2], torch.tensor([0, 1.0, 0, 0, 0]))
    # sigma 0 is the one-hot cross-entropy, weighted by the true class as weighted_ce.
    logits = torch.randn(4, 5)
    w = [1.0, 2.0, 1.0, 3.0, 1.0]
    hard = ordinal_targets(labels, grades, ordinal, 5, sigma=0.0)
    assert soft_weighted_ce(logits, labels, hard, w).item() == pytest.approx(
        weighted_ce(logits, labels, w).item(), rel=1e-5
    )
    # A near miss (grade 4 for a 3) costs less than a far one (grade 1) with soft targets; the
    # one-hot loss cannot tell them apart.
    near, far = torch.full((1, 5), -4.0), torch.full((1, 5), -4.0)
    near[0, 3], far[0, 0] = 4.0, 4.0
    y, g, o = torch.tensor([2]), torch.tensor([5]), torch.tensor([True])
    soft = ordinal_targets(y, g, o, 5, 0.7)
    assert soft_weighted_ce(near, y, soft, w) < soft_weighted_ce(far, y, soft, w)
    assert weighted_ce(near, y, w).item() == pytest.approx(weighted_ce(far, y, w).item())


def test_ordinal_sigma_is_refused_for_rsna_and_trains_the_disc_network() -> None:
    from spinegrade.config import load_config
    from spinegrade.models.registry import build_grader
    from spinegrade.training.stages import _GraderLoss

    cfg = load_config("quick", ["loss.ordinal_sigma=0.7", "crops.size=32", "crops.slices=3"])
    with pytest.raises(ValueError, match=r"loss\.ordinal_sigma"):
        _GraderLoss(cfg, "spinal", RSNA_2024)
    loss = _GraderLoss(cfg, "disc", SPIDER_DISCS)
    model = build_grader(cfg, n_targets=5, n_classes=5, pretrained=False)
    batch = {
        "x": torch.randn(2, 3, 32, 32), "level": torch.tensor([0, 4]),
        "labels": torch.tensor([[2, 1, -1, -1, -1], [4, 0, -1, -1, -1]]),
        "head": torch.tensor([[0, 1, 2, 3, 4]] * 2), "grades": torch.tensor([[5, 2, 2, 2, 2]] * 2),
        "study": torch.tensor([0, 0]),
    }  # fmt: skip
    out = loss(model, batch)
    out["loss"].backward()
    grad = model.head[-1].weight.grad.reshape(5, 5, -1).abs().sum(dim=(1, 2))
    assert torch.isfinite(out["loss"]) and (grad[:2] > 0).all() and (grad[2:] == 0).all()


def test_a_task_anchored_on_the_disc_needs_labelled_disc_centres(tiny_trained, tmp_path) -> None:
    """Without any labelled disc centre the localiser cannot learn where a disc lies from its
    canal point, so every disc crop would be unplaceable at prediction: stop before training."""
    import shutil

    from spinegrade.config import load_config
    from spinegrade.rsna.tables import matrix_to_wide
    from spinegrade.task import TASK_FILE, save_task
    from spinegrade.training.cv import cross_validate
    from tiny_config import TINY_RUN

    data, tiny = tiny_trained
    disc = tmp_path / "data"
    shutil.copytree(data, disc, ignore=shutil.ignore_patterns("test_images"))
    ids = load_train(disc / "train.csv")["study_id"].tolist()
    codes = np.zeros((len(ids), len(SPIDER_DISCS.columns)), dtype=np.int64)
    matrix_to_wide(ids, codes, SPIDER_DISCS).to_csv(disc / "train.csv", index=False)
    save_task(SPIDER_DISCS, disc / TASK_FILE)
    cfg = load_config("quick", TINY_RUN)
    with pytest.raises(ValueError, match=r"pfirrmann, .* on the disc centre.*train_disc_coord"):
        cross_validate(disc, tiny.parent / "cache", tmp_path / "run", cfg, progress=False)
    assert not list((tmp_path / "run").glob("fold_*"))  # nothing trained


def _coded_spider():
    """SPIDER's disc task with a hospital's own codes for Pfirrmann (finding and grades) and for
    narrowing's finding only (its grades keep the private ones)."""
    import dataclasses

    from spinegrade.task import SPIDER_DISCS

    pf, narrowing, *rest = SPIDER_DISCS.conditions
    pf = dataclasses.replace(
        pf, code=("PFIRR", "99HOSP", "Pfirrmann grade of disc"),
        grade_codes=tuple((f"PF{g}", "99HOSP", f"Pfirrmann {g}") for g in pf.grades),
    )  # fmt: skip
    narrowing = dataclasses.replace(narrowing, code=("N1", "99HOSP", "Disc space narrowing"))
    return dataclasses.replace(SPIDER_DISCS, conditions=(pf, narrowing, *rest))


def test_a_task_carries_its_own_sr_codes_through_task_yaml(tmp_path: Path) -> None:
    """``code`` / ``grade_codes`` of a condition in task.yaml (value, scheme, meaning) are what
    its SR names it by; a condition without them keeps the private codes, and a task.yaml
    without any reads and writes as before."""
    from spinegrade.reporting.codes import PRIVATE_SCHEME, codes_for
    from spinegrade.task import SPIDER_DISCS, load_task, save_task

    coded = _coded_spider()
    save_task(coded, tmp_path / "task.yaml")
    assert load_task(tmp_path / "task.yaml") == coded
    written = yaml.safe_load((tmp_path / "task.yaml").read_text())["conditions"]
    assert written[0]["code"] == {"value": "PFIRR", "scheme": "99HOSP",
                                  "meaning": "Pfirrmann grade of disc"}  # fmt: skip
    assert "grade_codes" not in written[1] and "code" not in written[2]
    plain = SPIDER_DISCS.to_dict()["conditions"]
    assert all("code" not in c and "grade_codes" not in c for c in plain)
    tc = codes_for(coded)
    assert (tc.findings["pfirrmann"].value, tc.findings["pfirrmann"].scheme_designator) == (
        "PFIRR", "99HOSP")  # fmt: skip
    assert [g.value for g in tc.grades["pfirrmann"]] == ["PF1", "PF2", "PF3", "PF4", "PF5"]
    assert tc.findings["disc_narrowing"].value == "N1"
    assert {g.scheme_designator for g in tc.grades["disc_narrowing"]} == {PRIVATE_SCHEME}
    # Only spinegrade's own codes are listed as private (the SR declares that scheme alone).
    assert all(c.scheme_designator == PRIVATE_SCHEME for c in tc.private)
    assert "PFIRR" not in {c.value for c in tc.private}
    assert tc.grade_of("pfirrmann", tc.grades["pfirrmann"][3]) == 3


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"code": ["PFIRR", "99HOSP", "x"]}, "a code is {value: ..., scheme: ..., meaning: ...}"),
        ({"code": {"value": "P" * 17, "scheme": "99HOSP", "meaning": "x"}}, "16 characters"),
        ({"code": {"value": "P", "scheme": "99SPINEGRADE", "meaning": "x"}}, "own scheme"),
        ({"code": {"value": "P", "scheme": "99HOSP", "meaning": " "}}, "give value, scheme"),
        ({"grade_codes": [{"value": "P1", "scheme": "99HOSP", "meaning": "x"}]},
         "one code per grade"),
    ],
)  # fmt: skip
def test_bad_task_codes_are_refused_naming_the_condition(tmp_path: Path, change, message) -> None:
    from spinegrade.task import SPIDER_DISCS, TaskError, load_task

    data = SPIDER_DISCS.to_dict()
    data["conditions"][0].update(change)
    (tmp_path / "task.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(TaskError, match=r"pfirrmann|conditions\[0\]") as err:
        load_task(tmp_path / "task.yaml")
    assert message in str(err.value) and "task.yaml" in str(err.value)
