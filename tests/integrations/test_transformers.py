"""Hugging Face Transformers integration: TransformersEvaluator and QuantizationTrainerCallback on a tiny random BERT."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers", reason="the Transformers integration needs transformers")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")

import quantrain  # noqa: E402
from quantrain.integrations import transformers as integration  # noqa: E402
from quantrain.integrations.transformers import QuantizationTrainerCallback, TransformersEvaluator  # noqa: E402

CONFIG_LIST = [
    {"op_types": ["Linear"], "target_names": ["_input_", "weight", "_output_"], "quant_dtype": "int8", "quant_scheme": "affine"}
]
SEQ_LEN = 12
VOCAB = 100


def tiny_bert() -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=2,
    )
    return transformers.BertForSequenceClassification(config)


def token_dataset(size: int = 16) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(size)
    return [
        {
            "input_ids": torch.randint(1, VOCAB, (SEQ_LEN,), generator=generator),
            "attention_mask": torch.ones(SEQ_LEN, dtype=torch.long),
            "labels": torch.tensor(i % 2),
        }
        for i in range(size)
    ]


def training_args(tmp_path, **overrides) -> transformers.TrainingArguments:
    settings = {
        "output_dir": str(tmp_path),
        "report_to": [],
        "save_strategy": "no",
        "logging_strategy": "no",
        "eval_strategy": "no",
        "use_cpu": True,
        "disable_tqdm": True,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 8,
        "dataloader_num_workers": 0,
        "learning_rate": 1e-3,
        "optim": "sgd",  # cheaper to start than fused AdamW on CPU
        **overrides,
    }
    return transformers.TrainingArguments(**settings)


def make_trainer(tmp_path, model: nn.Module, train_size: int = 16, **overrides) -> transformers.Trainer:
    data = token_dataset(train_size)
    return transformers.Trainer(model=model, args=training_args(tmp_path, **overrides), train_dataset=data, eval_dataset=data[:8])


def linear_names(model: nn.Module) -> set[str]:
    return {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}


def logits(model: nn.Module, batch: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(
            input_ids=torch.stack([b["input_ids"] for b in batch]),
            attention_mask=torch.stack([b["attention_mask"] for b in batch]),
        ).logits


class CountForwards:
    """Counts the model's training-mode forwards (micro-batches)."""

    def __init__(self, model: nn.Module) -> None:
        self.count = 0
        model.register_forward_pre_hook(self)

    def __call__(self, module: nn.Module, args: object) -> None:
        if module.training:
            self.count += 1


class StepProbe(transformers.TrainerCallback):
    """Records (global_step, quantizer step) right after each optimizer step."""

    def __init__(self, quantizer: quantrain.QATQuantizer) -> None:
        self.quantizer = quantizer
        self.seen: list[tuple[int, int]] = []

    def on_optimizer_step(self, args, state, control, **kwargs) -> None:
        self.seen.append((state.global_step, self.quantizer.current_step))


# ---- TransformersEvaluator -----------------------------------------------------------------------------------


def test_compress_quantizes_and_trains_every_linear(tmp_path):
    model = tiny_bert()
    names = linear_names(model)
    assert len(names) == 14  # 6 per layer, the pooler and the classifier
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = make_trainer(tmp_path, model)
    quantizer = quantrain.QATQuantizer(model, CONFIG_LIST, evaluator=TransformersEvaluator(trainer))

    returned, calibration = quantizer.compress(max_steps=3)

    assert returned is model
    assert quantizer.current_step == 3
    assert trainer.state.global_step == 3
    assert set(calibration) == names
    assert all(set(targets) == {"_input_0", "weight", "_output_0"} for targets in calibration.values())
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])
    assert any(not torch.equal(before[name], p) for name, p in model.named_parameters())

    batch = token_dataset(4)
    quantized = logits(model, batch)
    assert torch.isfinite(quantized).all()
    float_logits = logits(quantizer.unwrap_model(), batch)
    assert not torch.allclose(quantized, float_logits, atol=1e-6)  # fake quantization was active
    assert torch.allclose(quantized, float_logits, atol=0.5)  # ... and only perturbed the output


