"""Stage-2 denoisers in the RAE latent space: DiT-DH and LightningDiT.

DiT-DH ("DiT with a DDT head", Zheng et al. 2025, *Diffusion Transformers with Representation
Autoencoders*, arXiv:2510.11690) is a LightningDiT backbone (adaLN-Zero blocks with RMSNorm,
SwiGLU, 2-D RoPE plus fixed sin-cos positions, patch size 1, Gaussian-Fourier time embedding, a
label table with a null class) followed by a shallow, wide head whose blocks are conditioned *per
token* on the backbone output. LightningDiT (Yao et al. 2025, arXiv:2501.01423) is the same block
stack without the head.

Parameter and buffer names follow the official RAE implementation so that its released checkpoints
load strictly (:func:`raebench.stage2.checkpoints.load_stage2_state`). The networks only predict: ``model(x, t, y)`` returns
the velocity for latents ``x`` (N, C, H, W) at times ``t`` (N,) with labels ``y`` (N,); the path,
loss and samplers live in :mod:`raebench.stage2.transport` and :mod:`raebench.stage2.samplers`.

The official width rule: a denoiser narrower than the latent token (C * p * p channels) cannot fit
the data; the constructors warn (:class:`WidthWarning`) when the backbone is that narrow.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from raebench.registry import Registry
from raebench.stage2 import cpu_gemm
from raebench.stage2.cpu_gemm import Linear
from raebench.stage2.fused import autocast_on, complex_viewable, fusable, gated_residual, linear_chunks, qkv_rope, rms_modulate, rms_modulate_residual, swiglu, wide


class WidthWarning(UserWarning):
    """The backbone is narrower than a latent token: the model cannot represent the data well."""


def _check_width(width: int, token_dim: int, what: str) -> None:
    if width < token_dim:
        warnings.warn(
            f"{what} width {width} is below the latent token dimension {token_dim}; RAE's width rule "
            f"asks for width >= token dimension (use a wider preset or a smaller latent).",
            WidthWarning,
            stacklevel=3,
        )


# ----------------------------------------------------------------------------------------------
# Positions: fixed 2-D sin-cos table and 2-D rotary embedding
# ----------------------------------------------------------------------------------------------


def sincos_pos_embed_2d(dim: int, grid: int) -> torch.Tensor:
    """(grid*grid, dim) float32 table; first half encodes the column (w), second the row (h).

    Computed in float64 like the MAE/DiT reference so that freshly built models match checkpoints.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))  # (D/4,)
    ww, hh = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    parts = []
    for pos in (ww.reshape(-1), hh.reshape(-1)):
        out = np.einsum("m,d->md", pos.astype(np.float64), omega)  # (M, D/4)
        parts += [np.sin(out), np.cos(out)]
    return torch.from_numpy(np.concatenate(parts, axis=1)).float()  # (M, D)


