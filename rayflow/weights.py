"""Weight files read safely: `.safetensors` (also sharded, via `.index.json`) or torch files loaded with
`weights_only=True`, never unpickled code; and the key/shape check every loader runs against the built network."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import torch

MAX_LISTED = 5  # mismatches listed in an error


def index_shards(index_path: str) -> list[str]:
    """The shard files a sharded `.index.json` names, beside it."""
    with open(index_path) as f:
        weight_map = json.load(f)["weight_map"]
    return [os.path.join(os.path.dirname(index_path), s) for s in sorted(set(weight_map.values()))]


def read_state_dict(path: str, *, state_key: str | None = None) -> dict[str, torch.Tensor]:
    """A state_dict from `.safetensors` (or a sharded `.index.json`) or a torch file read with weights_only=True.

    state_key selects a nested entry ("ema", "model.ema") of checkpoints that hold more than the weights.
    """
    if path.endswith(".index.json"):
        state: dict = {}
        for shard in index_shards(path):
            state.update(read_state_dict(shard))
    elif path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path, device="cpu")
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle.UnpicklingError for pickled objects, RuntimeError for other formats
            raise ValueError(
                f"teacher file {path} is not a plain state_dict that loads with weights_only=True "
                f"({type(e).__name__}: {str(e).splitlines()[0][:200]}). rayflow never unpickles code. FIX THIS by "
                "converting it once, where you trust it, to .safetensors (README: Distill your own model)"
            ) from None
    for part in state_key.split(".") if state_key else []:
        if not isinstance(state, Mapping) or part not in state:
            keys = sorted(state)[:10] if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(f"teacher file {path} has no entry {part!r} (teacher.state_key={state_key!r}); its "
                             f"top-level keys are {keys}. FIX THIS by setting teacher.state_key to one of them")
        state = state[part]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        keys = sorted(state)[:10] if isinstance(state, Mapping) else type(state).__name__
        raise ValueError(f"teacher file {path} is not a flat name -> tensor state_dict (top level: {keys}). "
                         "FIX THIS by setting teacher.state_key to the entry that holds the weights (e.g. ema)")
    return dict(state)


def check_state_dict(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], what: str, fix: str):
    """Raise a ValueError listing the first missing, unexpected and shape-mismatched keys, if any."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs config {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{what}: {len(missing)} missing {missing[:MAX_LISTED]}, {len(unexpected)} unexpected "
            f"{unexpected[:MAX_LISTED]}, {len(shapes)} shape mismatches {shapes[:MAX_LISTED]}. FIX THIS by {fix}"
        )
