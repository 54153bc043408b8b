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

from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from copylora.engine.jobs import MergedModule, ModuleJob, SvdOptions
from copylora.engine.quantile import linear_quantile


def stacked_batch(jobs: list[ModuleJob], device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """P (B×out×R) with the scales folded in and Q (B×R×in) of same-shaped jobs, in float32.

    A few whole-batch operations per input rather than several per module: on a CPU each
    copy above 32k values is its own OpenMP region, and waking sleeping threads for hundreds of
    small copies cost the torch backend more than the copies themselves.
    """
    device = device or jobs[0].ups[0].device
    scales = torch.tensor([job.scales for job in jobs], dtype=torch.float32, device=device)
    ups, downs = [], []
    for i in range(len(jobs[0].ups)):
        ups.append(torch.stack([job.ups[i] for job in jobs]).to(device, torch.float32) * scales[:, i, None, None])
        downs.append(torch.stack([job.downs[i] for job in jobs]).to(device, torch.float32))
    return torch.cat(ups, dim=-1), torch.cat(downs, dim=-2)


def stacked_factors(job: ModuleJob, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """P (out×R) with the scales folded in, and Q (R×in), in float32."""
    p, q = stacked_batch([job], device)
    return p[0], q[0]


# The steps below take one module's tensors or a batch of same-shaped modules' (leading dims).


@contextmanager
def lapack_on_one_thread(device: torch.device) -> Iterator[None]:
    """torch on one CPU thread for the small R×R matrices' LAPACK calls (restored after).

    Batched, torch calls LAPACK once per matrix, and MKL splits even a 32×32 SVD across the
    team; with idle threads asleep (copylora's default, copylora/runtime/openmp_wait.py) every split waits
    for one to wake: a batch of 30 32×32 SVDs took 48 ms on this project's 2 cores, 6 ms on one.
    The C++ kernel holds MKL to one thread for the same calls.
    """
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def small_svd(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch.linalg.svd(a, full_matrices=False) of the small matrices below (R×R cores, or W where
    it is no bigger than its factors). On CUDA in float64: cuSOLVER's float32 SVD left singular
    values 1e-5 too large (relative) on an H200, beyond what float32 rounding of W explains."""
    if a.device.type != "cuda":
        with lapack_on_one_thread(a.device):
            return torch.linalg.svd(a, full_matrices=False)
    u, s, vh = torch.linalg.svd(a.double(), full_matrices=False)
    return u.to(a.dtype), s.to(a.dtype), vh.to(a.dtype)


QrFunction = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

# The largest |QᵀQ − I| after Cholesky-QR's first pass that its second pass still corrects to
# orthonormal in float32 (the C++ kernel's threshold too); a matrix beyond it goes to Householder.
CHOLESKY_QR_DEVIATION = 0.1


def cholesky_qr2(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Thin QR of a batch of tall matrices (B×n×R) by Cholesky-QR twice, as the C++ kernel does.

    Two Gram products, two small Cholesky factorisations and products with the small inverses:
    batched BLAS-3 that runs on every thread, where torch's Householder QR on a CPU is one LAPACK
    call per matrix. Matrices whose Cholesky fails (rank-deficient or all-zero factors) or whose
    first pass is far from orthonormal (ill-conditioned ones) get torch.linalg.qr instead.
    """
    def cholesky_and_inverse(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """L, L⁻¹ and LAPACK's info of each (small) Gram matrix."""
        identity = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device).expand_as(gram)
        with lapack_on_one_thread(gram.device):
            lower, info = torch.linalg.cholesky_ex(gram)
            return lower, torch.linalg.solve_triangular(lower, identity, upper=False), info

    l1, inverse1, info1 = cholesky_and_inverse(a.mT @ a)
    q1 = a @ inverse1.mT
    gram = q1.mT @ q1
    l2, inverse2, info2 = cholesky_and_inverse(gram)
    q, r = q1 @ inverse2.mT, l2.mT @ l1.mT
    deviation = (gram - torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)).abs().amax(dim=(-2, -1))
    failed = (info1 != 0) | (info2 != 0) | deviation.isnan() | (deviation > CHOLESKY_QR_DEVIATION)
    redo = failed.nonzero().squeeze(-1)
    if redo.numel() > 0:
        q[redo], r[redo] = torch.linalg.qr(a[redo])
    return q, r


def thin_svd(
    p: torch.Tensor, q: torch.Tensor, qr: QrFunction = torch.linalg.qr
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U (out×m), S (m), Vh (m×in) of W = p @ q, with m = min(R, out, in). `qr` factors the
    tall p and qᵀ: Householder for the reference; cholesky_qr2 for batches (leading dims)."""
    out_features, total_rank = p.shape[-2:]
    in_features = q.shape[-1]
    m = min(total_rank, out_features, in_features)
    if total_rank >= min(out_features, in_features):
        u, s, vh = small_svd(p @ q)
        return u[..., :m], s[..., :m], vh[..., :m, :]
    q_p, r_p = qr(p)
    q_q, r_q = qr(q.mT)
    u_c, s, vh_c = small_svd(r_p @ r_q.mT)
    return q_p @ u_c, s, vh_c @ q_q.mT


# From this total rank R the batched backends take the Gram route below (measured on a 2-core CPU,
# bench/README.md: within noise of Cholesky-QR twice up to R = 32, faster from R = 64); the C++
# kernel's kGramMinRank.
GRAM_MIN_RANK = 64


def gram_thin_svd(
    p: torch.Tensor, q: torch.Tensor, kept: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """U (B×out×k), S (B×m), Vh (B×k×in) of a batch of W = p @ q with k = kept ≤ m, and which modules
    the route accepted (the rest are garbage for the caller to redo), as the C++ kernel's gram_route.

    Only the kept vectors, without orthonormal bases of P and Qᵀ: the Cholesky factors of the
    Grams (PᵀP = L_P L_Pᵀ, QQᵀ = L_Q L_Qᵀ) give the core L_Pᵀ L_Q, whose SVD U_c S V_cᵀ is W's, and
    U_k = P·(L_P⁻ᵀ U_c[:, :k]), Vh_k = (V_c[:, :k]ᵀ L_Q⁻¹)·Q. The Grams are float64, so squaring the
    condition number costs eps64·cond², not eps32·cond². P L_P⁻ᵀ is orthonormal to within about
    eps64·√rows·‖P‖²_F·‖L_P⁻¹‖²_F, and S moves by that times ‖W‖_F: a module is accepted where both
    Cholesky factorisations succeed and that movement, for P and Q together, stays below one float32
    rounding of the factors, eps32·‖P‖_F‖Q‖_F (the engine tests allow 8).
    """
    p64, q64 = p.double(), q.double()
    gram_p, gram_q = p64.mT @ p64, q64 @ q64.mT
    with lapack_on_one_thread(p.device):
        lower_p, info_p = torch.linalg.cholesky_ex(gram_p)
        lower_q, info_q = torch.linalg.cholesky_ex(gram_q)
        identity = torch.eye(gram_p.shape[-1], dtype=gram_p.dtype, device=gram_p.device).expand_as(gram_p)
        inverse_p = torch.linalg.solve_triangular(lower_p, identity, upper=False)
        inverse_q = torch.linalg.solve_triangular(lower_q, identity, upper=False)
    norm_p, norm_q = gram_p.diagonal(dim1=-2, dim2=-1).sum(-1), gram_q.diagonal(dim1=-2, dim2=-1).sum(-1)
    loss = torch.finfo(torch.float64).eps * (
        norm_p * inverse_p.square().sum((-2, -1)) * p.shape[-2] ** 0.5
        + norm_q * inverse_q.square().sum((-2, -1)) * q.shape[-1] ** 0.5
    )
    factorised = (info_p == 0) & (info_q == 0)
    # LAPACK refuses a core with NaN: a failed factorisation's core is zeroed (the caller redoes it)
    core = torch.where(factorised[..., None, None], (lower_p.mT @ lower_q).nan_to_num(0.0), 0.0)
    u_c, s, vh_c = small_svd(core.float())
    moved = loss * s.double().norm(dim=-1)
    accepted = factorised & (moved <= (norm_p * norm_q).sqrt() * torch.finfo(torch.float32).eps)
    left = inverse_p.mT @ u_c[..., :kept].double()
    right = vh_c[..., :kept, :].double() @ inverse_q
    return p @ left.float(), s, right.float() @ q, accepted


def batch_thin_svd(p: torch.Tensor, q: torch.Tensor, kept: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """thin_svd of a batch as the torch backend runs it, U and Vh cut to `kept` vectors: the Gram
    route where R ≥ GRAM_MIN_RANK and R < min(out, in), with Cholesky-QR twice (and Householder) for
    the modules it declines; Cholesky-QR twice elsewhere. The same routes as the C++ kernel, on
    every device."""
    out_features, total_rank = p.shape[-2:]
    if total_rank < GRAM_MIN_RANK or total_rank >= min(out_features, q.shape[-1]):
        u, s, vh = thin_svd(p, q, qr=cholesky_qr2)
        return u[..., :kept], s, vh[..., :kept, :]
    u, s, vh, accepted = gram_thin_svd(p, q, kept)
    redo = (~accepted).nonzero().squeeze(-1)
    if redo.numel() > 0:
        u_redone, s_redone, vh_redone = thin_svd(p[redo], q[redo], qr=cholesky_qr2)
        u[redo], s[redo], vh[redo] = u_redone[..., :kept], s_redone, vh_redone[..., :kept, :]
    return u, s, vh


def fix_signs(u: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip pairs so the largest-|value| entry of each U column (first on ties) is positive."""
    if u.shape[-1] == 0:
        return u, vh
    rows = u.abs().argmax(dim=-2, keepdim=True)  # argmax returns the first of equal maxima
    signs = torch.where(u.gather(-2, rows) < 0, -1.0, 1.0).to(u.dtype)  # (..., 1, m)
    return u * signs, vh * signs.mT


def lora_factors(
    u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int, sqrt_split: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """up (out×rank), down (rank×in) from the leading pairs, zero-padded past the available ones."""
    kept = min(rank, s.shape[-1])
    weights = s[..., :kept].sqrt() if sqrt_split else s[..., :kept]
    up = u[..., :kept] * weights[..., None, :]
    down = vh[..., :kept, :] * weights[..., :, None] if sqrt_split else vh[..., :kept, :]
    if kept < rank:
        up = torch.nn.functional.pad(up, (0, rank - kept))
        down = torch.nn.functional.pad(down, (0, 0, 0, rank - kept))
    return up, down


def clamp_joint(up: torch.Tensor, down: torch.Tensor, quantile: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Stock's outlier clamp: both factors to ±(quantile of their joined values), per module."""
    if quantile >= 1.0 or up.numel() + down.numel() == 0:
        return up, down
    hi = linear_quantile(torch.cat([up.flatten(-2), down.flatten(-2)], dim=-1), quantile)[..., None, None]
    return up.clamp(-hi, hi), down.clamp(-hi, hi)


def merge_module(job: ModuleJob, options: SvdOptions) -> MergedModule:
    """One module: the reference every backend (the batched one included) is tested against."""
    u, s, vh = thin_svd(*stacked_factors(job))
    u, vh = fix_signs(u, vh)
    up, down = lora_factors(u, s, vh, job.rank, options.sqrt_split)
    up, down = clamp_joint(up, down, options.clamp_quantile)
    return MergedModule(up=up, down=down, singular_values=s)


def merge_batch(
    jobs: list[ModuleJob], options: SvdOptions, device: torch.device | str, out_dtype: torch.dtype = torch.float32
) -> list[MergedModule]:
    """merge_module's steps for same-shaped jobs (equal group_key) at once, batched: one call per
    step instead of one per module (~1000 small cuSOLVER calls for SD1.5), by batch_thin_svd.
    Results come back on the CPU, up and down in out_dtype (one cast per batch)."""
    kept = min(max(job.rank for job in jobs), jobs[0].num_singular_values)
    u, s, vh = batch_thin_svd(*stacked_batch(jobs, device), kept)
    u, vh = fix_signs(u, vh)
    singular_values = s.cpu()
    merged: list[MergedModule | None] = [None] * len(jobs)
    for rank in sorted({job.rank for job in jobs}):  # the kept rank may differ inside a group
        members = [i for i, job in enumerate(jobs) if job.rank == rank]
        if len(members) == len(jobs):  # the usual case: no copy of the whole batch
            up, down = lora_factors(u, s, vh, rank, options.sqrt_split)
        else:
            index = torch.tensor(members, device=u.device)
            up, down = lora_factors(u[index], s[index], vh[index], rank, options.sqrt_split)
        up, down = clamp_joint(up, down, options.clamp_quantile)
        up, down = up.to("cpu", out_dtype), down.to("cpu", out_dtype)
        for row, i in enumerate(members):
            merged[i] = MergedModule(up=up[row], down=down[row], singular_values=singular_values[i])
    return merged  # type: ignore[return-value]


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
