"""The Triton kernels (mos_lightning.kernels) on CPU through Triton's interpreter.

TRITON_INTERPRET must be set before a kernel is decorated, so the checks run in one subprocess
(tests/kernels_check.py, one JSON line per case) and each case is reported here as its own test.
"""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECK = Path(__file__).with_name("kernels_check.py")
pytestmark = pytest.mark.slow  # a subprocess through the interpreter: ~15 s on 2 cores


def case_names() -> list[str]:
    """The @case functions of kernels_check.py, read without importing it (that would set TRITON_INTERPRET)."""
    tree = ast.parse(CHECK.read_text())
    return [node.name for node in tree.body if isinstance(node, ast.FunctionDef)
            and any(isinstance(d, ast.Name) and d.id == "case" for d in node.decorator_list)]


def run_check(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.run([sys.executable, str(CHECK), *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=timeout)


@pytest.fixture(scope="module")
def results(request):
    seed = int.from_bytes(os.urandom(4), "little")
    done = run_check("--seed", str(seed))
    rows = {}
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            rows[row["case"]] = row
    if done.returncode not in (0, 1) or not rows:
        pytest.fail(f"kernels_check.py crashed (exit {done.returncode}, seed {seed}):\n"
                    f"{done.stdout[-2000:]}\n{done.stderr[-6000:]}")
    return seed, rows, done.stderr


@pytest.mark.parametrize("name", case_names())
def test_kernel_case(results, name):
    seed, rows, stderr = results
    assert name in rows, f"{name} did not report; stderr:\n{stderr[-4000:]}"
    assert rows[name]["ok"], (f"{name} failed; rerun: python tests/kernels_check.py --seed {seed} {name}\n"
                              f"{rows[name]['detail']}")


def test_the_case_list_is_read():
    assert len(case_names()) >= 10 and "planted_errors_are_caught" in case_names()


def test_import_without_triton():
    """`import mos_lightning.kernels` must not need triton; asking for the kernels then says what is missing."""
    code = ("import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
            "import torch, mos_lightning.kernels as k\n"
            "try:\n    k.use_triton_kernels(torch.nn.RMSNorm(4))\n"
            "except ImportError as e:\n    print('refused:', e)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    assert "refused: the Triton kernels need a working triton" in done.stdout, done.stdout


def test_the_config_switch_swaps_in_the_kernel_modules():
    """model.parallelism.kernels=triton: configure_model swaps every RMSNorm and SwiGLU before sharding, the
    state dict keeps its keys and tensors, and off CUDA the swapped model computes what the eager one does."""
    import copy

    import torch

    from mos_lightning.kernels.rms_norm import TritonRMSNorm
    from mos_lightning.kernels.swiglu import TritonSwiGLU
    from mos_lightning.lit import MoSModule
    from mos_lightning.model.blocks import SwiGLU
    from mos_lightning.model.generation import GenerationTower
    from mos_lightning.model.understanding import UnderstandingTower
    from mos_lightning.parallel import Parallelism

    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
    module = MoSModule(understanding=UnderstandingTower(), generation=GenerationTower(width=64, depth=2, heads=2),
                       parallelism=Parallelism(kernels="triton"))
    torch.nn.init.normal_(module.model.generation.head.weight)  # the zero-initialised head would hide differences
    eager = copy.deepcopy(module.model)
    module.configure_model()
    model = module.model
    kinds, eager_kinds = [type(m) for m in model.modules()], [type(m) for m in eager.modules()]
    assert kinds.count(TritonSwiGLU) == eager_kinds.count(SwiGLU) >= 2  # the generation blocks' and the router's
    assert kinds.count(TritonRMSNorm) >= 2 * 2
    assert not any(type(m) is torch.nn.RMSNorm and m.weight is not None for m in model.modules())
    got, want = model.state_dict(), eager.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    z, t = torch.randn(3, 3, 32, 32), torch.rand(3)
    states = model.states(["a red circle", "two blue squares", "a green triangle"])
    model.eval(), eager.eval()  # training routing explores at random (epsilon)
    assert torch.equal(model(z, t, states)[0], eager(z, t, states)[0])
