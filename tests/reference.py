"""The reference answers: plain ``transformers`` CLIP, no cliptag code involved."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel


class ReferenceClip:
    """``CLIPModel`` with ``CLIPImageProcessorPil`` and the checkpoint's tokenizer."""

    def __init__(self, checkpoint: Path) -> None:
        self.model = CLIPModel.from_pretrained(checkpoint).eval()
        self.processor = CLIPImageProcessorPil.from_pretrained(checkpoint)
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint)

    @torch.no_grad()
    def probabilities(self, image_path: Path, prompts: list[str]) -> list[float]:
        """Softmax over the labels of ``logits_per_image``, as CLIP defines it."""
        pixels = self.processor(images=[Image.open(image_path)], return_tensors="pt")["pixel_values"]
        tokens = self.tokenizer(prompts, padding=True, return_tensors="pt")
        output = self.model(pixel_values=pixels, **tokens)
        return output.logits_per_image.softmax(dim=-1)[0].tolist()

    @property
    def logit_scale(self) -> float:
        """CLIP's temperature, ``exp(logit_scale)``, as ``logits_per_image`` applies it."""
        return float(self.model.logit_scale.detach().exp())

    @torch.no_grad()
    def image_embedding(self, image_path: Path) -> torch.Tensor:
        pixels = self.processor(images=[Image.open(image_path)], return_tensors="pt")["pixel_values"]
        features = self.model.get_image_features(pixel_values=pixels).pooler_output[0]
        return features / features.norm()

    @torch.no_grad()
    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts, padding=True, return_tensors="pt")
        features = self.model.get_text_features(**tokens).pooler_output
        return features / features.norm(dim=-1, keepdim=True)
