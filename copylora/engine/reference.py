"""The pure-torch merge: the reference every backend is tested against, and the fallback.

For one module W = P·Q with P = [s₁U₁ … sₙUₙ] (out×R) and Q = [D₁; …; Dₙ] (R×in). With
P = Q_p R_p and Qᵀ = Q_q R_q (thin QR), W = Q_p (R_p R_qᵀ) Q_qᵀ, so the SVD of the R×R core
C = R_p R_qᵀ = U_c S V_cᵀ gives W's exact thin SVD U = Q_p U_c, Vᵀ = V_cᵀ Q_qᵀ without forming W.
When R ≥ min(out, in) the dense W is no bigger than the factors and is decomposed directly.

Conventions shared with the extension (copylora._C), so all backends agree bit-for-bit in meaning:
- float32 arithmetic whatever the input dtype;
- only the first min(R, out, in) singular vectors are used; ranks beyond that are zero-padded;
- each singular pair's sign is fixed so that the largest-|value| entry of the U column
  (first one on ties) is positive, which makes the output deterministic;
- up = U·S, down = Vᵀ (or √S on each), then both clamped to ±(q-quantile of their joined values).
"""

from __future__ import annotations

import torch

from copylora.engine.jobs import MergedModule, ModuleJob, SvdOptions
from copylora.engine.quantile import linear_quantile


def stacked_factors(job: ModuleJob, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """P (out×R) with the scales folded in, and Q (R×in), in float32."""
    device = device or job.ups[0].device
    p = torch.cat([u.to(device, torch.float32) * s for u, s in zip(job.ups, job.scales)], dim=1)
    q = torch.cat([d.to(device, torch.float32) for d in job.downs], dim=0)
    return p, q


def thin_svd(p: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U (out×m), S (m), Vh (m×in) of W = p @ q, with m = min(R, out, in)."""
    out_features, total_rank = p.shape
    in_features = q.shape[1]
    m = min(total_rank, out_features, in_features)
    if total_rank >= min(out_features, in_features):
        u, s, vh = torch.linalg.svd(p @ q, full_matrices=False)
        return u[:, :m], s[:m], vh[:m]
    q_p, r_p = torch.linalg.qr(p)
    q_q, r_q = torch.linalg.qr(q.T)
    u_c, s, vh_c = torch.linalg.svd(r_p @ r_q.T)
    return q_p @ u_c, s, vh_c @ q_q.T


def fix_signs(u: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip pairs so the largest-|value| entry of each U column is positive."""
    if u.shape[1] == 0:
        return u, vh
    rows = u.abs().argmax(dim=0)
    signs = torch.where(u[rows, torch.arange(u.shape[1], device=u.device)] < 0, -1.0, 1.0).to(u.dtype)
    return u * signs, vh * signs[:, None]


def lora_factors(
    u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int, sqrt_split: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """up (out×rank), down (rank×in) from the leading pairs, zero-padded past the available ones."""
    kept = min(rank, s.shape[0])
    if sqrt_split:
        root = s[:kept].sqrt()
        up, down = u[:, :kept] * root, vh[:kept] * root[:, None]
    else:
        up, down = u[:, :kept] * s[:kept], vh[:kept]
    if kept < rank:
        up = torch.nn.functional.pad(up, (0, rank - kept))
        down = torch.nn.functional.pad(down, (0, 0, 0, rank - kept))
    return up, down


def clamp_joint(up: torch.Tensor, down: torch.Tensor, quantile: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Stock's outlier clamp: both factors to ±(quantile of their joined values)."""
    if quantile >= 1.0 or up.numel() + down.numel() == 0:
        return up, down
    hi = linear_quantile(torch.cat([up.reshape(-1), down.reshape(-1)]), quantile)
    return up.clamp(-hi, hi), down.clamp(-hi, hi)


def merge_module(job: ModuleJob, options: SvdOptions) -> MergedModule:
    u, s, vh = thin_svd(*stacked_factors(job))
    u, vh = fix_signs(u, vh)
    up, down = lora_factors(u, s, vh, job.rank, options.sqrt_split)
    up, down = clamp_joint(up, down, options.clamp_quantile)
    return MergedModule(up=up, down=down, singular_values=s)


def dense_stock_merge(job: ModuleJob, clamp_quantile: float = 0.99) -> tuple[torch.Tensor, torch.Tensor]:
    """kohya's algorithm as stock runs it — dense W, full SVD, no sign fix, torch.quantile.

    For tests only: it is what copylora must agree with in meaning.
    """
    p, q = stacked_factors(job)
    u, s, vh = torch.linalg.svd(p @ q)
    rank = job.rank
    up, down = u[:, :rank] @ torch.diag(s[:rank]), vh[:rank]
    hi = torch.quantile(torch.cat([up.flatten(), down.flatten()]), clamp_quantile)
    return up.clamp(-hi, hi), down.clamp(-hi, hi)
