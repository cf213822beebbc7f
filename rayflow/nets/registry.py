"""Build networks by name from plain keyword arguments."""

from __future__ import annotations

from torch import nn

from rayflow.nets.mlp import MLPDenoiserNet
from rayflow.nets.unet import UNet

_NETS: dict[str, type[nn.Module]] = {"mlp": MLPDenoiserNet, "unet": UNet}


def net_names() -> list[str]:
    return sorted(_NETS)


def build_net(name: str, **kwargs) -> nn.Module:
    """`build_net('unet', in_channels=1, channels=32, num_classes=10)`; unknown names list the choices."""
    if name not in _NETS:
        raise ValueError(f"unknown network {name!r}; choose one of {net_names()}")
    if "channel_mult" in kwargs:
        kwargs["channel_mult"] = tuple(kwargs["channel_mult"])
    if "attn_levels" in kwargs:
        kwargs["attn_levels"] = tuple(kwargs["attn_levels"])
    return _NETS[name](**kwargs)
