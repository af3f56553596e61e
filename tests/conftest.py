import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing downloads in tests
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


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
