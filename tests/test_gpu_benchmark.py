"""benchmarks/gpu.py on a CPU: it says it needs a GPU and exits 0; its model, inputs, FLOP count and MFU are checked
here at a tiny size (the timings themselves need CUDA)."""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from mos_lightning.describe import count, forward_flops

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_model  # noqa: E402

TINY = gpu_model.Size(width=64, depth=2, heads=2, patch_size=2, channels=4, tower_layers=3, tower_width=32, context=5,
                fusion={"router_width": 32, "router_depth": 1, "router_heads": 2}, latent=8)


@pytest.mark.slow  # a subprocess: ~3 s alone on 2 cores, more on a busy machine
def test_without_a_gpu_it_says_so_and_exits_0(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--quick", "--json", str(out)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "needs a GPU" in done.stdout
    assert json.loads(out.read_text())["cuda"] is False


def test_flops_of_one_linear_are_three_times_its_forward():
    linear = nn.Linear(7, 11, bias=False)
    x = torch.randn(5, 7, requires_grad=True)
    total, by_module = gpu_model.count_flops(lambda: linear(x).sum().backward())
    assert total == 3 * (2 * 5 * 7 * 11)  # forward, input gradient, weight gradient
    assert by_module["Global"] == total


def test_mfu_and_the_peak_table():
    assert gpu_model.mfu(494.5e12, 1.0, 989e12) == pytest.approx(0.5)
    assert gpu_model.mfu(3e14, 0.5, 1.2e15) == pytest.approx(0.5)
    assert gpu_model.mfu(1e12, 1.0, None) is None
    assert gpu_model.bf16_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_model.bf16_peak("NVIDIA H200") == 989e12
    assert gpu_model.bf16_peak("NVIDIA H100 PCIe") == 756e12
    assert gpu_model.bf16_peak("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu_model.bf16_peak("Tesla T4") is None


def test_the_sizes_are_the_paper_overlays():
    size = gpu_model.paper_size("paper_ablation")
    assert (size.width, size.depth, size.heads, size.patch_size, size.channels) == (2048, 20, 16, 2, 48)
    assert (size.tower_layers, size.tower_width, size.context, size.tokens) == (29, 3072, 256, 1024)  # Llama-3.2-3B
    assert size.fusion["router_width"] == 1792 and size.fusion["router_depth"] == 2
    model = gpu_model.build_model(size, "meta")
    # the overlay's own counts (its comments; tests/test_describe.py): a 1.01B tower, a 91M router, 126M of Proj_j
    assert count(model.generation) == pytest.approx(1.01e9, rel=0.01)
    assert count(model.fusion.router) == pytest.approx(91e6, rel=0.01)
    assert count(model.fusion) - count(model.fusion.router) == pytest.approx(20 * 3072 * 2048, rel=0.001)
    widths = [gpu_model.scale_model(name)["generation"]["init_args"]["width"] for name in gpu_model.PAPER_SIZES]
    assert widths == [2048, 3072, 3584]
    # the overlays round the FFN hidden widths up to multiples of 128: 5461 and 9557 were a third of the GPU rate
    hidden = [model.generation.blocks[0].ffn.down.in_features] + [
        gpu_model.build_model(gpu_model.paper_size(name), "meta").generation.blocks[0].ffn.down.in_features
        for name in gpu_model.PAPER_SIZES[1:]]
    assert hidden == [5504, 8192, 9600]


def test_a_tiny_step_on_cpu_counts_its_flops_and_trains():
    torch.manual_seed(0)
    model = gpu_model.build_model(TINY).train()
    x = gpu_model.step_inputs(TINY, batch=2)
    assert x.states.hidden.shape == (2, 3, 5, 32) and x.states.hidden.dtype == torch.bfloat16
    step, _ = gpu_model.count_flops(lambda: gpu_model.forward_backward(model, x, dtype=None))
    model.zero_grad(set_to_none=True)
    one = gpu_model.step_inputs(TINY, batch=1)
    with torch.no_grad():
        forward, _ = gpu_model.count_flops(lambda: model(one.z0, one.t, one.states))
    # the same model as describe counts it (on the meta device, SDPA's formula instead of written-out matmuls)
    assert forward == sum(forward_flops(gpu_model.build_model(TINY, "meta"), (8, 8), TINY.context).values())
    assert 2 * 2 * forward < step <= 3 * 2 * forward  # backward: no input gradient for the tower states and z_t
    before = [p.detach().clone() for p in model.parameters()]
    loss = gpu_model.train_step(model, gpu_model.make_optimizer(model), x, dtype=None)
    assert math.isfinite(loss.item())
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())


def test_the_router_pass_is_a_part_of_the_step():
    torch.manual_seed(0)
    model = gpu_model.build_model(TINY).train()
    x = gpu_model.step_inputs(TINY, batch=2)
    step, _ = gpu_model.count_flops(lambda: gpu_model.forward_backward(model, x, dtype=None))
    model.zero_grad(set_to_none=True)
    tokens = gpu_model.fusion_tokens(model, x, dtype=None)
    router, _ = gpu_model.count_flops(lambda: gpu_model.router_pass(model, x, tokens, dtype=None))
    assert tokens.grad is not None and model.fusion.router.head.weight.grad is not None
    assert model.generation.blocks[0].q.weight.grad is None  # the router alone
    fusion, _ = gpu_model.count_flops(lambda: gpu_model.router_pass(model, x, tokens, whole_fusion=True, dtype=None))
    assert 0 < router < fusion < step


def test_the_unaligned_variant_keeps_int_8_3_width_everywhere():
    size = gpu_model.paper_size("paper_ablation")
    odd = gpu_model.build_model(gpu_model.unaligned(size), "meta")
    hidden = {m.down.in_features for m in odd.modules() if isinstance(m, gpu_model.SwiGLU)}
    assert hidden == {int(2048 * 8 / 3), int(1792 * 8 / 3)} == {5461, 4778}  # the generation blocks', the router's
    aligned = gpu_model.build_model(size, "meta")
    assert {m.down.in_features for m in aligned.modules() if isinstance(m, gpu_model.SwiGLU)} == {5504, 4864}


@pytest.mark.slow  # a subprocess with a gloo process group: ~10 s
def test_the_fsdp_script_runs_its_gloo_twin_on_cpu():
    """benchmarks/gpu_fsdp.py shards over NCCL on a GPU; its CPU twin (gloo, eager kernels, a tiny size) runs the same
    meta-init, parallelize and steps here."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(29600 + os.getpid() % 300)}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_fsdp.py"), "--device", "cpu", "--kernels",
                           "eager", "--tiny", "--steps", "3"], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"rank 0: (\d+)/\1 trainable parameters are DTensors", done.stdout), done.stdout  # every one
    assert "meta left: False" in done.stdout
    assert "losses finite True, last below first True" in done.stdout
