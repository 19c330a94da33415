"""Per-epoch checkpoints (safetensors + a JSON that commits the pair) and the weight average."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from spinegrade.util.atomic import atomic_path, crash_point, write_json
from spinegrade.util.runtime import unwrap

CKPT_FORMAT = "spinegrade-checkpoint/1"


# ------------------------------------------------------------------------------- checkpoints


def save_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict,
    average: WeightAverage | None = None,
) -> None:
    """Model, optimiser (and weight-average) tensors as safetensors, the rest as JSON; atomic."""
    tensors = {f"model.{k}": _cpu(v) for k, v in unwrap(model).state_dict().items()}
    if average is not None:
        tensors.update({f"average.{k}": _cpu(v) for k, v in average.state.items()})
        state = {**state, "average_steps": average.steps}
    opt = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for idx, pstate in opt["state"].items():
        for key, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{key}"] = _cpu(value)
            else:
                scalars.setdefault(str(idx), {})[key] = value
    meta = {"format": CKPT_FORMAT, "param_groups": opt["param_groups"], "scalars": scalars, **state}
    # The JSON file is the commit point: it names the tensor file it goes with (one per epoch), so
    # a kill between the two writes leaves the previous epoch's pair intact and in use.
    tensor_path = path.with_name(f"{path.stem}.e{state.get('epoch', 0)}.safetensors")
    with atomic_path(tensor_path) as tmp:
        save_file(tensors, str(tmp))
    crash_point(f"checkpoint_write:{path.stem}")
    write_json(path.with_suffix(".json"), {**meta, "tensors": tensor_path.name}, indent=None)
    for old in path.parent.glob(f"{path.stem}.e*.safetensors"):
        if old.name != tensor_path.name:
            old.unlink(missing_ok=True)


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous()


def load_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    average: WeightAverage | None = None,
) -> dict | None:
    """Restore a checkpoint written by :func:`save_checkpoint`; None when there is none."""
    json_path = path.with_suffix(".json")
    if not json_path.is_file():
        return None
    meta = json.loads(json_path.read_text())
    if meta.get("format") != CKPT_FORMAT:
        raise ValueError(
            f"{json_path}: not a spinegrade checkpoint; delete it to start the stage over"
        )
    # Checkpoints written before the JSON named its tensors sit at PATH.safetensors.
    tensor_path = path.parent / meta.get("tensors", path.with_suffix(".safetensors").name)
    if not tensor_path.is_file():
        raise ValueError(
            f"{json_path} names {tensor_path.name}, which is missing; delete {path.parent} to "
            "start the stage over"
        )
    tensors = load_file(str(tensor_path))
    unwrap(model).load_state_dict(_with_prefix(tensors, "model."))
    if average is not None and "average_steps" in meta:
        average.load(_with_prefix(tensors, "average."), int(meta["average_steps"]))
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for idx, extra in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(extra)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta


def _with_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


class WeightAverage:
    """Exponential moving average of a model's weights and buffers.

    With a few hundred steps on a few dozen studies, the weights of the last step are one noisy
    draw; their running average predicts more steadily (the same idea as SWA / timm's ModelEma).
    The decay ramps up over the first steps so the random initial weights fade quickly.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay, self.steps = decay, 0
        self.state = {k: v.detach().clone() for k, v in unwrap(model).state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.steps += 1
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        for k, v in unwrap(model).state_dict().items():
            if v.dtype.is_floating_point:
                self.state[k].mul_(d).add_(v.detach(), alpha=1 - d)
            else:
                self.state[k].copy_(v)

    def load(self, state: dict[str, torch.Tensor], steps: int) -> None:
        for k, v in state.items():
            self.state[k].copy_(v)
        self.steps = steps

    def copy_to(self, model: nn.Module) -> None:
        unwrap(model).load_state_dict(self.state)
