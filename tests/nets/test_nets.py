"""Networks: shapes, conditioning, the shared interface and initialisation from the teacher."""

import pytest
import torch

from rayflow.core.diffusion import Denoiser, denoising_loss
from rayflow.core.schedule import CosineSchedule
from rayflow.core.steps import clone_trainable, freeze
from rayflow.nets import build_net


@pytest.mark.parametrize("res,channels", [(32, 1), (16, 3)])
def test_unet_shapes_and_class_conditioning(res, channels):
    torch.manual_seed(0)
    net = build_net("unet", in_channels=channels, channels=16, channel_mult=[1, 2], attn_levels=[1], num_classes=10)
    # residual branches and the output layer start at zero (a common stabiliser); perturb them so the
    # conditioning becomes visible in the output
    for p in net.parameters():
        if p.ndim > 1 and p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.05)
    x, t = torch.randn(4, channels, res, res), torch.rand(4)
    a = net(x, t, torch.tensor([0, 1, 2, 3]))
    b = net(x, t, torch.tensor([4, 5, 6, 7]))
    null = net(x, t, None)
    assert a.shape == x.shape and null.shape == x.shape
    assert not torch.allclose(a, b) and not torch.allclose(a, null)
    torch.testing.assert_close(null, net(x, t, torch.full((4,), 10)))  # None means the null class


def test_unet_learns_to_denoise_a_fixed_image_set():
    # a few hundred steps must reduce the denoising loss on a tiny fixed data set well below its start
    torch.manual_seed(0)
    sch = CosineSchedule()
    den = Denoiser(
        build_net("unet", in_channels=1, channels=16, channel_mult=[1, 2], attn_levels=[], num_classes=2), sch
    )
    x = torch.zeros(8, 1, 8, 8)
    x[:4, :, 2:6, 2:6] = 1.0
    x[4:, :, :, 3:5] = -1.0
    cond = torch.tensor([0] * 4 + [1] * 4)
    opt = torch.optim.Adam(den.parameters(), 2e-3)
    g = torch.Generator().manual_seed(0)

    def loss():
        return denoising_loss(den, x, cond, sch, weighting="one", generator=torch.Generator().manual_seed(1)).mean()

    with torch.no_grad():
        start = loss().item()
    for _ in range(120):
        opt.zero_grad()
        denoising_loss(den, x, cond, sch, weighting="one", generator=g).mean().backward()
        opt.step()
    with torch.no_grad():
        assert loss().item() < 0.5 * start


def test_student_and_aux_start_as_exact_copies_of_a_frozen_teacher():
    teacher = freeze(Denoiser(build_net("mlp", dim=4, width=16, depth=1, num_classes=3), CosineSchedule()))
    student = clone_trainable(teacher)
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())
    for (k, a), (_, b) in zip(teacher.state_dict().items(), student.state_dict().items()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr(), k
    z, t, c = torch.randn(5, 4), torch.rand(5), torch.tensor([0, 1, 2, 3, 0])
    torch.testing.assert_close(teacher(z, t, c), student(z, t, c))


def test_unknown_network_lists_choices():
    with pytest.raises(ValueError, match="choose one of"):
        build_net("transformer")


def _text_cond(b: int, length: int, dim: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(b, length, dim + 1, generator=g)
    mask = torch.arange(length)[None] < torch.randint(1, length + 1, (b, 1), generator=g)  # (B, L) prefix masks
    cond[..., :-1] *= mask[..., None]
    cond[..., -1] = mask.float()
    return cond


def test_text_unet_ignores_padding_and_treats_zeros_as_the_null_condition():
    torch.manual_seed(0)
    net = build_net("unet", in_channels=3, channels=8, channel_mult=[1, 2], attn_levels=[1], text_dim=6).eval()
    for p in net.parameters():  # zero-initialised output layers would make every check trivially pass
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.1)
    x, t, cond = torch.randn(3, 3, 8, 8), torch.rand(3), _text_cond(3, 5, 6)
    out = net(x, t, cond)
    assert out.shape == x.shape
    # values at padded positions (mask 0) do not matter: packing zeroes them, but the net must not rely on it
    noisy = cond.clone()
    noisy[..., :-1] += 5.0 * (cond[..., -1:] == 0)
    torch.testing.assert_close(net(x, t, noisy), out)
    # more padding does not change anything either (the caption's tokens are what counts)
    padded = torch.cat([cond, torch.zeros(3, 4, 7)], dim=1)
    torch.testing.assert_close(net(x, t, padded), out, rtol=1e-5, atol=1e-6)
    # the text changes the output, and None is the all-zero null condition
    assert (net(x, t, _text_cond(3, 5, 6, seed=1)) - out).abs().max() > 1e-3
    torch.testing.assert_close(net(x, t, None), net(x, t, torch.zeros(3, 5, 7)))
    with pytest.raises(ValueError, match="text_dim"):
        net(x, t, torch.zeros(3, 5, 9))
    with pytest.raises(ValueError, match="not both"):
        build_net("unet", in_channels=3, channels=8, num_classes=3, text_dim=6)


@pytest.mark.parametrize("conditioning", ["class", "text"])
def test_unet_supports_forward_mode_jvp_in_eval_mode(conditioning):
    # the parameter-space algorithm runs torch.func.jvp through the frozen (eval-mode) teacher
    from torch.func import functional_call, jvp

    kind = {"num_classes": 3} if conditioning == "class" else {"text_dim": 4}
    net = build_net("unet", in_channels=1, channels=8, channel_mult=[1, 2], attn_levels=[1], **kind).eval()
    for p in net.parameters():
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.05)
    params = {k: v.detach().double() for k, v in net.named_parameters()}
    net = net.double()
    tangent = {k: torch.randn_like(v) for k, v in params.items()}
    x, t = torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.rand(2, dtype=torch.float64)
    c = torch.tensor([0, 2]) if conditioning == "class" else _text_cond(2, 3, 4).double()
    _, u = jvp(lambda p: functional_call(net, p, (x, t, c)), (params,), (tangent,))
    h = 1e-6
    plus = functional_call(net, {k: v + h * tangent[k] for k, v in params.items()}, (x, t, c))
    minus = functional_call(net, {k: v - h * tangent[k] for k, v in params.items()}, (x, t, c))
    torch.testing.assert_close(u, (plus - minus) / (2 * h), rtol=1e-5, atol=1e-7)
