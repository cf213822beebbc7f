"""A tiny random CLIP checkpoint (character-level tokenizer) saved offline, for CLIP-score tests."""

from __future__ import annotations

import json
import os
import string

import torch

IMAGE_SIZE = 32
MAX_POSITIONS = 16
MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)  # not CLIP's: proves preprocessor_config.json is read


def save_tiny_clip(folder: str, seed: int = 0) -> None:
    """A 2-layer, 32-wide random CLIP and a character-level CLIPTokenizer, saved with save_pretrained."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is first imported: nothing may be downloaded
    import transformers

    letters = string.ascii_lowercase
    tokens = [*letters, *(c + "</w>" for c in letters), "<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    # transformers 5: CLIPTokenizer is the `tokenizers`-backed class and takes the vocab/merges themselves
    # (no vocab.json/merges.txt files needed); it saves tokenizer.json + tokenizer_config.json.
    tokenizer = transformers.CLIPTokenizer(vocab=vocab, merges=[])
    tokenizer.save_pretrained(folder)
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=MAX_POSITIONS,
                bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)  # eos id: the text model pools there
    vision = dict(image_size=IMAGE_SIZE, patch_size=8, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=2)
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    torch.manual_seed(seed)
    transformers.CLIPModel(config).save_pretrained(folder)
    with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
        json.dump({"image_mean": list(MEAN), "image_std": list(STD), "image_processor_type": "CLIPImageProcessor"}, f)
