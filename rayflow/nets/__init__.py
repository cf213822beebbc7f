"""nn.Modules behind one interface F(x_in, t, cond); `rayflow.core.diffusion.Denoiser` turns them into x_hat."""

from rayflow.nets.registry import build_net, net_names

__all__ = ["build_net", "net_names"]
