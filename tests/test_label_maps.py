"""Label maps of real spines (disc, vertebra, canal on every slice) as a second teacher of the
localiser: read onto the cache's grid, carried through every look and augmentation with the
image, scored by their own loss, and trained by a head that prediction never needs (tiny, CPU)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from spinegrade.config import load_config
from spinegrade.data.label_maps import UNKNOWN, stack_labels
from spinegrade.data.localizer_dataset import LocalizerDataset, collate_stacks
from spinegrade.localization.frames import canonical_labels, sagittal_frame
from spinegrade.localization.points import true_points
from spinegrade.localization.samples import LocalizerSample, localizer_sample
from spinegrade.localization.tasks import LOCALIZER_TASKS
from spinegrade.models.registry import build_from_spec, build_localizer
from spinegrade.preprocessing.build import preprocess_dataset
from spinegrade.preprocessing.cache import load_study_stacks, read_index
from spinegrade.rsna import load_dataset, normalize_coordinates
from spinegrade.rsna.label_maps import LABEL_MAPS_FILE, LabelMapError, has_label_maps
from spinegrade.rsna.spider import ID_BASE, import_spider
from spinegrade.task import LABEL_CLASSES
from spinegrade.training.losses import segmentation_loss
from spinegrade.training.stages import _LocalizerLoss
from test_spider_import import (
    COL_DIR,
    PATIENTS,
    ROW_DIR,
    SHAPE,
    SPACING,
    slice_origin,
    write_spider,
)
from test_train import CPU, TINY


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> tuple[Path, Path]:
    """The SPIDER look-alike imported and cached on its own grid (40 x 32, no resize)."""
    root = tmp_path_factory.mktemp("maps")
    out, cache = root / "out", root / "cache"
    import_spider(write_spider(root / "spider"), out, progress=False)
    preprocess_dataset(out, cache, size=64, progress=False)
    return out, cache


def _stacks(out: Path, cache: Path, patient: int):
    return load_study_stacks(cache, ID_BASE + patient, index=read_index(cache))


@pytest.mark.parametrize("size", [64, 13])  # the source grid, and 13 x 10 cached pixels
def test_label_maps_follow_their_slices_onto_the_cached_grid(imported, tmp_path, size) -> None:
    """Each cached pixel takes the class of the source pixel its centre lies in, found here
    through the patient geometry (the DICOM positions), not through the cache's pixel scale."""
    from PIL import Image

    out, cache = imported
    if size != 64:
        cache = tmp_path / "cache"
        preprocess_dataset(out, cache, size=size, progress=False)
    assert has_label_maps(out)
    for patient in PATIENTS:
        (stack,) = _stacks(out, cache, patient)
        labels = stack_labels(out, stack)
        assert labels.shape == stack.volume.shape and labels.dtype == np.uint8
        assert labels.shape[1:] == ((40, 32) if size == 64 else (13, 10))
        folder = out / "train_label_maps" / str(stack.study_id) / str(stack.series_id)
        # The reader orders slices along the normal, against InstanceNumber: each cached slice
        # must carry its own instance's map.
        assert list(stack.instance_numbers) != sorted(stack.instance_numbers)
        gy, gx = np.indices(labels.shape[1:])
        for i, number in enumerate(stack.instance_numbers):
            png = np.array(Image.open(folder / f"{number}.png"))
            mm = stack.voxel_to_patient(np.full(gy.shape, i), gy, gx) - slice_origin(number - 1)
            col = np.floor(mm @ ROW_DIR / SPACING + 0.5).astype(int)
            row = np.floor(mm @ COL_DIR / SPACING + 0.5).astype(int)
            want = png[row.clip(0, SHAPE[0] - 1), col.clip(0, SHAPE[1] - 1)]
            assert (labels[i] == want).mean() > (0.999 if size == 64 else 0.95)
            if size == 64:
                assert np.array_equal(labels[i], png)


def test_a_slice_without_a_map_is_unknown_and_a_folder_without_maps_has_none(
    imported, tmp_path
) -> None:
    out, cache = imported
    (stack,) = _stacks(out, cache, PATIENTS[0])
    folder = out / "train_label_maps" / str(stack.study_id) / str(stack.series_id)
    moved = tmp_path / "2.png"
    (folder / "2.png").rename(moved)
    try:
        labels = stack_labels(out, stack)
        gone = int(np.flatnonzero(stack.instance_numbers == 2)[0])
        assert (labels[gone] == UNKNOWN).all()
        assert (labels[np.arange(len(labels)) != gone] < len(LABEL_CLASSES)).all()
    finally:
        moved.rename(folder / "2.png")
    assert not has_label_maps(tmp_path)


