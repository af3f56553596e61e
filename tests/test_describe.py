"""`describe`: the paper's three sizes built on the meta device from shipped configs (no weights, no hub), their
counts against the paper's and the published models', and the per-rank bytes against a hand formula."""
import json
import math
import time
from pathlib import Path

import pytest

from mos_lightning.cli.describe import describe_main
from mos_lightning.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SCALE = ROOT / "experiments" / "scale"
TOWERS = ROOT / "mos_lightning" / "configs" / "towers"
# size: (generation tower, published understanding model with its LM head, the shipped architecture)
SIZES = {
    "paper_ablation": (1e9, 3.21e9, "Llama-3.2-3B"),  # §4.1: LLaMA-3.2-3B + a 1B tower
    "mos_s": (3e9, 8.03e9, "PLM-8B-LLM"),  # §3.5: PLM-8B (its LLM is Llama-3.1-8B's architecture) + 3B
    "mos_l": (5e9, 14.7e9, "InternVL3-14B-LLM"),  # §3.5: InternVL-14B (Qwen2.5-14B's LLM) + 5B
}


@pytest.fixture(scope="module")
def described():
    start = time.perf_counter()
    out = {name: describe_main(["--config", str(SCALE / f"{name}.yaml"), "--image_size", "512", "512",
                                "--world_size", "8", "--json"]) for name in SIZES}
    print(f"describe x{len(SIZES)}: {time.perf_counter() - start:.1f} s")
    return out


@pytest.mark.slow  # three multi-billion-parameter models on the meta device: ~20 s
@pytest.mark.parametrize("name", SIZES)
def test_paper_sizes(described, name):
    d = described[name]
    generation, published, tower = SIZES[name]
    assert abs(d["generation_params"] / generation - 1) <= 0.10, d["generation_params"]
    assert 50e6 <= d["router_params"] <= 150e6, d["router_params"]
    config = json.loads((TOWERS / tower / "config.json").read_text())
    head = 0 if config["tie_word_embeddings"] else config["vocab_size"] * config["hidden_size"]  # AutoModel has none
    assert abs((d["understanding_params"] + head) / published - 1) <= 0.01, d["understanding_params"]
    g = d["geometry"]
    assert g["m"] == config["num_hidden_layers"] + 1 and g["understanding_width"] == config["hidden_size"]
    # Proj_j: one D_u -> D_g linear (with bias) per generation block
    assert d["projection_params"] == g["n"] * (g["understanding_width"] + 1) * g["generation_width"]
    assert d["trainable_params"] == (d["generation_params"] + d["router_params"] + d["projection_params"]
                                     + d["other_trainable_params"])
    # FSDP2 over 8 ranks: fp32 weight, grad and two AdamW moments sharded; the bf16 tower and fp32 VAE whole
    parts = d["bytes_per_rank_parts"]
    assert parts["trainable_states"] == math.ceil(16 * d["trainable_params"] / 8)
    assert parts["understanding"] == 2 * d["understanding_params"]
    assert d["bytes_per_rank"] == sum(parts.values())
    # 512^2 through the 16x VAE and patch 2: 16 x 16 tokens; a step is 3x the forward
    assert tuple(d["latent_size"]) == (32, 32) and d["image_tokens"] == 256
    assert d["flops_per_step"] == 3 * sum(d["forward_flops"].values())
    # the generation forward is at least its matmuls' 2 x params x tokens (attention adds to it)
    matmuls = 2 * d["generation_params"] * 256
    assert 0.9 * matmuls <= d["forward_flops"]["generation"] <= 2 * matmuls


def test_the_table_and_a_bad_size(capsys):
    """The embedded default (pixels, patch 4): a human-readable table; an image size that the patch does not
    divide is a clear error naming the settings."""
    d = describe_main(["--image_size", "32", "32"])
    printed = capsys.readouterr().out
    assert "| generation tower |" in printed and "router / generation forward FLOPs" in printed
    assert tuple(d["latent_size"]) == (32, 32) and d["image_tokens"] == (32 // 4) ** 2
    with pytest.raises(ConfigError, match="patch_size x autoencoder factor"):
        describe_main(["--image_size", "30", "32"])
