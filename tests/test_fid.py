"""FID through torch-fidelity, offline: He-initialised InceptionV3 weights and a tiny open_clip model, both saved
to tmp dirs. Most checks use Inception's "192" layer (about 7x cheaper than "2048" on this CPU, and 192x192
covariances keep the Fréchet distance cheap); the default 2048-d path is checked for shape here, and end to end
with MOS_FID_FULL=1 (a 2048x2048 eigendecomposition takes 5-30 s on the shared 2-core machine).
"""
import json
import os
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
import torch_fidelity

from mos_lightning.errors import ConfigError
from mos_lightning.evaluation import fid as fid_module
from mos_lightning.evaluation.fid import FrechetDistance, ImagesAsUint8

KEY = torch_fidelity.KEY_METRIC_FID


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory):
    """torch-fidelity's InceptionV3 with kaiming-normal convs/linears (PyTorch's default init maps every image to
    nearly the same features, so FID would be ~0 for anything), saved as the state_dict weights_path expects."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Blank(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True):  # the constructor always loads; skip it
            return None

    root = tmp_path_factory.mktemp("inception")
    torch.save({}, root / "empty.pth")
    torch.manual_seed(0)
    net = Blank("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(root / "empty.pth"))
    for module in net.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
    torch.save(net.state_dict(), root / "inception-he.pth")
    return root / "inception-he.pth"


@pytest.fixture(scope="module")
def shared_fd(inception_weights):
    return FrechetDistance(weights_path=inception_weights, feature_layer="192", batch_size=16)


@pytest.fixture
def fd(shared_fd, tmp_path):
    """The module's one FrechetDistance (extractor loaded once), with a fresh cache dir per test."""
    shared_fd.cache_dir = tmp_path / "fid-cache"
    yield shared_fd
    shared_fd.cache_dir = None


@pytest.fixture
def counter(shared_fd):
    """How many images went through the extractor."""
    seen = [0]
    handle = shared_fd.extractor.register_forward_hook(lambda m, inputs, out: seen.__setitem__(0, seen[0] +
                                                                                               len(inputs[0])))
    yield seen
    handle.remove()


def blobs(n, rng):
    """Random colour blocks: 4x4 random colours, nearest-upsampled to 32x32, in [-1, 1]."""
    return torch.nn.functional.interpolate(torch.rand(n, 3, 4, 4, generator=rng) * 2 - 1, size=32, mode="nearest")


def gradients(n, rng):
    """Smooth two-colour ramps along a random direction, in [-1, 1]."""
    angle = torch.rand(n, 1, 1, 1, generator=rng) * 2 * torch.pi
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    t = ((xs * angle.cos() + ys * angle.sin()) / 2 ** 0.5 + 1) / 2  # (n,1,32,32) in [0,1]
    a, b = (torch.rand(n, 3, 1, 1, generator=rng) * 2 - 1 for _ in range(2))
    return a * (1 - t) + b * t


def reference_fid(f1, f2):
    """Independent float64 Fréchet distance: numpy statistics, scipy.linalg.sqrtm."""
    f1, f2 = np.asarray(f1, dtype=np.float64), np.asarray(f2, dtype=np.float64)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # n < d: the product is singular, sqrtm says so
        covmean = scipy.linalg.sqrtm(s1 @ s2)
    diff = f1.mean(0) - f2.mean(0)
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real), float(np.trace(s1))


def direct_features(extractor, images):
    """The same extractor called directly on the test's own uint8 conversion (no torch-fidelity loader)."""
    x = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    with torch.no_grad():
        return extractor(x)[0]


def test_default_extractor_is_inception_2048(inception_weights, rng):
    fd = FrechetDistance(weights_path=inception_weights)
    assert (fd.name, fd.feature_layer) == ("inception-v3-compat", "2048")
    extractor = fd.extractor
    assert type(extractor).__name__ == "FeatureExtractorInceptionV3" and fd.extractor is extractor
    assert fd.features(blobs(1, rng)).shape == (1, 2048)


@pytest.mark.skipif(not os.environ.get("MOS_FID_FULL"), reason="2048-d FID end to end; set MOS_FID_FULL=1")
def test_default_2048_identical_and_float64_reference(inception_weights, rng):
    fd = FrechetDistance(weights_path=inception_weights)
    a, b = blobs(8, rng), gradients(8, rng)
    same, diff = fd.score(a, a, data_id="a").value, fd.score(b, a, data_id="a").value
    fa, fb = direct_features(fd.extractor, a), direct_features(fd.extractor, b)
    (ref_same, scale), (ref_diff, _) = reference_fid(fa, fa), reference_fid(fb, fa)
    print(f"2048-d: identical {same:.3e} (float64 {ref_same:.3e}, tr {scale:.3f}); different {diff:.6f} "
          f"(float64 {ref_diff:.6f})")
    assert abs(same) < 1e-4 * scale and diff == pytest.approx(ref_diff, rel=1e-5) and diff > 0.5 * scale


