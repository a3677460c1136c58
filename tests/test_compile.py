"""torch.compile (CPU, inductor): a freshly prepared model trains and infers as it does eagerly, compiling one graph
per schedule phase, with no graph break.

Equality is checked to atol 1e-5 rather than bit for bit: inductor may fuse and reorder float operations (a
reduction's summation order, a division folded into a neighbouring kernel), and one rounding difference can move a
value across a quantization step. On these models the results are in practice exact or within a few ulps.

Folded BatchNorms are frozen (``freeze_bn_step=0``) in most compiled-training tests, so the whole model is one graph;
while a folded BN is live its layer runs eagerly inside the compiled model (see the last test).
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

from quantrain import QATQuantizer
from quantrain.config.presets import deployable_config_list

pytestmark = [
    pytest.mark.slow,  # each test compiles graphs
    pytest.mark.skipif(
        not any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if c),
        reason="torch.compile's inductor backend needs a C++ compiler on CPU",
    ),
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),  # torch's own
]

BATCH, STEPS = 8, 4
ATOL = 1e-5  # not 0: inductor may reorder float operations (see the module docstring)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 3, 6, 6, generator=gen), torch.randint(0, 5, (BATCH,), generator=gen)) for _ in range(n)]


def _train(backend: str | None, steps: int = STEPS, config_list=None, **options):
    """Prepare a fresh model, compile it (unless ``backend`` is None) and train it; return the model, its quantizer,
    the losses and the number of graphs compiled after each step."""
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    options = {"fuse": "auto", "freeze_bn_step": 0, "example_inputs": torch.zeros(1, 3, 6, 6), **options}
    quantizer = QATQuantizer(model, config_list or deployable_config_list(8, 8), **options)
    forward = model if backend is None else torch.compile(model, backend=backend)
    losses, graphs = [], []
    for x, y in _batches(steps):
        optimizer.zero_grad()
        loss = F.cross_entropy(forward(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
        graphs.append(counters["stats"]["unique_graphs"])
    return model, quantizer, torch.stack(losses), graphs


def _assert_same_training(eager, compiled) -> None:
    (eager_model, eager_q, eager_losses, _), (model, quantizer, losses, _) = eager, compiled
    torch.testing.assert_close(losses, eager_losses, atol=ATOL, rtol=0)
    expected, actual = eager_model.state_dict(), model.state_dict()
    assert list(actual) == list(expected)
    for key, value in expected.items():
        assert actual[key].shape == value.shape, key
        if value.is_floating_point():  # parameters, BN statistics, tracked ranges, scales, zero points
            torch.testing.assert_close(actual[key], value, atol=ATOL, rtol=0, msg=key)
        else:  # step counter, BN batch count, seeded / calibrated / enable flags
            assert torch.equal(actual[key], value), key
    assert quantizer.current_step == eager_q.current_step
    expected_config, config = eager_q.get_calibration_config(), quantizer.get_calibration_config()
    assert {m: sorted(t) for m, t in config.items()} == {m: sorted(t) for m, t in expected_config.items()}
    for module, targets in expected_config.items():
        for target, entry in targets.items():
            for key in ("scale", "zero_point"):
                torch.testing.assert_close(config[module][target][key], entry[key], atol=ATOL, rtol=0)
    assert all(fq.is_calibrated and fq.observer.is_seeded for fq in quantizer.fake_quantizers())


def _graph_breaks() -> int:
    return sum(counters["graph_break"].values())


def test_compiled_training_matches_eager_from_a_freshly_prepared_model():
    eager = _train(None)
    compiled = _train("inductor")
    _assert_same_training(eager, compiled)
    # First-batch seeding happens inside the graph: one graph for the whole run, no break, no recompilation.
    assert compiled[3] == [1] * STEPS
    assert _graph_breaks() == 0


def test_quantization_starting_mid_training_recompiles_once():
    steps, start = 5, 2
    eager = _train(None, steps, quant_start_step=start)
    compiled = _train("inductor", steps, quant_start_step=start)
    # Same numbers as eager, where a graph kept from before the switch would have given the unquantized losses ...
    _assert_same_training(eager, compiled)
    unquantized = _train(None, steps, quant_start_step=steps)[2]
    assert torch.equal(unquantized[:start], eager[2][:start])
    assert (unquantized[start:] - eager[2][start:]).abs().min() > 10 * ATOL
    # ... and the switch cost exactly one recompilation: one graph per schedule phase.
    assert compiled[3] == [1] * start + [2] * (steps - start)
    assert _graph_breaks() == 0


def test_compiled_eval_inference_matches_eager():
    eager_trained, _, _, _ = _train(None, 3)
    compiled_trained, _, _, _ = _train("inductor", 3)  # the flags' Python mirrors were set by the compiled forward
    x = _batches(4)[3][0]
    with torch.no_grad():
        expected = eager_trained.eval()(x)
        compiled_trained.eval()
        state = {k: v.clone() for k, v in compiled_trained.state_dict().items()}
        outputs = {
            "compiled model": torch.compile(eager_trained)(x),
            "compiled model trained compiled": torch.compile(compiled_trained)(x),
            "model trained compiled": compiled_trained(x),
        }
    for name, actual in outputs.items():
        torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0, msg=name)
    for key, value in compiled_trained.state_dict().items():  # eval mode changes nothing: ranges stay frozen
        assert torch.equal(value, state[key]), key
    assert _graph_breaks() == 0


def test_lazily_sized_activation_ranges_recompile_once():
    """Per-channel activation ranges get their shape from the first batch: the compiled forward replaces those
    buffers instead of resizing them (no graph break), and the next step recompiles once for their new shape."""
    per_channel = {"quant_dtype": "uint8", "quant_scheme": "affine", "granularity": "per_channel"}
    config = [
        {"op_names": ["0"], "target_names": ["_input_"], **per_channel},
        {"op_types": ["Conv2d"], "target_names": ["weight", "_output_"], **per_channel, "quant_dtype": "int8"},
    ]
    eager = _train(None, 3, config)
    compiled = _train("aot_eager", 3, config)  # the graph structure is decided by dynamo, whatever the backend
    _assert_same_training(eager, compiled)
    assert compiled[0][0].fake_quant["_input_0"].scale.shape == (1, 3, 1, 1)
    assert compiled[3] == [1, 2, 2]
    assert _graph_breaks() == 0


def test_a_live_folded_batchnorm_runs_eagerly_inside_the_compiled_model_and_matches_eager_training():
    """While a folded BN is live, its layer runs outside the graph (a graph break per such layer): compiled, AOT
    autograd would recompute the fold factor in the backward from ``running_var`` after batch_norm updated it in
    place, and the gradients would be wrong. Once BN freezes, the recompiled graph has no break."""
    eager = _train(None, 5, freeze_bn_step=2)
    compiled = _train("inductor", 5, freeze_bn_step=2)
    _assert_same_training(eager, compiled)
    breaks_while_live = _graph_breaks()
    assert breaks_while_live >= 1
    graphs = compiled[3]
    assert graphs[1] == graphs[0] and graphs[4] == graphs[2]  # no recompiles within a phase