class Rope2D(nn.Module):
    """2-D rotary embedding on (N, heads, L, head_dim) queries/keys, tokens in row-major order.

    The first half of each head rotates with the row index, the second half with the column index;
    rotation pairs are adjacent channels (2i, 2i+1). Buffers ``freqs_cos``/``freqs_sin`` (L, head_dim)
    are saved in checkpoints, as in the official code.
    """

    def __init__(self, head_dim: int, grid: int, theta: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"2-D RoPE needs a head dimension divisible by 4, got {head_dim}")
        half = head_dim // 2
        inv = 1.0 / (theta ** (torch.arange(0, half, 2)[: half // 2].float() / half))  # (half/2,)
        pos = torch.arange(grid) / grid * grid  # (grid,)
        f = (pos[:, None] * inv[None, :]).repeat_interleave(2, dim=-1)  # (grid, half)
        f = torch.cat([f[:, None, :].expand(grid, grid, half), f[None, :, :].expand(grid, grid, half)], -1)
        f = f.reshape(grid * grid, head_dim)  # (L, head_dim)
        self.register_buffer("freqs_cos", f.cos())
        self.register_buffer("freqs_sin", f.sin())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., L, hd) -> x cos + rotate_half(x) sin, rotate_half: (x0, x1) -> (-x1, x0) per pair.

        Computed as one complex multiply per pair, (x0 + i x1)(cos + i sin): 2.5x faster forward +
        backward on CPU than flip + two multiplies (measured at head_dim 96, 64 tokens). The
        rotation is read from the (checkpointed) cos/sin buffers on every call, so loaded values win.
        Under ``torch.compile`` it is real arithmetic (Inductor generates no code for complex ops).
        """
        xw = wide(x)
        if torch.compiler.is_compiling():
            pairs = xw.unflatten(-1, (-1, 2))  # (..., L, hd/2, 2)
            rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)  # rotate_half
            return (xw * self.freqs_cos.to(xw.dtype) + rotated * self.freqs_sin.to(xw.dtype)).to(x.dtype)
        cis = torch.complex(self.freqs_cos[:, ::2].to(xw.dtype), self.freqs_sin[:, ::2].to(xw.dtype))  # (L, hd/2)
        xc = torch.view_as_complex((xw if complex_viewable(xw) else xw.contiguous()).unflatten(-1, (-1, 2)))  # (..., L, hd/2)
        return torch.view_as_real(xc * cis).flatten(-2).to(x.dtype)  # (..., L, hd)


# ----------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """RMS normalisation computed in float32, with a learned gain."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.float32, torch.float64):  # one call
            return F.rms_norm(x, (x.shape[-1],), self.weight, eps=self.eps)
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


def _norm(dim: int, rms: bool) -> nn.Module:
    return RMSNorm(dim) if rms else nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


class PatchEmbed(nn.Module):
    """(N, C, H, W) -> (N, H/p * W/p, D) tokens; a Conv2d named ``proj`` as in timm's PatchEmbed."""

    def __init__(self, grid_in: int, patch: int, in_ch: int, dim: int) -> None:
        super().__init__()
        self.patch = patch
        self.num_patches = (grid_in // patch) ** 2
        self.proj = nn.Conv2d(in_ch, dim, kernel_size=patch, stride=patch, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.patch == 1:  # a per-token linear map: skip the convolution machinery
            w = self.proj.weight.flatten(1)  # (D, C)
            return cpu_gemm.linear(x.flatten(2).transpose(1, 2), w, self.proj.bias)  # (N, L, D)
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, L, D)


class Attention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention``, optional QK-norm/RoPE."""

    def __init__(self, dim: int, heads: int, qk_norm: bool = False, rms: bool = True) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = Linear(dim, 3 * dim, bias=True)
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim) if rms else nn.LayerNorm(self.head_dim)
            self.k_norm = RMSNorm(self.head_dim) if rms else nn.LayerNorm(self.head_dim)
        else:
            self.q_norm = self.k_norm = None
        self.proj = Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: Rope2D | None = None) -> torch.Tensor:
        n, l, d = x.shape
        qkv = self.qkv(x)  # (N, L, 3D)
        if rope is not None and self.q_norm is None and fusable(qkv):
            q, k, v = qkv_rope(qkv, rope.freqs_cos, rope.freqs_sin, self.heads)  # (N, H, L, hd) each
            x = F.scaled_dot_product_attention(q, k, v)  # (N, H, L, hd)
            return self.proj(x.transpose(1, 2).reshape(n, l, d))  # (N, L, D)
        qkv = qkv.view(n, l, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, N, H, L, hd)
        if self.q_norm is not None:
            q, k, v = qkv.unbind(0)
            q, k = self.q_norm(q), self.k_norm(k)
            if rope is not None:
                q, k = rope(q), rope(k)
        elif rope is not None:
            q, k = rope(qkv[:2]).unbind(0)  # both rotated in one pass
            v = qkv[2]
        else:
            q, k, v = qkv.unbind(0)
        q, k = q.to(v.dtype), k.to(v.dtype)
        x = F.scaled_dot_product_attention(q, k, v)  # (N, H, L, hd)
        return self.proj(x.transpose(1, 2).reshape(n, l, d))  # (N, L, D)


class SwiGLU(nn.Module):
    """SwiGLU feed-forward: w3(silu(a) * b) with [a, b] = w12(x)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w12 = Linear(dim, 2 * hidden)
        self.w3 = Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.w12(x)  # (..., 2 * hidden)
        if fusable(u):
            return self.w3(swiglu(u))  # silu(a) * b for [a, b] = u, fused backward
        a, b = u.chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class GeluMlp(nn.Module):
    """fc1 -> GELU(tanh) -> fc2 (timm ``Mlp`` names)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def _expand_tokens(m: torch.Tensor, length: int) -> torch.Tensor:
    """Broadcast a modulation (N, D) or (N, L, D) to ``length`` tokens (segment-repeated)."""
    if m.dim() == 2:
        return m.unsqueeze(1)  # (N, 1, D)
    if m.shape[1] != length:
        if length % m.shape[1]:
            raise ValueError(f"{length} tokens cannot be conditioned on {m.shape[1]} tokens")
        m = m.repeat_interleave(length // m.shape[1], dim=1)  # (N, L, D)
    return m


def _modulations(linear: nn.Linear, c_act: torch.Tensor, length: int, k: int) -> tuple[torch.Tensor, ...]:
    """The k adaLN modulations (N, 1 or L, D) of ``linear(c_act)``; per token without a concatenating backward."""
    if (c_act.dim() == 3 and c_act.shape[1] == length and c_act.dtype == linear.weight.dtype and fusable(c_act)
            and not autocast_on(c_act)):
        # not under autocast: there the projection (and its backward GEMMs) must run in low precision
        return linear_chunks(c_act, linear.weight, linear.bias, k)
    return _expand_tokens(linear(c_act), length).chunk(k, dim=-1)


def _modulate(norm: nn.Module, x: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor) -> torch.Tensor:
    """norm(x) * (1 + scale) + shift; RMSNorm on a float32 stream takes the fused path."""
    if isinstance(norm, RMSNorm) and fusable(x):
        return rms_modulate(x, norm.weight, shift, scale, norm.eps)
    h = norm(x)
    return h * (1 + scale) if shift is None else h * (1 + scale) + shift


def _modulate_keep(norm: nn.Module, x: torch.Tensor, shift: torch.Tensor | None,
                   scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x) * (1 + scale) + shift, x); on the fused path x comes back through the function so
    that its two gradients (branch and residual) are summed in the fused backward."""
    if isinstance(norm, RMSNorm) and fusable(x):
        return rms_modulate_residual(x, norm.weight, shift, scale, norm.eps)
    return _modulate(norm, x, shift, scale), x


def _residual(x: torch.Tensor, gate: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """x + gate * f (the adaLN-Zero gated residual)."""
    return gated_residual(x, gate, f) if fusable(x) else x + gate * f


class Block(nn.Module):
    """adaLN-Zero transformer block; the condition ``c`` is per sample (N, D) or per token (N, L, D)."""

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_ratio: float = 4.0,
        use_qknorm: bool = False,
        use_swiglu: bool = True,
        use_rmsnorm: bool = True,
        wo_shift: bool = False,
    ) -> None:
        super().__init__()
        self.norm1 = _norm(dim, use_rmsnorm)
        self.norm2 = _norm(dim, use_rmsnorm)
        self.attn = Attention(dim, heads, qk_norm=use_qknorm, rms=use_rmsnorm)
        hidden = int(dim * mlp_ratio)
        # int(2/3 * hidden) (not hidden * 2 // 3): the float rounding fixes the checkpoint shapes
        self.mlp = SwiGLU(dim, int(2 / 3 * hidden)) if use_swiglu else GeluMlp(dim, hidden)
        self.wo_shift = wo_shift
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(dim, (4 if wo_shift else 6) * dim))

    def forward(self, x: torch.Tensor, c_act: torch.Tensor, rope: Rope2D | None = None) -> torch.Tensor:
        """``c_act`` is silu(condition): computed once by the model and shared by all its blocks."""
        mods = _modulations(self.adaLN_modulation[1], c_act, x.shape[1], 4 if self.wo_shift else 6)
        if self.wo_shift:
            scale1, gate1, scale2, gate2 = mods  # (N, 1 or L, D) each
            shift1 = shift2 = None
        else:
            shift1, scale1, gate1, shift2, scale2, gate2 = mods  # (N, 1 or L, D) each
        h, x = _modulate_keep(self.norm1, x, shift1, scale1)
        x = _residual(x, gate1, self.attn(h, rope))  # (N, L, D)
        h, x = _modulate_keep(self.norm2, x, shift2, scale2)
        return _residual(x, gate2, self.mlp(h))  # (N, L, D)


class FinalLayer(nn.Module):
    """adaLN (shift, scale; no gate) + linear to p*p*C channels per token."""

    def __init__(self, dim: int, out_dim: int, use_rmsnorm: bool) -> None:
        super().__init__()
        self.norm_final = _norm(dim, use_rmsnorm)
        self.linear = Linear(dim, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c_act: torch.Tensor) -> torch.Tensor:
        """``c_act`` is silu(condition), as for :class:`Block`."""
        shift, scale = _modulations(self.adaLN_modulation[1], c_act, x.shape[1], 2)
        return self.linear(_modulate(self.norm_final, x, shift, scale))  # (N, L, p*p*C)


class GaussianFourierEmbedding(nn.Module):
    """Continuous time t (N,) -> (N, D): MLP of [sin, cos](2*pi*t*W) with fixed random W (256,)."""

    def __init__(self, dim: int, size: int = 256, scale: float = 1.0) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.randn(size) * scale, requires_grad=False)
        self.mlp = nn.Sequential(Linear(2 * size, dim), nn.SiLU(), Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        # W gets a gradient only where it requires one: the official trainer's model.requires_grad_(True)
        # trains it (its `with torch.no_grad(): W = self.W` does not detach)
        f = t[:, None] * self.W[None, :] * 2 * math.pi  # (N, 256)
        return self.mlp(torch.cat([torch.sin(f), torch.cos(f)], dim=-1))  # (N, D)


class LabelEmbedder(nn.Module):
    """Class labels -> (N, D); row ``num_classes`` is the null class used for CFG label dropout."""

    def __init__(self, num_classes: int, dim: int, dropout_prob: float) -> None:
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), dim)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, y: torch.Tensor, train: bool) -> torch.Tensor:
        if train and self.dropout_prob > 0:
            drop = torch.rand(y.shape[0], device=y.device) < self.dropout_prob
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return self.embedding_table(y)


