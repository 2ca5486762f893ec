"""The server's settings: a plain dataclass, importable without the serve extra (the CLI shows its defaults)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..image import DEFAULT_MAX_PIXELS
from ..load_options import DEFAULT_DTYPE, DEFAULT_MODEL


@dataclass
class ServeSettings:
    """Everything `llava-next serve` can be told; the CLI's defaults are these."""

    model: str = DEFAULT_MODEL
    served_name: str | None = None  # the model id clients send and /v1/models lists (default: from `model`)
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # clients send `Authorization: Bearer <key>` on /v1/ routes
    max_concurrent: int | None = None  # sequences decoding at once (default: 8 on CPU, 32 on GPU, fewer if KV is short)
    kv_memory: int | None = None  # bytes of KV space (default: a quarter of free memory on CPU, half on GPU)
    # bytes of finished conversations' KV kept for their next turns (default: a quarter of kv_memory; the newest is
    # kept even when larger)
    prefix_cache_memory: int | None = None
    max_queue: int = 64  # sequences waiting for a KV row; more is answered 429
    prefill_chunk: int = 256  # prompt tokens per step while others are decoding
    max_images: int = 8  # per request
    max_image_bytes: int = 20 * 2**20
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    max_body_bytes: int = 64 * 2**20
    allow_remote_images: bool = False
    allowed_local_media_path: str | None = None
    fetch_timeout: float = 10.0
    log_prompts: bool = False
    # loading, as load() takes them
    dtype: str = DEFAULT_DTYPE
    device: str | None = None
    revision: str | None = None
    quantize: str | None = None
    group_size: int | None = None  # load()'s default: 128, or a quantized checkpoint's own
    compile: bool = False
    vision_tower: str | None = None  # original-layout checkpoints only
    conv_template: str | None = None

    def name(self) -> str:
        if self.served_name:
            return self.served_name
        path = Path(self.model)
        return path.name if path.exists() else self.model

    def media_policy(self):
        from .media import MediaPolicy  # the serve extra's httpx: only where a server runs

        local = Path(self.allowed_local_media_path) if self.allowed_local_media_path else None
        return MediaPolicy(allow_remote=self.allow_remote_images, allowed_local_path=local,
                           max_image_bytes=self.max_image_bytes, max_image_pixels=self.max_image_pixels,
                           fetch_timeout=self.fetch_timeout)
