"""PyTorch Lightning: LightningEvaluator (NNI's calling convention) and QuantizationCallback (a user-driven Trainer)."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lightning", reason="the PyTorch Lightning integration needs lightning (pip install 'quantrain[lightning]')")

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from quantrain import QATQuantizer
from quantrain.integrations import lightning as integration
from quantrain.integrations.lightning import LightningEvaluator, QuantizationCallback

SCRIPT = Path(__file__).with_name("lightning_ddp_script.py")
CONFIG = [
    {"op_types": ["Linear"], "target_names": ["_input_", "weight", "_output_"], "quant_dtype": "int8", "quant_scheme": "affine"}
]
TARGETS = {"_input_0", "weight", "_output_0"}
BATCHES_PER_EPOCH = 8


class Classifier(pl.LightningModule):
    """Linear-ReLU-Linear; validation logs the accuracy under each of ``val_metrics`` (and the loss as 'loss')."""

    def __init__(self, val_metrics: tuple[str, ...] = ("default",)) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        self.val_metrics = val_metrics
        self.batches_seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.batches_seen += 1
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        for name in self.val_metrics:
            value = F.cross_entropy(logits, y) if name == "loss" else (logits.argmax(1) == y).float().mean()
            self.log(name, value)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class WithTestStep(Classifier):
    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.log("default", 0.25)


def _dataset(n: int = BATCHES_PER_EPOCH * 8, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return TensorDataset(x, (x.sum(1) > 0).long() + (x[:, 0] > 1).long())


class Data(pl.LightningDataModule):
    def __init__(self) -> None:
        super().__init__()
        self.train_set, self.val_set = _dataset(seed=0), _dataset(seed=1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=8)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=8)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=8)


def make_trainer(**kwargs) -> pl.Trainer:
    quiet = {"enable_progress_bar": False, "logger": False, "enable_checkpointing": False, "enable_model_summary": False}
    return pl.Trainer(accelerator="cpu", num_sanity_val_steps=0, **quiet, **kwargs)


def float_forward(model: Classifier, x: torch.Tensor) -> torch.Tensor:
    """The model's float computation, from its (unchanged) Parameters."""
    first, last = model.net[0], model.net[2]
    return F.linear(F.relu(F.linear(x, first.weight, first.bias)), last.weight, last.bias)


def accuracy(model: nn.Module, dataset: TensorDataset) -> float:
    model.eval()
    with torch.no_grad():
        x, y = dataset.tensors
        return (model(x).argmax(1) == y).float().mean().item()


# ---- LightningEvaluator ------------------------------------------------------------------------------------------


def test_compress_trains_through_the_trainer_and_continues():
    model, data = Classifier(), Data()
    trainer = make_trainer(max_epochs=3)
    evaluator = LightningEvaluator(trainer, data)
    weight = model.net[0].weight.detach().clone()
    quantizer = QATQuantizer(model, CONFIG, evaluator)

    returned, config = quantizer.compress(max_steps=5)
    assert returned is model
    assert quantizer.current_step == trainer.global_step == 5 and model.batches_seen == 5
    assert set(config) == {"net.0", "net.2"} and all(set(targets) == TARGETS for targets in config.values())
    assert not torch.equal(model.net[0].weight, weight)
    assert (trainer.max_steps, trainer.max_epochs) == (-1, 3)  # the trainer's own limits are back
    assert not any(isinstance(c, QuantizationCallback) for c in trainer.callbacks)

    stale = evaluator.first_optimizer  # kept alive: each fit must count the optimizer it builds, not this one
    quantizer.compress(max_epochs=1)  # a fresh epoch (Lightning ends the stopped one), with a new optimizer
    assert quantizer.current_step == trainer.global_step == 5 + BATCHES_PER_EPOCH
    quantizer.compress(max_steps=3)
    assert quantizer.current_step == trainer.global_step == 16
    assert evaluator.first_optimizer is trainer.optimizers[0] and evaluator.first_optimizer is not stale

    score, results = evaluator.evaluate()
    assert [set(result) for result in results] == [{"default"}]
    assert score == pytest.approx(accuracy(model, data.val_set)) == pytest.approx(results[0]["default"])


