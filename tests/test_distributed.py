"""Multi-process QAT: 2 ranks (gloo, CPU, spawned) against a single process seeing the whole batch."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import distributed_workers as workers
from quantrain import PtqQuantizer, QATQuantizer
from quantrain.distributed import RangeSync, world_size

pytestmark = [
    pytest.mark.slow,  # processes started per test
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available in this build"),
]


def assert_calibration_close(actual: dict, expected: dict, atol: float = 1e-6) -> None:
    assert actual.keys() == expected.keys()
    for module, targets in expected.items():
        assert actual[module].keys() == targets.keys(), module
        for target, entry in targets.items():
            for key in ("scale", "zero_point", "tracked_min", "tracked_max"):
                torch.testing.assert_close(
                    actual[module][target][key], entry[key], atol=atol, rtol=0, msg=f"{module}.{target}.{key}"
                )


def assert_identical(a: dict, b: dict) -> None:
    for module, targets in a["calibration"].items():
        for target, entry in targets.items():
            for key, value in entry.items():
                other = b["calibration"][module][target][key]
                assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, (module, target, key)


def assert_weights_close(actual: dict, expected: dict, atol: float = 1e-6) -> None:
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, atol=atol, rtol=0, msg=name)


def check_ranks(results: list[dict]) -> None:
    for rank, result in enumerate(results):
        assert "error" not in result, f"rank {rank} failed:\n{result['error']}"


@pytest.fixture(scope="module")
def after(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_after")
    results = workers.run_ranks(workers.wrap_after_quantizing, out)
    check_ranks(results)
    return results


@pytest.fixture(scope="module")
def before(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_before")
    trained = workers.cnn()
    QATQuantizer(trained, workers.CONFIG)
    workers.train(trained, torch.optim.SGD(trained.parameters(), lr=0.1))
    torch.save(trained.state_dict(), out / "trained.pt")
    results = workers.run_ranks(workers.wrap_before_quantizing, out)
    check_ranks(results)
    for result in results:
        result["dir"] = out
    return results


def test_ranks_hold_identical_ranges_equal_to_one_process_on_the_global_batch(after):
    expected = workers.reference(workers.cnn, workers.CONFIG)
    assert_identical(after[0], after[1])
    for result in after:
        assert result["step"] == workers.STEPS
        assert_calibration_close(result["calibration"], expected["calibration"])
        assert_weights_close(result["weights"], expected["weights"])
    # Without the reduction each rank would have tracked its own half: the ranges differ from the global ones.
    local = workers.cnn()
    local_quantizer = QATQuantizer(local, workers.CONFIG)
    workers.train(local, torch.optim.SGD(local.parameters(), lr=0.1), rank=0, world=2)
    local_max = local_quantizer.get_calibration_config()["0"]["_input_0"]["tracked_max"]
    assert not torch.allclose(local_max, expected["calibration"]["0"]["_input_0"]["tracked_max"], atol=1e-3)


def test_a_checkpoint_saved_on_rank_0_reloads_on_every_rank(after):
    for result in after:
        assert_identical(result["reloaded"], after[0])
        assert result["reloaded"]["step"] == workers.STEPS
        assert_weights_close(result["reloaded"]["weights"], after[0]["weights"], atol=0)


def test_folded_sync_batchnorm_uses_the_global_batch_statistics(after):
    expected = workers.reference(workers.cnn_bn, workers.FOLD_CONFIG)
    reference_bn = workers.cnn_bn()
    QATQuantizer(reference_bn, workers.FOLD_CONFIG)
    workers.train(reference_bn, torch.optim.SGD(reference_bn.parameters(), lr=0.1))
    assert_identical(after[0]["sync_bn"], after[1]["sync_bn"])
    for result in after:
        assert_calibration_close(result["sync_bn"]["calibration"], expected["calibration"], atol=1e-5)
        assert_weights_close(result["sync_bn"]["weights"], expected["weights"], atol=1e-5)
        running_mean, running_var = result["sync_bn"]["running"]
        torch.testing.assert_close(running_mean, reference_bn[1].running_mean, atol=1e-5, rtol=0)
        torch.testing.assert_close(running_var, reference_bn[1].running_var, atol=1e-5, rtol=0)


def test_wrapping_in_ddp_first_and_training_through_torch_evaluator(before):
    expected = workers.reference(workers.cnn, workers.CONFIG)
    assert_identical(before[0], before[1])
    for result in before:
        assert result["bound_is_inner"]
        assert result["step"] == workers.STEPS
        assert sorted(result["calibration"]) == ["0", "3"]  # names of the inner model, not "module.0"
        assert_calibration_close(result["calibration"], expected["calibration"])
        assert_weights_close(result["weights"], expected["weights"])


def test_rank_0_state_reaches_the_others_at_the_first_synchronized_forward(before):
    resumed = workers.cnn()
    quantizer = QATQuantizer(resumed, workers.CONFIG)
    resumed.load_state_dict(torch.load(before[0]["dir"] / "trained.pt", weights_only=True))
    workers.train(resumed, torch.optim.SGD(resumed.parameters(), lr=0.1), steps=1)
    expected = workers.snapshot(quantizer, resumed)
    assert_identical(before[0]["resumed"], before[1]["resumed"])
    for result in before:
        assert result["resumed"]["step"] == workers.STEPS + 1
        assert_calibration_close(result["resumed"]["calibration"], expected["calibration"])
        assert_weights_close(result["resumed"]["weights"], expected["weights"])


def test_ptq_calibration_reduces_extremes_across_ranks(before):
    model = workers.cnn()
    ptq = PtqQuantizer(model, workers.CONFIG)
    for step in range(3):
        ptq.track_forward(workers.batch(step)[0])
    expected = workers.tracked_ranges(ptq)
    assert before[0]["ptq"].keys() == expected.keys()
    for result in before:
        for key, (lo, hi) in expected.items():  # the global extremes (to matmul rounding at another batch size)
            torch.testing.assert_close(result["ptq"][key], (lo, hi), atol=1e-6, rtol=0, msg=str(key))


def test_ranks_with_different_configs_fail_together_with_a_clear_message(tmp_path):
    results = workers.run_ranks(workers.mismatched_configs, tmp_path)
    check_ranks(results)
    for result in results:
        assert result["message"] is not None, "no error raised"
        assert "ranks quantized the model differently" in result["message"]
        assert "uint8" in result["message"] and "int8" in result["message"]
        assert result["unchanged"]


def test_without_a_process_group_nothing_is_reduced():
    assert world_size() == 1
    sync = RangeSync()
    lo, hi = torch.tensor([-1.0]), torch.tensor([2.0])
    assert sync(lo, hi) == (lo, hi)
    assert not sync.active()


def test_sync_ranges_and_process_group_are_validated():
    model = workers.cnn()
    with pytest.raises(TypeError, match="sync_ranges"):
        QATQuantizer(model, workers.CONFIG, sync_ranges="yes")
    with pytest.raises(TypeError, match="process_group"):
        QATQuantizer(model, workers.CONFIG, process_group="world")
    assert not hasattr(model, "quantrain_step")  # the model is untouched


def test_ddp_leaves_quantrain_buffers_alone_and_unwrap_restores_its_ignore_list():
    model = workers.cnn()
    model._ddp_params_and_buffers_to_ignore = ["user.buffer"]
    quantizer = QATQuantizer(model, workers.CONFIG)
    ignored = model._ddp_params_and_buffers_to_ignore
    assert ignored[0] == "user.buffer"
    assert "quantrain_step" in ignored and "0.fake_quant._input_0.observer.tracked_min" in ignored
    quantizer.unwrap_model()
    assert model._ddp_params_and_buffers_to_ignore == ["user.buffer"]
    F.relu(model(torch.randn(1, 3, 8, 8)))  # still a working float model
