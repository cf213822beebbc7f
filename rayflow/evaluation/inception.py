"""The FID Inception-v3 network: the TensorFlow 2015-12-05 graph as ported by pytorch-fid, loaded from a local file.

FID and Inception Score numbers are only comparable across papers when computed with this exact network: the
TF graph of the original FID code, which differs from torchvision's ImageNet Inception-v3 in four ways that
are reproduced here:

- 1008 output classes instead of 1000;
- the average pools of the Mixed_5*, Mixed_6b-e and Mixed_7b blocks ignore the zero padding
  (TF's average pool divides by the number of real pixels, i.e. `count_include_pad=False`);
- the pool branch of the last block (Mixed_7c) is a 3x3 *max* pool, not an average pool;
- the input is resized to 299x299 bilinearly (corners not aligned) and fed in [-1, 1].

Module and parameter names follow torchvision's `Inception3` (without the auxiliary head), so the state_dict of
pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` loads with `strict=True`. Nothing is ever downloaded:
the user points `eval.inception_weights` at a local copy, and its SHA-256 is checked before it is unpickled.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from rayflow.files import sha256_file

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_WEIGHTS_FILE}"
# SHA-256 of pytorch-fid's release file (95,628,359 bytes). It starts with "6726825d", the hash prefix in the
# file name (torch.hub's naming convention), and is quoted identically, next to that URL, by several
# independent projects that verify the download.
FID_WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
CONFIG_KEY = "eval.inception_weights"

FEATURE_DIM = 2048  # pool3: the features FID is defined on
NUM_CLASSES = 1008  # the TF graph's softmax has 1008 outputs (1000 ImageNet classes + 8 unused)
INPUT_SIZE = 299


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3, as in the TF graph) -> ReLU."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size, stride=1, padding=0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_ch, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool() -> nn.Module:
    # TF's SAME-padded average pool averages over the real pixels only; counting the zero padding (the
    # PyTorch default) darkens the border of every pool branch and shifts FID by a few points.
    return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    """35x35 block (Mixed_5b-d): 1x1, 5x5, double 3x3 and pooled branches, concatenated in that order."""

    def __init__(self, in_ch: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_ch, 64, 1)
        self.branch5x5_1 = BasicConv2d(in_ch, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.pool = _tf_avg_pool()
        self.branch_pool = BasicConv2d(in_ch, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(self.pool(x))], 1)


class InceptionB(nn.Module):
    """35x35 -> 17x17 reduction (Mixed_6a): strided 3x3, strided double 3x3 and a strided max pool."""

    def __init__(self, in_ch: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(in_ch, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class FIDInceptionC(nn.Module):
    """17x17 block (Mixed_6b-e): 1x1, factorised 7x7, double factorised 7x7 and pooled branches."""

    def __init__(self, in_ch: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_ch, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_ch, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_ch, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.pool = _tf_avg_pool()
        self.branch_pool = BasicConv2d(in_ch, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            bd = layer(bd)
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(self.pool(x))], 1)


class InceptionD(nn.Module):
    """17x17 -> 8x8 reduction (Mixed_7a): strided 3x3, 7x7-then-strided-3x3 and a strided max pool."""

    def __init__(self, in_ch: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_ch, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_ch, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class FIDInceptionE(nn.Module):
    """8x8 block (Mixed_7b with an average pool, Mixed_7c with a max pool): expanded 3x3 branches."""

    def __init__(self, in_ch: int, *, max_pool: bool) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_ch, 320, 1)
        self.branch3x3_1 = BasicConv2d(in_ch, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        # The TF graph's last block max-pools here (most likely a bug in that graph, but it is the network
        # every published FID was computed with).
        self.pool = nn.MaxPool2d(3, stride=1, padding=1) if max_pool else _tf_avg_pool()
        self.branch_pool = BasicConv2d(in_ch, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(h), self.branch3x3_2b(h)], 1)
        h = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(h), self.branch3x3dbl_3b(h)], 1)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(self.pool(x))], 1)


class FIDInceptionV3(nn.Module):
    """The FID Inception-v3. `forward`: (N, 1 or 3, H, W) in [-1, 1] -> (pool3 features (N, 2048), logits (N, 1008)).

    Build it with random weights for tests; use `load_fid_inception` for real measurements. `weights_sha256`
    is the SHA-256 of the file the weights came from (None when not loaded from a file).
    """

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, max_pool=False)
        self.Mixed_7c = FIDInceptionE(2048, max_pool=True)
        self.fc = nn.Linear(FEATURE_DIM, NUM_CLASSES)
        self.weights_sha256: str | None = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, C, H, W) images in [-1, 1], C in {1, 3} -> pool3 features (N, 2048) and IS logits (N, 1008).

        The logits are pool3 @ fc.weight.T *without* the fc bias, as the reference Inception Score code
        (improved-GAN's, followed by torch-fidelity and torchmetrics: "logits_unbiased") computes them.
        """
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"Inception takes (N, 1 or 3, H, W) images, got shape {tuple(x.shape)}; FIX THIS by "
                             "passing channel-first images (x.permute(0, 3, 1, 2))")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # grayscale: the same plane on R, G and B
        if x.shape[2:] != (INPUT_SIZE, INPUT_SIZE):
            # Resizing in [-1, 1] equals pytorch-fid's resize-in-[0, 1]-then-2x-1: both maps are affine.
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        h = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (N, 64, 147, 147)
        h = F.max_pool2d(h, 3, stride=2)  # (N, 64, 73, 73)
        h = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(h))  # (N, 192, 71, 71)
        h = F.max_pool2d(h, 3, stride=2)  # (N, 192, 35, 35)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            h = block(h)  # ... -> (N, 2048, 8, 8)
        features = h.mean(dim=(2, 3))  # (N, 2048) global average pool = pool3
        return features, features @ self.fc.weight.T  # (N, 1008)