def _unpatchify(x: torch.Tensor, p: int, c: int) -> torch.Tensor:
    n, l, _ = x.shape
    h = math.isqrt(l)
    if p == 1:
        return x.transpose(1, 2).reshape(n, c, h, h)  # (N, C, H, W)
    x = x.reshape(n, h, h, p, p, c)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(n, c, h * p, h * p)  # (N, C, H, W)


def _init_common(model: nn.Module) -> None:
    """adaLN-Zero initialisation shared by both architectures (called after xavier if any)."""
    for emb in [m for m in model.modules() if isinstance(m, PatchEmbed)]:
        nn.init.xavier_uniform_(emb.proj.weight.view(emb.proj.weight.shape[0], -1))
        nn.init.zeros_(emb.proj.bias)
    nn.init.normal_(model.y_embedder.embedding_table.weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[2].weight, std=0.02)
    for block in model.blocks:
        nn.init.zeros_(block.adaLN_modulation[-1].weight)
        nn.init.zeros_(block.adaLN_modulation[-1].bias)
    for w in (model.final_layer.adaLN_modulation[-1], model.final_layer.linear):
        nn.init.zeros_(w.weight)
        nn.init.zeros_(w.bias)
    if getattr(model, "pos_embed", None) is not None:
        grid = math.isqrt(model.pos_embed.shape[1])
        model.pos_embed.data.copy_(sincos_pos_embed_2d(model.pos_embed.shape[-1], grid).unsqueeze(0))


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------


