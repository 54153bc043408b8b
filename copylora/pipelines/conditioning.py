"""Rewrite a module's factors so a float32 engine loses nothing to cancellation (exact mode).

A copy-machine delta B − A cancels: the stacked factors P = [s_B·up_B, s_A·up_A] and
Q = [down_B; down_A] are far larger than W = P·Q (about 200× on the real SD1.5 pair, where A and
B start from the same lora_down), and float32 rounding of P, Q and of their QR factors is
relative to them, not to W: the factored float32 merge then reproduces W only to ~2e-5.

With Qᵀ = Q_q·R_q (thin QR, float64), W = (P·R_qᵀ)·Q_qᵀ: one input whose down has orthonormal
rows and whose up P·R_qᵀ = W·Q_q is exactly as large as W. Rounding those to float32 costs
float32's epsilon relative to W, so the same engine reproduces W to ~1e-6. Only exact mode
(no clamp) needs it; the stock path keeps the inputs as they are.
"""

from __future__ import annotations

import torch

from copylora.engine import ModuleJob


def orthonormal_down(job: ModuleJob) -> ModuleJob:
    """The same W as one input (up = W·Q_q, down = Q_qᵀ), formed in float64, stored in float32; for a
    job that forms its factors on demand, a job that conditions them when it forms them."""
    if job.load is not None:
        width = min(job.in_features, job.total_rank)
        return ModuleJob(
            name=job.name,
            ups=[torch.empty(job.out_features, width, device="meta")],
            downs=[torch.empty(width, job.in_features, device="meta")],
            scales=[1.0],
            rank=job.rank,
            load=lambda: _conditioned_factors(job.loaded()),
        )
    ups, downs = _conditioned_factors(job)
    return ModuleJob(name=job.name, ups=ups, downs=downs, scales=[1.0], rank=job.rank)


def _conditioned_factors(job: ModuleJob) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    p = torch.cat([u.double() * s for u, s in zip(job.ups, job.scales)], dim=1)
    q = torch.cat([d.double() for d in job.downs], dim=0)
    basis, triangle = torch.linalg.qr(q.T)  # (in, r), (r, R) with r = min(in, R)
    return [(p @ triangle.T).float()], [basis.T.float().contiguous()]