def test_repeated_compress_continues_and_restores_args(tmp_path):
    model = tiny_bert()
    trainer = make_trainer(tmp_path, model, train_size=8, num_train_epochs=7)  # batch 4: 2 steps an epoch
    quantizer = quantrain.QATQuantizer(model, CONFIG_LIST, evaluator=TransformersEvaluator(trainer))

    quantizer.compress(max_epochs=1)
    assert quantizer.current_step == 2
    optimizer = trainer.optimizer.optimizer
    assert isinstance(optimizer, torch.optim.Optimizer)
    assert quantizer.evaluator.first_optimizer is optimizer
    quantizer.compress(max_steps=3, max_epochs=1)  # as in NNI and the Trainer: a positive max_steps wins

    assert quantizer.current_step == 5
    assert trainer.state.global_step == 3  # each compress() is a new trainer.train() run
    assert trainer.optimizer.optimizer is optimizer  # the optimizer (and its state) carries over
    assert trainer.args.max_steps == -1
    assert trainer.args.num_train_epochs == 7
    assert not any(isinstance(cb, QuantizationTrainerCallback) for cb in trainer.callback_handler.callbacks)


# Steps one compress() trains, by NNI's rule (args.max_steps / num_train_epochs set where compress gives them, the
# arguments' own otherwise; the Trainer lets a positive max_steps override the epochs). 16 samples, batch 4: 4 steps
# an epoch; TrainingArguments' own default is 3 epochs. Columns: own arguments; compress (max_steps, max_epochs); steps.
BUDGETS = [
    ({}, (5, None), 5),
    ({}, (None, 1), 4),
    ({}, (None, 2), 8),
    ({}, (6, 1), 6),
    ({"max_steps": 3}, (None, 1), 3),
    ({"max_steps": 3}, (None, 2), 3),
    ({"max_steps": 3}, (5, None), 5),
    ({"num_train_epochs": 2}, (None, 1), 4),
    ({"num_train_epochs": 2}, (6, None), 6),
    ({"max_steps": 3, "num_train_epochs": 2}, (None, 1), 3),
    ({"max_steps": 3, "num_train_epochs": 2}, (2, 1), 2),
]


@pytest.mark.parametrize("own, budget, steps", BUDGETS)
def test_each_compress_trains_the_steps_nni_would(tmp_path, own, budget, steps):
    model = tiny_bert()
    trainer = make_trainer(tmp_path, model, **own)
    saved = trainer.args.max_steps, trainer.args.num_train_epochs
    quantizer = quantrain.QATQuantizer(model, CONFIG_LIST, evaluator=TransformersEvaluator(trainer))
    quantizer.compress(*budget)
    assert quantizer.current_step == trainer.state.global_step == steps
    assert (trainer.args.max_steps, trainer.args.num_train_epochs) == saved


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    model = tiny_bert()
    trainer = make_trainer(tmp_path, model, gradient_accumulation_steps=2)
    quantizer = quantrain.QATQuantizer(model, CONFIG_LIST, evaluator=TransformersEvaluator(trainer))
    forwards = CountForwards(model)

    quantizer.compress(max_steps=3)

    assert forwards.count == 6  # micro-batches
    assert trainer.state.global_step == 3
    assert quantizer.current_step == trainer.state.global_step


def test_evaluate_returns_nni_metric_and_metrics(tmp_path):
    model = tiny_bert()
    trainer = make_trainer(tmp_path, model)
    evaluator = TransformersEvaluator(trainer, dummy_input=token_dataset(1)[0]["input_ids"][None])
    quantrain.QATQuantizer(model, CONFIG_LIST, evaluator=evaluator)

    with pytest.warns(UserWarning, match="no 'default'"):
        metric, metrics = evaluator.evaluate()  # only a loss: no metric to report, as in NNI
    assert metric is None and math.isfinite(metrics["eval_loss"])

    trainer.compute_metrics = lambda p: {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())}
    trainer.args.metric_for_best_model = "accuracy"
    metric, metrics = evaluator.evaluate()
    assert metric == metrics["eval_accuracy"] and 0.0 <= metric <= 1.0

    trainer.compute_metrics = lambda p: {"default": 0.25, "accuracy": 0.5}  # the Trainer reports it as eval_default
    metric, metrics = evaluator.evaluate()
    assert metric == metrics["eval_default"] == 0.25

    trainer.compute_metrics = None
    with pytest.warns(UserWarning, match="metric_for_best_model 'eval_accuracy' is not among the metrics"):
        metric, metrics = evaluator.evaluate()
    assert metric is None and "eval_loss" in metrics
    assert evaluator.get_dummy_input() is evaluator.dummy_input


