"""The prompt embedding: computed once per prompt, then the text encoder is let go."""

from __future__ import annotations

from collections.abc import Callable

import torch

from pisa_cli.models import cache


class PromptEncoder:
    """Encodes prompts with the CLIP tokenizer and text encoder, loading them only when needed.

    The embedding is the text encoder's last hidden state for the prompt padded to the
    tokenizer's max length (77) with truncation, computed in float32 on the CPU and cached
    per prompt. The encoder (1.4 GB for SD 2.1) is released after each use unless
    ``keep_loaded``: a run encodes one prompt, once.
    """

    def __init__(
        self,
        load_tokenizer: Callable[[], object],
        load_text_encoder: Callable[[], torch.nn.Module],
        keep_loaded: bool = False,
        cache_key: str = "",
    ):
        self._load_tokenizer = load_tokenizer
        self._load_text_encoder = load_text_encoder
        self._keep_loaded = keep_loaded
        self._tokenizer: object | None = None
        self._encoder: torch.nn.Module | None = None
        self._cache: dict[str, torch.Tensor] = {}
        self._cache_key = cache_key
        """Digest of the tokenizer and text encoder files; empty: no on-disk cache."""
        self.encodes = 0
        """How many times the text encoder actually ran."""

    def __call__(self, prompt: str) -> torch.Tensor:
        """(1, 77, hidden) float32 embedding of ``prompt`` on the CPU."""
        if prompt in self._cache:
            return self._cache[prompt]
        key = cache.make_key(encoder=self._cache_key, prompt=prompt) if self._cache_key else ""
        stored = cache.load_tensors("prompts", key, _embedding_check) if key else None
        if stored is not None:
            self._cache[prompt] = stored["embedding"]
        else:
            self._cache[prompt] = self._encode(prompt)
            if key:
                cache.save_tensors("prompts", key, {"embedding": self._cache[prompt]})
        return self._cache[prompt]

    @torch.inference_mode()
    def _encode(self, prompt: str) -> torch.Tensor:
        if self._tokenizer is None:
            self._tokenizer = self._load_tokenizer()
        encoder = self._encoder if self._encoder is not None else self._load_text_encoder()
        encoder = encoder.to("cpu", torch.float32).eval()
        tokens = self._tokenizer(  # type: ignore[operator]
            prompt,
            max_length=self._tokenizer.model_max_length,  # type: ignore[attr-defined]
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        ).input_ids
        embedding = encoder(tokens)[0].detach().clone()
        self.encodes += 1
        self._encoder = encoder if self._keep_loaded else None
        return embedding


def _embedding_check(tensors: dict[str, torch.Tensor]) -> str:
    """What is wrong with a cached prompt entry: one (1, tokens, hidden) float32 tensor."""
    return cache.mismatch(tensors, {"embedding": ((1, None, None), torch.float32)})
