// W = P Q's thin SVD for a batch of same-shaped modules, shared by the CPU and CUDA kernels: the
// routes (dense, the Gram route, Cholesky-QR twice, Householder), how one is chosen, and the
// copylora::factored_svd op's argument checks. Everything here is ATen calls on whatever device P
// and Q live; each kernel brings its own batched SVD for the small cores.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <tuple>

#include "merge_group.h"

namespace copylora {

// How a module's W was decomposed: the factored_svd op's last output, so tests and benchmarks can
// see it. Householder follows Cholesky-QR, which hands it what it cannot factor.
enum Route : int64_t { kRouteDense = 0, kRouteGram = 1, kRouteCholeskyQr = 2, kRouteHouseholder = 3 };

// Which factored method a caller asks for; merge_group always runs kAuto. kHouseholder is the
// CUDA kernel's method before Cholesky-QR, kept so the GPU check can time the two side by side.
enum class Method { kAuto, kGram, kQr, kHouseholder };

inline Method parse_method(c10::string_view name) {
  if (name == "auto") return Method::kAuto;
  if (name == "gram") return Method::kGram;
  if (name == "qr") return Method::kQr;
  if (name == "householder") return Method::kHouseholder;
  TORCH_CHECK(false, "factored_svd: method must be 'auto', 'gram', 'qr' or 'householder', got '", std::string(name), "'");
}

// U (B, out, kk), S (B, m), Vh (B, kk, in) of W = P Q for a batch, and each module's Route.
struct Decomposition {
  at::Tensor u;
  at::Tensor s;
  at::Tensor vh;
  at::Tensor route;  // (B,) int64, on P's device
};

inline at::Tensor routes(const at::Tensor& p, Route route) {
  return at::full({p.size(0)}, route, p.options().dtype(at::kLong));
}

// Largest deviation of Q1^T Q1 from the identity after CholQR's first pass that is left to the
// second pass (it is about cond(A)^2 * eps, so cond(A) up to ~1000). A guard: in the tests a failed
// Cholesky already catches every matrix CholQR2 cannot factor accurately.
constexpr float kCholeskyQrDeviation = 0.1f;

// A product with the inverse of a small lower-triangular matrix, formed explicitly: MKL's triangular
// solve on these shapes was slower than the Householder QR it replaces.
inline at::Tensor lower_inverse(const at::Tensor& lower) {
  const at::Tensor identity = at::eye(lower.size(1), lower.options()).expand_as(lower);
  return at::linalg_solve_triangular(lower, identity, /*upper=*/false);
}

// Batched reduced QR of tall matrices A (B, rows, R) by Cholesky-QR twice: R^T R = A^T A, Q = A R^-1,
// repeated on Q. A few BLAS-3 passes over A, where Householder makes about 2R level-2 passes (LAPACK
// on the CPU, cuSOLVER's geqrf on the GPU): on the CPU the SDXL resize's engine (R = 32) took 0.8 s
// instead of 1.1 s; on an H200 the batched torch backend with it ran SDXL's R = 16 cores in 0.24 s
// against the Householder kernel's 0.45 s. The squared condition number makes it fail for
// ill-conditioned or rank-deficient A (a zero module, two inputs with the same up): those matrices,
// recognised by a failed Cholesky or a first-pass Q too far from orthonormal, are factored by
// Householder instead. Returns Q, R and which matrices went to Householder.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> cholesky_qr2(const at::Tensor& a) {
  auto [l1, info1] = at::linalg_cholesky_ex(at::bmm(a.transpose(1, 2), a));
  const at::Tensor q1 = at::bmm(a, lower_inverse(l1).transpose(1, 2));
  const at::Tensor g2 = at::bmm(q1.transpose(1, 2), q1);
  auto [l2, info2] = at::linalg_cholesky_ex(g2);
  at::Tensor q = at::bmm(q1, lower_inverse(l2).transpose(1, 2));
  at::Tensor r = at::bmm(l2.transpose(1, 2), l1.transpose(1, 2));
  const at::Tensor deviation = (g2 - at::eye(g2.size(1), g2.options())).abs().amax({1, 2});
  const at::Tensor failed = (info1 != 0).logical_or(info2 != 0).logical_or(deviation.isnan()).logical_or(
      deviation > kCholeskyQrDeviation);
  const at::Tensor redo = failed.nonzero().squeeze(1);
  if (redo.numel() > 0) {
    auto [q_h, r_h] = householder_qr(a.index_select(0, redo));
    q.index_copy_(0, redo, q_h);
    r.index_copy_(0, redo, r_h);
  }
  return {q, r, failed};
}

