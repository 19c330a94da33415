"""Training throughput of the quick (or any) config on this machine; prints a markdown table.

    .venv/bin/python bench/bench_train.py                       # quick config, 2 threads
    .venv/bin/python bench/bench_train.py --config default --threads 2 --steps 5
    .venv/bin/python bench/bench_train.py --cache /tmp/sg_demo_cache   # crop cutting on real stacks
    .venv/bin/python bench/bench_train.py crops.size=48 localizer.batch_size=2   # overrides

Measures, each after warm-up steps: grader training steps (crops/s, forward + backward + AdamW)
per group model, grader inference (crops/s), localiser training (stacks/s at the config's image
size and a typical 15-slice sagittal stack), and cutting jittered training crops from cached
stacks (crops/s, single thread). Figures only: nothing here passes or fails on time.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from spinegrade.config import load_config
from spinegrade.models.registry import build_grader, build_localizer

CLOCK = {"name": "wall", "threads": 1}
AUTOCAST = {"dtype": None}  # --autocast bf16: the forward passes under CPU autocast


def _autocast():
    dtype = AUTOCAST["dtype"]
    return torch.autocast("cpu", dtype=dtype) if dtype else contextlib.nullcontext()


def _rate(step, items: int, steps: int, warmup: int = 2) -> float:
    """Items per second of ``step``: wall clock, or process CPU time / threads (``--clock cpu``).

    On a shared machine the CPU clock estimates what the same work takes on idle cores.
    """
    for _ in range(warmup):
        step()
    cpu = CLOCK["name"] == "cpu"
    t = time.process_time() if cpu else time.perf_counter()
    for _ in range(steps):
        step()
    elapsed = (time.process_time() - t) / CLOCK["threads"] if cpu else time.perf_counter() - t
    return items * steps / elapsed


def grader_rates(cfg, steps: int) -> tuple[float, float]:
    """(training crops/s, inference crops/s) of one stage-2 model."""
    model = build_grader(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    b, c = cfg.train.batch_size, cfg.crops
    x = torch.randn(b, c.slices, c.size, c.size)
    level = torch.randint(0, 5, (b,))
    labels = torch.randint(0, 3, (b,))

    def train_step() -> None:
        with _autocast():
            loss = torch.nn.functional.cross_entropy(model(x, level)[:, 0].float(), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()

    model.train()
    train = _rate(train_step, b, steps)
    model.eval()
    with torch.no_grad(), _autocast():
        infer = _rate(lambda: model(x, level), b, steps)
    return train, infer


def localizer_rate(cfg, steps: int, slices: int = 15) -> float:
    """Training stacks/s of the stage-1 network (10 foraminal targets)."""
    from spinegrade.training.losses import localizer_loss

    net = build_localizer(cfg, n_targets=10)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    b, size = cfg.localizer.batch_size, cfg.localizer.image_size
    x = torch.rand(b, slices, size, size)
    xy = torch.rand(b, 10, 2) * size
    z = torch.randint(0, slices, (b, 10)).float()
    valid = torch.ones(b, 10, dtype=torch.bool)

    def step() -> None:
        with _autocast():
            out = net(x)
        out = {k: v.float() if torch.is_tensor(v) else v for k, v in out.items()}
        loss = localizer_loss(out, xy, z, valid)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()

    net.train()
    return _rate(step, b, steps, warmup=1)


def crop_rate(cfg, cache: str | None, n: int = 400) -> float:
    """Jittered training crops cut per second from cached (or hand-made) stacks."""
    from spinegrade.data.crops import make_crops
    from spinegrade.localization.points import StudyPoints
    from spinegrade.preprocessing.cache import CachedStack, load_stack, read_index

    if cache:
        index = read_index(cache)
        row = index[(index["status"] == "ok") & (index["description"] == "Sagittal T2/STIR")].iloc[
            0
        ]
        stack = load_stack(os.path.join(cache, row["path"]))
    else:
        rng = np.random.default_rng(0)
        stack = CachedStack(
            volume=rng.integers(0, 255, (15, 256, 256), dtype=np.uint8),
            positions=np.array([[-30.0 + 4 * k, -120.0, 120.0] for k in range(15)]),
            row_dir=np.array([0.0, 1.0, 0.0]),
            col_dir=np.array([0.0, 0.0, -1.0]),
            spacing=(0.9, 0.9),
            orig_shape=(256, 256),
            instance_numbers=np.arange(1, 16),
            description="Sagittal T2/STIR",
        )
    d, h, w = stack.volume.shape
    points = StudyPoints()
    points.set("spinal_canal_stenosis", "l3_l4", stack.voxel_to_patient(d // 2, h / 2, w / 2))
    stacks = {"Sagittal T2/STIR": [stack]}
    rng = np.random.default_rng(1)
    cols = ["spinal_canal_stenosis_l3_l4"]
    return _rate(lambda: make_crops(stacks, points, cfg.crops, cols, rng), 1, n, warmup=5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", default="quick")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--cache", default=None, help="cut crops from this cache's stacks")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    ap.add_argument(
        "--autocast",
        choices=("off", "bf16"),
        default="off",
        help="forward passes under CPU autocast (bf16 needs AVX-512 BF16 or AMX)",
    )
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. crops.size=48")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    CLOCK.update(name=args.clock, threads=args.threads)
    AUTOCAST["dtype"] = torch.bfloat16 if args.autocast == "bf16" else None
    torch.manual_seed(0)
    cfg = load_config(args.config, args.overrides)
    c, m, loc = cfg.crops, cfg.model, cfg.localizer
    train, infer = grader_rates(cfg, args.steps)
    stacks = localizer_rate(cfg, max(2, args.steps // 3))
    CLOCK.update(threads=1)  # crop cutting is single-threaded numpy/scipy
    crops = crop_rate(cfg, args.cache)
    print(
        f"### Training throughput: config `{args.config}`, "
        f"{args.threads} threads, {args.clock} clock, autocast {args.autocast}"
    )
    print(
        f"grader {m.backbone}, crops {c.slices}x{c.size}x{c.size}, batch {cfg.train.batch_size}; "
        f"localizer {loc.backbone} at {loc.image_size} px, batch {loc.batch_size} x 15 slices"
    )
    print("| what | rate |\n|---|---|")
    print(f"| grader training (fwd+bwd+AdamW) | {train:.0f} crops/s |")
    print(f"| grader inference | {infer:.0f} crops/s |")
    print(f"| localiser training | {stacks:.1f} stacks/s |")
    print(f"| cutting jittered crops (1 thread) | {crops:.0f} crops/s |")


if __name__ == "__main__":
    main()