def test_evaluator_argument_errors(tmp_path):
    with pytest.raises(TypeError, match=r"TransformersEvaluator: trainer must be a transformers\.Trainer, got Module"):
        TransformersEvaluator(nn.Module())

    model = tiny_bert()
    trainer = make_trainer(tmp_path, tiny_bert())
    with pytest.raises(ValueError, match=r"TransformersEvaluator: trainer\.model is not the model being quantized"):
        quantrain.QATQuantizer(model, CONFIG_LIST, evaluator=TransformersEvaluator(trainer))
    assert not hasattr(model, "quantrain_step")  # the model was left alone

    evaluator = TransformersEvaluator(make_trainer(tmp_path, model))
    with pytest.raises(RuntimeError, match="no model bound"):
        evaluator.train(max_steps=1)
    quantrain.QATQuantizer(model, CONFIG_LIST, evaluator=evaluator)
    with pytest.raises(ValueError, match="max_steps or max_epochs"):
        evaluator.train()
    with pytest.raises(ValueError, match="max_epochs must be a positive int"):
        evaluator.train(max_epochs=0)
    evaluator.trainer.eval_dataset = None
    with pytest.raises(ValueError, match="needs the trainer to have an eval_dataset"):
        evaluator.evaluate()


def test_submodule_of_trainer_model_can_be_quantized(tmp_path):
    model = tiny_bert()
    trainer = make_trainer(tmp_path, model)
    quantizer = quantrain.QATQuantizer(model.bert.encoder, CONFIG_LIST, evaluator=TransformersEvaluator(trainer))
    quantizer.compress(max_steps=2)
    assert quantizer.current_step == 2
    assert len(quantizer.get_calibration_config()) == 12


# ---- QuantizationTrainerCallback ------------------------------------------------------------------------------


def test_callback_counts_the_trainers_optimizer_steps(tmp_path):
    model = tiny_bert()
    quantizer = quantrain.QATQuantizer(model, CONFIG_LIST)
    # A decoy optimizer steps first, so the quantizer counts its steps until the callback attaches the Trainer's.
    decoy = torch.optim.SGD(model.parameters(), lr=0.0)
    decoy.step()
    assert quantizer.current_step == 1
    callback = QuantizationTrainerCallback(quantizer)
    trainer = transformers.Trainer(
        model=model,
        args=training_args(tmp_path, max_steps=3, gradient_accumulation_steps=2),
        train_dataset=token_dataset(),
        callbacks=[callback],
    )
    assert isinstance(callback, transformers.TrainerCallback)
    forwards = CountForwards(model)
    probe = StepProbe(quantizer)
    trainer.add_callback(probe)

    trainer.train()
    assert forwards.count == 6
    assert trainer.state.global_step == 3
    assert quantizer.current_step == 1 + 3
    # Counted by the optimizer step itself, before the Trainer's global_step moves on.
    assert probe.seen == [(0, 2), (1, 3), (2, 4)]

    trainer.train()  # a second run counts on
    assert quantizer.current_step == 1 + 3 + 3
    decoy.step()  # no longer counted
    assert quantizer.current_step == 7
    assert set(quantizer.get_calibration_config()) == linear_names(model)


def test_callback_follows_global_step_when_an_optimizer_step_is_skipped():
    model = tiny_bert()
    quantizer = quantrain.QATQuantizer(model, CONFIG_LIST)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    callback = QuantizationTrainerCallback(quantizer)
    state = SimpleNamespace(global_step=5)  # e.g. resumed from a checkpoint
    callback.on_train_begin(None, state, None, model=model, optimizer=SimpleNamespace(optimizer=optimizer))

    optimizer.step()
    state.global_step += 1
    callback.on_step_end(None, state, None)
    assert quantizer.current_step == 1
    state.global_step += 1  # mixed precision skipped this optimizer step; the Trainer still counts it
    callback.on_step_end(None, state, None)
    assert quantizer.current_step == 2

    optimizer.step()
    optimizer.step()
    state.global_step += 1
    with pytest.warns(UserWarning, match="1 more optimizer steps than the Trainer made"):
        callback.on_step_end(None, state, None)
    assert quantizer.current_step == 4


def test_callback_errors(tmp_path):
    with pytest.raises(TypeError, match="QuantizationTrainerCallback: quantizer must be a quantrain quantizer, got Module"):
        QuantizationTrainerCallback(nn.Module())

    model = tiny_bert()
    quantizer = quantrain.QATQuantizer(model, CONFIG_LIST)
    trainer = transformers.Trainer(
        model=tiny_bert(),
        args=training_args(tmp_path, max_steps=1),
        train_dataset=token_dataset(),
        callbacks=[QuantizationTrainerCallback(quantizer)],
    )
    with pytest.raises(ValueError, match="the Trainer's model is not the quantizer's model"):
        trainer.train()


# ---- packaging ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_import_quantrain_does_not_import_transformers():
    code = (
        "import sys, quantrain, quantrain.integrations.transformers\n"
        "assert 'transformers' not in sys.modules, 'transformers was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_missing_transformers_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"pip install 'quantrain\[transformers\]'"):
        TransformersEvaluator(object())
    with pytest.raises(AttributeError):
        integration.NoSuchName  # noqa: B018