// Factored through explicit orthonormal bases of P and Q^T: by CholQR2 (Householder for what it
// cannot factor), or by Householder alone.
template <typename BatchedSvd>
Decomposition qr_route(const GroupShape& g, const at::Tensor& p, const at::Tensor& q, bool householder_only,
                       BatchedSvd batched_svd) {
  if (householder_only) {
    auto [u, s, vh] = factored_svd(g, p, q, householder_qr, batched_svd);
    return {u, s, vh, routes(p, kRouteHouseholder)};
  }
  at::Tensor redone = at::zeros({p.size(0)}, p.options().dtype(at::kBool));
  auto qr = [&redone](const at::Tensor& a) {
    auto [q_a, r_a, failed] = cholesky_qr2(a);
    redone.logical_or_(failed);
    return std::make_tuple(q_a, r_a);
  };
  auto [u, s, vh] = factored_svd(g, p, q, qr, batched_svd);
  return {u, s, vh, redone.to(at::kLong).add_(kRouteCholeskyQr)};  // kRouteHouseholder where redone
}

// Only the kept singular vectors, without orthonormal bases of P and Q^T: the Cholesky factors of
// the Grams (P^T P = L_P L_P^T, Q Q^T = L_Q L_Q^T) give the core L_P^T L_Q, whose SVD U_c S V_c^T is
// W's, and U_k = P (L_P^-T U_c[:, :k]), Vh_k = (V_c[:, :k]^T L_Q^-1) Q cost (out + in) R k. The Grams
// are float64 (a product of float32 values is exact there), so squaring the condition number costs
// eps64 cond^2, not eps32 cond^2, and one BLAS-3 pass over P and Q replaces CholQR2's four (at half
// float32's speed on a CPU). Q_P = P L_P^-T is then orthonormal to within about
// eps64 sqrt(rows) ||P||_F^2 ||L_P^-1||_F^2 (an over-estimate), and the singular values move by that
// times ||W||_F: a module is accepted where both Cholesky factorisations succeed and that movement,
// for P and Q together, stays below one float32 rounding of the factors, eps32 ||P||_F ||Q||_F (the
// engine tests allow 8). `accepted` says which modules were.
template <typename BatchedSvd>
Decomposition gram_route(const GroupShape& g, const at::Tensor& p, const at::Tensor& q, at::Tensor& accepted,
                         BatchedSvd batched_svd) {
  const int64_t kk = g.computed;
  const at::Tensor p64 = p.to(at::kDouble);
  const at::Tensor q64 = q.to(at::kDouble);
  const at::Tensor gram_p = at::bmm(p64.transpose(1, 2), p64);
  const at::Tensor gram_q = at::bmm(q64, q64.transpose(1, 2));
  auto [l_p, info_p] = at::linalg_cholesky_ex(gram_p);
  auto [l_q, info_q] = at::linalg_cholesky_ex(gram_q);
  const at::Tensor inverse_p = lower_inverse(l_p);
  const at::Tensor inverse_q = lower_inverse(l_q);
  const at::Tensor norm_p = gram_p.diagonal(0, 1, 2).sum(1);  // ||P||_F^2
  const at::Tensor norm_q = gram_q.diagonal(0, 1, 2).sum(1);
  const at::Tensor loss = (norm_p * inverse_p.square().sum({1, 2}) * std::sqrt(static_cast<double>(g.out)) +
                           norm_q * inverse_q.square().sum({1, 2}) * std::sqrt(static_cast<double>(g.in))) *
                          std::numeric_limits<double>::epsilon();
  const at::Tensor factorised = (info_p == 0).logical_and(info_q == 0);
  // LAPACK refuses a core with NaN: a failed factorisation's core is zeroed (qr_route redoes it)
  const at::Tensor core = at::bmm(l_p.transpose(1, 2), l_q).nan_to_num_(0.0).mul_(factorised.view({-1, 1, 1}));
  auto [u_c, s, vh_c] = batched_svd(core.to(at::kFloat).contiguous());
  const at::Tensor moved = loss * s.to(at::kDouble).square().sum(1).sqrt();
  const at::Tensor allowed = (norm_p * norm_q).sqrt() * std::numeric_limits<float>::epsilon();
  accepted = factorised.logical_and(moved <= allowed);  // NaN compares false: never accepted
  const at::Tensor left = at::bmm(inverse_p.transpose(1, 2), u_c.narrow(2, 0, kk).to(at::kDouble));
  const at::Tensor right = at::bmm(vh_c.narrow(1, 0, kk).to(at::kDouble), inverse_q);
  const at::Tensor u = at::bmm(p, left.to(at::kFloat));
  const at::Tensor vh = at::bmm(right.to(at::kFloat), q);
  return {u, s.contiguous(), vh, routes(p, kRouteGram)};
}

