"""The job's dataset as the workers get it: every configured source through the same pipeline."""

import numpy as np
import torch

from rayflow.config import DataConfig
from rayflow.data.transforms import to_model_input
from rayflow.orchestrate.datasets import train_dataset
from rayflow.orchestrate.evaluate import real_images
from tests.data.make_images import make_image_folder
from tests.orchestrate.test_generate import tiny_job


def test_image_folder_job_dataset_yields_uint8_chw_images(ray_cluster, tmp_path):
    make_image_folder(tmp_path / "train")  # 11 good images in 3 classes, one truncated JPEG
    data = DataConfig(source="image_folder", path=str(tmp_path / "train"), resolution=16, channels=3,
                      num_classes=3, on_bad_image="skip")
    batch = train_dataset(data).take_batch(100, batch_format="numpy")
    images = np.stack(batch["image"])
    # uint8 through the object store; the workers' iter_torch_batches scales to [-1, 1]
    assert images.shape == (11, 3, 16, 16) and images.dtype == np.uint8
    assert set(batch["label"].tolist()) == {0, 1, 2}


def test_builtin_job_dataset_is_deterministic_for_resume(ray_cluster):
    data = DataConfig(source="digits", resolution=8)
    a = train_dataset(data).take_batch(64, batch_format="numpy")
    b = train_dataset(data).take_batch(64, batch_format="numpy")
    assert np.array_equal(a["label"], b["label"]) and np.array_equal(np.stack(a["image"]), np.stack(b["image"]))


def test_evaluation_real_images_are_scaled_as_the_workers_scale_them(ray_cluster):
    # the evaluation's real set (classifier, FID reference) takes the training pipeline's uint8 images and scales
    # them the same way iter_torch_batches does: the old pipeline's float32 values, bit for bit
    job = tiny_job()
    x, labels = real_images(job, 32)
    batch = train_dataset(job.data, encode_text=False).limit(32).take_batch(32, batch_format="numpy")
    assert x.dtype == torch.float32 and x.shape == (32, job.data.channels, job.data.resolution, job.data.resolution)
    expected = to_model_input(np.ascontiguousarray(np.stack(batch["image"]).transpose(0, 2, 3, 1)))  # NCHW -> NHWC
    assert np.array_equal(x.numpy(), expected) and -1.0 <= x.min() and x.max() <= 1.0
    assert np.array_equal(labels.numpy(), batch["label"])
