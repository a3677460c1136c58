"""Quantization-aware training with DistributedDataParallel: every rank holds the same ranges, scales and zero points.

Run on CPU with two processes (gloo), or on GPUs (nccl, one process per GPU)::

    torchrun --standalone --nproc_per_node=2 examples/ddp_train.py --epochs 3 --out runs/ddp

Each rank trains on its slice of every batch. quantrain reduces each activation's batch range across ranks before
the moving average, so the result equals one process training on the whole batch; weights need nothing, DDP keeps
them identical. Rank 0 writes the checkpoint and the calibration_config.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from quantrain import QATQuantizer, save_calibration_config
from quantrain.demo import accuracy, build_model, demo_config_list, load_digits


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch size (split across ranks)")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--out", type=Path, default=None, help="where rank 0 saves model.pt and calibration.json")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} must be a multiple of the {world} processes")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if not cuda:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))

    torch.manual_seed(0)  # the same initial weights everywhere (DDP also broadcasts rank 0's)
    x_train, y_train, x_test, y_test = load_digits()
    model = build_model().to(device)
    # before or after DDP: either works; the example input is what quantrain captures the model's graph from
    quantizer = QATQuantizer(model, demo_config_list(8), fuse="auto", integer_bias=True, example_inputs=x_train[:2].to(device))
    ddp = DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=args.lr, momentum=0.9)

    local = args.batch_size // world
    for epoch in range(args.epochs):
        order = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(epoch))  # the same on all ranks
        ddp.train()
        for start in range(0, len(order) - args.batch_size + 1, args.batch_size):
            index = order[start + rank * local : start + (rank + 1) * local]  # this rank's slice of the global batch
            loss = F.cross_entropy(ddp(x_train[index].to(device)), y_train[index].to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if rank == 0:
            test_accuracy = accuracy(model, x_test.to(device), y_test.to(device))
            print(f"epoch {epoch + 1}: loss {loss.item():.4f}, test accuracy {test_accuracy:.2f}%")

    same, sent = ranks_agree(quantizer.get_calibration_config(), device)
    if rank == 0:
        print(f"optimizer steps: {quantizer.current_step}; ranks hold identical scales and zero points: {same}")
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), args.out / "model.pt")
            save_calibration_config(quantizer.get_calibration_config(), args.out / "calibration.json")
            print(f"saved {args.out / 'model.pt'} and {args.out / 'calibration.json'}")
    # DDP lets go of the process group first, so that destroying the group (which joins gloo's worker threads) runs
    # inside destroy_process_group rather than in DDP's destructor, which holds the GIL: a worker thread freeing a
    # tensor that was sent through the group may need the GIL, and the two would wait for each other at exit.
    del ddp
    dist.destroy_process_group()
    del sent


def ranks_agree(calibration_config: dict, device: torch.device) -> tuple[bool, list[torch.Tensor]]:
    """Whether every rank's scales and zero points equal rank 0's, bit for bit; and the tensors it sent."""
    values = torch.cat(
        [
            entry[key].reshape(-1)
            for targets in calibration_config.values()
            for entry in targets.values()
            for key in ("scale", "zero_point")
        ]
    ).to(device)
    reference = values.clone()
    dist.broadcast(reference, 0)
    differs = torch.tensor([float(not torch.equal(values, reference))], device=device)
    dist.all_reduce(differs)
    return differs.item() == 0, [reference, differs]


if __name__ == "__main__":
    main()
