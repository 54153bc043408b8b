// CUDA kernel of copylora::merge_group. A group of B modules runs in a fixed number of launches,
// whatever B is: n x 2 assembly kernels (one per input and factor, all modules at once), the
// decomposition of decompose.h in batched ATen calls (cuBLAS/cuSOLVER, TF32 off whatever the caller
// set) with one Jacobi SVD kernel for all R x R cores, one kernel for sign fix/scaling/truncation and
// one for the quantile clamp. Host syncs per group: the finiteness check of the inputs, the routes'
// hand-overs (modules the Gram route or Cholesky-QR decline) and the Jacobi convergence count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cfloat>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "decompose.h"
#include "merge_group.h"

namespace copylora {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpSize = 32;
// Graded spectra need 24-27 sweeps at R = 160-169; convergence is quadratic once close, so a
// module still rotating after 60 is reported (a warning), not silently returned.
constexpr int kMaxSweeps = 60;
constexpr int kMaxGridX = 1024;
constexpr int64_t kMaxModules = 65535;  // gridDim.y of the assembly kernels

// ---------------------------------------------------------------------------------------------
// Fused assembly: P[b][:, offset:offset+r] = scale[b] * up_b and Q[b][offset:offset+r, :] = down_b,
// cast to float32 as they are copied. blockIdx.y is the module; pointers[b] its factor.

template <typename scalar_t>
__global__ void assemble_up_kernel(const int64_t* __restrict__ pointers, const float* __restrict__ scales,
                                   int64_t inputs, int64_t input, int64_t out, int64_t total_rank,
                                   int64_t rank, int64_t offset, float* __restrict__ p) {
  const int64_t b = blockIdx.y;
  const scalar_t* up = reinterpret_cast<const scalar_t*>(pointers[b]);
  const float scale = scales[b * inputs + input];
  float* p_b = p + b * out * total_rank + offset;
  const int64_t count = out * rank;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < count;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    p_b[(e / rank) * total_rank + e % rank] = scale * static_cast<float>(up[e]);
  }
}

template <typename scalar_t>
__global__ void assemble_down_kernel(const int64_t* __restrict__ pointers, int64_t in, int64_t total_rank,
                                     int64_t rank, int64_t offset, float* __restrict__ q) {
  const int64_t b = blockIdx.y;
  const scalar_t* down = reinterpret_cast<const scalar_t*>(pointers[b]);
  float* q_b = q + (b * total_rank + offset) * in;  // input i's rows are contiguous in Q[b]
  const int64_t count = rank * in;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < count;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    q_b[e] = static_cast<float>(down[e]);
  }
}

dim3 assembly_grid(int64_t count, int64_t modules) {
  const int64_t blocks = std::min<int64_t>((count + kThreads - 1) / kThreads, kMaxGridX);
  return dim3(static_cast<unsigned>(std::max<int64_t>(blocks, 1)), static_cast<unsigned>(modules));
}

bool assembled_directly(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16;
}

// Factor `which` (0 up, 1 down) of input i for every module, contiguous and of one dtype: the
// files' own dtype when all modules agree and the assembly kernels read it (no copy), float32
// otherwise (mixed dtypes, float8).
std::vector<at::Tensor> slot_factors(const GroupShape& g, at::TensorList factors, int64_t input) {
  const at::ScalarType first = factors[input].scalar_type();
  bool uniform = assembled_directly(first);
  for (int64_t b = 0; b < g.modules; ++b) {
    uniform = uniform && factors[b * g.inputs + input].scalar_type() == first;
  }
  const at::ScalarType dtype = uniform ? first : at::kFloat;
  std::vector<at::Tensor> slot;
  slot.reserve(g.modules);
  for (int64_t b = 0; b < g.modules; ++b) {
    slot.push_back(factors[b * g.inputs + input].to(dtype).contiguous());
  }
  return slot;
}

