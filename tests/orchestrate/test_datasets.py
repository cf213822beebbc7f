"""The job's dataset as the workers get it: every configured source through the same pipeline."""

import numpy as np

from rayflow.config import DataConfig
from rayflow.orchestrate.datasets import train_dataset
from tests.data.make_images import make_image_folder


def test_image_folder_job_dataset_yields_scaled_chw_images(ray_cluster, tmp_path):
    make_image_folder(tmp_path / "train")  # 11 good images in 3 classes, one truncated JPEG
    data = DataConfig(source="image_folder", path=str(tmp_path / "train"), resolution=16, channels=3,
                      num_classes=3, on_bad_image="skip")
    batch = train_dataset(data).take_batch(100, batch_format="numpy")
    images = np.stack(batch["image"])
    assert images.shape == (11, 3, 16, 16) and images.dtype == np.float32
    assert -1.0 <= images.min() and images.max() <= 1.0
    assert set(batch["label"].tolist()) == {0, 1, 2}


def test_builtin_job_dataset_is_deterministic_for_resume(ray_cluster):
    data = DataConfig(source="digits", resolution=8)
    a = train_dataset(data).take_batch(64, batch_format="numpy")
    b = train_dataset(data).take_batch(64, batch_format="numpy")
    assert np.array_equal(a["label"], b["label"]) and np.array_equal(np.stack(a["image"]), np.stack(b["image"]))
