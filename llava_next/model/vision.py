"""CLIP vision transformer (Radford et al. 2021), as LLaVA uses it: a feature extractor cut at an inner layer.

Module and parameter names follow transformers' CLIPVisionTransformer so that checkpoints map by prefix alone.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from ..config import VisionConfig
from .decoder import embedding


@functools.cache
def cpu_has_amx() -> bool:
    """Whether this processor has AMX tiles (Intel Xeon from Sapphire Rapids), which PyTorch's CPU kernels use."""
    supported = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(supported and supported())


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(
            cfg.num_channels, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False
        )
        self.position_embedding = embedding(cfg.patches_per_side**2 + 1, cfg.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # pixels: (n, 3, S, S) -> patches: (n, P, C) with P = (S / patch)^2, then CLS first: (n, P + 1, C)
        weight = self.patch_embedding.weight
        patches = self.patch_embedding(pixels.to(weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, width = x.shape
        # (n, L, C) -> (n, heads, L, head_dim)
        q, k, v = (p(x).view(n, length, self.num_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        if x.device.type == "cpu" and x.dtype == torch.bfloat16 and not cpu_has_amx():
            # Without AMX, PyTorch's CPU kernel for unmasked bfloat16 attention is ~2.7x slower than its float32 one
            # (an AMD EPYC with AVX512-BF16, 577-patch tiles); upcasting the three small tensors costs far less. With
            # AMX it multiplies bfloat16 tiles natively: 2.9-3.1x the upcast (an Intel Xeon, 3 and 5 tiles).
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(x.dtype)
        else:
            out = F.scaled_dot_product_attention(q, k, v)  # no mask: every patch sees every patch
        return self.out_proj(out.transpose(1, 2).reshape(n, length, width))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = quick_gelu if cfg.hidden_act == "quick_gelu" else F.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = VisionAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(VisionBlock(cfg) for _ in range(num_layers))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig, feature_layers: list[int] | None = None):
        """feature_layers: build only what computing these layers' features needs (inference). Without it the tower
        is complete (the final blocks and norm included), so that a trained model saves whole for other tools."""
        super().__init__()
        self.cfg = cfg
        self.embeddings = VisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # sic: the checkpoints' spelling
        built = cfg.num_layers
        if feature_layers is not None:
            built = max(self.hidden_state_index(layer) for layer in feature_layers)
        self.encoder = VisionEncoder(cfg, built)
        if feature_layers is None:
            # Never applied: LLaVA takes inner-layer features.
            self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.gradient_checkpointing = False

    @property
    def complete(self) -> bool:
        return len(self.encoder.layers) == self.cfg.num_layers and hasattr(self, "post_layernorm")

    def skipped_checkpoint_prefixes(self) -> tuple[str, ...]:
        """Checkpoint names (within the tower) of what a tower built for its feature layers leaves out."""
        if self.complete:
            return ()
        return tuple(f"encoder.layers.{i}." for i in range(len(self.encoder.layers), self.cfg.num_layers)) + \
            ("post_layernorm.",)

    def hidden_state_index(self, layer: int) -> int:
        """transformers' hidden_states[layer]: index 0 is the embeddings, index i the output of block i."""
        return layer % (self.cfg.num_layers + 1)

    def unused_parameter_names(self, feature_layers: list[int]) -> list[str]:
        """Parameters that never touch the features (the blocks after the deepest feature layer, the final norm)."""
        deepest = max(self.hidden_state_index(layer) for layer in feature_layers)
        prefixes = [f"encoder.layers.{i}." for i in range(deepest, self.cfg.num_layers)] + ["post_layernorm."]
        return [name for name, _ in self.named_parameters() if name.startswith(tuple(prefixes))]

    def forward(self, pixels: torch.Tensor, feature_layers: list[int]) -> torch.Tensor:
        """pixels (n, 3, S, S) -> hidden states of `feature_layers`, concatenated on the channel axis: (n, P + 1, C * k).

        Stops after the deepest requested layer: the layers after it (and the final norm) would be wasted work.
        """
        wanted = [self.hidden_state_index(layer) for layer in feature_layers]
        x = self.pre_layrnorm(self.embeddings(pixels))
        kept = {0: x} if 0 in wanted else {}
        for i, block in enumerate(self.encoder.layers[: max(wanted)], start=1):
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
            if i in wanted:
                kept[i] = x
        return torch.cat([kept[i] for i in wanted], dim=-1)