void assemble(const GroupShape& g, at::TensorList ups, at::TensorList downs, const at::Tensor& scales,
              at::Tensor& p, at::Tensor& q) {
  const auto stream = at::cuda::getCurrentCUDAStream();
  // One pointer table for every launch: row 2i holds input i's ups, row 2i+1 its downs.
  std::vector<std::vector<at::Tensor>> staged;  // keeps cast copies alive until the launches
  at::Tensor table = at::empty({2 * g.inputs, g.modules}, at::TensorOptions().dtype(at::kLong));
  int64_t* entries = table.data_ptr<int64_t>();
  for (int64_t i = 0; i < g.inputs; ++i) {
    for (int which = 0; which < 2; ++which) {
      staged.push_back(slot_factors(g, which == 0 ? ups : downs, i));
      for (int64_t b = 0; b < g.modules; ++b) {
        entries[(2 * i + which) * g.modules + b] = reinterpret_cast<int64_t>(staged.back()[b].const_data_ptr());
      }
    }
  }
  const at::Tensor device_table = table.to(scales.device());
  const int64_t* pointers = device_table.const_data_ptr<int64_t>();
  const float* scale_data = scales.const_data_ptr<float>();
  for (int64_t i = 0; i < g.inputs; ++i) {
    const int64_t r = g.input_ranks[i];
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, staged[2 * i][0].scalar_type(), "assemble_up", [&] {
      assemble_up_kernel<scalar_t><<<assembly_grid(g.out * r, g.modules), kThreads, 0, stream>>>(
          pointers + 2 * i * g.modules, scale_data, g.inputs, i, g.out, g.total_rank, r, g.offsets[i],
          p.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, staged[2 * i + 1][0].scalar_type(), "assemble_down", [&] {
      assemble_down_kernel<scalar_t><<<assembly_grid(r * g.in, g.modules), kThreads, 0, stream>>>(
          pointers + (2 * i + 1) * g.modules, g.in, g.total_rank, r, g.offsets[i], q.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
}

// ---------------------------------------------------------------------------------------------
// SVD of the small R x R cores: one-sided (Hestenes) Jacobi, one block per core, the core and the
// accumulated rotations in shared memory. Column pairs are rotated in round-robin order, so a
// round's pairs are disjoint and each warp rotates its own pairs in parallel.

__device__ float warp_sum(float value) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    value += __shfl_xor_sync(0xffffffffu, value, offset);
  }
  return value;
}

__global__ void jacobi_svd_kernel(const float* __restrict__ cores, int64_t size, float* __restrict__ u_out,
                                  float* __restrict__ s_out, float* __restrict__ vh_out,
                                  int* __restrict__ unconverged) {
  extern __shared__ float shared[];
  float* a = shared;               // column j at a + j * size
  float* v = a + size * size;      // column j at v + j * size
  float* norms = v + size * size;  // size: singular values
  float* a_norms = norms + size;   // size
  float* v_norms = a_norms + size;  // size
  int* position = reinterpret_cast<int*>(v_norms + size);
  __shared__ int rotated;

  const int64_t b = blockIdx.x;
  const float* core = cores + b * size * size;
  for (int64_t e = threadIdx.x; e < size * size; e += blockDim.x) {
    const int64_t row = e / size, col = e % size;
    a[col * size + row] = core[e];
    v[col * size + row] = row == col ? 1.0f : 0.0f;
  }
  __syncthreads();

  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize, warps = blockDim.x / kWarpSize;
  const int64_t players = size + (size & 1);  // an odd size gets an idle slot
  const float tolerance = sqrtf(static_cast<float>(size)) * FLT_EPSILON;
  bool converged = false;
  for (int sweep = 0; sweep < kMaxSweeps && !converged; ++sweep) {
    if (threadIdx.x == 0) {
      rotated = 0;
    }
    __syncthreads();
    for (int64_t round = 0; round < players - 1; ++round) {
      for (int64_t pair = warp; pair < players / 2; pair += warps) {
        const int64_t i = pair == 0 ? round : (round + pair) % (players - 1);
        const int64_t j = pair == 0 ? players - 1 : (round - pair + players - 1) % (players - 1);
        if (i >= size || j >= size) {
          continue;
        }
        float* ai = a + i * size;
        float* aj = a + j * size;
        float alpha = 0.0f, beta = 0.0f, gamma = 0.0f;
        for (int64_t row = lane; row < size; row += kWarpSize) {
          alpha += ai[row] * ai[row];
          beta += aj[row] * aj[row];
          gamma += ai[row] * aj[row];
        }
        alpha = warp_sum(alpha);
        beta = warp_sum(beta);
        gamma = warp_sum(gamma);
        // Every lane holds the same sums, so the branch is uniform across the warp.
        if (gamma == 0.0f || fabsf(gamma) <= tolerance * sqrtf(alpha) * sqrtf(beta)) {
          continue;
        }
        const float zeta = (beta - alpha) / (2.0f * gamma);
        // hypotf, not sqrtf(1 + zeta^2): between a column and one of rounding noise (a rank-deficient
        // core: two inputs with the same up) zeta^2 overflowed, t came out 0, and the identity
        // "rotation" kept the sweeps going until kMaxSweeps.
        const float t = copysignf(1.0f, zeta) / (fabsf(zeta) + hypotf(1.0f, zeta));
        // Correctly rounded (rsqrtf is approximate, and its bias grows S's error to 1e-4 at R ~ 160)
        const float c = 1.0f / sqrtf(1.0f + t * t);
        const float s = c * t;
        if (s == 0.0f) {
          continue;  // t underflowed: this pair is as orthogonal as float32 can make it
        }
        float* vi = v + i * size;
        float* vj = v + j * size;
        for (int64_t row = lane; row < size; row += kWarpSize) {
          const float x = ai[row], y = aj[row];
          ai[row] = c * x - s * y;
          aj[row] = s * x + c * y;
          const float vx = vi[row], vy = vj[row];
          vi[row] = c * vx - s * vy;
          vj[row] = s * vx + c * vy;
        }
        if (lane == 0) {
          rotated = 1;
        }
      }
      __syncthreads();
    }
    converged = rotated == 0;
    __syncthreads();  // everyone has read `rotated` before thread 0 resets it
  }
  if (threadIdx.x == 0 && !converged) {
    atomicAdd(unconverged, 1);
  }

  // Where t is tiny, c rounds to exactly 1 while s = t: that rotation is sqrt(1 + t^2) times an
  // orthogonal one, so the columns of A and V grow together (S came out 1e-5 too large at R = 128
  // on an H200). A = core V holds throughout, so sigma_j = |a_j| / |v_j| and v_j / |v_j| undo it.
  // Sort descending (first index on ties).
  for (int64_t j = threadIdx.x; j < size; j += blockDim.x) {
    float a_sum = 0.0f, v_sum = 0.0f;
    for (int64_t row = 0; row < size; ++row) {
      a_sum += a[j * size + row] * a[j * size + row];
      v_sum += v[j * size + row] * v[j * size + row];
    }
    a_norms[j] = sqrtf(a_sum);
    v_norms[j] = sqrtf(v_sum);
    norms[j] = a_norms[j] / v_norms[j];
  }
  __syncthreads();
  for (int64_t j = threadIdx.x; j < size; j += blockDim.x) {
    int rank = 0;
    for (int64_t k = 0; k < size; ++k) {
      rank += norms[k] > norms[j] || (norms[k] == norms[j] && k < j);
    }
    position[j] = rank;
    s_out[b * size + rank] = norms[j];
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < size * size; e += blockDim.x) {
    const int64_t j = e / size, row = e % size;
    const int64_t to = position[j];
    const float inverse = a_norms[j] > 0.0f ? 1.0f / a_norms[j] : 0.0f;
    u_out[(b * size + row) * size + to] = a[j * size + row] * inverse;          // U[:, to] = a_j / |a_j|
    vh_out[(b * size + to) * size + row] = v[j * size + row] / v_norms[j];  // Vh[to, :] = v_j / |v_j|
  }
}

size_t jacobi_shared_bytes(int64_t size) {
  return static_cast<size_t>(2 * size * size + 3 * size) * sizeof(float) + static_cast<size_t>(size) * sizeof(int);
}

// cuSOLVER's float32 SVD left singular values 1e-5 too large (relative) at R = 256 on an H200,
// beyond float32 rounding of W: the matrices it gets are small, so it runs in float64.
std::tuple<at::Tensor, at::Tensor, at::Tensor> float64_svd(const at::Tensor& matrices) {
  auto [u, s, vh] = at::linalg_svd(matrices.to(at::kDouble), /*full_matrices=*/false);
  return {u.to(at::kFloat), s.to(at::kFloat), vh.to(at::kFloat)};
}

// Thin U, S descending, Vh of contiguous float32 matrices (B, rows, cols): square ones that fit one
// block's shared memory by the Jacobi kernel, others by cuSOLVER in float64. Warns when a core's
// Jacobi iteration did not converge within kMaxSweeps.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batched_svd(const at::Tensor& matrices) {
  const int64_t modules = matrices.size(0), size = matrices.size(1);
  const size_t bytes = jacobi_shared_bytes(size);
  const cudaDeviceProp* properties = at::cuda::getCurrentDeviceProperties();
  if (matrices.size(2) != size || bytes > properties->sharedMemPerBlockOptin) {
    return float64_svd(matrices);
  }
  if (bytes > properties->sharedMemPerBlock) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(jacobi_svd_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
  }
  at::Tensor u = at::empty_like(matrices);
  at::Tensor s = at::empty({modules, size}, matrices.options());
  at::Tensor vh = at::empty_like(matrices);
  at::Tensor unconverged = at::zeros({1}, matrices.options().dtype(at::kInt));
  jacobi_svd_kernel<<<static_cast<unsigned>(modules), kThreads, bytes, at::cuda::getCurrentCUDAStream()>>>(
      matrices.const_data_ptr<float>(), size, u.data_ptr<float>(), s.data_ptr<float>(), vh.data_ptr<float>(),
      unconverged.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int failed = unconverged.item<int>();
  if (failed > 0) {
    TORCH_WARN("merge_group: the Jacobi SVD of ", failed, " of ", modules, " cores (", size, " x ", size,
               ") did not converge in ", kMaxSweeps, " sweeps; their singular values may be inaccurate");
  }
  return {u, s, vh};
}

// ---------------------------------------------------------------------------------------------
// Sign fix, scaling and truncation, one block per module: each warp finds the largest-|value|
// entry (first on ties) of its U columns, then the block writes the kept pairs into up/down.

__global__ void write_factors_kernel(const float* __restrict__ u, const float* __restrict__ s,
                                     const float* __restrict__ vh, const int64_t* __restrict__ ranks,
                                     int64_t out, int64_t in, int64_t computed, int64_t singular,
                                     int64_t max_rank, bool sqrt_split, float* __restrict__ up,
                                     float* __restrict__ down) {
  extern __shared__ float column_scale[];  // 2 * computed: up's, then down's factor per pair
  const int64_t b = blockIdx.x;
  const int64_t kept = min(ranks[b], singular);
  const float* u_b = u + b * out * computed;
  const float* s_b = s + b * singular;
  const float* vh_b = vh + b * computed * in;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize, warps = blockDim.x / kWarpSize;
  for (int64_t j = warp; j < kept; j += warps) {
    float best_abs = -1.0f;
    int64_t best_row = 0;
    for (int64_t row = lane; row < out; row += kWarpSize) {
      const float value = fabsf(u_b[row * computed + j]);
      if (value > best_abs) {
        best_abs = value;
        best_row = row;
      }
    }
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      const float other_abs = __shfl_xor_sync(0xffffffffu, best_abs, offset);
      const int64_t other_row = __shfl_xor_sync(0xffffffffu, best_row, offset);
      if (other_abs > best_abs || (other_abs == best_abs && other_row < best_row)) {
        best_abs = other_abs;
        best_row = other_row;
      }
    }
    if (lane == 0) {
      const float sign = u_b[best_row * computed + j] < 0.0f ? -1.0f : 1.0f;
      const float root = sqrtf(s_b[j]);
      column_scale[j] = sign * (sqrt_split ? root : s_b[j]);
      column_scale[computed + j] = sign * (sqrt_split ? root : 1.0f);
    }
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < out * kept; e += blockDim.x) {
    const int64_t row = e / kept, j = e % kept;
    up[(b * out + row) * max_rank + j] = u_b[row * computed + j] * column_scale[j];
  }
  for (int64_t e = threadIdx.x; e < kept * in; e += blockDim.x) {
    const int64_t j = e / in, col = e % in;
    down[(b * max_rank + j) * in + col] = vh_b[j * in + col] * column_scale[computed + j];
  }
}

// ---------------------------------------------------------------------------------------------
// Quantile clamp, one block per module: the two order statistics around q * (n - 1) are found by
// radix selection on order-preserving integer keys (4 passes of 8 bits), then both factors are
// clamped to +-(their linear interpolation), as torch.quantile + clamp would do.

__device__ uint32_t order_key(float x) {
  const uint32_t bits = __float_as_uint(x);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

__device__ float key_value(uint32_t key) {
  return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

struct ClampBlock {
  float* up;
  float* down;
  int64_t out, in, max_rank, rank, count;
  __device__ float value(int64_t e) const { return *clamp_element(up, down, out, in, max_rank, rank, e); }
};

// Key of the k-th smallest (0-based) value.
__device__ uint32_t select_key(const ClampBlock& m, int64_t k, unsigned int* histogram, uint32_t* chosen_prefix,
                               int64_t* remaining) {
  uint32_t prefix = 0, mask = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int d = threadIdx.x; d < 256; d += blockDim.x) {
      histogram[d] = 0;
    }
    __syncthreads();
    for (int64_t e = threadIdx.x; e < m.count; e += blockDim.x) {
      const uint32_t key = order_key(m.value(e));
      if ((key & mask) == prefix) {
        atomicAdd(&histogram[(key >> shift) & 0xffu], 1u);
      }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int64_t seen = 0;
      uint32_t digit = 0;
      while (digit < 255 && seen + histogram[digit] <= k) {
        seen += histogram[digit];
        ++digit;
      }
      *chosen_prefix = prefix | (digit << shift);
      *remaining = k - seen;
    }
    __syncthreads();
    prefix = *chosen_prefix;
    k = *remaining;
    mask |= 0xffu << shift;
    __syncthreads();  // all have read the shared results before the next pass overwrites them
  }
  return prefix;
}

__global__ void clamp_kernel(const int64_t* __restrict__ ranks, int64_t out, int64_t in, int64_t max_rank,
                             float quantile, float* __restrict__ up, float* __restrict__ down) {
  __shared__ unsigned int histogram[256];
  __shared__ uint32_t chosen_prefix;
  __shared__ int64_t remaining;
  __shared__ unsigned long long at_most_below;
  __shared__ unsigned int next_key;

  const int64_t b = blockIdx.x;
  const int64_t rank = ranks[b];
  const ClampBlock m{up + b * out * max_rank, down + b * max_rank * in, out, in, max_rank, rank, (out + in) * rank};
  if (m.count == 0) {
    return;
  }
  const QuantilePosition position = quantile_position(quantile, m.count);
  const uint32_t below_key = select_key(m, position.below, histogram, &chosen_prefix, &remaining);
  const float below = key_value(below_key);
  float above = below;
  if (position.above != position.below) {
    // The next order statistic equals `below` when enough values tie with it, else it is the
    // smallest value above it.
    if (threadIdx.x == 0) {
      at_most_below = 0;
      next_key = 0xffffffffu;
    }
    __syncthreads();
    unsigned long long local_count = 0;
    unsigned int local_next = 0xffffffffu;
    for (int64_t e = threadIdx.x; e < m.count; e += blockDim.x) {
      const uint32_t key = order_key(m.value(e));
      if (key <= below_key) {
        ++local_count;
      } else {
        local_next = min(local_next, key);
      }
    }
    atomicAdd(&at_most_below, local_count);
    atomicMin(&next_key, local_next);
    __syncthreads();
    if (at_most_below <= static_cast<unsigned long long>(position.above)) {
      above = key_value(next_key);
    }
  }
  const float hi = lerp_like_torch(below, above, position.weight);
  for (int64_t e = threadIdx.x; e < m.count; e += blockDim.x) {
    float* x = clamp_element(m.up, m.down, out, in, max_rank, rank, e);
    *x = fminf(fmaxf(*x, -hi), hi);
  }
}

// ---------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> merge_group_cuda(
    at::TensorList ups, at::TensorList downs, const at::Tensor& scales, at::IntArrayRef ranks,
    double clamp_quantile, bool sqrt_split, std::optional<at::ScalarType> out_dtype) {
  const GroupShape g = check_group(ups, downs, scales, ranks, clamp_quantile);
  const at::ScalarType dtype = check_out_dtype(out_dtype);
  TORCH_CHECK(g.modules <= kMaxModules, "merge_group: at most ", kMaxModules, " modules per call on CUDA, got ",
              g.modules);
  const c10::cuda::CUDAGuard guard(scales.device());
  const at::NoTF32Guard full_float32;  // bmm in float32 even where the caller allowed TF32
  const auto options = scales.options().dtype(at::kFloat);
  at::Tensor up = at::zeros({g.modules, g.out, g.max_rank}, options);
  at::Tensor down = at::zeros({g.modules, g.max_rank, g.in}, options);
  at::Tensor singular = at::zeros({g.modules, g.singular}, options);
  if (g.modules == 0) {
    return {up.to(dtype), down.to(dtype), singular};
  }
  const auto stream = at::cuda::getCurrentCUDAStream();
  at::Tensor p = at::empty({g.modules, g.out, g.total_rank}, options);
  at::Tensor q = at::empty({g.modules, g.total_rank, g.in}, options);
  assemble(g, ups, downs, scales.contiguous(), p, q);
  TORCH_CHECK(at::isfinite(p).all().item<bool>() && at::isfinite(q).all().item<bool>(), kNonFiniteFactor);

  const int64_t kk = g.computed;
  const Decomposition d = decompose(g, p, q, Method::kAuto, batched_svd);  // (B, out, kk), (B, m), (B, kk, in)
  const at::Tensor& u = d.u;
  const at::Tensor& s = d.s;
  const at::Tensor& vh = d.vh;
  singular.copy_(s);

  const at::Tensor device_ranks = at::tensor(ranks, at::TensorOptions().dtype(at::kLong)).to(scales.device());
  write_factors_kernel<<<static_cast<unsigned>(g.modules), kThreads, 2 * kk * sizeof(float), stream>>>(
      u.const_data_ptr<float>(), s.const_data_ptr<float>(), vh.const_data_ptr<float>(),
      device_ranks.const_data_ptr<int64_t>(), g.out, g.in, kk, g.singular, g.max_rank, sqrt_split,
      up.data_ptr<float>(), down.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (clamp_quantile < 1.0) {
    clamp_kernel<<<static_cast<unsigned>(g.modules), kThreads, 0, stream>>>(
        device_ranks.const_data_ptr<int64_t>(), g.out, g.in, g.max_rank, static_cast<float>(clamp_quantile),
        up.data_ptr<float>(), down.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  // On the GPU the float32 result is transient device memory: one cast per group suffices.
  return {up.to(dtype), down.to(dtype), singular};
}

// copylora::factored_svd on the GPU: the decomposition merge_group_cuda makes, with each module's route.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> factored_svd_cuda(const at::Tensor& p, const at::Tensor& q,
                                                                             int64_t kept, c10::string_view method) {
  const GroupShape g = factored_shape(p, q, kept);
  const c10::cuda::CUDAGuard guard(p.device());
  const at::NoTF32Guard full_float32;
  const Decomposition d = decompose(g, p.contiguous(), q.contiguous(), parse_method(method), batched_svd);
  return {d.u, d.s, d.vh, d.route};
}

}  // namespace

TORCH_LIBRARY_IMPL(copylora, CUDA, m) {
  m.impl("merge_group", &merge_group_cuda);
  m.impl("factored_svd", &factored_svd_cuda);
}

}  // namespace copylora
