// Shared by the CPU and CUDA kernels of copylora::merge_group: argument checks, the shape of
// a group, and the small pieces of arithmetic that must be identical on every device.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#if defined(__CUDACC__)
#define COPYLORA_HOST_DEVICE __host__ __device__
#else
#define COPYLORA_HOST_DEVICE
#endif

namespace copylora {

// Everything the kernels need to know about one call: B modules with n inputs each, all of
// the same (out, in, r_1..r_n).
struct GroupShape {
  int64_t modules = 0;      // B
  int64_t inputs = 0;       // n
  int64_t out = 0;
  int64_t in = 0;
  int64_t total_rank = 0;   // R = r_1 + ... + r_n
  int64_t max_rank = 0;     // K = max(ranks): columns of the returned up
  int64_t singular = 0;     // m = min(R, out, in)
  int64_t computed = 0;     // min(K, m): singular vectors actually needed
  bool dense = false;       // R >= min(out, in): decompose W itself, as the reference does
  std::vector<int64_t> input_ranks;  // r_i
  std::vector<int64_t> offsets;      // column of P (row of Q) where input i starts
};

inline GroupShape check_group(
    at::TensorList ups, at::TensorList downs, const at::Tensor& scales, at::IntArrayRef ranks,
    double clamp_quantile) {
  GroupShape g;
  g.modules = static_cast<int64_t>(ranks.size());
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == g.modules,
              "merge_group: scales must be (B, n) with B = len(ranks) = ", g.modules, ", got ",
              scales.sizes());
  TORCH_CHECK(scales.scalar_type() == at::kFloat, "merge_group: scales must be float32, got ",
              scales.scalar_type());
  TORCH_CHECK(clamp_quantile >= 0.0, "merge_group: clamp_quantile must be >= 0, got ", clamp_quantile);
  g.inputs = scales.size(1);
  TORCH_CHECK(ups.size() == downs.size(), "merge_group: ", ups.size(), " ups but ", downs.size(), " downs");
  TORCH_CHECK(static_cast<int64_t>(ups.size()) == g.modules * g.inputs,
              "merge_group: expected B*n = ", g.modules * g.inputs, " factor pairs, got ", ups.size());
  for (int64_t rank : ranks) {
    TORCH_CHECK(rank >= 0, "merge_group: ranks must be >= 0, got ", rank);
    g.max_rank = std::max(g.max_rank, rank);
  }
  if (g.modules == 0) {
    return g;
  }
  TORCH_CHECK(g.inputs > 0, "merge_group: every module needs at least one input");
  g.out = ups[0].size(0);
  g.in = downs[0].size(1);
  for (int64_t i = 0; i < g.inputs; ++i) {
    g.offsets.push_back(g.total_rank);
    g.input_ranks.push_back(downs[i].size(0));
    g.total_rank += downs[i].size(0);
  }
  for (size_t j = 0; j < ups.size(); ++j) {
    const at::Tensor& up = ups[j];
    const at::Tensor& down = downs[j];
    const int64_t r = g.input_ranks[j % g.inputs];
    TORCH_CHECK(up.dim() == 2 && down.dim() == 2,
                "merge_group: factor pair ", j, " must be 2-D (a conv's down flattened), got up ",
                up.sizes(), " and down ", down.sizes());
    TORCH_CHECK(up.size(0) == g.out && up.size(1) == r && down.size(0) == r && down.size(1) == g.in,
                "merge_group: factor pair ", j, " has up ", up.sizes(), " and down ", down.sizes(),
                "; this group's input ", j % g.inputs, " is up (", g.out, ", ", r, ") and down (", r,
                ", ", g.in, ")");
    TORCH_CHECK(at::isFloatingType(up.scalar_type()) && at::isFloatingType(down.scalar_type()),
                "merge_group: factor pair ", j, " must be floating point, got ", up.scalar_type(),
                " and ", down.scalar_type());
    TORCH_CHECK(up.device() == scales.device() && down.device() == scales.device(),
                "merge_group: factor pair ", j, " is on ", up.device(), "/", down.device(),
                " but scales is on ", scales.device());
  }
  TORCH_CHECK(g.total_rank > 0, "merge_group: the inputs have total rank 0");
  g.singular = std::min({g.total_rank, g.out, g.in});
  g.computed = std::min(g.max_rank, g.singular);
  g.dense = g.total_rank >= std::min(g.out, g.in);
  return g;
}

