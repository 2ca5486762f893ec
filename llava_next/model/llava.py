"""The LLaVA model: vision tower -> projector -> (LLaVA-NeXT: anyres packing) -> merged into the decoder's input.

Liu et al., "Visual Instruction Tuning" (2023) and "Improved Baselines with Visual Instruction Tuning" (LLaVA 1.5);
LLaVA-NeXT (2024) adds the anyres tiling whose geometry lives in `llava_next.geometry`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LlavaConfig
from ..errors import LlavaError
from ..geometry import anyres_canvas, anyres_grid
from .decoder import Decoder, KVCache
from .vision import VisionTransformer


class ImageTokenMismatch(LlavaError, ValueError):
    """The prompt's image placeholders and the images' features do not line up."""


class Projector(nn.Module):
    """MLP from vision width to text width, exact (erf) GELU between its layers: two layers in every published
    checkpoint (linear_1, linear_2); the original repositories also train one ("linear") or more ("mlp3x_gelu")."""

    def __init__(self, cfg: LlavaConfig):
        super().__init__()
        vision_width = cfg.vision.hidden_size * len(cfg.feature_layers)
        self.depth = cfg.projector_depth
        self.linear_1 = nn.Linear(vision_width, cfg.text.hidden_size, bias=cfg.projector_bias)
        for i in range(2, self.depth + 1):
            setattr(self, f"linear_{i}", nn.Linear(cfg.text.hidden_size, cfg.text.hidden_size, bias=cfg.projector_bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear_1(x)
        for i in range(2, self.depth + 1):
            x = getattr(self, f"linear_{i}")(F.gelu(x))
        return x


class LlavaModel(nn.Module):
    def __init__(self, cfg: LlavaConfig, for_inference: bool = False):
        """for_inference: the vision tower only up to its feature layer, and the decoder's q/k/v and gate/up
        projections fused into one matmul each. Training builds the plain model, whose parameters are the
        checkpoint's one for one."""
        super().__init__()
        self.cfg = cfg
        self.vision_tower = VisionTransformer(cfg.vision, cfg.feature_layers if for_inference else None)
        self.multi_modal_projector = Projector(cfg)
        if cfg.is_anyres and cfg.patch_merge == "spatial_unpad":
            self.image_newline = nn.Parameter(torch.zeros(cfg.text.hidden_size))
        self.language_model = Decoder(cfg.text, fused=for_inference)
        self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.language_model.embed_tokens.weight

    @property
    def dtype(self) -> torch.dtype:
        """The dtype activations are computed in (the embedding table's; quantized layers store integers)."""
        return self.language_model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.language_model.embed_tokens.weight.device

    def checkpoint_weights(self) -> dict[str, torch.Tensor]:
        """Every weight under its checkpoint name (ours, unfused): fused projections appear as views into the
        fused matrices, so that loading fills them in place and saving writes the checkpoint's names."""
        views = {f"language_model.{k}": v for k, v in self.language_model.checkpoint_views().items()}
        weights = {k: v for k, v in self.named_parameters() if ".qkv_proj." not in k and ".gate_up_proj." not in k}
        return weights | views

    def skipped_checkpoint_prefixes(self) -> tuple[str, ...]:
        """Checkpoint names this model leaves out on purpose (vision blocks past the feature layer)."""
        return tuple("vision_tower." + p for p in self.vision_tower.skipped_checkpoint_prefixes())

    # -- images ------------------------------------------------------------------------------------------------------

    def tile_counts(self, image_sizes: torch.Tensor | None, num_images: int) -> list[int]:
        if not self.cfg.is_anyres:
            return [1] * num_images
        counts = []
        for h, w in image_sizes.tolist():
            grid = anyres_canvas((h, w), self.cfg.image_grid_pinpoints, self.cfg.vision.image_size)
            counts.append(1 + grid.rows * grid.cols)
        return counts

    def image_features(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None) -> list[torch.Tensor]:
        """pixel_values (N, max_tiles, 3, S, S) [anyres] or (N, 3, S, S) -> one (k_i, C) tensor per image."""
        if pixel_values.dim() == 4:
            pixel_values = pixel_values[:, None]
        counts = self.tile_counts(image_sizes, pixel_values.shape[0])
        # Tiles that only pad the batch to max_tiles are dropped before the tower; all the rest go in one call.
        tiles = torch.cat([pv[:n] for pv, n in zip(pixel_values, counts)])  # (sum n, 3, S, S)
        hidden = self.vision_tower(tiles, self.cfg.feature_layers)  # (sum n, P + 1, C_v * k)
        if self.cfg.vision_feature_select_strategy == "default":
            hidden = hidden[:, 1:]  # drop CLS
        features = self.multi_modal_projector(hidden)  # (sum n, P, C)
        per_image = features.split(counts)
        if not self.cfg.is_anyres or self.cfg.patch_merge == "flat":
            return [f.flatten(0, 1) for f in per_image]
        return [self.pack_image_features(f, (h, w)) for f, (h, w) in zip(per_image, image_sizes.tolist())]

    def pack_image_features(self, features: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """(1 + rows * cols, P, C) tile features -> (k, C): base tile, then the grid unpadded, a newline per row."""
        cfg = self.cfg
        side = cfg.vision.patches_per_side
        grid = anyres_grid(image_size, cfg.image_grid_pinpoints, cfg.vision.image_size, cfg.vision.patch_size,
                           cfg.unpad_rounding)
        base, tiles = features[0], features[1:]
        c = features.shape[-1]
        # (rows * cols, side * side, C) -> (rows, cols, side, side, C) -> (rows, side, cols, side, C) -> (H, W, C)
        canvas = tiles.view(grid.rows, grid.cols, side, side, c).permute(0, 2, 1, 3, 4)
        canvas = canvas.reshape(grid.rows * side, grid.cols * side, c)
        if cfg.patch_merge == "spatial":  # the whole grid, row by row, no newlines
            return torch.cat([base, canvas.flatten(0, 1)])
        top, left = grid.feature_offset
        canvas = canvas[top : top + grid.feature_height, left : left + grid.feature_width]  # (h, w, C)
        newline = self.image_newline.to(canvas.dtype).expand(grid.feature_height, 1, c)
        packed = torch.cat([canvas, newline], dim=1).flatten(0, 1)  # (h * (w + 1), C)
        return torch.cat([base, packed])

    # -- text --------------------------------------------------------------------------------------------------------

    def embed(self, input_ids: torch.Tensor, image_features: list[torch.Tensor] | None) -> torch.Tensor:
        """Token embeddings with each image-placeholder row replaced, in order, by the images' feature rows."""
        placeholders = input_ids == self.cfg.image_token_id
        # The placeholder id may lie outside the vocabulary (checkpoints of the original LLaVA code have no image
        # token): look up row 0 there, the rows are replaced anyway.
        embeds = self.language_model.embed_tokens(input_ids.masked_fill(placeholders, 0))
        n_placeholders = int(placeholders.sum())
        n_features = sum(f.shape[0] for f in image_features) if image_features else 0
        if n_placeholders != n_features:
            raise ImageTokenMismatch(
                f"the input has {n_placeholders} image placeholder tokens but the images give {n_features} features; "
                "build inputs with the processor, which expands each <image> to its image's exact token count"
            )
        if n_features:
            embeds = embeds.masked_scatter(placeholders[..., None], torch.cat(image_features).to(embeds.dtype))
        return embeds

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        attention_mask: torch.Tensor | None = None,  # (B, T), 0 on (left) padding
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        cache: KVCache | None = None,
        start: int | torch.Tensor = 0,  # (B,): one decoding query per row, each at its own cache slot
        positions: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        image_features: list[torch.Tensor] | None = None,  # instead of pixel_values: features already computed
    ) -> torch.Tensor:
        """Logits (B, T, V), or for the last `logits_to_keep` positions only.

        Without a cache this is the plain full-sequence forward pass. With one, the queries occupy cache slots
        start .. start + T and `key_mask` (B, start + T) tells which slots are real tokens.
        """
        if image_features is None and pixel_values is not None:
            image_features = self.image_features(pixel_values, image_sizes)
        if image_features is None and (isinstance(start, torch.Tensor) or start > 0):
            # a decoding step: the prompt's images are in the cache, and a generated <image> id (an undertrained
            # model can sample one) is an ordinary token here, as in transformers
            embeds = self.language_model.embed_tokens(input_ids)
        else:
            embeds = self.embed(input_ids, image_features)
        if attention_mask is not None:
            attention_mask = attention_mask.bool()
            if key_mask is None and not bool(attention_mask.all()):
                key_mask = attention_mask  # padding: attention needs a mask (None lets SDPA run plain causal kernels)
        if positions is None:
            positions = positions_from_mask(attention_mask if attention_mask is not None
                                            else torch.ones_like(input_ids, dtype=torch.bool))
        # (B, T, C), or the last logits_to_keep positions only: the decoder computes no more
        hidden = self.language_model(embeds, positions, key_mask, cache, start, outputs=logits_to_keep)
        return self.lm_head(hidden)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Rotary positions that start at 0 on each row's first real token, whatever the left padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