class DiTDH(nn.Module):
    """DiT backbone (``hidden_size[0]``, ``depth[0]``) + DDT head (``hidden_size[1]``, ``depth[1]``).

    Keyword names are those of the official ``DiTwDDTHead`` so the official YAML ``params`` map
    one-to-one. ``patch_size`` may be an int or [backbone, head] patch sizes.
    """

    def __init__(
        self,
        input_size: int = 16,
        patch_size: int | Sequence[int] = 1,
        in_channels: int = 768,
        hidden_size: Sequence[int] = (1152, 2048),
        depth: Sequence[int] = (28, 2),
        num_heads: int | Sequence[int] = (16, 16),
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        use_qknorm: bool = False,
        use_swiglu: bool = True,
        use_rope: bool = True,
        use_rmsnorm: bool = True,
        wo_shift: bool = False,
        use_pos_embed: bool = True,
    ) -> None:
        super().__init__()
        ps, px = (patch_size, patch_size) if isinstance(patch_size, (int, float)) else tuple(patch_size)
        ps, px = int(ps), int(px)
        heads = (num_heads, num_heads) if isinstance(num_heads, int) else tuple(num_heads)
        d_enc, d_dec = int(hidden_size[0]), int(hidden_size[1])
        self.in_channels = self.out_channels = in_channels
        self.num_classes = num_classes
        self.input_size = input_size
        self.x_patch = px
        self.num_encoder_blocks, self.num_decoder_blocks = int(depth[0]), int(depth[1])
        _check_width(d_enc, in_channels * ps * ps, "DiT-DH backbone")

        self.x_embedder = PatchEmbed(input_size, px, in_channels, d_dec)
        self.s_embedder = PatchEmbed(input_size, ps, in_channels, d_enc)
        self.s_projector = Linear(d_enc, d_dec) if d_enc != d_dec else nn.Identity()
        self.t_embedder = GaussianFourierEmbedding(d_enc)
        self.y_embedder = LabelEmbedder(num_classes, d_enc, class_dropout_prob)
        self.final_layer = FinalLayer(d_dec, px * px * in_channels, use_rmsnorm)
        if use_pos_embed:
            self.pos_embed = nn.Parameter(torch.zeros(1, self.s_embedder.num_patches, d_enc), requires_grad=False)
        else:
            self.pos_embed = None
        if use_rope:
            self.enc_feat_rope = Rope2D(d_enc // heads[0], math.isqrt(self.s_embedder.num_patches))
            self.dec_feat_rope = Rope2D(d_dec // heads[1], math.isqrt(self.x_embedder.num_patches))
        else:
            self.enc_feat_rope = self.dec_feat_rope = None
        opts = dict(mlp_ratio=mlp_ratio, use_qknorm=use_qknorm, use_swiglu=use_swiglu,
                    use_rmsnorm=use_rmsnorm, wo_shift=wo_shift)
        self.blocks = nn.ModuleList(
            [Block(d_enc, heads[0], **opts) for _ in range(self.num_encoder_blocks)]
            + [Block(d_dec, heads[1], **opts) for _ in range(self.num_decoder_blocks)]
        )
        self.initialize_weights()

    def initialize_weights(self) -> None:
        _init_common(self)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x (N, C, H, W), t (N,), y (N,) -> velocity (N, C, H, W)."""
        t_emb = self.t_embedder(t)  # (N, Ds)
        c = F.silu(t_emb + self.y_embedder(y, self.training))  # (N, Ds); the blocks apply SiLU again
        c_act = F.silu(c)  # (N, Ds)
        s = self.s_embedder(x)  # (N, L, Ds)
        if self.pos_embed is not None:
            s = s + self.pos_embed
        for block in self.blocks[: self.num_encoder_blocks]:
            s = block(s, c_act, self.enc_feat_rope)  # (N, L, Ds)
        s = self.s_projector(F.silu(t_emb.unsqueeze(1) + s))  # (N, L, Dx): per-token condition
        s_act = F.silu(s)  # (N, L, Dx), shared by every head block and the final layer
        h = self.x_embedder(x)  # (N, Lx, Dx)
        for block in self.blocks[self.num_encoder_blocks :]:
            h = block(h, s_act, self.dec_feat_rope)  # (N, Lx, Dx)
        return _unpatchify(self.final_layer(h, s_act), self.x_patch, self.out_channels)  # (N, C, H, W)

    # The official DiT-DH's guidance methods, with its call signature and semantics, for scripts written
    # against the official model. raebench's samplers guide through samplers.velocity_fn (same numbers,
    # checked in tests/test_stage2_samplers.py against the official outputs).

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float,
                         cfg_interval: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
        """Classifier-free guidance on the official doubled batch: x (2N, C, H, W) whose first half is used
        for both halves, t (2N,), y (2N,) = [labels, null class]. Guided where t_min <= t <= t_max, the
        conditional velocity elsewhere; both halves of the result hold it."""
        from raebench.stage2.samplers import _in_interval  # the samplers' interval rule (velocity_fn)

        half = x[: len(x) // 2]
        cond, uncond = self.forward(torch.cat([half, half]), t, y).chunk(2)  # (N, C, H, W) each
        inside = _in_interval(t[: len(t) // 2], cfg_interval, cond.dim())
        guided = torch.where(inside, uncond + cfg_scale * (cond - uncond), cond)
        return torch.cat([guided, guided])

    def forward_with_autoguidance(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float,
                                  additional_model_forward, cfg_interval: tuple[float, float] = (0.0, 1.0)
                                  ) -> torch.Tensor:
        """AutoGuidance as the official DiT-DH: ``additional_model_forward(x, t, y)`` is the guide model's
        forward; v_guide + scale * (v - v_guide) where t_min <= t <= t_max, v elsewhere (batch not doubled)."""
        from raebench.stage2.samplers import _in_interval

        v, v_guide = self.forward(x, t, y), additional_model_forward(x, t, y)
        return torch.where(_in_interval(t, cfg_interval, v.dim()), v_guide + cfg_scale * (v - v_guide), v)


class LightningDiT(nn.Module):
    """LightningDiT: the plain DiT with the same block as DiT-DH (official ``LightningDiT`` names)."""

    def __init__(
        self,
        input_size: int = 16,
        patch_size: int = 1,
        in_channels: int = 768,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = False,
        use_qknorm: bool = False,
        use_swiglu: bool = True,
        use_rope: bool = True,
        use_rmsnorm: bool = True,
        wo_shift: bool = False,
        use_gembed: bool = True,
    ) -> None:
        super().__init__()
        del use_gembed  # accepted for config compatibility; the Gaussian-Fourier embedding is always used
        self.in_channels = in_channels
        self.out_channels = in_channels * (2 if learn_sigma else 1)
        self.learn_sigma = learn_sigma
        self.num_classes = num_classes
        self.input_size = input_size
        self.patch = patch_size
        _check_width(hidden_size, in_channels * patch_size * patch_size, "LightningDiT")
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = GaussianFourierEmbedding(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, hidden_size), requires_grad=False)
        self.feat_rope = Rope2D(hidden_size // num_heads, input_size // patch_size) if use_rope else None
        self.blocks = nn.ModuleList(
            [Block(hidden_size, num_heads, mlp_ratio, use_qknorm, use_swiglu, use_rmsnorm, wo_shift)
             for _ in range(depth)]
        )
        self.final_layer = FinalLayer(hidden_size, patch_size * patch_size * self.out_channels, use_rmsnorm)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        _init_common(self)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x (N, C, H, W), t (N,), y (N,) -> velocity (N, C, H, W)."""
        h = self.x_embedder(x) + self.pos_embed  # (N, L, D)
        c_act = F.silu(self.t_embedder(t) + self.y_embedder(y, self.training))  # (N, D)
        for block in self.blocks:
            h = block(h, c_act, self.feat_rope)  # (N, L, D)
        out = _unpatchify(self.final_layer(h, c_act), self.patch, self.out_channels)  # (N, C', H, W)
        return out[:, : self.in_channels] if self.learn_sigma else out

    # The official LightningDiT's guidance methods, with its signature and semantics (which differ from
    # DiT-DH's): ``cfg_interval`` is a list of [t_lo, t_hi) intervals in which ``interval_cfg`` (when > 1)
    # or the conditional velocity replaces ``cfg_scale``, and the batch's first t decides for all samples.
    # One (t_lo, t_hi) pair is taken as a list of one (the official code fails on it); the default is no
    # interval (the official default (-1e4, -1e4) fails the same way).

    def _lightning_scale(self, t: torch.Tensor, cfg_scale: float, cfg_interval, interval_cfg: float) -> float | None:
        """The scale the official rule applies at ``t[0]``; None means "the conditional velocity"."""
        intervals = list(cfg_interval)
        if len(intervals) == 2 and all(isinstance(v, (int, float)) for v in intervals):
            intervals = [intervals]
        t0 = float(t[0])
        for lo, hi in intervals:
            if lo <= t0 < hi:
                return interval_cfg if interval_cfg > 1.0 else None
        return cfg_scale

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float,
                         cfg_interval=(), interval_cfg: float = 0.0) -> torch.Tensor:
        """Classifier-free guidance on the official doubled batch (x's first half used for both halves,
        y = [labels, null class]); both halves of the result hold the guided velocity."""
        half = x[: len(x) // 2]
        cond, uncond = self.forward(torch.cat([half, half]), t, y).chunk(2)  # (N, C, H, W) each
        scale = self._lightning_scale(t, cfg_scale, cfg_interval, interval_cfg)
        guided = cond if scale is None else uncond + scale * (cond - uncond)
        return torch.cat([guided, guided])

    def forward_with_autoguidance(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float,
                                  additional_model_forward, cfg_interval=(), interval_cfg: float = 0.0
                                  ) -> torch.Tensor:
        """AutoGuidance as the official LightningDiT: the doubled batch's first halves go through this model
        and ``additional_model_forward`` (the guide); the guided velocity fills both halves."""
        n = len(x) // 2
        v, v_guide = self.forward(x[:n], t[:n], y[:n]), additional_model_forward(x[:n], t[:n], y[:n])
        v_guide = v_guide[:, : self.in_channels]
        scale = self._lightning_scale(t, cfg_scale, cfg_interval, interval_cfg)
        guided = v if scale is None else v_guide + scale * (v - v_guide)
        return torch.cat([guided, guided])


# ----------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """A stage-2 architecture preset; ``build`` takes the latent geometry and optional overrides."""

    name: str
    arch: str  # "ditdh" or "lightningdit"
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""

    def build(self, in_channels: int = 768, input_size: int = 16, num_classes: int = 1000, **overrides: Any) -> nn.Module:
        cls = ARCHITECTURES[self.arch]
        return cls(in_channels=in_channels, input_size=input_size, num_classes=num_classes,
                   **{**self.kwargs, **overrides})


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {"ditdh": DiTDH, "lightningdit": LightningDiT}
MODELS: Registry[ModelSpec] = Registry("stage-2 model", listed=False)

_HEAD = dict(width=2048, depth=2, heads=16)
for _size, (_w, _d, _h) in {"s": (384, 12, 6), "b": (768, 12, 12), "l": (1024, 24, 16), "xl": (1152, 28, 16)}.items():
    MODELS.register(
        f"ditdh-{_size}",
        ModelSpec(f"ditdh-{_size}", "ditdh",
                  dict(hidden_size=(_w, _HEAD["width"]), depth=(_d, _HEAD["depth"]), num_heads=(_h, _HEAD["heads"])),
                  f"DiT-DH-{_size.upper()}: backbone {_w}/{_d}/{_h}, head 2048/2/16"),
        aliases=(f"dit-dh-{_size}",),
    )
    MODELS.register(
        f"lightningdit-{_size}",
        ModelSpec(f"lightningdit-{_size}", "lightningdit", dict(hidden_size=_w, depth=_d, num_heads=_h),
                  f"LightningDiT-{_size.upper()}: {_w}/{_d}/{_h}, patch 1"),
    )
MODELS.register(
    "ditdh-tiny",
    ModelSpec("ditdh-tiny", "ditdh", dict(hidden_size=(64, 96), depth=(2, 1), num_heads=(4, 4)),
              "DiT-DH for tests: backbone 64/2/4, head 96/1/4"),
)


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a preset by name: ``build_model("ditdh-xl", in_channels=768, input_size=16)``."""
    return MODELS.get(name).build(**kwargs)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
