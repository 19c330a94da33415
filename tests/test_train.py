"""Training loop, checkpoints, stage-2 learning, and the run folder end to end (tiny, CPU)."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pandas as pd
import pytest
import torch

from spinegrade.config import OptimConfig, load_config
from spinegrade.data.epoch import EpochDataset
from spinegrade.data.grader_dataset import GraderDataset, collate_levels
from spinegrade.data.studies import load_studies
from spinegrade.inference.fold_models import load_fold_models, predict_study
from spinegrade.localization.derived import derive_points, fit_offsets
from spinegrade.training.cv import cross_validate, merge_run
from spinegrade.training.engine import FitSpec, fit
from spinegrade.training.optim import lr_at, make_optimizer, parameter_groups, set_lr
from spinegrade.util.runtime import Runtime, setup_runtime
from stack_factory import write_world

TINY = [
    "crops.size=32", "crops.slices=3", "crops.spinal_mm=40", "crops.foraminal_mm=40",
    "crops.subarticular_mm=40", "model.backbone=test_efficientnet", "model.dim=32",
    "model.depth=1", "model.heads=2", "model.token_grid=1", "train.batch_size=10",
    "train.epochs=1", "localizer.image_size=32", "localizer.epochs=1",
    "localizer.decoder_channels=8", "localizer.batch_size=4", "data.n_folds=2",
]  # fmt: skip
CPU = Runtime(torch.device("cpu"))


def test_lr_schedule_warms_up_then_decays():
    cfg = OptimConfig(warmup_frac=0.1, scheduler="cosine")
    lrs = [lr_at(s, 100, 1.0, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:])) and lrs[-1] < 0.05


def _grader(cfg_overrides=()):
    from spinegrade.models.registry import build_grader

    return build_grader(load_config("quick", [*TINY, *cfg_overrides]))


def test_scale_one_keeps_the_decay_grouping_of_every_run_so_far():
    # Existing runs must train bit-identically: two groups, [ndim > 1, ndim <= 1], in
    # parameter order, with the plain learning rate.
    model = _grader()
    groups = parameter_groups(model, 0.01, 0.05)
    params = [p for p in model.parameters() if p.requires_grad]
    assert [g["params"] for g in groups] == [
        [p for p in params if p.ndim > 1],
        [p for p in params if p.ndim <= 1],
    ]
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(0.01, 0.05), (0.01, 0.0)]


@pytest.mark.parametrize("kind", ["grader", "localizer"])
def test_backbone_groups_cover_every_parameter_once_at_a_scaled_lr(kind):
    from spinegrade.models.registry import build_localizer

    cfg = load_config("quick", [*TINY, "optim.backbone_lr_scale=0.1"])
    model = _grader() if kind == "grader" else build_localizer(cfg)
    model.encoder.conv_stem.weight.requires_grad_(False)  # frozen: in no group
    opt = make_optimizer(model, 0.01, cfg.optim)
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(ids) == len(set(ids)) == len(trainable) and set(ids) == {id(p) for p in trainable}
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        if p.requires_grad:
            g = group_of[id(p)]
            assert g["lr"] == pytest.approx(0.001 if name.startswith("encoder.") else 0.01)
            assert g["weight_decay"] == (0.05 if p.ndim > 1 else 0.0)
    base = [g["lr"] for g in opt.param_groups]
    backbone = next(g for g in opt.param_groups if g["lr"] < 0.01)
    head = next(g for g in opt.param_groups if g["lr"] == 0.01)
    cfg.optim.warmup_frac = 0.1
    for step in (0, 5, 10, 50, 99):  # warm-up, peak, cosine, end: the ratio holds throughout
        set_lr(opt, base, step, 100, cfg.optim)
        assert head["lr"] == pytest.approx(lr_at(step, 100, 0.01, cfg.optim))
        assert backbone["lr"] == pytest.approx(0.1 * head["lr"])


def test_optimizer_and_runtime_errors_are_clear(monkeypatch):
    model = torch.nn.Linear(4, 2)
    with pytest.raises(ValueError, match=r"optim\.name"):
        make_optimizer(model, 0.1, OptimConfig(name="lamb"))
    with pytest.raises(ValueError, match="backbone_lr_scale"):
        make_optimizer(model, 0.1, OptimConfig(backbone_lr_scale=-1.0))
    assert isinstance(make_optimizer(model, 0.1, OptimConfig(name="sgd")), torch.optim.SGD)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ddp = load_config("quick", ["train.strategy=ddp"]).train
    with pytest.raises(RuntimeError, match=r"torchrun --nproc_per_node N -m spinegrade\.cli train"):
        setup_runtime(ddp)


class _Toy(EpochDataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(32, 4, generator=g)
        self.y = (self.x[:, 0] > 0).long()

    def __len__(self) -> int:
        return 32

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


def _toy_loss(model, batch):
    return {"loss": torch.nn.functional.cross_entropy(model(batch["x"]), batch["y"])}


def _collate(items):
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


class _Interrupt(Exception):
    pass


def _stop_after(epoch: int):
    def log(record: dict) -> None:
        if record["epoch"] == epoch:
            raise _Interrupt

    return log


@pytest.mark.parametrize("average", [0.0, 0.3])
def test_checkpoint_resume_continues_where_it_stopped(tmp_path, average):
    ckpt = tmp_path / "ckpt"
    spec = FitSpec("toy", 3, batch_size=8, lr=0.05, optim=OptimConfig(), seed=1, average=average)
    torch.manual_seed(0)
    with pytest.raises(_Interrupt):  # killed after epoch 2 (its checkpoint is on disk)
        fit(torch.nn.Linear(4, 2), _Toy(), _collate, _toy_loss, spec, CPU, ckpt, _stop_after(2))
    meta = json.loads((tmp_path / "ckpt.json").read_text())
    # The JSON (the commit point) names its epoch's tensors; older epochs' files are gone.
    assert meta["epoch"] == 2 and meta["tensors"] == "ckpt.e2.safetensors"
    assert [p.name for p in tmp_path.glob("ckpt*.safetensors")] == ["ckpt.e2.safetensors"]
    # A new process: fresh model, same checkpoint -> only the missing epoch runs.
    torch.manual_seed(123)
    resumed = torch.nn.Linear(4, 2)
    history = fit(resumed, _Toy(), _collate, _toy_loss, spec, CPU, ckpt_path=ckpt)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    # Same weights as an uninterrupted run: optimiser state, schedule and data order resumed.
    torch.manual_seed(0)
    straight = torch.nn.Linear(4, 2)
    fit(straight, _Toy(), _collate, _toy_loss, spec, CPU)
    assert torch.allclose(straight.weight, resumed.weight, atol=1e-6)


def test_validation_runs_every_nth_epoch_and_last_without_changing_the_weights():
    spec = FitSpec("toy", 5, batch_size=8, lr=0.05, optim=OptimConfig(), seed=1, eval_every=2)
    seen: list[int] = []

    def evaluate(model) -> dict[str, float]:
        seen.append(len(seen))
        return {"loss": 0.0}

    torch.manual_seed(0)
    sparse = torch.nn.Linear(4, 2)
    history = fit(sparse, _Toy(), _collate, _toy_loss, spec, CPU, evaluate=evaluate)
    assert [h["epoch"] for h in history if "val_loss" in h] == [2, 4, 5]
    torch.manual_seed(0)
    every = torch.nn.Linear(4, 2)
    fit(every, _Toy(), _collate, _toy_loss, FitSpec("toy", 5, 8, 0.05, OptimConfig(), seed=1), CPU)
    assert torch.allclose(sparse.weight, every.weight)  # validation is logging only


def test_step_lines_every_log_every_steps():
    records: list[dict] = []
    # 32 samples / batch 8 = 4 steps an epoch, 3 epochs = 12 steps: lines after steps 5 and 10.
    spec = FitSpec("toy", 3, 8, 0.05, OptimConfig(warmup_frac=0), seed=1, log_every=5)
    torch.manual_seed(0)
    fit(torch.nn.Linear(4, 2), _Toy(), _collate, _toy_loss, spec, CPU, log=records.append)
    steps = [r for r in records if "step" in r]
    assert [(r["epoch"], r["step"]) for r in steps] == [(2, 5), (3, 10)]
    assert set(steps[0]) == {"stage", "epoch", "step", "loss", "lr", "samples_per_s"}
    assert steps[0]["lr"] == pytest.approx(lr_at(4, 12, 0.05, spec.optim))
    assert all(r["loss"] > 0 and r["samples_per_s"] > 0 for r in steps)
    assert [r["epoch"] for r in records if "step" not in r] == [1, 2, 3]
    # 0 disables them; the epoch lines and the weights stay as they were.
    quiet: list[dict] = []
    spec.log_every = 0
    fit(torch.nn.Linear(4, 2), _Toy(), _collate, _toy_loss, spec, CPU, log=quiet.append)
    assert [r["epoch"] for r in quiet] == [1, 2, 3] and all("step" not in r for r in quiet)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_world(tmp_path_factory.mktemp("world"), n_studies=6)


def test_a_few_grader_steps_reduce_the_loss(world):
    from spinegrade.models.registry import build_grader
    from spinegrade.training.stages import _GraderLoss

    data, cache = world
    cfg = load_config("quick", [*TINY, "train.epochs=8", "train.lr=3e-3", "optim.warmup_frac=0"])
    labels = pd.read_csv(data / "train.csv")
    studies = load_studies(
        cache, labels["study_id"].tolist(), labels, _coords(data), progress=False
    )
    offsets = fit_offsets([s.points for s in studies.values()])
    points = {k: derive_points(s.points, offsets) for k, s in studies.items()}
    dataset = GraderDataset(list(studies.values()), points, "spinal", cfg.crops, augment=False)
    assert len(dataset) == 6
    batch = collate_levels([dataset[i] for i in range(len(dataset))])
    assert batch["x"].shape[1:] == (3, 32, 32) and batch["labels"].min() >= 0
    torch.manual_seed(0)
    model = build_grader(cfg)
    spec = FitSpec("g", cfg.train.epochs, 3, cfg.train.lr, cfg.optim, seed=0)
    history = fit(model, dataset, collate_levels, _GraderLoss(cfg, "spinal"), spec, CPU)
    losses = [h["train_loss"] for h in history]
    assert losses[-1] < losses[0]


def _coords(data):
    from spinegrade.rsna import load_coordinates, normalize_coordinates

    return normalize_coordinates(load_coordinates(data / "train_label_coordinates.csv"))


def test_run_folder_is_complete_reloadable_and_folds_are_disjoint(world, tmp_path, monkeypatch):
    monkeypatch.setenv("SPINEGRADE_PROGRESS", "0")
    data, cache = world
    run = tmp_path / "run"
    tiny = [*TINY, "data.n_folds=3"]
    # One fold alone (as on another machine), then the other two side by side in two
    # processes; the second call merges.
    one = load_config("quick", [*tiny, "train.fold_workers=1"])
    assert cross_validate(data, cache, run, one, folds_to_run=[2], progress=False) is None
    two = load_config("quick", [*tiny, "train.fold_workers=2"])
    cv = cross_validate(data, cache, run, two, progress=False)
    assert cv is not None
    assert set(cv["oof"]) == {"spinal", "foraminal", "subarticular", "any_severe_spinal", "score"}
    assert {"uniform", "prior", "best_constant"} <= set(cv["baselines"])
    assert "bayes_limit" not in cv and "true_probs" not in cv  # training never reads a truth
    assert set(cv["localizer"]) == {"spinal", "foraminal", "subarticular"}
    folds = pd.read_csv(run / "folds.csv")
    assert folds["study_id"].is_unique and sorted(folds["fold"].unique()) == [0, 1, 2]
    names = ("localizer_spinal", "localizer_foraminal", "grader_spinal", "grader_foraminal",
             "grader_subarticular")  # fmt: skip
    for k in (0, 1, 2):
        d = run / f"fold_{k}"
        for name in names:
            assert (d / f"{name}.safetensors").is_file() and (d / f"{name}.json").is_file()
        assert (d / "log.jsonl").read_text().count("\n") >= 5 and not (d / "checkpoints").exists()
        oof = pd.read_csv(d / "oof.csv")
        val = set(folds.loc[folds["fold"] == k, "study_id"])
        assert {int(r.split("_")[0]) for r in oof["row_id"]} == val and len(oof) == 25 * len(val)
    oof = pd.read_csv(run / "oof.csv")
    probs = oof[["normal_mild", "moderate", "severe"]]
    assert len(oof) == 25 * len(folds) and np.allclose(probs.sum(axis=1), 1)
    assert json.loads((run / "cv.json").read_text()) == json.loads(json.dumps(cv))
    # Reload a fold and predict a study exactly as the out-of-fold pass did.
    models = load_fold_models(run / "fold_0")
    sid = int(folds.loc[folds["fold"] == 0, "study_id"].iloc[0])
    study = load_studies(cache, [sid], progress=False)[sid]
    pred = predict_study(models, study.stacks)
    # After one epoch the localiser may miss the axial slab: those cells fall back to the prior.
    assert pred.probs.shape == (25, 3) and pred.graded[:15].all()
    rows = oof[oof["row_id"].str.startswith(f"{sid}_")].set_index("row_id")
    expected = rows.loc[f"{sid}_spinal_canal_stenosis_l3_l4", ["normal_mild", "moderate", "severe"]]
    assert np.allclose(pred.probs[2], expected.to_numpy(), atol=1e-5)
    # Re-running is a no-op that merges again; another config is refused.
    assert merge_run(run)["oof"] == cv["oof"]
    with pytest.raises(ValueError, match="another config"):
        cross_validate(data, cache, run, load_config("quick", [*tiny, "train.epochs=2"]))


def test_a_run_can_train_the_canal_localiser_alone(world, tmp_path, monkeypatch):
    monkeypatch.setenv("SPINEGRADE_PROGRESS", "0")
    data, cache = world
    run = tmp_path / "run"
    cfg = load_config(
        "quick", [*TINY, "data.n_folds=3", "localizer.tasks=[spinal]", "train.groups=[spinal]"]
    )
    assert cross_validate(data, cache, run, cfg, folds_to_run=[0], progress=False) is None
    fold = run / "fold_0"
    assert (fold / "localizer_spinal.safetensors").is_file()
    assert not (fold / "localizer_foraminal.safetensors").exists()
    assert json.loads((fold / "localizer_geometry.json").read_text())["tasks"] == ["spinal"]
    models = load_fold_models(fold)
    assert set(models.localizer.nets) == {"spinal"}
    sid = int(pd.read_csv(run / "folds.csv").query("fold == 0")["study_id"].iloc[0])
    pred = predict_study(models, load_studies(cache, [sid], progress=False)[sid].stacks)
    # The canal is located (and the recesses derived from it) and graded; no net finds the
    # foramina, and with no foraminal grader they get the prior.
    xyz = pred.points.xyz
    assert np.isfinite(xyz[[0, 3, 4]]).all() and np.isnan(xyz[[1, 2]]).all()
    assert pred.graded[:5].all() and not pred.graded[5:15].any()


def test_grader_members_train_from_their_own_seeds_and_predict_as_their_mean(
    world, tmp_path, monkeypatch
):
    """``train.members=2``: each group's second grader is trained from its own seed beside the
    first (which is what a one-member run trains), saved as ``grader_{group}.m1``, logged as its
    own stage, and a reloaded fold grades with the mean of both members' logits. A member the
    run trained and the fold lacks is an error naming it, never a silent smaller ensemble."""
    from spinegrade.inference.fold_models import grade_crops
    from spinegrade.localization.localize import localize_study
    from spinegrade.models.grader import GraderMembers
    from spinegrade.models.registry import load_model
    from spinegrade.models.weights import WeightsError

    monkeypatch.setenv("SPINEGRADE_PROGRESS", "0")
    data, cache = world
    tiny = [*TINY, "data.n_folds=3", "localizer.tasks=[spinal]", "train.groups=[spinal]"]
    one, two = tmp_path / "one", tmp_path / "two"
    for run, extra in ((one, []), (two, ["train.members=2"])):
        cfg = load_config("quick", [*tiny, *extra])
        assert cross_validate(data, cache, run, cfg, folds_to_run=[0], progress=False) is None
    fold = two / "fold_0"
    first, second = (
        load_model(fold / f)[0]
        for f in ("grader_spinal.safetensors", "grader_spinal.m1.safetensors")
    )
    alone = load_model(one / "fold_0" / "grader_spinal.safetensors")[0]

    def equal(a, b):
        pairs = zip(a.state_dict().values(), b.state_dict().values(), strict=True)
        return [torch.equal(x, y) for x, y in pairs]

    same, differ = equal(first, alone), equal(first, second)
    assert all(same) and not all(differ)  # member 0 = the one-member run; member 1 its own seed
    log_lines = (fold / "log.jsonl").read_text().splitlines()
    stages = {json.loads(line).get("stage") for line in log_lines}
    assert {"grader_spinal", "grader_spinal_m1"} <= stages
    models = load_fold_models(fold)
    assert isinstance(models.graders["spinal"], GraderMembers)
    sid = int(pd.read_csv(two / "folds.csv").query("fold == 0")["study_id"].iloc[0])
    study = load_studies(cache, [sid], progress=False)[sid]
    from spinegrade.data.crops import make_crops
    from spinegrade.localization.derived import derive_points as derive

    points = derive(localize_study(models.localizer, study.stacks), models.localizer.offsets)
    crops = make_crops(study.stacks, points, models.crops, columns=["spinal_canal_stenosis_l3_l4"])
    x = torch.from_numpy(crops["spinal_canal_stenosis_l3_l4"][None])
    with torch.no_grad():
        mean_logits = (first(x, torch.tensor([2])) + second(x, torch.tensor([2]))) / 2
    graded = grade_crops(models.graders, crops)["spinal_canal_stenosis_l3_l4"]
    np.testing.assert_allclose(graded, mean_logits[0, 0].softmax(-1).numpy(), atol=1e-5)
    # Exported, both members run in ONNX Runtime and grade alike.
    pytest.importorskip("onnxruntime")
    from spinegrade.inference.export import export_run

    assert {p.path.name for p in export_run(two, folds=[0])} >= {
        "grader_spinal.onnx", "grader_spinal.m1.onnx"}  # fmt: skip
    onnx = load_fold_models(fold, engine="onnx")
    assert isinstance(onnx.graders["spinal"], GraderMembers)
    np.testing.assert_allclose(
        grade_crops(onnx.graders, crops)["spinal_canal_stenosis_l3_l4"], graded, atol=1e-4
    )
    # The second member's sidecar gone (an interrupted copy): loading names the file.
    (fold / "grader_spinal.m1.json").unlink()
    with pytest.raises(WeightsError, match=r"grader_spinal\.m1"):
        load_fold_models(fold)
    with pytest.raises(ValueError, match=r"train\.members=0"):
        cross_validate(
            data, cache, tmp_path / "none", load_config("quick", [*tiny, "train.members=0"])
        )


def test_an_unknown_localiser_task_is_named_with_the_choices(tmp_path):
    from spinegrade.config import ConfigError
    from spinegrade.localization.tasks import configured_tasks

    with pytest.raises(ConfigError, match=r"localizer.tasks=.*'axial'.*\['foraminal', 'spinal'\]"):
        configured_tasks(load_config("quick", ["localizer.tasks=[spinal, axial]"]))
    with pytest.raises(ConfigError, match="one or more"):
        configured_tasks(load_config("quick", ["localizer.tasks=[]"]))
    # Training refuses it before reading any data.
    with pytest.raises(ConfigError, match=r"localizer\.tasks"):
        cross_validate(tmp_path / "no_data", tmp_path / "no_cache", tmp_path / "run",
                       load_config("quick", [*TINY, "localizer.tasks=[axial]"]))  # fmt: skip
    assert not (tmp_path / "run").exists()


def test_cli_splits_fold_numbers_from_overrides():
    from spinegrade.cli import _split_train_args

    assert _split_train_args(["0"], ["1", "train.epochs=2"]) == ([0, 1], ["train.epochs=2"], [])
    assert _split_train_args(["2,3"], None) == ([2, 3], [], [])
    assert _split_train_args(None, ["a.b=1"]) == (None, ["a.b=1"], [])
    with pytest.raises(ValueError, match="need --folds"):
        _split_train_args(None, ["3"])
    # Any other word is a data folder (train takes several, see test_sources.py).
    assert _split_train_args(None, ["epochs"]) == (None, [], ["epochs"])


def test_fold_workers_keep_every_core_busy(monkeypatch):
    from spinegrade.training.cv import _fold_workers

    monkeypatch.setattr("os.cpu_count", lambda: 2)
    cfg = load_config("quick")
    assert [_fold_workers(cfg, CPU, n) for n in (1, 2, 3, 4, 5)] == [1, 2, 3, 2, 3]
    assert _fold_workers(load_config("quick", ["train.fold_workers=1"]), CPU, 5) == 1
    gpu = Runtime(torch.device("cuda"))
    assert _fold_workers(cfg, gpu, 5) == 1  # one GPU trains one fold at a time