def test_maps_of_other_classes_are_refused_by_name(imported, tmp_path) -> None:
    out, _ = imported
    data = tmp_path / "data"
    (data / "train_label_maps").mkdir(parents=True)
    with pytest.raises(LabelMapError, match=LABEL_MAPS_FILE):
        has_label_maps(data)  # maps without their classes named
    meta = {"classes": {"0": "background", "1": "vertebra", "2": "disc", "3": "spinal canal"}}
    (data / LABEL_MAPS_FILE).write_text(json.dumps(meta))
    with pytest.raises(LabelMapError, match="renumber the maps"):
        has_label_maps(data)
    (data / LABEL_MAPS_FILE).write_text((out / LABEL_MAPS_FILE).read_text())
    assert has_label_maps(data)


def test_the_network_sees_each_pixels_class_through_any_look(imported) -> None:
    """canonical_labels against the frame's own mapping (a flipped frame, whole and zoomed)."""
    out, cache = imported
    (stack,) = _stacks(out, cache, PATIENTS[1])
    labels = stack_labels(out, stack)
    frame = sagittal_frame(stack, 48, 24)
    assert frame.transpose or frame.flip_x or frame.flip_y or frame.flip_z
    h, w = frame.inplane_hw()
    rng = np.random.default_rng(0)
    for look in (frame, frame.zoomed(h * 0.15, w * 0.9, 0.5)):  # the second leaves the image
        seg = canonical_labels(labels, look)
        assert seg.shape == (frame.n_slices, 48, 48)
        z, y, x = (rng.integers(0, n, 400) for n in seg.shape)
        cz, cy, cx = (np.floor(np.asarray(v) + 0.5).astype(int) for v in look.to_cached(z, y, x))
        inside = (cy >= 0) & (cy < labels.shape[1]) & (cx >= 0) & (cx < labels.shape[2])
        want = np.zeros(len(z), dtype=np.uint8)  # outside the image: background
        want[inside] = labels[cz[inside], cy[inside], cx[inside]]
        agree = seg[z, y, x] == want
        assert agree.mean() > 0.97  # pixel-centre rounding at block edges may differ by one
        assert inside.any() and (~inside).any()  # the square field pads: both are checked


def _canal_sample(out: Path, cache: Path, patient: int) -> LocalizerSample:
    """The spinal sample of one study, its maps redrawn: class 3 in a disc of 3 cached pixels
    around every canal point, background elsewhere."""
    (stack,) = _stacks(out, cache, patient)
    rows = load_dataset(out).coordinates
    points = true_points(normalize_coordinates(rows[rows["study_id"] == stack.study_id]), [stack])
    plain = localizer_sample(stack, points, LOCALIZER_TASKS["spinal"], 48, 24)
    labels = np.zeros(stack.volume.shape, dtype=np.uint8)
    gy, gx = np.indices(labels.shape[1:])
    for p in plain.points[plain.valid]:
        z, y, x = (float(v) for v in stack.patient_to_voxel(p))
        labels[round(z)][(gy - y) ** 2 + (gx - x) ** 2 <= 9] = 3
    return localizer_sample(stack, points, LOCALIZER_TASKS["spinal"], 48, 24, labels)


def test_augmented_looks_keep_every_point_on_its_drawn_class(imported) -> None:
    out, cache = imported
    samples = [_canal_sample(out, cache, p) for p in PATIENTS]
    cfg = load_config("quick", ["localizer.augment.rotate_deg=25"])
    c = cfg.localizer
    data = LocalizerDataset(samples, True, c.zoom, seed=3, aug=c.augment, fine=c.fine)
    seen = []
    for epoch in range(6):
        data.set_epoch(epoch)
        for i in range(len(data)):
            item = data[i]
            for j in np.flatnonzero(item["valid"]):
                x, y = np.floor(item["xy"][j] + 0.5).astype(int)
                seen.append(item["seg"][int(item["z"][j]), y, x])
    assert len(seen) > 60 and np.mean(np.array(seen) == 3) > 0.95
    batch = collate_stacks([data[0], {k: v for k, v in data[1].items() if k != "seg"}])
    assert batch["seg"].dtype == torch.uint8
    assert (batch["seg"][1] == UNKNOWN).all()  # a stack without maps teaches nothing here


def test_the_segmentation_loss_scores_only_drawn_pixels() -> None:
    torch.manual_seed(0)
    seg = torch.randint(0, 4, (2, 3, 16, 16), dtype=torch.uint8)
    seg[1, 2] = UNKNOWN
    perfect = torch.nn.functional.one_hot(seg.long().clamp(max=3), 4).permute(0, 1, 4, 2, 3)
    logits = (perfect.float() * 20).requires_grad_()  # at the maps' own resolution
    assert float(segmentation_loss(logits.detach(), seg)["loss"]) < 1e-3
    noisy = torch.randn(2, 3, 4, 16, 16)
    base = segmentation_loss(noisy, seg)
    changed = noisy.clone()
    changed[1, 2] = 50 * torch.randn(4, 16, 16)  # the unknown slice
    assert torch.allclose(segmentation_loss(changed, seg)["loss"], base["loss"])
    assert float(base["loss"]) > 1.0
    none = segmentation_loss(logits, torch.full_like(seg, UNKNOWN))
    none["loss"].backward()
    assert float(none["loss"].detach()) == 0.0 and logits.grad is not None


