"""The FID Inception-v3 and FID/IS on it, run on the real network code with random weights (nothing downloaded).

A 299x299 Inception forward costs ~0.3 s per image on one CPU core, so network tests use 2-6 small images.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
import torch
from scipy import linalg
from torch import nn

from rayflow.core.metrics import gaussian_stats
from rayflow.evaluation.fid import (
    fid_from_stats,
    inception_features,
    inception_score,
    load_reference_stats,
    reference_stats,
    save_reference_stats,
)
from rayflow.evaluation.inception import (
    FID_WEIGHTS_SHA256,
    FID_WEIGHTS_URL,
    FIDInceptionV3,
    load_fid_inception,
)


def _random_net(seed: int = 0) -> FIDInceptionV3:
    """Random weights, He-initialised convs so the 94 layers keep activations O(1) instead of ~1e-8."""
    torch.manual_seed(seed)
    net = FIDInceptionV3()
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return net.eval()


@pytest.fixture(scope="module")
def net() -> FIDInceptionV3:
    return _random_net()


@pytest.fixture(scope="module")
def weights_file(net, tmp_path_factory) -> tuple[str, str]:
    path = str(tmp_path_factory.mktemp("inception") / "random-inception.pth")
    torch.save(net.state_dict(), path)
    with open(path, "rb") as f:
        return path, hashlib.sha256(f.read()).hexdigest()


def _images(n: int, channels: int = 3, res: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, channels, res, res, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# --- the network ---


def test_outputs_are_pool3_features_and_1008_logits(net):
    feats, logits = inception_features(net, _images(2), batch_size=2)
    assert feats.shape == (2, 2048) and logits.shape == (2, 1008)
    assert feats.dtype == np.float64 and logits.dtype == np.float64
    assert np.isfinite(feats).all() and (feats >= 0).all()  # a mean of ReLU outputs
    assert not np.allclose(feats[0], feats[1])
    # IS logits leave out the fc bias, as the reference Inception Score code does.
    w = net.fc.weight.detach().double().numpy()
    np.testing.assert_allclose(logits, feats @ w.T, rtol=1e-4, atol=1e-5)


def test_grayscale_is_repeated_to_rgb_and_uint8_is_scaled(net):
    gray = _images(2, channels=1)
    f_gray, _ = inception_features(net, gray)
    f_rgb, _ = inception_features(net, gray.repeat(1, 3, 1, 1))
    np.testing.assert_allclose(f_gray, f_rgb, rtol=0, atol=1e-6)
    as_uint8 = ((gray + 1) * 127.5).round().to(torch.uint8)
    f_u8, _ = inception_features(net, as_uint8.numpy())  # numpy uint8 in [0, 255]
    f_float, _ = inception_features(net, as_uint8.float() / 127.5 - 1)
    np.testing.assert_allclose(f_u8, f_float, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="FIX THIS by passing channel-first"):
        inception_features(net, torch.zeros(2, 32, 32, 3))


def test_state_dict_has_the_pytorch_fid_keys_and_shapes(net):
    sd = net.state_dict()
    # torchvision's Inception3 without the aux head: 94 conv+BN layers (6 entries each) and the fc.
    assert len(sd) == 94 * 6 + 2
    assert len([k for k in sd if not k.endswith("num_batches_tracked")]) == 472
    assert sum(p.numel() for p in net.parameters()) == 23_850_960  # torchvision's 27,161,264 - aux + 8 classes
    assert not any(k.startswith("AuxLogits") for k in sd)
    tops = {k.split(".")[0] for k in sd}
    assert tops == {"Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
                    "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
                    "Mixed_7a", "Mixed_7b", "Mixed_7c", "fc"}
    shapes = {
        "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
        "Conv2d_1a_3x3.bn.running_mean": (32,),
        "Conv2d_4a_3x3.bn.running_var": (192,),
        "Mixed_5b.branch1x1.conv.weight": (64, 192, 1, 1),
        "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
        "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
        "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
        "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
        "Mixed_7a.branch3x3_2.conv.weight": (320, 192, 3, 3),
        "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
        "Mixed_7b.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
        "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
        "fc.weight": (1008, 2048),
        "fc.bias": (1008,),
    }
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape, key
    assert not any(k.endswith("conv.bias") for k in sd)  # the BN after each conv carries the bias
    assert all(m.eps == 1e-3 for m in net.modules() if isinstance(m, nn.BatchNorm2d))


def test_pool_branches_follow_the_tf_graph(net):
    avg_blocks = ["Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7b"]
    for name in avg_blocks:
        pool = getattr(net, name).pool
        assert isinstance(pool, nn.AvgPool2d) and pool.count_include_pad is False, name
    assert isinstance(net.Mixed_7c.pool, nn.MaxPool2d)
    # Padding is not averaged in: a constant map stays constant up to the border.
    assert torch.equal(net.Mixed_5b.pool(torch.ones(1, 2, 5, 5)), torch.ones(1, 2, 5, 5))


# --- loading weights ---


def test_load_checks_the_hash_and_loads_strictly(net, weights_file):
    path, sha = weights_file
    loaded = load_fid_inception(path, sha256=sha)
    assert loaded.weights_sha256 == sha and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    for key, value in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert load_fid_inception(path, sha256=sha[:8].upper()).weights_sha256 == sha  # a torch.hub-style prefix


def test_load_rejects_a_wrong_hash_naming_both(weights_file):
    path, sha = weights_file
    with pytest.raises(ValueError) as err:
        load_fid_inception(path)  # the default pin: pytorch-fid's file, not these random weights
    assert sha in str(err.value) and FID_WEIGHTS_SHA256 in str(err.value) and "FIX THIS" in str(err.value)
    with pytest.raises(ValueError, match="not a hex SHA-256"):
        load_fid_inception(path, sha256="6726")


def test_missing_file_says_where_to_get_it(tmp_path):
    for path in (str(tmp_path / "nope.pth"), None):
        with pytest.raises(FileNotFoundError) as err:
            load_fid_inception(path)
        msg = str(err.value)
        assert FID_WEIGHTS_URL in msg and "eval.inception_weights=" in msg and "\n" not in msg
    assert FID_WEIGHTS_SHA256.startswith("6726825d") and len(FID_WEIGHTS_SHA256) == 64  # torch.hub's name rule
    assert FID_WEIGHTS_URL.endswith("pt_inception-2015-12-05-6726825d.pth")


def test_load_tolerates_missing_bn_counters_but_names_wrong_keys(net, tmp_path):
    sd = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    old = str(tmp_path / "old-export.pth")
    torch.save(sd, old)
    load_fid_inception(old, sha256=_sha(old))  # exports without BN step counters load

    sd["Mixed_5b.branch1x1.conv.weightt"] = sd.pop("Mixed_5b.branch1x1.conv.weight")
    sd["fc.weight"] = sd["fc.weight"][:1000]  # torchvision's 1000-class head
    bad = str(tmp_path / "bad.pth")
    torch.save(sd, bad)
    with pytest.raises(ValueError) as err:
        load_fid_inception(bad, sha256=_sha(bad))
    msg = str(err.value)
    assert "missing (1): Mixed_5b.branch1x1.conv.weight" in msg
    assert "unexpected (1): Mixed_5b.branch1x1.conv.weightt" in msg and "wrong shape (1): fc.weight" in msg


def _sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# --- FID and IS ---


def test_fid_of_a_set_with_itself_is_zero_and_a_shift_adds_its_square():
    feats = np.random.default_rng(0).normal(size=(400, 16)) @ np.random.default_rng(1).normal(size=(16, 16))
    mu, sigma = gaussian_stats(feats)
    assert abs(fid_from_stats(mu, sigma, mu, sigma)) < 1e-6
    shift = np.full(16, 0.5)
    mu2, sigma2 = gaussian_stats(feats + shift)
    assert fid_from_stats(mu, sigma, mu2, sigma2) == pytest.approx((shift**2).sum(), rel=1e-6)
    with pytest.raises(ValueError, match="do not match"):
        fid_from_stats(mu, sigma, mu[:8], sigma[:8, :8])


def test_fid_matches_a_direct_scipy_computation():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(300, 12))
    b = rng.normal(size=(300, 12)) @ rng.normal(size=(12, 12)) * 0.7 + 0.3
    mu1, s1 = a.mean(0), np.cov(a, rowvar=False)
    mu2, s2 = b.mean(0), np.cov(b, rowvar=False)
    direct = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert fid_from_stats(mu1, s1, mu2, s2) == pytest.approx(direct, rel=1e-8)


def test_inception_score_bounds():
    mean, std = inception_score(np.zeros((50, 1008)))  # uniform predictions
    assert mean == pytest.approx(1.0) and std == pytest.approx(0.0, abs=1e-12)
    same = np.tile(100.0 * np.eye(5)[0], (50, 1))  # confident, all the same class
    assert inception_score(same)[0] == pytest.approx(1.0)
    distinct = np.tile(100.0 * np.eye(5), (10, 1))  # confident, every split covers the 5 classes evenly
    mean, std = inception_score(distinct, splits=10)
    assert mean == pytest.approx(5.0, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)
    assert inception_score(np.tile(1e4 * np.eye(5), (2, 1)), splits=2)[0] == pytest.approx(5.0)  # no NaN
    with pytest.raises(ValueError, match="N >= splits"):
        inception_score(np.zeros((5, 10)), splits=10)


# --- reference statistics ---


def test_reference_stats_round_trip_and_detect_damage(tmp_path):
    rng = np.random.default_rng(3)
    feats = rng.normal(size=(40, 8))
    mu, sigma = gaussian_stats(feats)
    path = str(tmp_path / "ref.npz")
    meta = {"data": "unit-test", "preprocessing": "none"}
    digest = save_reference_stats(path, mu, sigma, 40, meta)
    assert digest == _sha(path) and [p.name for p in tmp_path.iterdir()] == ["ref.npz"]  # no temp left over
    ref = load_reference_stats(path, expect_n=40)
    np.testing.assert_array_equal(ref.mu, mu)
    np.testing.assert_array_equal(ref.sigma, sigma)
    assert (ref.n, ref.meta, ref.sha256) == (40, meta, digest)
    with np.load(path, allow_pickle=False) as z:
        assert set(z.files) >= {"mu", "sigma", "n", "meta", "sha256"}

    with pytest.raises(ValueError, match="n=40 images, expected n=50"):
        load_reference_stats(path, expect_n=50)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])  # truncated
    with pytest.raises(ValueError, match="unreadable or incomplete"):
        load_reference_stats(path)
    # Edited: a valid npz whose mu no longer matches the stored content hash.
    intact = str(tmp_path / "intact.npz")
    save_reference_stats(intact, mu, sigma, 40, meta)
    with np.load(intact, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["mu"] = arrays["mu"] + 1e-3
    edited = str(tmp_path / "edited.npz")
    np.savez(edited, **arrays)
    with pytest.raises(ValueError, match="content hash"):
        load_reference_stats(edited)
    with pytest.raises(FileNotFoundError):
        load_reference_stats(str(tmp_path / "missing.npz"))


def test_reference_stats_are_computed_once_and_reused(net, tmp_path):
    images = _images(5, channels=1, seed=4)
    calls = []

    def batches():
        calls.append(1)
        return iter(images.split(2) + (images[:2],))  # 7 images offered, the first 5 used

    cache = str(tmp_path / "cache")
    ref = reference_stats(cache, "unit-test-gray-32", batches, net, n=5, batch_size=2, meta={"split": "train"})
    assert len(calls) == 1 and ref.n == 5
    feats, _ = inception_features(net, images)
    mu, sigma = gaussian_stats(feats)
    np.testing.assert_allclose(ref.mu, mu, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(ref.sigma, sigma, rtol=1e-5, atol=1e-9)
    assert ref.meta["split"] == "train" and ref.meta["key"] == "unit-test-gray-32"
    assert ref.meta["weights_sha256"] and "299" in ref.meta["preprocessing"]

    again = reference_stats(cache, "unit-test-gray-32", batches, net, n=5, batch_size=2)
    assert len(calls) == 1  # read back from the cache, Inception not run again
    assert again.sha256 == ref.sha256
    np.testing.assert_array_equal(again.sigma, ref.sigma)
    (name,) = os.listdir(cache)
    assert name.startswith("inception-ref-unit-test-gray-32-n5-") and name.endswith(".npz")

    with pytest.raises(ValueError, match="gave 7 images, 8 requested"):
        reference_stats(cache, "unit-test-gray-32", batches, net, n=8, batch_size=4)
    assert len(calls) == 2 and len(os.listdir(cache)) == 1  # nothing cached for a failed run