# Steps one compress() trains, by NNI's rule (a fresh trainer per call: a compress limit replaces the trainer's, a
# limit not given keeps the trainer's own; Lightning's default is 1000 epochs when neither limit is set). Epochs
# have 8 batches. Columns: the trainer's own (max_steps, max_epochs); compress's (max_steps, max_epochs); steps.
BUDGETS = [
    ({}, (5, None), 5),
    ({}, (None, 1), 8),
    ({}, (None, 2), 16),
    ({}, (5, 1), 5),
    ({}, (12, 1), 8),
    ({"max_steps": 5}, (3, None), 3),
    ({"max_steps": 5}, (20, None), 20),
    ({"max_steps": 5}, (None, 1), 5),
    ({"max_steps": 5}, (None, 2), 5),
    ({"max_steps": 5}, (12, 1), 8),
    ({"max_steps": 12}, (None, 1), 8),
    ({"max_epochs": 2}, (5, None), 5),
    ({"max_epochs": 2}, (20, None), 16),
    ({"max_epochs": 2}, (None, 1), 8),
    ({"max_epochs": 2}, (12, 1), 8),
    ({"max_steps": 5, "max_epochs": 2}, (12, None), 12),
    ({"max_steps": 5, "max_epochs": 2}, (None, 1), 5),
    ({"max_steps": 20, "max_epochs": 2}, (None, 1), 8),
    ({"max_steps": 20, "max_epochs": 1}, (30, None), 8),
    ({"max_steps": 5, "max_epochs": 2}, (3, 1), 3),
]


@pytest.mark.parametrize("own, budget, steps", BUDGETS)
def test_each_compress_trains_the_steps_nni_would(own, budget, steps):
    model = Classifier()
    trainer = make_trainer(**own)
    quantizer = QATQuantizer(model, CONFIG, LightningEvaluator(trainer, Data()))
    quantizer.compress(*budget)
    assert quantizer.current_step == trainer.global_step == model.batches_seen == steps
    loop = trainer.fit_loop
    assert (loop.epoch_loop.max_steps, loop.max_epochs) == (own.get("max_steps", -1), own.get("max_epochs"))
    quantizer.compress(*budget)  # the same budget again: NNI's fresh trainer trains as many steps again
    assert quantizer.current_step == trainer.global_step == 2 * steps


def test_no_sanity_validation_runs_before_the_fit_as_in_nni():
    model = Classifier()
    validated = []
    model.validation_step = lambda batch, batch_idx: validated.append(batch_idx)
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_val_batches=2,
        check_val_every_n_epoch=100,
    )
    assert trainer.num_sanity_val_steps == 2
    QATQuantizer(model, CONFIG, LightningEvaluator(trainer, Data())).compress(3, None)
    assert validated == [] and trainer.num_sanity_val_steps == 2


def test_fake_quantization_starts_at_quant_start_step():
    model = Classifier()
    quantizer = QATQuantizer(model, CONFIG, LightningEvaluator(make_trainer(), Data()), quant_start_step=4)
    x = torch.randn(16, 4)

    quantizer.compress(max_steps=3)
    assert quantizer.current_step == 3
    assert not any(fq.fake_quant_enabled.item() for fq in quantizer.fake_quantizers())
    model.eval()
    assert torch.equal(model(x), float_forward(model, x))

    assert quantizer.get_calibration_config() == {}  # ranges tracked, no scales yet
    model.train()  # Lightning keeps the modes it finds at the start of a fit

    quantizer.compress(max_steps=2)  # step 4 on: the training forward computes scales and fake-quantizes
    assert quantizer.current_step == 5
    assert all(fq.fake_quant_enabled.item() and fq.calibrated.item() for fq in quantizer.fake_quantizers())
    model.eval()
    assert not torch.allclose(model(x), float_forward(model, x), atol=1e-4)