def test_the_head_trains_only_with_a_weight_and_prediction_ignores_it(imported) -> None:
    out, cache = imported
    plain = build_localizer(load_config("quick", TINY))
    assert plain.seg is None and "seg_classes" not in plain.spec["kwargs"]
    torch.manual_seed(0)
    net = build_localizer(load_config("quick", TINY), seg=True)
    assert net.seg.out_channels == len(LABEL_CLASSES)
    again = build_from_spec(net.spec)
    again.load_state_dict(net.state_dict())  # a saved net rebuilds with its head, strictly
    samples = [_canal_sample(out, cache, p) for p in PATIENTS]
    batch = collate_stacks([s.view(s.frame) for s in samples])
    # TINY's 32 px looks; the samples' are 48: the heatmaps stay at a quarter of the input.
    out_ = net(batch["volume"], batch["mask"])
    assert out_["seg_logits"].shape == (3, batch["volume"].shape[1], 4, 12, 12)
    net.eval()
    assert torch.equal(net.heatmaps(batch["volume"], batch["mask"]),
                       net(batch["volume"], batch["mask"])["heatmaps"])  # fmt: skip
    net.train()
    loss_fn = _LocalizerLoss(1.5, seg_weight=1.0)
    opt = torch.optim.Adam(net.parameters(), 2e-2)
    first = None
    for _ in range(40):
        parts = loss_fn(net, batch)
        opt.zero_grad()
        parts["loss"].backward()
        opt.step()
        first = first if first is not None else float(parts["seg_ce"])
    assert float(parts["seg_ce"]) < 0.5 * first  # the head learns the drawn canal
    without = {k: v for k, v in batch.items() if k != "seg"}
    parts = loss_fn(net, without)  # phantoms: no map, no term, the head still in the graph
    assert float(parts["seg_ce"]) == 0.0
    parts["loss"].backward()
    assert net.seg.weight.grad is not None


def test_a_run_with_label_maps_records_the_head_and_localises(imported, tmp_path, monkeypatch):
    from spinegrade.training.cv import cross_validate

    monkeypatch.setenv("SPINEGRADE_PROGRESS", "0")
    out, cache = imported
    cfg = load_config("quick", [*TINY, "train.fold_workers=1", "localizer.tasks=[spinal]",
                                "localizer.seg_weight=1.0", "train.groups=[]",
                                "data.n_folds=3", "data.cache_size=64"])  # fmt: skip
    cv = cross_validate(out, cache, tmp_path / "run", cfg, progress=False)
    assert cv["localizer"]["spinal"]["n"] == len(PATIENTS) * 5
    for k in range(3):
        fold = tmp_path / "run" / f"fold_{k}"
        spec = json.loads((fold / "localizer_spinal.json").read_text())["spec"]
        assert spec["kwargs"]["seg_classes"] == len(LABEL_CLASSES)
        logged = [json.loads(line) for line in (fold / "log.jsonl").read_text().splitlines()]
        epochs = [r for r in logged if r.get("stage") == "localizer_spinal" and "epoch" in r]
        assert epochs and all(np.isfinite(r["train_seg_ce"]) and r["train_seg_ce"] > 0
                              for r in epochs)  # fmt: skip


def test_only_a_net_whose_data_have_maps_gets_the_head(imported) -> None:
    """A net of phantoms alone is built as it was before the maps (its weights and random draws
    unchanged), whatever seg_weight says; the same net on drawn spines gets the head."""
    from spinegrade.training.stages import train_localizer

    out, cache = imported
    drawn = [_canal_sample(out, cache, p) for p in PATIENTS]
    plain = [dataclasses.replace(s, labels=None) for s in drawn]
    cfg = load_config("quick", [*TINY, "localizer.seg_weight=0.5", "localizer.tasks=[spinal]"])
    nets = {
        k: train_localizer(cfg, {"spinal": v}, {}, CPU)
        for k, v in (("plain", plain), ("drawn", drawn))
    }
    assert nets["plain"]["spinal"].seg is None
    assert "seg_classes" not in nets["plain"]["spinal"].spec["kwargs"]
    assert nets["drawn"]["spinal"].seg is not None
    zero = load_config("quick", [*TINY, "localizer.tasks=[spinal]"])
    assert train_localizer(zero, {"spinal": drawn}, {}, CPU)["spinal"].seg is None