// The dtype of the returned up and down: float32 unless the caller asked for another float.
inline at::ScalarType check_out_dtype(std::optional<at::ScalarType> out_dtype) {
  const at::ScalarType dtype = out_dtype.value_or(at::kFloat);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              "merge_group: out_dtype must be float32, float64, float16 or bfloat16, got ", dtype);
  return dtype;
}

// torch.quantile's 'linear' interpolation, with its float32 arithmetic: the position
// q * (n - 1) is computed in float32, and the two neighbouring order statistics are blended
// by torch.lerp's formula (which switches form at weight 0.5 for accuracy).
struct QuantilePosition {
  int64_t below;
  int64_t above;
  float weight;
};

COPYLORA_HOST_DEVICE inline QuantilePosition quantile_position(float q, int64_t count) {
  const float position = q * static_cast<float>(count - 1);
  const float below = floorf(position);
  const float above = ceilf(position);
  return {static_cast<int64_t>(below), static_cast<int64_t>(above), position - below};
}

COPYLORA_HOST_DEVICE inline float lerp_like_torch(float start, float end, float weight) {
  return fabsf(weight) < 0.5f ? start + weight * (end - start) : end - (end - start) * (1.0f - weight);
}

// The values clamped together for module b are up[b, :, :rank] and down[b, :rank, :] (zero
// padding past the available singular vectors included, as in the reference): element e of
// that joined list lives at this offset from the start of the module's block.
COPYLORA_HOST_DEVICE inline float* clamp_element(float* up, float* down, int64_t out, int64_t in,
                                                 int64_t max_rank, int64_t rank, int64_t e) {
  const int64_t up_count = out * rank;
  if (e < up_count) {
    return up + (e / rank) * max_rank + e % rank;
  }
  return down + (e - up_count);
}

// NaN or Inf in a factor would make LAPACK fail (CPU) or the Jacobi sort garbage (CUDA): both
// kernels refuse it, with this message, after assembling P and Q in float32.
inline constexpr const char* kNonFiniteFactor =
    "merge_group: a factor contains NaN or Inf (or overflowed float32 when scaled)";

// The batched reduced QR every device can use: Householder, through ATen.
inline std::tuple<at::Tensor, at::Tensor> householder_qr(const at::Tensor& matrices) {
  return at::linalg_qr(matrices);
}

// W's thin SVD for a batch of modules from their stacked factors P (B, out, R) and Q (B, R, in):
// U (B, out, kk), S (B, m), Vh (B, kk, in), all contiguous. Dense when R >= min(out, in), where W
// is no bigger than the factors; otherwise W = Qp (Rp Rq^T) Qq^T, so the SVD of the small R x R
// core gives W's. batched_qr is a batched reduced QR (Q orthonormal, R upper triangular);
// batched_svd the device's batched thin SVD (of W when dense, else the cores).
template <typename BatchedQr, typename BatchedSvd>
std::tuple<at::Tensor, at::Tensor, at::Tensor> factored_svd(const GroupShape& g, const at::Tensor& p,
                                                            const at::Tensor& q, BatchedQr batched_qr,
                                                            BatchedSvd batched_svd) {
  const int64_t kk = g.computed;
  at::Tensor u, s, vh;
  if (g.dense) {
    auto [u_w, s_w, vh_w] = batched_svd(at::bmm(p, q));
    u = u_w.narrow(2, 0, kk);
    s = s_w.narrow(1, 0, g.singular);
    vh = vh_w.narrow(1, 0, kk);
  } else {
    auto [q_p, r_p] = batched_qr(p);
    auto [q_q, r_q] = batched_qr(q.transpose(1, 2));
    auto [u_c, s_c, vh_c] = batched_svd(at::bmm(r_p, r_q.transpose(1, 2)).contiguous());
    u = at::bmm(q_p, u_c.narrow(2, 0, kk));
    s = s_c;
    vh = at::bmm(vh_c.narrow(1, 0, kk), q_q.transpose(1, 2));
  }
  return {u.contiguous(), s.contiguous(), vh.contiguous()};
}

}  // namespace copylora