@pytest.mark.parametrize("val_metrics", [("loss", "default"), ("default",)])
def test_evaluate_returns_nni_metric_and_results(val_metrics):
    model, data = Classifier(val_metrics), Data()
    evaluator = LightningEvaluator(make_trainer(), data)
    evaluator.bind_model(model)
    score, results = evaluator.evaluate()
    assert score == pytest.approx(accuracy(model, data.val_set))
    assert len(results) == 1 and set(results[0]) == set(val_metrics)


def test_evaluate_without_a_default_metric_warns_and_returns_none_as_nni():
    model, data = Classifier(("acc", "loss")), Data()
    evaluator = LightningEvaluator(make_trainer(), data)
    evaluator.bind_model(model)
    with pytest.warns(UserWarning, match="trainer.validate logged no 'default' metric"):
        score, results = evaluator.evaluate()
    assert score is None and set(results[0]) == {"acc", "loss"}


def test_get_dummy_input_falls_back_to_the_first_training_batch_as_nni():
    data = Data()
    x, y = LightningEvaluator(make_trainer(), data).get_dummy_input()
    assert torch.equal(x, data.train_set.tensors[0][:8]) and torch.equal(y, data.train_set.tensors[1][:8])
    dummy = torch.zeros(1, 4)
    assert LightningEvaluator(make_trainer(), data, dummy_input=dummy).get_dummy_input() is dummy


def test_evaluate_tests_when_the_model_defines_test_step():
    evaluator = LightningEvaluator(make_trainer(), Data())
    evaluator.bind_model(WithTestStep())
    assert evaluator.evaluate() == (0.25, [{"default": 0.25}])


