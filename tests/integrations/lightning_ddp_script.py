"""QAT through LightningEvaluator with Lightning's ``ddp`` strategy on 2 CPU processes (run by test_lightning.py).

Usage: ``python lightning_ddp_script.py OUTDIR [STRATEGY]``. Lightning's ``ddp`` launches this script again for rank 1;
each rank builds the same model (same seed), quantizes it before the fit, trains ``STEPS`` optimizer steps on its
half of the data (Lightning adds a DistributedSampler) and saves ``OUTDIR/rank{R}.pt``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from quantrain import QATQuantizer
from quantrain.integrations.lightning import LightningEvaluator

STEPS = 6  # 64 samples, 2 ranks, batches of 8: 4 steps an epoch, so the fit crosses an epoch boundary
CONFIG = [
    {"op_types": ["Linear"], "target_names": ["_input_", "weight", "_output_"], "quant_dtype": "int8", "quant_scheme": "affine"}
]


class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Data(pl.LightningDataModule):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        x = torch.randn(64, 4, generator=g) * torch.linspace(0.5, 3.0, 64).unsqueeze(1)  # ranks see different ranges
        self.dataset = TensorDataset(x, (x.sum(1) > 0).long() + (x[:, 0] > 1).long())

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=8)


def main(outdir: Path, strategy: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Classifier()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        enable_progress_bar=False,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    quantizer = QATQuantizer(model, CONFIG, LightningEvaluator(trainer, Data()))
    _, calibration_config = quantizer.compress(max_steps=STEPS)
    result = {
        "current_step": quantizer.current_step,
        "global_step": trainer.global_step,
        "world_size": trainer.world_size,
        "calibration_config": calibration_config,
        "weight": model.net[0].weight.detach().clone(),
    }
    torch.save(result, outdir / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "ddp")
