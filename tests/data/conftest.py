"""Fixtures for the data layer."""

from __future__ import annotations

import pytest

from .make_images import ImageFolderSpec, make_image_folder


@pytest.fixture(scope="session")
def image_folder_spec(tmp_path_factory: pytest.TempPathFactory) -> ImageFolderSpec:
    """A tiny ImageNet-layout folder (session-wide; tests must not modify it)."""
    return make_image_folder(tmp_path_factory.mktemp("imagenet_tiny"))
