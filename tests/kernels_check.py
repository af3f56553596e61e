"""Checks of mos_lightning.kernels under the Triton interpreter, on CPU: one JSON line per case on stdout.

    python tests/kernels_check.py [--seed N] [--cuda] [CASE ...]

tests/test_kernels.py runs it in a subprocess because TRITON_INTERPRET must be set before any kernel is
decorated. With --cuda the same cases run the compiled kernels on a GPU instead. References are torch
ops on the same inputs in float64, gradients by autograd; inputs are fresh random numbers from --seed
(printed by the test on failure).
"""
import os
import sys

CUDA = "--cuda" in sys.argv
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton decorates the kernels

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

from mos_lightning.kernels import rms_norm as R  # noqa: E402
from mos_lightning.kernels import swiglu as S  # noqa: E402
from mos_lightning.kernels import use_triton_kernels  # noqa: E402
from mos_lightning.model.blocks import Block, SwiGLU  # noqa: E402
from mos_lightning.model.generation import GenerationTower  # noqa: E402

CASES = {}
RTOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}  # bf16: torch's default, a few roundings of 2^-8
FP32_EPS = torch.finfo(torch.float32).eps
DEVICE = torch.device("cuda" if CUDA else "cpu")


def case(fn):
    CASES[fn.__name__] = fn
    return fn


def randn(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64, device=DEVICE) * scale).to(dtype)


def close(name, actual, expected, rtol, atol_scale=1e-5):
    """|actual - expected| <= rtol |expected| + atol_scale * max|expected|, in float64."""
    expected = expected.detach().double()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    atol = atol_scale * expected.abs().max().item()
    torch.testing.assert_close(actual.detach().double(), expected, rtol=rtol, atol=atol,
                               msg=lambda m: f"{name} ({actual.dtype}, {tuple(actual.shape)}): {m}")


def leaf(t):
    return t.detach().clone().requires_grad_()


def grads(fn, *inputs, dy):
    """fn(*inputs) and the gradients of <fn(*inputs), dy> for each input, on fresh leaves."""
    leaves = [leaf(t) for t in inputs]
    out = fn(*leaves)
    out.backward(dy)
    return out, [t.grad for t in leaves]


def check_rms(x, weight, eps=None):
    dtype = x.dtype
    dy = randn(*x.shape, dtype=dtype)
    out, (dx, dw) = grads(lambda a, b: R.rms_norm(a, b, eps), x, weight, dy=dy)
    ref, (rdx, rdw) = grads(lambda a, b: R.rms_norm_reference(a, b, FP32_EPS if eps is None else eps),
                            x.double(), weight.double(), dy=dy.double())
    assert (out.dtype, dx.dtype, dw.dtype) == (x.dtype, x.dtype, weight.dtype), (out.dtype, dx.dtype, dw.dtype)
    for name, a, e in (("y", out, ref), ("dx", dx, rdx), ("dweight", dw, rdw)):
        close(name, a, e, RTOL[dtype])


