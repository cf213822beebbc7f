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


def test_unet_supports_forward_mode_jvp_in_eval_mode():
    # the parameter-space algorithm runs torch.func.jvp through the frozen (eval-mode) teacher
    from torch.func import functional_call, jvp

    net = build_net("unet", in_channels=1, channels=8, channel_mult=[1, 2], attn_levels=[1], num_classes=3).eval()
    for p in net.parameters():
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.05)
    params = {k: v.detach().double() for k, v in net.named_parameters()}
    net = net.double()
    tangent = {k: torch.randn_like(v) for k, v in params.items()}
    x, t, c = torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.rand(2, dtype=torch.float64), torch.tensor([0, 2])
    _, u = jvp(lambda p: functional_call(net, p, (x, t, c)), (params,), (tangent,))
    h = 1e-6
    plus = functional_call(net, {k: v + h * tangent[k] for k, v in params.items()}, (x, t, c))
    minus = functional_call(net, {k: v - h * tangent[k] for k, v in params.items()}, (x, t, c))
    torch.testing.assert_close(u, (plus - minus) / (2 * h), rtol=1e-5, atol=1e-7)
