"""The fake-quant path on CUDA gives the CPU's numbers (runs only where a GPU is present)."""

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import distributed_workers as workers
from quantrain import QATQuantizer
from quantrain.ops.qparams import calculate_qparams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


def test_cuda_training_matches_cpu():
    torch.manual_seed(0)
    cpu = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    gpu = copy.deepcopy(cpu).cuda()
    config = [
        {
            "op_types": ["Conv2d", "Linear"],
            "quant_dtype": "uint8",
            "quant_scheme": "affine",
            "target_settings": {"weight": {"quant_dtype": "int8", "granularity": "out_channel"}},
        }
    ]
    quantizers = [QATQuantizer(cpu, config), QATQuantizer(gpu, config)]
    for _ in range(3):
        x = torch.randn(4, 3, 8, 8)
        with _full_float32():
            out_cpu, out_gpu = cpu(x), gpu(x.cuda())
        out_gpu.sum().backward()
        out_cpu.sum().backward()
        # The convolution's own rounding differs between devices, and a value next to a rounding boundary may land
        # one output step away; every other value agrees.
        step = quantizers[0].get_calibration_config()["3"]["_output_0"]["scale"]
        difference = (out_gpu.detach().cpu() - out_cpu.detach()).abs()
        assert (difference <= step + 1e-5).all()
        assert (difference <= 1e-5).float().mean() >= 0.9
    config_cpu, config_gpu = (q.get_calibration_config() for q in quantizers)
    assert torch.equal(config_gpu["0"]["_input_0"]["scale"], config_cpu["0"]["_input_0"]["scale"])  # the same batch
    assert gpu[0].fake_quant["weight"].scale.is_cuda
    config_cpu, config_gpu = (q.get_calibration_config() for q in quantizers)
    assert torch.allclose(config_gpu["0"]["weight"]["scale"], config_cpu["0"]["weight"]["scale"])
    assert config_gpu["0"]["weight"]["scale"].device.type == "cpu"


@pytest.mark.parametrize("qmin, qmax, symmetric", [(0, 255, False), (-127, 127, False), (-127, 127, True), (0, 15, False)])
def test_qparams_on_cuda_equal_the_cpu_bit_for_bit(qmin, qmax, symmetric):
    g = torch.Generator().manual_seed(0)
    lo, hi = -torch.rand(4096, generator=g) * 3, torch.rand(4096, generator=g) * 5
    cpu = calculate_qparams(lo, hi, qmin, qmax, symmetric=symmetric)
    gpu = calculate_qparams(lo.cuda(), hi.cuda(), qmin, qmax, symmetric=symmetric)
    assert torch.equal(gpu[0].cpu(), cpu[0]) and torch.equal(gpu[1].cpu(), cpu[1])


@contextlib.contextmanager
def _full_float32():
    """No TF32 in CUDA convolutions and matrix products (on by default for cuDNN convolutions)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_ddp_with_folded_sync_batchnorm_on_cuda_matches_one_process(tmp_path):
    results = workers.run_ranks(workers.folded_sync_bn_on_cuda, tmp_path)
    for rank, result in enumerate(results):
        assert "error" not in result, f"rank {rank} failed:\n{result['error']}"
    expected = workers.reference(workers.cnn_bn, workers.FOLD_CONFIG, device="cuda")
    for result in results:
        for module, targets in expected["calibration"].items():
            for target, entry in targets.items():
                for key in ("scale", "tracked_min", "tracked_max"):
                    torch.testing.assert_close(result["calibration"][module][target][key], entry[key], atol=1e-5, rtol=0)
        for name, value in expected["weights"].items():
            torch.testing.assert_close(result["weights"][name], value, atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_on_cuda_keeps_ranges_in_float32(dtype):
    model = workers.cnn_bn().cuda()
    quantizer = QATQuantizer(model, workers.FOLD_CONFIG, integer_bias=True, example_inputs=workers.batch(0)[0].cuda())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(4):
        x, y = (t.cuda() for t in workers.batch(step))
        with torch.autocast("cuda", dtype=dtype):
            out = model(x)
            loss = F.cross_entropy(out, y)
        assert out.dtype == dtype
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
    for module in quantizer.quantized_modules.values():
        for fq in module.fake_quant.values():
            assert fq.scale.dtype == torch.float32 and fq.observer.tracked_min.dtype == torch.float32
            assert torch.isfinite(fq.scale).all()
