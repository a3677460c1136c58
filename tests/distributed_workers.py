"""What each rank runs in the multi-process tests (tests/test_distributed.py), and the single-process references.

Every scenario trains on the same global batches: step ``s`` draws ``GLOBAL_BATCH`` samples from seed ``s``; rank
``r`` of ``w`` takes the ``r``-th slice. A single process training on the whole batch is the reference.
"""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from quantrain import PtqQuantizer, QATQuantizer, TorchEvaluator

GLOBAL_BATCH = 16
STEPS = 6
CONFIG = [
    {
        "op_types": ["Conv2d", "Linear"],
        "target_names": ["_input_", "weight", "_output_"],
        "quant_dtype": "uint8",
        "quant_scheme": "affine",
        "target_settings": {"weight": {"quant_dtype": "int8", "quant_scheme": "symmetric", "granularity": "out_channel"}},
    }
]
FOLD_CONFIG = [{**CONFIG[0], "fuse_names": [("0", "1", "2")]}]


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))


def cnn_bn(norm: type[nn.Module] = nn.BatchNorm2d) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), norm(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))


def batch(step: int, rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, 3, 8, 8, generator=g) * (1 + step % 3)
    y = torch.randint(0, 5, (GLOBAL_BATCH,), generator=g)
    size = GLOBAL_BATCH // world
    return x[rank * size : (rank + 1) * size], y[rank * size : (rank + 1) * size]


def train(
    model: nn.Module, optimizer: torch.optim.Optimizer, rank: int = 0, world: int = 1, steps: int = STEPS, device: str = "cpu"
) -> None:
    model.train()
    for step in range(steps):
        x, y = (t.to(device) for t in batch(step, rank, world))
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


class AveragingSGD(torch.optim.SGD):
    """SGD on gradients averaged over ranks (what DistributedDataParallel does)."""

    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= dist.get_world_size()
        return super().step(closure)


def snapshot(quantizer, model: nn.Module) -> dict:
    """What the tests compare: the calibration_config, the weights and the step."""
    return {
        "calibration": quantizer.get_calibration_config(),
        "weights": {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if "fake_quant" not in k},
        "step": quantizer.current_step,
    }


def tracked_ranges(quantizer) -> dict:
    return {
        (name, target): (fq.observer.tracked_min.clone(), fq.observer.tracked_max.clone())
        for name, module in quantizer.quantized_modules.items()
        for target, fq in module.fake_quant.items()
    }


def reference(make_model: Callable[[], nn.Module], config: list, steps: int = STEPS, device: str = "cpu") -> dict:
    """A single process training on the whole global batch."""
    model = make_model().to(device)
    quantizer = QATQuantizer(model, config)
    train(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=steps, device=device)
    return snapshot(quantizer, model)


# ---- running ranks ------------------------------------------------------------------------------------------


def run_ranks(worker: Callable, out: Path, world: int = 2, timeout: float = 120.0) -> list[dict]:
    """Start ``world`` processes (gloo, CPU) running ``worker(rank, world, out)``; return what each saved."""
    context = mp.start_processes(_entry, args=(worker, world, str(out)), nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            raise TimeoutError(f"{worker.__name__}: ranks did not finish within {timeout} s (a hang)")
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(world)]


def _entry(rank: int, worker: Callable, world: int, out: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=world)
    try:
        result = worker(rank, world, Path(out))
    except Exception:
        result = {"error": traceback.format_exc()}
    torch.save(result, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


# ---- scenarios ----------------------------------------------------------------------------------------------


def wrap_after_quantizing(rank: int, world: int, out: Path) -> dict:
    """Quantize, then wrap in DDP; train; save on rank 0 and reload on both; a folded SyncBatchNorm model too."""
    model = cnn()
    quantizer = QATQuantizer(model, CONFIG)
    ddp = DDP(model)
    train(ddp, torch.optim.SGD(ddp.parameters(), lr=0.1), rank, world)
    result = snapshot(quantizer, model)

    if rank == 0:
        torch.save(model.state_dict(), out / "checkpoint.pt")
    dist.barrier()
    restored = cnn()
    restored_quantizer = QATQuantizer(restored, CONFIG)
    restored.load_state_dict(torch.load(out / "checkpoint.pt", weights_only=True))
    result["reloaded"] = snapshot(restored_quantizer, restored)

    # DistributedDataParallel refuses SyncBatchNorm on CPU modules, so gradients are averaged by hand here.
    folded = nn.SyncBatchNorm.convert_sync_batchnorm(cnn_bn())
    folded_quantizer = QATQuantizer(folded, FOLD_CONFIG)
    train(folded, AveragingSGD(folded.parameters(), lr=0.1), rank, world)
    result["sync_bn"] = snapshot(folded_quantizer, folded)
    result["sync_bn"]["running"] = (folded[1].running_mean.clone(), folded[1].running_var.clone())
    return result


def wrap_before_quantizing(rank: int, world: int, out: Path) -> dict:
    """DDP first, then a quantizer driven by TorchEvaluator; then rank 0 alone loads a checkpoint; then PTQ."""
    model = cnn()
    ddp = DDP(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)

    def training_step(batch_, model_):
        x, y = batch_
        return F.cross_entropy(model_(x), y)

    def training_func(model_, optimizers, step_fn, schedulers, max_steps, max_epochs):
        model_.train()
        for step in range(max_steps):
            optimizers.zero_grad()
            step_fn(batch(step, rank, world), model_).backward()
            optimizers.step()

    evaluator = TorchEvaluator(training_func, optimizer, training_step)
    quantizer = QATQuantizer(ddp, CONFIG, evaluator)
    quantizer.compress(max_steps=STEPS)
    result = snapshot(quantizer, model)
    result["bound_is_inner"] = quantizer.bound_model is model

    # Rank 0 resumes from a checkpoint that the other rank does not load: the first synchronized forward aligns them.
    resumed = cnn()
    resumed_quantizer = QATQuantizer(resumed, CONFIG)
    if rank == 0:
        resumed.load_state_dict(torch.load(out / "trained.pt", weights_only=True))
    ddp = DDP(resumed)
    train(ddp, torch.optim.SGD(ddp.parameters(), lr=0.1), rank, world, steps=1)
    result["resumed"] = snapshot(resumed_quantizer, resumed)

    calibrated = cnn()
    ptq = PtqQuantizer(calibrated, CONFIG)
    for step in range(3):
        ptq.track_forward(batch(step, rank, world)[0])
    result["ptq"] = tracked_ranges(ptq)
    return result


def mismatched_configs(rank: int, world: int, out: Path) -> dict:
    """Rank 1 quantizes outputs to int8, rank 0 to uint8: the first training forward fails on both, clearly."""
    model = cnn()
    config = [{**CONFIG[0], "quant_dtype": "int8" if rank else "uint8"}]
    QATQuantizer(model, config)
    ddp = DDP(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        ddp(batch(0, rank, world)[0])
    except ValueError as exc:
        message = str(exc)
    else:
        message = None
    unchanged = all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    return {"message": message, "unchanged": unchanged}


def folded_sync_bn_on_cuda(rank: int, world: int, out: Path) -> dict:
    """DDP with a folded SyncBatchNorm on a GPU (both ranks share it, through gloo)."""
    model = nn.SyncBatchNorm.convert_sync_batchnorm(cnn_bn()).cuda()
    quantizer = QATQuantizer(model, FOLD_CONFIG)
    ddp = DDP(model, device_ids=[0])
    train(ddp, torch.optim.SGD(ddp.parameters(), lr=0.1), rank, world, device="cuda")
    return snapshot(quantizer, model)
