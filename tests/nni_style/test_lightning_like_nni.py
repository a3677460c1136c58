"""LightningEvaluator as NNI 3.0's evaluator page and its QAT/PTQ tests use it (``SimpleLightningModel``).

A ``LightningModule`` wrapping the torch model as ``self.model`` (so op names are ``model.conv1``...), logging the
accuracy as ``'default'`` in its validation and test steps, ``configure_optimizers`` returning an optimizer with an
epoch-wise ExponentialLR; a ``LightningDataModule``; ``LightningEvaluator(trainer, data_module)``. NNI's budget rule:
a limit given to ``compress`` replaces the Trainer's, a limit not given leaves the Trainer's own in force. NNI's
``evaluate()`` runs ``trainer.test`` and returns ``(mean of 'default', list of result dicts)``.
"""

from __future__ import annotations

import pytest

pl = pytest.importorskip("lightning.pytorch", reason="LightningEvaluator needs lightning (pip install 'quantrain[lightning]')")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from nni_style_common import Net, check_entry, digits, make_evaluating_func  # noqa: E402
from torch.optim.lr_scheduler import ExponentialLR  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from quantrain import PtqQuantizer, QATQuantizer  # noqa: E402
from quantrain.integrations.lightning import LightningEvaluator  # noqa: E402

BATCHES_PER_EPOCH = 8
CONFIGURE_LIST = [
    {
        "target_names": ["weight"],
        "op_names": ["model.fc1", "model.fc2"],
        "quant_dtype": "int8",
        "quant_scheme": "affine",
        "granularity": "in_channel",
    },
    {
        "target_names": ["_input_", "weight", "_output_"],
        "op_names": ["model.conv1", "model.conv2"],
        "quant_dtype": "int8",
        "quant_scheme": "affine",
        "granularity": "default",
    },
]


class SimpleLightningModel(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = Net()

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.nll_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def evaluate(self, batch, stage=None):
        x, y = batch
        logits = self(x)
        loss = F.nll_loss(logits, y)
        acc = (torch.argmax(logits, dim=1) == y).float().mean()
        if stage:
            self.log("default", acc, prog_bar=False)
            self.log(f"{stage}_loss", loss, prog_bar=True)
            self.log(f"{stage}_acc", acc, prog_bar=True)

    def validation_step(self, batch, batch_idx):
        self.evaluate(batch, "val")

    def test_step(self, batch, batch_idx):
        self.evaluate(batch, "test")

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        scheduler_dict = {"scheduler": ExponentialLR(optimizer, 0.5), "interval": "epoch"}
        return {"optimizer": optimizer, "lr_scheduler": scheduler_dict}


class DigitsDataModule(pl.LightningDataModule):
    def __init__(self, batch_size: int = 64) -> None:
        super().__init__()
        self.batch_size = batch_size

    def setup(self, stage: str | None = None):
        x_train, y_train, x_test, y_test = digits()
        size = self.batch_size * BATCHES_PER_EPOCH
        self.digits_train = TensorDataset(x_train[:size], y_train[:size])
        self.digits_val = TensorDataset(x_train[size : 2 * size], y_train[size : 2 * size])
        self.digits_test = TensorDataset(x_test, y_test)

    def train_dataloader(self):
        return DataLoader(self.digits_train, batch_size=self.batch_size)

    def val_dataloader(self):
        return DataLoader(self.digits_val, batch_size=self.batch_size)

    def test_dataloader(self):
        return DataLoader(self.digits_test, batch_size=len(self.digits_test))


def make_trainer(**limits):
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **limits,
    )


def check_calibration_config(calibration_config):
    assert set(calibration_config) == {"model.conv1", "model.conv2", "model.fc1", "model.fc2"}
    for name in ("model.conv1", "model.conv2"):
        assert set(calibration_config[name]) == {"_input_0", "weight", "_output_0"}
        for entry in calibration_config[name].values():
            check_entry(entry, shape=())
    check_entry(calibration_config["model.fc1"]["weight"], shape=(1, 64))
    check_entry(calibration_config["model.fc2"]["weight"], shape=(1, 32))