def load_fid_inception(
    path: str | os.PathLike | None, sha256: str | None = FID_WEIGHTS_SHA256, device: str | torch.device = "cpu"
) -> FIDInceptionV3:
    """The FID Inception with weights from a local file whose SHA-256 must equal `sha256`, in eval mode.

    `sha256` may also be a prefix of at least 8 hex digits (torch.hub's file-name convention); None or ""
    means the pinned pytorch-fid hash. Raises FileNotFoundError (saying where to get the file) when it is
    missing and ValueError when its hash or its keys are wrong. Nothing is downloaded.
    """
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(
            f"FID Inception weights not found at {str(path) if path else '(unset)'}; FIX THIS by downloading "
            f"{FID_WEIGHTS_URL} once and setting {CONFIG_KEY}=/path/to/{FID_WEIGHTS_FILE} (nothing is downloaded "
            "at run time)")
    want = (sha256 or FID_WEIGHTS_SHA256).strip().lower()
    if len(want) < 8 or any(c not in "0123456789abcdef" for c in want):
        raise ValueError(f"pinned Inception hash {sha256!r} is not a hex SHA-256 (or a prefix of >= 8 digits); "
                         "FIX THIS by passing the file's full SHA-256 (sha256sum FILE)")
    got = sha256_file(os.fspath(path))
    if not got.startswith(want):
        raise ValueError(
            f"FID Inception weights {path} have SHA-256 {got}, expected {want}; FIX THIS by downloading the file "
            f"again from {FID_WEIGHTS_URL} (a different or damaged file gives incomparable FID/IS), or pass its "
            "hash as sha256= if you deliberately use other weights")
    # weights_only: the file is a pickle; the restricted unpickler refuses anything but tensors and containers.
    state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    model = FIDInceptionV3()
    _load_strict(model, state, os.fspath(path))
    model.weights_sha256 = got
    return model.to(device).eval().requires_grad_(False)


def _load_strict(model: nn.Module, state: object, path: str) -> None:
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state_dict (a mapping of names to tensors); FIX THIS by "
                         f"pointing {CONFIG_KEY} at pytorch-fid's {FID_WEIGHTS_FILE}")
    state = dict(state)
    own = model.state_dict()
    # BatchNorm step counters mean nothing in eval mode; older exports lack them, so take ours.
    for key in own.keys() - state.keys():
        if key.endswith(".num_batches_tracked"):
            state[key] = own[key]
    missing = sorted(own.keys() - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    wrong_shape = sorted(k for k in own.keys() & state.keys() if own[k].shape != state[k].shape)
    if missing or unexpected or wrong_shape:
        parts = [f"{name} ({len(keys)}): {', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''}"
                 for name, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape))
                 if keys]
        raise ValueError(f"{path} does not fit the FID Inception-v3: {'; '.join(parts)}; FIX THIS by pointing "
                         f"{CONFIG_KEY} at pytorch-fid's {FID_WEIGHTS_FILE} (torchvision-named keys, 1008 classes)")
    model.load_state_dict(state, strict=True)