def check_swiglu(gate_up):
    dy = randn(*gate_up.shape[:-1], gate_up.shape[-1] // 2, dtype=gate_up.dtype)
    out, (dgu,) = grads(S.swiglu, gate_up, dy=dy)
    ref, (rdgu,) = grads(S.swiglu_reference, gate_up.double(), dy=dy.double())
    assert out.dtype == dgu.dtype == gate_up.dtype
    close("out", out, ref, RTOL[gate_up.dtype])
    close("d_gate_up", dgu, rdgu, RTOL[gate_up.dtype])


@case
def rms_fp32_5x23x123():
    check_rms(randn(5, 23, 123), randn(123))


@case
def rms_fp32_single_row():
    check_rms(randn(1, 77), randn(77), eps=1e-6)


@case
def rms_fp32_permuted_view():
    """QK-norm's input: a (b, h, l, d) view of (b, l, h, d), rows not contiguous."""
    check_rms(randn(2, 7, 3, 10).transpose(1, 2), randn(10))


@case
def rms_fp32_wide_row():
    check_rms(randn(3, 5000), randn(5000))


@case
def rms_bf16_5x23x123():
    check_rms(randn(5, 23, 123, dtype=torch.bfloat16), randn(123, dtype=torch.bfloat16))


@case
def rms_bf16_input_fp32_weight():
    """bf16 activations over float32 weights (autocast, FSDP reduce dtype): y and dx bf16, dweight float32."""
    check_rms(randn(4, 9, 96, dtype=torch.bfloat16), randn(96))


@case
def rms_bf16_in_fp32_out():
    """What the module does under CUDA autocast (rms_norm is on its float32 list): bf16 read, float32 written."""
    x, weight = randn(6, 50, dtype=torch.bfloat16), randn(50, dtype=torch.bfloat16)
    dy = randn(6, 50)
    out, (dx, dw) = grads(lambda a, b: R.rms_norm(a, b, None, torch.float32), x, weight, dy=dy)
    ref, (rdx, rdw) = grads(lambda a, b: R.rms_norm_reference(a, b, FP32_EPS), x.double(), weight.double(),
                            dy=dy.double())
    assert (out.dtype, dx.dtype, dw.dtype) == (torch.float32, torch.bfloat16, torch.bfloat16)
    close("y", out, ref, 1e-5)
    close("dx", dx, rdx, RTOL[torch.bfloat16])
    close("dweight", dw, rdw, RTOL[torch.bfloat16])


@case
def rms_module_matches_nn_rmsnorm():
    """The module against torch's own nn.RMSNorm: eps None (float32's epsilon, also for bf16 inputs) and set,
    on small inputs where eps matters, and a 2-D normalized_shape."""
    for shape, eps, dtype in (((40,), None, torch.float32), ((40,), None, torch.bfloat16),
                              ((40,), 1e-6, torch.bfloat16), ((4, 10), 1e-5, torch.float32)):
        eager = nn.RMSNorm(shape, eps=eps).to(DEVICE, dtype)
        with torch.no_grad():
            eager.weight.copy_(randn(*shape))
        kernel = R.TritonRMSNorm.from_eager(copy.deepcopy(eager))
        x = randn(3, 6, *shape, dtype=dtype, scale=1e-3)
        dy = randn(*x.shape, dtype=dtype)
        out, (dx,) = grads(kernel, x, dy=dy)
        ref, (rdx,) = grads(eager, x, dy=dy)
        close(f"y eps={eps}", out, ref, RTOL[dtype])
        close(f"dx eps={eps}", dx, rdx, RTOL[dtype])
        close(f"dweight eps={eps}", kernel.weight.grad, eager.weight.grad, RTOL[dtype])


@case
def swiglu_fp32_5x23x246():
    check_swiglu(randn(5, 23, 246))


@case
def swiglu_fp32_single_row():
    check_swiglu(randn(1, 74))


@case
def swiglu_fp32_several_column_blocks():
    check_swiglu(randn(2, 2 * (S.BLOCK + 476)))


@case
def swiglu_bf16_5x23x246():
    check_swiglu(randn(5, 23, 246, dtype=torch.bfloat16))


@case
def swiglu_module_matches_blocks_swiglu():
    eager = SwiGLU(40, 53).to(DEVICE)
    kernel = S.TritonSwiGLU.from_eager(copy.deepcopy(eager))
    x, dy = randn(3, 5, 40), randn(3, 5, 40)
    out, (dx,) = grads(kernel, x, dy=dy)
    ref, (rdx,) = grads(eager, x, dy=dy)
    close("out", out, ref, 1e-5)
    close("dx", dx, rdx, 1e-5)
    for name in ("gate_up", "down"):
        close(f"{name}.weight.grad", getattr(kernel, name).weight.grad, getattr(eager, name).weight.grad, 1e-5)


@case
def planted_errors_are_caught():
    """The comparisons can fail: a wrong eps and swapped gate/up halves are both reported."""
    x, w = randn(4, 30, scale=1e-3), randn(30)
    for label, run in (("eps", lambda: close("y", R.rms_norm(x, w, 1e-5), R.rms_norm_reference(x.double(), w, 1e-6),
                                             1e-5)),
                       ("halves", lambda: close("out", S.swiglu(x), S.swiglu_reference(x.double().roll(15, -1)),
                                                1e-5))):
        try:
            run()
        except AssertionError:
            continue
        raise AssertionError(f"a planted error ({label}) passed the comparison")


@case
def state_dict_round_trip():
    """eager -> kernel module -> eager, bit-equal; from_eager holds the very same Parameters."""
    for eager, fresh_kernel, fresh_eager in (
            (nn.RMSNorm(40, eps=1e-6), R.TritonRMSNorm(40, eps=1e-6), nn.RMSNorm(40, eps=1e-6)),
            (SwiGLU(40, 53), S.TritonSwiGLU(40, 53), SwiGLU(40, 53))):
        with torch.no_grad():
            for p in eager.parameters():
                p.copy_(randn(*p.shape))
        fresh_kernel.load_state_dict(eager.state_dict())
        fresh_eager.load_state_dict(fresh_kernel.state_dict())
        start, back = eager.state_dict(), fresh_eager.state_dict()
        assert list(start) == list(fresh_kernel.state_dict()) == list(back), (list(start), list(back))
        assert all(torch.equal(start[k], back[k]) for k in start), "round trip changed a tensor"
        shared = type(fresh_kernel).from_eager(eager)
        assert [id(p) for p in shared.parameters()] == [id(p) for p in eager.parameters()], "parameters were copied"
    assert R.TritonRMSNorm.from_eager(nn.RMSNorm(40, eps=1e-6)).eps == 1e-6


def counting_launches():
    """Wrap the launchers so a test can tell the kernels ran (the modules fall back to eager off CUDA)."""
    counts = {}
    for module, name in ((R, "rms_norm_forward"), (R, "rms_norm_backward"), (S, "swiglu_forward"),
                         (S, "swiglu_backward")):
        launcher = getattr(module, name)

        def wrapped(*args, _launcher=launcher, _name=name):
            counts[_name] = counts.get(_name, 0) + 1
            return _launcher(*args)

        setattr(module, name, wrapped)
    return counts


def check_swapped_model(model, run, expected_swaps):
    """use_triton_kernels on `model`: the count, identical state-dict keys and tensors, Parameters kept,
    kernels run, and the output and every gradient close to an eager copy's."""
    with torch.no_grad():
        for p in model.parameters():  # RMSNorm weights start at one and the head at zero: perturb
            p.add_(0.1 * torch.randn_like(p))
    eager = copy.deepcopy(model)
    keys, params = {k: v.data_ptr() for k, v in model.state_dict().items()}, [id(p) for p in model.parameters()]
    counts = counting_launches()
    swapped = use_triton_kernels(model)
    assert swapped == expected_swaps, f"swapped {swapped} modules, expected {expected_swaps}"
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == keys, "state dict keys or tensors changed"
    assert [id(p) for p in model.parameters()] == params, "parameters were replaced"
    assert not any(type(m) in (nn.RMSNorm, SwiGLU) for m in model.modules()), "an eager module was left"
    assert use_triton_kernels(model) == 0, "a second call swapped again"
    out, ref = run(model), run(eager)
    dy = torch.randn_like(ref)
    out.backward(dy)
    ref.backward(dy)
    assert set(counts) == {"rms_norm_forward", "rms_norm_backward", "swiglu_forward", "swiglu_backward"}, counts
    close("output", out, ref, 1e-5)
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        if q.grad is not None:
            close(f"{name}.grad", p.grad, q.grad, 1e-4)


@case
def use_triton_kernels_on_a_block():
    """head dim 10 and FFN hidden 106: neither a power of two."""
    x, context = randn(2, 9, 40), randn(2, 5, 40)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]], device=DEVICE)
    check_swapped_model(Block(dim=40, heads=4).to(DEVICE), lambda block: block(x, context, mask), expected_swaps=6)