def test_accepts_the_standalone_pytorch_lightning_package():
    ptl = pytest.importorskip("pytorch_lightning")

    class Module(ptl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.fc(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class PtlData(ptl.LightningDataModule):
        def train_dataloader(self):
            return DataLoader(_dataset(), batch_size=8)

    quiet = {"enable_progress_bar": False, "logger": False, "enable_checkpointing": False, "enable_model_summary": False}
    trainer = ptl.Trainer(accelerator="cpu", **quiet)
    model = Module()
    quantizer = QATQuantizer(model, [{"op_types": ["Linear"]}], LightningEvaluator(trainer, PtlData()))
    quantizer.compress(max_steps=2)
    assert quantizer.current_step == trainer.global_step == 2
    with pytest.raises(TypeError, match=r"data_module must be a lightning\.pytorch\.LightningDataModule"):
        LightningEvaluator(make_trainer(), PtlData())  # the two packages' classes do not mix


# ---- QuantizationCallback ----------------------------------------------------------------------------------------


def test_callback_counts_optimizer_steps_with_gradient_accumulation():
    module = Classifier()
    quantizer = QATQuantizer(module.net, CONFIG)  # the LightningModule contains the quantized model
    trainer = make_trainer(max_steps=6, accumulate_grad_batches=2, callbacks=[QuantizationCallback(quantizer)])
    trainer.fit(module, datamodule=Data())
    assert module.batches_seen == 12
    assert quantizer.current_step == trainer.global_step == 6
    assert trainer.callback_metrics["quantrain/step"].item() == 6


def test_each_fit_counts_the_optimizer_it_builds():
    model = Classifier()
    quantizer = QATQuantizer(model, CONFIG, quant_start_step=5)
    first = make_trainer(max_steps=3, callbacks=[QuantizationCallback(quantizer)])
    first.fit(model, datamodule=Data())
    # `first` still holds its optimizer, which quantrain counted; the callback switches to the new one.
    second = make_trainer(max_steps=4, callbacks=[QuantizationCallback(quantizer, log_step=False)])
    second.fit(model, datamodule=Data())
    assert first.optimizers[0] is not second.optimizers[0]
    assert quantizer.current_step == 3 + 4
    assert all(fq.fake_quant_enabled.item() for fq in quantizer.fake_quantizers())
    assert "quantrain/step" not in second.callback_metrics


def test_callback_refuses_a_model_it_does_not_quantize():
    quantizer = QATQuantizer(Classifier(), CONFIG)
    trainer = make_trainer(max_steps=1, callbacks=[QuantizationCallback(quantizer)])
    with pytest.raises(ValueError, match=r"model being fit \(Classifier\) is not, and does not contain, the quantizer's model"):
        trainer.fit(Classifier(), datamodule=Data())
    assert quantizer.current_step == 0


def test_a_pickled_callback_refuses_to_run():
    """What ddp_spawn's workers get: a copy of the callback without the quantizer, which stops the fit clearly."""
    model = Classifier()
    callback = QuantizationCallback(QATQuantizer(model, CONFIG))
    copy = pickle_roundtrip(callback)
    assert type(copy) is QuantizationCallback and copy.quantizer is None and copy.log_step is True
    with pytest.raises(RuntimeError, match="strategy='ddp'"):
        make_trainer(max_steps=1, callbacks=[copy]).fit(model, datamodule=Data())


def pickle_roundtrip(obj):
    return pickle.loads(pickle.dumps(obj))


# ---- argument errors ---------------------------------------------------------------------------------------------


def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match=r"LightningEvaluator: trainer must be a lightning\.pytorch\.Trainer, got str"):
        LightningEvaluator("trainer", Data())
    with pytest.raises(TypeError, match=r"LightningEvaluator: data_module must be a lightning\.pytorch\.LightningDataModule"):
        LightningEvaluator(make_trainer(), DataLoader(_dataset()))
    plain = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(TypeError, match=r"LightningEvaluator: model must be a lightning\.pytorch\.LightningModule"):
        QATQuantizer(plain, CONFIG, LightningEvaluator(make_trainer(), Data()))
    assert not hasattr(plain, "quantrain_step")  # refused before the model was touched
    with pytest.raises(RuntimeError, match="no model bound"):
        LightningEvaluator(make_trainer(), Data()).train(max_steps=1)
    with pytest.raises(TypeError, match="QuantizationCallback: quantizer must be a quantrain quantizer"):
        QuantizationCallback(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="log_step must be True or False"):
        QuantizationCallback(QATQuantizer(Classifier(), CONFIG), log_step=1)


def test_missing_lightning_asks_for_the_extra(monkeypatch):
    for name in integration.PACKAGES:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"pip install 'quantrain\[lightning\]'"):
        LightningEvaluator(object(), object())
    with pytest.raises(ImportError, match=r"pip install 'quantrain\[lightning\]'"):
        _ = integration.QuantizationCallback


@pytest.mark.slow
def test_importing_quantrain_does_not_import_lightning():
    code = (
        "import sys, quantrain, quantrain.integrations.lightning\n"
        "print(sorted(m for m in sys.modules if 'lightning' in m and not m.startswith('quantrain')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "[]"


# ---- DDP ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_ddp_ranks_count_their_steps_and_agree_on_calibration(tmp_path):
    """Lightning's ddp strategy on 2 CPU processes (gloo): the script re-launches itself for rank 1."""
    launched = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR")  # as if started by hand
    env = {k: v for k, v in os.environ.items() if k not in launched}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    steps = 6  # lightning_ddp_script.STEPS
    for rank in ranks:
        assert rank["world_size"] == 2
        assert rank["current_step"] == rank["global_step"] == steps
    assert torch.equal(ranks[0]["weight"], ranks[1]["weight"])  # DDP kept the weights in step
    first, second = ranks[0]["calibration_config"], ranks[1]["calibration_config"]
    assert set(first) == set(second) == {"net.0", "net.2"}
    for module, targets in first.items():
        assert set(targets) == set(second[module]) == TARGETS
        for target, entry in targets.items():
            for key in ("scale", "zero_point", "tracked_min", "tracked_max"):
                assert torch.equal(entry[key], second[module][target][key]), f"{module}.{target}: {key} differs between ranks"
