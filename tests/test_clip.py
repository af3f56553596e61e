"""CLIP score through open_clip: exact against a hand-computed reference, the shipped shapes CLIP separates
matching from shuffled captions, bad settings fail early, and its training is reproducible."""
import json
import sys
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from mos_lightning.data.shapes import ShapesDataset
from mos_lightning.errors import ConfigError
from mos_lightning.evaluation.clip import SHAPES_WEIGHTS, clip_score, load_clip, mean_clip_score, prepare_images

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from train_shapes_clip import TrainConfig, encode_text, train  # noqa: E402

TINY = {"embed_dim": 16,
        "vision_cfg": {"image_size": 16, "patch_size": 4, "width": 32, "head_width": 16, "layers": 1},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
# Shipped weights over 12 random seeds of 128 fresh renders: mean matching - mean shuffled CLIP score 56.5-60.3,
# image->text top-1 among 64 0.72-0.89 (chance ~0.02). Thresholds leave room for the next retrain.
MIN_GAP, MIN_TOP1 = 40.0, 0.5
WORDS = ["a", "red", "blue", "circle", "square", "two", "above", "left", "of", "and", "cat", "sky"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A randomly initialised tiny open_clip model: its config, its weights file, and the model itself."""
    root = tmp_path_factory.mktemp("tiny_clip")
    config = root / "tiny_test_clip.json"
    config.write_text(json.dumps(TINY))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model("tiny_test_clip").eval()
    weights = root / "tiny_test_clip.pt"
    torch.save(model.state_dict(), weights)
    return config, weights, model


def _captions(rng: torch.Generator, n: int) -> list[str]:
    idx = torch.randint(len(WORDS), (n, 6), generator=rng)
    return [" ".join(WORDS[i] for i in row[: 2 + k % 5]) for k, row in enumerate(idx.tolist())]


def test_clip_score_matches_hand_computed_reference(tiny, rng):
    config, weights, model = tiny
    clip = load_clip("tiny_test_clip", pretrained=str(weights), config_path=str(config))
    images = torch.rand(12, 3, 16, 16, generator=rng) * 2 - 1
    captions = _captions(rng, 12)

    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        img = F.normalize(model.encode_image(((images + 1) / 2 - mean) / std), dim=-1)
        txt = F.normalize(model.encode_text(open_clip.tokenize(captions, context_length=16)), dim=-1)
    cos = (img * txt).sum(-1)
    reference = 100 * torch.where(cos > 0, cos, torch.zeros_like(cos))

    scores = clip_score(clip, images, captions)
    assert scores.shape == (12,)
    torch.testing.assert_close(scores, reference, atol=1e-4, rtol=1e-5)
    # batches of 5, not 12: float32 rounding may differ in the last bits (~1e-6 of a score of order 10-100)
    assert mean_clip_score(clip, images, captions, batch_size=5) == pytest.approx(reference.mean().item(), abs=1e-4)
    assert clip.encode_images(images).norm(dim=-1).sub(1).abs().max() < 1e-5


@pytest.mark.parametrize("hw", [(24, 40), (40, 24), (16, 16), (9, 12)])
def test_resize_matches_torchvision(hw, rng):
    """Inputs of another size go through open_clip's eval transform (short side bicubic, centre crop)."""
    images = torch.rand(3, 3, *hw, generator=rng) * 2 - 1
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.3, 0.25)
    x = TF.resize((images + 1) / 2, [16], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    expected = TF.normalize(TF.center_crop(x.clamp(0, 1), [16, 16]), mean, std)
    torch.testing.assert_close(prepare_images(images, 16, mean, std), expected, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def shapes_clip():
    assert SHAPES_WEIGHTS.is_file(), "the packaged shapes CLIP weights are missing"
    return load_clip()


def test_shapes_clip_prefers_matching_captions(shapes_clip, rng):
    seed = int(torch.randint(10**7, 2**31 - 1, (1,), generator=rng))  # fresh renders: not the train stream
    images, captions, _ = zip(*ShapesDataset(128, seed=seed))
    images = torch.stack(images)
    perm, other_image = torch.randperm(128, generator=rng), torch.empty(128, dtype=torch.long)
    other_image[perm] = perm.roll(-1)  # a random derangement: every image gets another image's caption
    shuffled = [captions[j] for j in other_image.tolist()]
    match, other = clip_score(shapes_clip, images, captions), clip_score(shapes_clip, images, shuffled)
    gap = match.mean() - other.mean()
    assert gap > MIN_GAP, f"matching {match.mean():.1f} vs shuffled {other.mean():.1f}"

    sims = shapes_clip.encode_images(images[:64]) @ shapes_clip.encode_texts(captions[:64]).T
    top1 = sum(captions[j] == c for j, c in zip(sims.argmax(1).tolist(), captions[:64])) / 64
    assert top1 > MIN_TOP1, f"image->text top-1 {top1:.2f} among 64 (chance ~0.02)"


def test_unknown_model_name_is_a_config_error():
    with pytest.raises(ConfigError, match="model_name.*'no-such-clip'.*ViT-B-32"):
        load_clip("no-such-clip")


@pytest.mark.parametrize("name", ["shapes-clip", "ViT-B-32"])
def test_missing_weights_file_is_a_config_error(name, tmp_path):
    missing = tmp_path / "nowhere" / "weights.pt"
    with pytest.raises(ConfigError, match=r"pretrained: weights file .*weights\.pt.* does not exist"):
        load_clip(name, pretrained=str(missing))


def test_bad_config_and_unknown_tag_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="config_path"):
        load_clip("shapes-clip", config_path=str(tmp_path / "missing.json"))
    with pytest.raises(ConfigError, match="pretrained: 'no-such-tag'.*openai"):
        load_clip("ViT-B-32", pretrained="no-such-tag")


def test_training_is_reproducible(tiny):
    config = str(tiny[0])

    def run(seed):
        cfg = TrainConfig(steps=3, batch_size=8, warmup=1, seed=seed, config_path=config, log_every=10**9)
        return train(cfg, log=None).model.state_dict()

    first, second, other = run(5), run(5), run(6)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_training_text_shortcut_is_exact(tiny, rng):
    """Training encodes captions cut after the longest one; under the causal mask that changes nothing."""
    model = tiny[2]
    tokens = open_clip.tokenize(_captions(rng, 8), context_length=16)
    with torch.no_grad():
        torch.testing.assert_close(encode_text(model, tokens), model.encode_text(tokens), atol=1e-5, rtol=1e-5)
