import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing downloads in tests
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import contextlib  # noqa: E402
import copy  # noqa: E402
import hashlib  # noqa: E402
import io  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import NamedTuple  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def minilm():
    from mos_lightning.model.understanding import UnderstandingTower

    return UnderstandingTower(dtype="float32")


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory):
    """A randomly initialised LLaMA-style decoder, saved and loaded through the same path as any tower."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaModel

    from mos_lightning.model.understanding import embedded_model_path

    path = tmp_path_factory.mktemp("tiny_llama")
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_path())
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    LlamaModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture
def rng():
    """Fresh random inputs each run, but reproducible from the printed seed on failure."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)


class TinyFit(NamedTuple):
    """The outputs of one finished `fit` of experiments/router_inputs.yaml + tests/tiny.yaml (every arm)."""

    runs: Path  # the logger's save_dir: runs/router_inputs/<arm>/ holds each arm's run
    rows: list[dict]  # what cli_main returned, one row per arm (a fresh copy for each test)
    printed: str  # what the fit printed to stdout (the ablation table at the end)


def _fingerprint(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def _router_inputs_fit(tmp_path_factory):
    from mos_lightning.cli import cli_main

    runs = tmp_path_factory.mktemp("router_inputs_run")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rows = cli_main(["fit", "--config", str(ROOT / "experiments" / "router_inputs.yaml"), "--config",
                         str(ROOT / "tests" / "tiny.yaml"), f"--trainer.logger.init_args.save_dir={runs}"])
    print(printed.getvalue())  # still in the report of the first test that asked for the run
    before = _fingerprint(runs)
    yield runs, rows, printed.getvalue()
    assert _fingerprint(runs) == before, "a test wrote into the shared router_inputs run; it is read-only"


@pytest.fixture
def router_inputs_run(_router_inputs_fit) -> TinyFit:
    """One tiny 3-arm fit per session, shared by the tests that only read its outputs (run folders, event
    files, checkpoints, the table). Treat the folder as read-only: the session checks nothing under it changed.
    Tests that need another config (callbacks, cache_dir, resume, DDP) run their own fit."""
    runs, rows, printed = _router_inputs_fit
    return TinyFit(runs, copy.deepcopy(rows), printed)
