"""CLIP checkpoints with random weights, saved with ``save_pretrained``.

The tests and the benchmarks load these through the production path
(:func:`worker.loading.load_clip`), since real weights cannot be downloaded here.
A full-size ViT-B/32 with random weights costs exactly what the real one costs.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

TINY_WORDS = ("a", "photo", "of", "the", "cat", "dog", "car", "cup", "rocket", "person")


def _byte_alphabet() -> list[str]:
    """GPT-2/CLIP's printable stand-ins for the 256 byte values."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    extra = 0
    codes = list(printable)
    for byte in range(256):
        if byte not in printable:
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def tiny_tokenizer() -> CLIPTokenizer:
    """A byte-level BPE tokenizer that encodes any text, with merges for a few whole words."""
    alphabet = _byte_alphabet()
    vocab: dict[str, int] = {}
    for token in ["<|startoftext|>", "<|endoftext|>", *alphabet, *(c + "</w>" for c in alphabet)]:
        vocab.setdefault(token, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in TINY_WORDS:
        symbols = [*list(word[:-1]), word[-1] + "</w>"]
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            merged = pair[0] + pair[1]
            if pair not in merges:
                merges.append(pair)
                vocab.setdefault(merged, len(vocab))
            symbols = [merged, *symbols[2:]]
    return CLIPTokenizer(vocab=vocab, merges=merges)


def save_clip(directory: Path, config: CLIPConfig, tokenizer: CLIPTokenizer, *, seed: int = 0) -> Path:
    """Random-weight ``CLIPModel`` for ``config`` plus tokenizer and processor, saved to ``directory``."""
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    CLIPImageProcessorPil().save_pretrained(directory)
    return directory


def build_tiny_clip(directory: Path, *, image_size: int = 64) -> Path:
    """A CLIP with 2-layer towers of width 32: fast enough to run hundreds of jobs in tests.

    Its processor resizes to the checkpoint's own ``image_size``, so tests also prove that
    input size comes from the checkpoint's config and not from ViT-B/32 constants.
    """
    tokenizer = tiny_tokenizer()
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 77,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": image_size,
            "patch_size": 16,
        },
        projection_dim=16,
    )
    save_clip(directory, config, tokenizer)
    processor = CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size=image_size)
    processor.save_pretrained(directory)
    return directory


def build_full_size_clip(directory: Path) -> Path:
    """ViT-B/32 at full size (the default ``CLIPConfig``) with random weights."""
    tokenizer = tiny_tokenizer()
    config = CLIPConfig()
    config.text_config.eos_token_id = tokenizer.eos_token_id
    config.text_config.bos_token_id = tokenizer.bos_token_id
    config.text_config.pad_token_id = tokenizer.pad_token_id
    return save_clip(directory, config, tokenizer)
