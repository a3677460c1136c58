"""TransformersEvaluator as NNI 3.0's evaluator page and BERT tutorials use it: ``TransformersEvaluator(trainer)``.

A tiny BERT built from ``transformers.BertConfig`` with random weights (nothing downloaded), a ``transformers.Trainer``
with ``TrainingArguments``, and NNI's budget rule: ``compress`` sets ``args.max_steps`` / ``args.num_train_epochs``
where it gives them and leaves the arguments' own values otherwise, a positive ``max_steps`` overriding the epochs.
``evaluate()`` returns ``(metric or None, metrics)``.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers", reason="TransformersEvaluator needs transformers")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from nni_style_common import check_entry  # noqa: E402
from torch import nn  # noqa: E402

from quantrain import QATQuantizer  # noqa: E402
from quantrain.integrations.transformers import TransformersEvaluator  # noqa: E402

VOCAB, SEQ_LEN, TRAIN_SIZE, BATCH = 50, 8, 16, 4
CONFIG_LIST = [
    {"op_types": ["Linear"], "target_names": ["_input_", "weight", "_output_"], "quant_dtype": "int8", "quant_scheme": "affine"}
]


def tiny_bert() -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=2,
    )
    return transformers.BertForSequenceClassification(config)


def token_dataset(size: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(size)
    return [
        {
            "input_ids": torch.randint(1, VOCAB, (SEQ_LEN,), generator=generator),
            "attention_mask": torch.ones(SEQ_LEN, dtype=torch.long),
            "labels": torch.tensor(i % 2),
        }
        for i in range(size)
    ]


def compute_metrics(eval_prediction) -> dict[str, float]:
    predictions = np.argmax(eval_prediction.predictions, axis=-1)
    return {"default": float((predictions == eval_prediction.label_ids).mean())}


def make_trainer(tmp_path, model, with_metrics=True, **arguments) -> transformers.Trainer:
    training_args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        eval_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        per_device_train_batch_size=BATCH,
        per_device_eval_batch_size=8,
        dataloader_num_workers=0,
        learning_rate=1e-3,
        optim="sgd",
        **arguments,
    )
    data = token_dataset(TRAIN_SIZE)
    return transformers.Trainer(
        model=model,
        args=training_args,
        train_dataset=data,
        eval_dataset=data[:8],
        compute_metrics=compute_metrics if with_metrics else None,
    )


def linear_names(model: nn.Module) -> set[str]:
    return {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}


def test_training_arguments_max_steps_override_the_epochs_compress_gives(tmp_path):
    torch.manual_seed(0)
    model = tiny_bert()
    trainer = make_trainer(tmp_path, model, max_steps=3)
    evaluator = TransformersEvaluator(trainer)
    quantizer = QATQuantizer(model, CONFIG_LIST, evaluator)

    _, calibration_config = quantizer.compress(None, 1)  # one epoch is 4 steps; the arguments' max_steps=3 wins
    assert trainer.state.global_step == 3
    assert quantizer.current_step == 3
    assert (trainer.args.max_steps, trainer.args.num_train_epochs) == (3, 3.0)  # the user's arguments are restored

    _, calibration_config = quantizer.compress(2, None)
    assert trainer.state.global_step == 2  # a new trainer.train() run...
    assert quantizer.current_step == 5  # ...while the quantizer's count goes on
    assert set(calibration_config) == linear_names(model)
    for targets in calibration_config.values():
        assert set(targets) == {"_input_0", "weight", "_output_0"}
        for entry in targets.values():
            check_entry(entry, shape=())

    metric, metrics = evaluator.evaluate()
    assert isinstance(metrics, dict) and "eval_loss" in metrics
    assert metric == metrics["eval_default"]  # the Trainer prefixes compute_metrics' 'default' with 'eval_'
    assert 0.0 <= metric <= 1.0


def test_compress_epochs_apply_when_the_arguments_give_no_max_steps(tmp_path, recwarn):
    torch.manual_seed(0)
    model = tiny_bert()
    trainer = make_trainer(tmp_path, model, with_metrics=False, num_train_epochs=1)
    evaluator = TransformersEvaluator(trainer)
    quantizer = QATQuantizer(model, CONFIG_LIST, evaluator)

    quantizer.compress(None, 2)
    assert trainer.state.global_step == 2 * TRAIN_SIZE // BATCH
    assert quantizer.current_step == 2 * TRAIN_SIZE // BATCH
    assert trainer.args.num_train_epochs == 1

    metric, metrics = evaluator.evaluate()
    assert metric is None  # no 'default' metric: NNI's (None, metrics)
    assert "eval_loss" in metrics
    assert any("default" in str(w.message) for w in recwarn.list)