def test_identical_zero_different_positive_and_float64_reference(fd, inception_weights, rng, counter):
    a, b = blobs(10, rng), gradients(10, rng)
    same = fd.score(a, a, data_id="blobs").value
    assert counter[0] == 20  # reference and generated side
    diff = fd.score(b, a, data_id="blobs").value
    assert counter[0] == 30  # the reference statistics came from the cache
    theirs = torch_fidelity.calculate_metrics(  # the public entry point, which builds its own extractor
        input1=ImagesAsUint8(b), input2=ImagesAsUint8(a), fid=True, cuda=False, cache=False, save_cpu_ram=True,
        verbose=False, feature_extractor="inception-v3-compat", feature_layer_fid="192",
        feature_extractor_weights_path=str(inception_weights))[KEY]
    assert diff == pytest.approx(theirs, rel=1e-6)
    fa, fb = direct_features(fd.extractor, a), direct_features(fd.extractor, b)
    (ref_same, scale), (ref_diff, _) = reference_fid(fa, fa), reference_fid(fb, fa)
    print(f"192-d: identical {same:.3e} (float64 {ref_same:.3e}, tr(sigma) {scale:.4f}); "
          f"different {diff:.6f} (float64 {ref_diff:.6f}, rel {abs(diff - ref_diff) / ref_diff:.1e})")
    assert abs(same) < 1e-4 * scale  # exact 0 in exact arithmetic; eigvals of a singular product leave ~1e-6
    assert diff == pytest.approx(ref_diff, rel=1e-5)
    assert diff > 0.5 * scale  # blocks vs ramps: far apart relative to the spread within a set


def test_reference_cache_hits_and_changed_keys_miss(fd, inception_weights, rng, counter, tmp_path, monkeypatch):
    ref, gen = blobs(8, rng), gradients(8, rng)
    sampler = {"cfg": 4.5, "steps": 20, "seed": 7, "precision": "float32"}
    first = fd.score(gen, ref, data_id="ref", sampler=sampler, save_to=tmp_path / "run")
    assert counter[0] == 16 and len(list(fd.cache_dir.glob("*.npz"))) == 1
    monkeypatch.setattr(fid_module, "create_feature_extractor", lambda *a, **k: pytest.fail("extractor rebuilt"))
    counter[0] = 0
    again = fd.score(gen, ref, data_id="ref")
    assert counter[0] == 8 and again.value == pytest.approx(first.value, rel=1e-12)  # only the generated side
    for changed in ({"data_id": "ref-v2"}, {"reference": torch.cat([ref[:1] * 0, ref[1:]])}, {"num_samples": 6}):
        counter[0] = 0
        kwargs = {"reference": ref, "data_id": "ref", **changed}
        fd.reference_stats(**kwargs)
        assert counter[0] == changed.get("num_samples", 8), changed
    assert len(list(fd.cache_dir.glob("*.npz"))) == 4
    base = fd.reference_key(ref, "ref", 8)
    (tmp_path / "other.pth").write_bytes(b"other weights")
    for other in (FrechetDistance(weights_path=tmp_path / "other.pth", feature_layer="192"),
                  FrechetDistance(weights_path=inception_weights, feature_layer="64"),
                  FrechetDistance(weights_path=inception_weights, feature_layer="192", resolution=64)):
        assert other.reference_key(ref, "ref", 8) != base
    saved = json.loads((tmp_path / "run" / "fid-inception-v3-compat.json").read_text())
    assert saved == first.to_dict() and saved["settings"]["steps"] == 20 and saved["settings"]["seed"] == 7
    settings = first.settings
    assert (settings["extractor"], settings["feature_layer"], settings["num_samples"]) == ("inception-v3-compat",
                                                                                           "192", 8)
    assert settings["weights"].startswith("sha256:") and "tf1-bilinear" in settings["resize_policy"]
    assert (settings["cfg"], settings["precision"], settings["resolution"], settings["features"]) == (
        4.5, "float32", None, "layer 192")


