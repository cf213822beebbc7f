"""Text conditioning for text-to-image training: captions (or precomputed embeddings) -> one tensor column.

The stages turn a text-image dataset into one float32 tensor column `cond` of shape (L, D + 1) per row, the
packed text condition (`pack`: embeddings + attention mask, the null condition is all zeros); captions go
through an encoder (`encoders`: minilm, hf) in a Ray Data actor pool, precomputed `text_emb` shards are packed
in plain tasks (`stage`). This package re-exports their public names.
"""

from rayflow.data.text.encoders import (
    ENCODER_KINDS,
    MEMO_BYTES,
    MEMO_ENTRIES,
    HFTextEncoder,
    TextEncoder,
    encoder_dim,
    make_encoder,
)
from rayflow.data.text.pack import pack_text, unpack_text
from rayflow.data.text.stage import (
    ENCODE_BATCH_SIZE,
    TEXT_COLUMNS,
    CaptionEncoderStage,
    encode_text,
    precomputed_stage,
)

__all__ = [
    "ENCODER_KINDS",
    "ENCODE_BATCH_SIZE",
    "MEMO_BYTES",
    "MEMO_ENTRIES",
    "TEXT_COLUMNS",
    "CaptionEncoderStage",
    "HFTextEncoder",
    "TextEncoder",
    "encode_text",
    "encoder_dim",
    "make_encoder",
    "pack_text",
    "precomputed_stage",
    "unpack_text",
]