def test_trainer_max_steps_stays_in_force_when_compress_gives_only_epochs():
    torch.manual_seed(0)
    pl_trainer = make_trainer(max_steps=5)
    pl_data = DigitsDataModule()
    evaluator = LightningEvaluator(pl_trainer, pl_data)
    model = SimpleLightningModel()
    quantizer = QATQuantizer(model, CONFIGURE_LIST, evaluator)

    _, calibration_config = quantizer.compress(None, 1)  # one epoch is 8 batches; the Trainer's max_steps=5 ends it
    assert pl_trainer.global_step == 5
    assert quantizer.current_step == 5
    assert pl_trainer.max_steps == 5  # the Trainer's own limit is left as it was
    check_calibration_config(calibration_config)

    _, calibration_config = quantizer.compress(3, None)  # a step limit given to compress replaces the Trainer's
    assert quantizer.current_step == 8
    check_calibration_config(calibration_config)

    score, results = evaluator.evaluate()
    assert isinstance(results, list) and len(results) == 1
    assert {"default", "test_loss", "test_acc"} <= set(results[0])
    assert score == pytest.approx(results[0]["default"])
    assert score == pytest.approx(make_evaluating_func(pl_data.test_dataloader())(model), abs=1e-6)


def test_ptq_with_a_lightning_evaluator_trains_for_the_epochs_given():
    torch.manual_seed(0)
    pl_trainer = make_trainer(max_epochs=3)
    evaluator = LightningEvaluator(pl_trainer, DigitsDataModule())
    model = SimpleLightningModel()
    weight = model.model.conv1.weight.detach().clone()
    quantizer = PtqQuantizer(model, CONFIGURE_LIST, evaluator)

    _, calibration_config = quantizer.compress(None, 1)  # the epoch limit given replaces the Trainer's 3
    assert pl_trainer.global_step == BATCHES_PER_EPOCH
    assert pl_trainer.max_epochs == 3
    assert not torch.equal(model.model.conv1.weight, weight)  # PTQ's loop trained the model, as in NNI
    check_calibration_config(calibration_config)
    score, results = evaluator.evaluate()
    assert score == pytest.approx(results[0]["default"])


@pytest.mark.parametrize(
    ("trainer_limits", "budget", "steps"),
    [
        ({}, (3, None), 3),
        ({}, (None, 1), BATCHES_PER_EPOCH),
        ({"max_epochs": 1}, (10, None), BATCHES_PER_EPOCH),
        ({"max_steps": 20, "max_epochs": 1}, (None, 2), 2 * BATCHES_PER_EPOCH),
        ({"max_epochs": 4}, (3, 1), 3),
    ],
    ids=["steps", "epochs", "trainer-epochs-stay", "compress-epochs-replace", "both"],
)
def test_compress_limits_replace_the_trainers_and_the_rest_stay(trainer_limits, budget, steps):
    torch.manual_seed(0)
    pl_trainer = make_trainer(**trainer_limits)
    own = (pl_trainer.max_steps, pl_trainer.max_epochs)
    quantizer = QATQuantizer(SimpleLightningModel(), CONFIGURE_LIST, LightningEvaluator(pl_trainer, DigitsDataModule()))
    quantizer.compress(*budget)
    assert quantizer.current_step == steps
    assert pl_trainer.global_step == steps
    assert (pl_trainer.max_steps, pl_trainer.max_epochs) == own


class TwoTestSetsModel(SimpleLightningModel):
    def test_step(self, batch, batch_idx, dataloader_idx=0):
        x, y = batch
        acc = (torch.argmax(self(x), dim=1) == y).float().mean()
        self.log("default", acc)  # Lightning names it default/dataloader_idx_N


class TwoTestSets(DigitsDataModule):
    def test_dataloader(self):
        half = len(self.digits_test) // 2
        first = TensorDataset(*self.digits_test[:half])
        second = TensorDataset(*self.digits_test[half:])
        return [DataLoader(first, batch_size=len(first)), DataLoader(second, batch_size=len(second))]


class NoDefaultModel(SimpleLightningModel):
    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", F.nll_loss(self(x), y))


def test_evaluate_averages_default_over_the_test_dataloaders_or_gives_none():
    torch.manual_seed(0)
    model = TwoTestSetsModel()
    evaluator = LightningEvaluator(make_trainer(max_steps=2), TwoTestSets())
    QATQuantizer(model, CONFIGURE_LIST, evaluator).compress(2, None)
    score, results = evaluator.evaluate()
    assert [list(result) for result in results] == [["default/dataloader_idx_0"], ["default/dataloader_idx_1"]]
    # NNI's docstring: the mean of the test dataloaders' 'default' metrics
    assert score == pytest.approx((results[0]["default/dataloader_idx_0"] + results[1]["default/dataloader_idx_1"]) / 2)

    model = NoDefaultModel()
    evaluator = LightningEvaluator(make_trainer(max_steps=2), DigitsDataModule())
    QATQuantizer(model, CONFIGURE_LIST, evaluator).compress(2, None)
    with pytest.warns(UserWarning, match="default"):
        score, results = evaluator.evaluate()
    assert score is None
    assert len(results) == 1 and "test_loss" in results[0]