@case
def use_triton_kernels_on_a_generation_tower():
    tower = GenerationTower(width=48, depth=2, heads=4, patch_size=2, channels=4, mlp_ratio=3.0, registers=2)
    z, t = randn(2, 4, 6, 8), torch.rand(2, device=DEVICE)
    check_swapped_model(tower.to(DEVICE), lambda model: model(z, t, None), expected_swaps=2 * 6 + 1)


@case
def use_triton_kernels_swaps_a_shared_module_once():
    shared, plain = nn.RMSNorm(16), nn.RMSNorm(16, elementwise_affine=False)
    model = nn.ModuleDict({"a": shared, "b": shared, "plain": plain, "list": nn.ModuleList([shared])})
    assert use_triton_kernels(model) == 1
    assert model["a"] is model["b"] is model["list"][0] and isinstance(model["a"], R.TritonRMSNorm)
    assert model["a"].weight is shared.weight and model["plain"] is plain


def run(name):
    start = time.perf_counter()
    try:
        CASES[name]()
        ok, detail = True, ""
    except Exception:
        ok, detail = False, traceback.format_exc(limit=6)
    return {"case": name, "ok": ok, "seconds": round(time.perf_counter() - start, 2), "detail": detail}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cuda", action="store_true", help="compiled kernels on the GPU, not the interpreter")
    parser.add_argument("cases", nargs="*", help=f"default: all of {', '.join(CASES)}")
    args = parser.parse_args()
    unknown = set(args.cases) - set(CASES)
    if unknown:
        parser.error(f"unknown cases {sorted(unknown)}")
    failed = 0
    for name in args.cases or CASES:
        torch.manual_seed(args.seed)  # each case reproducible on its own
        result = run(name)
        failed += not result["ok"]
        print(json.dumps(result), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
