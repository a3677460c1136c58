"""A QAT run that checkpoints and resumes, for tests/test_resume.py (which kills it with SIGKILL and resumes it).

A conv-BN-ReLU model is trained with ``QATQuantizer`` (``fuse='auto'``, ``integer_bias``, a schedule with
``quant_start_step``, ``freeze_bn_step`` and ``freeze_range_step``), on batches generated from the step index, so the
data needs no state of its own. Every ``--every`` steps it writes ``checkpoint.pt`` with
:func:`quantrain.checkpoint.save_checkpoint` (atomic): the model's state_dict (quantrain's state and step included),
the optimizer's, the LR scheduler's and the RNG state. ``--resume`` loads it (``torch.load(weights_only=True)``)
into a model built from another seed, so everything it continues from comes from the checkpoint; the quantizer's
step comes back from the model's ``quantrain_step`` buffer. At the end it writes ``calibration.json`` and
``final.pt``. One thread and deterministic algorithms make the numbers reproducible bit for bit.

    python tests/resume_script.py DIR [--steps N] [--every K] [--delay SECONDS] [--resume]
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

from quantrain import QATQuantizer, save_calibration_config
from quantrain.checkpoint import load_checkpoint, save_checkpoint

CONFIG_LIST = [
    {"op_names": ["0", "8"], "target_names": ["_input_"], "quant_dtype": "uint8", "quant_scheme": "affine"},
    {
        "op_types": ["Conv2d", "Linear"],
        "target_names": ["weight", "_output_"],
        "quant_dtype": "uint8",
        "quant_scheme": "affine",
        "target_settings": {"weight": {"quant_dtype": "int8", "quant_scheme": "symmetric", "granularity": "out_channel"}},
    },
]
SCHEDULE = {"quant_start_step": 4, "freeze_bn_step": 20, "freeze_range_step": 26}
CHECKPOINT, CALIBRATION, FINAL = "checkpoint.pt", "calibration.json", "final.pt"


def build_model(seed: int) -> nn.Module:
    """Conv-BN-ReLU, conv-BN-ReLU, pooled, linear: two folded layers and a plain one."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, bias=False),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of optimizer step ``step``: a function of the index only."""
    generator = torch.Generator().manual_seed(10_000 + step)
    return torch.randn(16, 1, 8, 8, generator=generator), torch.randint(0, 4, (16,), generator=generator)


def train(directory: str, steps: int, every: int, delay: float, resume: bool) -> None:
    model = build_model(seed=1 if resume else 0)  # a resumed run must take everything from the checkpoint
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.5)
    quantizer = QATQuantizer(
        model, CONFIG_LIST, fuse="auto", integer_bias=True, example_inputs=torch.zeros(1, 1, 8, 8), **SCHEDULE
    )
    start = _restore(directory, model, optimizer, scheduler, quantizer) if resume else 0
    print(f"starting at step {start}", flush=True)
    for step in range(start, steps):
        x, y = batch(step)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()  # counted by the quantizer: the schedule moves on
        scheduler.step()
        if (step + 1) % every == 0:
            _save(directory, step + 1, model, optimizer, scheduler)
        time.sleep(delay)
    save_calibration_config(quantizer.get_calibration_config(), os.path.join(directory, CALIBRATION))
    save_checkpoint({"model": model.state_dict(), "step": quantizer.current_step}, os.path.join(directory, FINAL))


def _save(directory: str, step: int, model: nn.Module, optimizer, scheduler) -> None:
    state = {
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": torch.get_rng_state(),
    }
    save_checkpoint(state, os.path.join(directory, CHECKPOINT))


def _restore(directory: str, model: nn.Module, optimizer, scheduler, quantizer: QATQuantizer) -> int:
    state = load_checkpoint(os.path.join(directory, CHECKPOINT))
    model.load_state_dict(state["model"])  # strict: every key, quantrain's included
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    if quantizer.current_step != state["step"]:
        raise RuntimeError(f"the quantizer resumed at step {quantizer.current_step}, the checkpoint is at {state['step']}")
    return state["step"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory")
    parser.add_argument("--steps", type=int, default=36)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds of sleep after each step")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    train(args.directory, args.steps, args.every, args.delay, args.resume)


if __name__ == "__main__":
    main()