def test_per_category_matches_each_subset(fd, rng):
    gen = torch.cat([blobs(4, rng), gradients(4, rng)])
    ref = torch.cat([gradients(4, rng), blobs(4, rng)])
    gen_cats, ref_cats = ["blob"] * 4 + ["ramp"] * 4, ["ramp"] * 4 + ["blob"] * 4
    result = fd.score(gen, ref, data_id="mix", categories=gen_cats, reference_categories=ref_cats)
    assert set(result.per_category) == {"blob", "ramp"}
    for cat, (g, r) in {"blob": (gen[:4], ref[4:]), "ramp": (gen[4:], ref[:4])}.items():
        # the subset alone is extracted in another batch (4 images, not 8): float32 features then differ in the
        # last bits (~1e-7 relative, CPU-dependent), which moves a Frechet distance this size far less than 1e-5
        alone = fd.score(g, r, data_id=f"mix-{cat}").value
        assert result.per_category[cat] == pytest.approx(alone, rel=1e-5, abs=1e-6), cat
    assert all(np.isfinite(v) and v > 0 for v in result.per_category.values())


def test_open_clip_feature_fid_through_torch_fidelity(tmp_path, rng):
    import open_clip

    config = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
              "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "fid-tiny-clip.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "fid-tiny-clip.json")
    torch.manual_seed(0)
    weights = tmp_path / "fid-tiny-clip.pt"
    torch.save(open_clip.create_model("fid-tiny-clip").state_dict(), weights)

    fd = FrechetDistance("open-clip:fid-tiny-clip", weights_path=weights)
    assert torch.equal(fd.extractor.model.visual.conv1.weight, torch.load(weights)["visual.conv1.weight"])
    a, b = blobs(16, rng), gradients(16, rng)
    assert direct_features(fd.extractor, a).norm(dim=-1) == pytest.approx(torch.ones(16), abs=1e-5)
    same, diff = fd.score(a, a, data_id="a"), fd.score(b, a, data_id="a")
    theirs = torch_fidelity.calculate_metrics(  # by name only: the extractor registered with torch-fidelity
        input1=ImagesAsUint8(b), input2=ImagesAsUint8(a), fid=True, cuda=False, cache=False, save_cpu_ram=True,
        verbose=False, feature_extractor="open-clip:fid-tiny-clip")[KEY]
    print(f"open_clip features: identical {same.value:.3e}, different {diff.value:.6f}")
    assert abs(same.value) < 1e-6 and diff.value > 1e-3 and diff.value == pytest.approx(theirs, rel=1e-6)
    assert same.settings["extractor"] == "open-clip:fid-tiny-clip" and same.settings["feature_layer"] == "clip"


def test_inputs_paths_datasets_and_fingerprints(tmp_path, rng):
    from PIL import Image

    images = blobs(3, rng)
    as_uint8 = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    paths = []
    for i, img in enumerate(as_uint8):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(paths[-1])
    triples = [(img, "a caption", "blob") for img in images]  # what the kit's datasets yield
    for source in (images, as_uint8, paths, triples):
        got = torch.stack(list(ImagesAsUint8(source)))
        assert got.dtype == torch.uint8 and torch.equal(got, as_uint8)
    assert ImagesAsUint8(images, 2, resolution=48)[1].shape == (3, 48, 48) and len(ImagesAsUint8(images, 2)) == 2
    before = fid_module.data_fingerprint(paths, 3)
    assert fid_module.data_fingerprint(paths, 2) != before
    Image.fromarray(as_uint8[0].permute(1, 2, 0).numpy()[::-1].copy()).save(paths[0])
    os.utime(paths[0], ns=(1, 1))  # a rewrite with another mtime
    assert fid_module.data_fingerprint(paths, 3) != before


def test_bad_settings_are_config_errors_before_any_extraction(inception_weights, fd, counter, tmp_path, rng):
    missing = tmp_path / "weights" / "pt_inception.pth"
    with pytest.raises(ConfigError, match=r"weights_path: .*pt_inception\.pth.*not found; fetch https://.*"
                                          r"weights-inception-2015-12-05"):
        FrechetDistance(weights_path=missing)
    with pytest.raises(ConfigError, match="extractor: unknown 'dinov2'; allowed: inception-v3-compat, open-clip:"):
        FrechetDistance("dinov2")
    with pytest.raises(ConfigError, match="weights_path: extractor 'open-clip:ViT-B-32' needs an open_clip"):
        FrechetDistance("open-clip:ViT-B-32")
    ref, gen = blobs(5, rng), blobs(7, rng)
    with pytest.raises(ConfigError, match="num_samples: requested 7 but the reference set has only 5"):
        fd.check_reference(ref, 7)
    with pytest.raises(ConfigError, match="num_samples: requested 7 but the reference set has only 5"):
        fd.score(gen, ref, data_id="small")
    with pytest.raises(ConfigError, match=r"categories: \['star'\] not among"):
        fd.score(gen[:5], ref, data_id="c", categories=["star"] + ["blob"] * 4, reference_categories=["blob"] * 5)
    with pytest.raises(ConfigError, match="categories: give categories for both"):
        fd.score(gen[:5], ref, data_id="c", categories=["blob"] * 5)
    assert counter[0] == 0