// The Gram route costs one float64 pass over P and Q, CholQR2 four float32 passes: measured on this
// project's CPU (bench/README.md), the two are within noise up to R = 32 and the Gram route is
// faster from R = 64 (FLUX.1 32 + 32: ~1.4x the engine). Below, CholQR2 stays, and with it the
// results (and golden files) of today's rank-8 and rank-16 merges bit for bit. On an H200 the Gram
// route led by milliseconds below R = 64 too (SDXL R = 16: 0.010 s against 0.012 s): one threshold
// serves both devices.
constexpr int64_t kGramMinRank = 64;

inline bool gram_pays(const GroupShape& g) {
  return g.total_rank >= kGramMinRank;
}

// W's decomposition for a batch of modules from their stacked P and Q (float32): the dense SVD where
// R >= min(out, in); else the Gram route, with CholQR2 (and Householder) for the modules it declines.
template <typename BatchedSvd>
Decomposition decompose(const GroupShape& g, const at::Tensor& p, const at::Tensor& q, Method method,
                        BatchedSvd batched_svd) {
  if (g.dense) {
    auto [u, s, vh] = factored_svd(g, p, q, householder_qr, batched_svd);
    return {u, s, vh, routes(p, kRouteDense)};
  }
  if (method == Method::kQr || method == Method::kHouseholder || (method == Method::kAuto && !gram_pays(g))) {
    return qr_route(g, p, q, method == Method::kHouseholder, batched_svd);
  }
  at::Tensor accepted;
  Decomposition result = gram_route(g, p, q, accepted, batched_svd);
  const at::Tensor redo = accepted.logical_not().nonzero().squeeze(1);
  if (redo.numel() > 0) {
    const Decomposition again = qr_route(g, p.index_select(0, redo), q.index_select(0, redo), false, batched_svd);
    result.u.index_copy_(0, redo, again.u);
    result.s.index_copy_(0, redo, again.s);
    result.vh.index_copy_(0, redo, again.vh);
    result.route.index_copy_(0, redo, again.route);
  }
  return result;
}

// The shape of a factored_svd call's batch, after checking its arguments: P (B, out, R) and
// Q (B, R, in), float32, on one device.
inline GroupShape factored_shape(const at::Tensor& p, const at::Tensor& q, int64_t kept) {
  TORCH_CHECK(p.dim() == 3 && q.dim() == 3 && p.size(0) == q.size(0) && p.size(2) == q.size(1),
              "factored_svd: p must be (B, out, R) and q (B, R, in), got ", p.sizes(), " and ", q.sizes());
  TORCH_CHECK(p.scalar_type() == at::kFloat && q.scalar_type() == at::kFloat, "factored_svd: p and q must be float32");
  TORCH_CHECK(p.device() == q.device(), "factored_svd: p is on ", p.device(), " but q on ", q.device());
  TORCH_CHECK(kept >= 0 && p.size(2) > 0, "factored_svd: needs R > 0 and kept >= 0");
  GroupShape g;
  g.modules = p.size(0);
  g.out = p.size(1);
  g.in = q.size(2);
  g.total_rank = p.size(2);
  g.singular = std::min({g.total_rank, g.out, g.in});
  g.computed = std::min(kept, g.singular);
  g.dense = g.total_rank >= std::min(g.out, g.in);
  return g;
}

}  // namespace copylora
