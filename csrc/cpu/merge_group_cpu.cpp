// CPU kernel of copylora::merge_group: float32 on ATen, parallel across modules with
// at::parallel_for. Each thread works through its share of a group in small batches: the fused
// assembly, the linear algebra (ATen's batched LAPACK calls) and the per-module finishing (sign
// fix, scaling, truncation, clamp), one batch at a time, while its data is in cache.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__linux__) || defined(__APPLE__)
#include <dlfcn.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <utility>
#include <tuple>
#include <vector>

#include "decompose.h"
#include "merge_group.h"

namespace copylora {
namespace {

// No NaN or Inf among n floats: an exponent of all ones marks both. Integer tests, so the loop
// vectorises without fast-math.
bool all_finite(const float* x, int64_t n) {
  uint32_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, x + i, sizeof bits);
    bad |= static_cast<uint32_t>((bits & 0x7f800000u) == 0x7f800000u);
  }
  return bad == 0;
}

// P[b] = [s_1 U_1 ... s_n U_n] (out x R) and Q[b] = [D_1; ...; D_n] (R x in), float32, written in
// place through views of the batched buffers: ATen's vectorised copy does the dtype cast (fp16
// and bf16 included) and reads any strides; the scale is applied to the small up block after.
void assemble_module(const GroupShape& g, at::TensorList ups, at::TensorList downs,
                     const float* scales, int64_t b, float* p, float* q) {
  const auto options = at::TensorOptions().dtype(at::kFloat);
  for (int64_t i = 0; i < g.inputs; ++i) {
    const int64_t r = g.input_ranks[i];
    const int64_t offset = g.offsets[i];
    at::Tensor p_block = at::from_blob(p + offset, {g.out, r}, {g.total_rank, 1}, options);
    p_block.copy_(ups[b * g.inputs + i]);
    p_block.mul_(scales[b * g.inputs + i]);
    at::from_blob(q + offset * g.in, {r, g.in}, options).copy_(downs[b * g.inputs + i]);
  }
}

// Writes module b's up (out x K block, zero past `kept`) and down (K x in block, likewise) from
// U (out x kk), S and Vh (kk x in), each pair's sign fixed so that the largest-|value| entry of its
// U column (first on ties) is positive. Row-major passes throughout: walking U a column at a time
// strides through it, and that scan was a third of the finishing time.
void write_factors(const GroupShape& g, const float* u, const float* s, const float* vh, int64_t kk,
                   int64_t kept, bool sqrt_split, float* up, float* down) {
  // |value| compared as the bits of a non-negative float, whose order is the values' order: an
  // integer select vectorises where a float one (which may trap) does not.
  std::vector<uint32_t> largest(kept, 0);
  std::vector<float> at_largest(kept, 0.0f);
  for (int64_t row = 0; row < g.out; ++row) {
    const float* u_row = u + row * kk;
    for (int64_t j = 0; j < kept; ++j) {
      const float value = u_row[j];
      uint32_t bits;
      std::memcpy(&bits, &value, sizeof bits);
      const uint32_t magnitude = bits & 0x7fffffffu;
      const bool larger = magnitude > largest[j];
      largest[j] = larger ? magnitude : largest[j];
      at_largest[j] = larger ? value : at_largest[j];
    }
  }
  std::vector<float> up_scale(kept);
  std::vector<float> down_scale(kept);
  for (int64_t j = 0; j < kept; ++j) {
    const float sign = at_largest[j] < 0.0f ? -1.0f : 1.0f;
    up_scale[j] = sign * (sqrt_split ? std::sqrt(s[j]) : s[j]);
    down_scale[j] = sign * (sqrt_split ? std::sqrt(s[j]) : 1.0f);
  }
  for (int64_t row = 0; row < g.out; ++row) {
    const float* u_row = u + row * kk;
    float* up_row = up + row * g.max_rank;
    for (int64_t j = 0; j < kept; ++j) {
      up_row[j] = u_row[j] * up_scale[j];
    }
    std::fill(up_row + kept, up_row + g.max_rank, 0.0f);
  }
  for (int64_t j = 0; j < kept; ++j) {
    const float* vh_row = vh + j * g.in;
    float* down_row = down + j * g.in;
    const float scale = down_scale[j];
    for (int64_t col = 0; col < g.in; ++col) {
      down_row[col] = vh_row[col] * scale;
    }
  }
  std::fill(down + kept * g.in, down + g.max_rank * g.in, 0.0f);
}

// Calls f(run, length) for the contiguous runs of the values clamped together for a module:
// up[:, :rank] (one run when rank is the block's width, else one per row), then down[:rank].
// Inner loops over a run vectorise; a call per value did not.
template <typename F>
void for_each_clamped_run(const GroupShape& g, int64_t rank, float* up, float* down, F&& f) {
  if (rank == g.max_rank) {
    f(up, g.out * rank);
  } else {
    for (int64_t row = 0; row < g.out; ++row) {
      f(up + row * g.max_rank, rank);
    }
  }
  f(down, rank * g.in);
}

// The order statistics k and k + 1 (0-based; k + 1 clipped to the last) of a module's clamped
// values. torch.quantile sorts; nth_element on a copy is O(n) but still moves every value. Here a
// small strided sample brackets the two statistics, one pass counts the values below the bracket
// and copies the few inside it, and nth_element runs on those only. If the sample misled (values
// with a pathological layout), the exact full selection runs instead.
std::pair<float, float> select_pair(const GroupShape& g, int64_t rank, float* up, float* down, int64_t k,
                                    std::vector<float>& buffer) {
  const int64_t count = (g.out + g.in) * rank;
  const int64_t next = std::min(k + 1, count - 1);
  auto from_sorted = [&](std::vector<float>& values, int64_t at, int64_t at_next) {
    std::nth_element(values.begin(), values.begin() + at, values.end());
    const float value = values[at];
    // Only values >= values[at] follow it now: the next statistic is their minimum.
    const float following = at_next == at ? value : *std::min_element(values.begin() + at + 1, values.end());
    return std::make_pair(value, following);
  };
  constexpr int64_t kSample = 2048;
  if (count > 4 * kSample) {
    const int64_t stride = count / kSample;
    buffer.clear();
    for (int64_t e = 0; e < count; e += stride) {
      buffer.push_back(*clamp_element(up, down, g.out, g.in, g.max_rank, rank, e));
    }
    const int64_t samples = static_cast<int64_t>(buffer.size());
    const double p = static_cast<double>(k) / count;
    const int64_t margin = 8 + static_cast<int64_t>(4.0 * std::sqrt(samples * p * (1.0 - p)));
    const int64_t lo_rank = static_cast<int64_t>(p * samples) - margin;
    const int64_t hi_rank = static_cast<int64_t>(static_cast<double>(next + 1) / count * samples) + margin;
    float lo = -std::numeric_limits<float>::infinity();
    float hi = std::numeric_limits<float>::infinity();
    if (lo_rank >= 0) {
      std::nth_element(buffer.begin(), buffer.begin() + lo_rank, buffer.end());
      lo = buffer[lo_rank];
    }
    if (hi_rank < samples) {
      std::nth_element(buffer.begin(), buffer.begin() + hi_rank, buffer.end());
      hi = buffer[hi_rank];
    }
    // Two passes: counting vectorises, copying the few values inside the bracket does not.
    int64_t below_lo = 0;
    int64_t inside = 0;
    for_each_clamped_run(g, rank, up, down, [&](const float* run, int64_t length) {
      int64_t below_here = 0;  // local counters keep the loop in registers
      int64_t inside_here = 0;
      for (int64_t i = 0; i < length; ++i) {
        below_here += run[i] < lo;
        inside_here += run[i] <= hi;
      }
      below_lo += below_here;
      inside += inside_here - below_here;
    });
    buffer.resize(inside);
    float* copied = buffer.data();
    for_each_clamped_run(g, rank, up, down, [&](const float* run, int64_t length) {
      for (int64_t i = 0; i < length; ++i) {
        if (run[i] >= lo && run[i] <= hi) {
          *copied++ = run[i];
        }
      }
    });
    if (below_lo <= k && next < below_lo + static_cast<int64_t>(buffer.size())) {
      return from_sorted(buffer, k - below_lo, next - below_lo);
    }
  }
  buffer.clear();
  for_each_clamped_run(g, rank, up, down,
                       [&](const float* run, int64_t length) { buffer.insert(buffer.end(), run, run + length); });
  return from_sorted(buffer, k, next);
}

// Stock's clamp of up and down to +-(q-quantile of their joined values), with torch.quantile's
// linear interpolation between the two neighbouring order statistics.
void clamp_module(const GroupShape& g, int64_t rank, float quantile, float* up, float* down,
                  std::vector<float>& buffer) {
  const int64_t count = (g.out + g.in) * rank;
  if (count == 0) {
    return;
  }
  const QuantilePosition pos = quantile_position(quantile, count);
  auto [below, above] = select_pair(g, rank, up, down, pos.below, buffer);
  if (pos.above == pos.below) {
    above = below;
  }
  const float hi = lerp_like_torch(below, above, pos.weight);
  for_each_clamped_run(g, rank, up, down, [hi](float* run, int64_t length) {
    for (int64_t i = 0; i < length; ++i) {
      run[i] = std::min(std::max(run[i], -hi), hi);
    }
  });
}

// MKL chooses its blocking, and so its rounding, by the number of threads it runs on: the QR of a
// tall P (10240 x 16) came out 1 ulp apart with OMP_NUM_THREADS=1 and 2. While alive, this makes
// the calling thread's MKL calls single-threaded, so the result does not depend on the thread
// count. MKL_Set_Num_Threads_Local (the C entry of mkl_set_num_threads_local; the lower-case symbol
// is the Fortran one, which takes a pointer) is looked up at run time in the library holding ATen (torch
// builds without MKL have no such symbol, and then this does nothing).
class SingleThreadedMkl {
 public:
  SingleThreadedMkl() : set_local_(lookup()) {
    if (set_local_ != nullptr) {
      previous_ = set_local_(1);
    }
  }
  ~SingleThreadedMkl() {
    if (set_local_ != nullptr) {
      set_local_(previous_);  // 0: back to MKL's global setting
    }
  }
  SingleThreadedMkl(const SingleThreadedMkl&) = delete;
  SingleThreadedMkl& operator=(const SingleThreadedMkl&) = delete;

 private:
  using SetLocal = int (*)(int);
  static SetLocal lookup() {
#if defined(__linux__) || defined(__APPLE__)
    static const SetLocal found = [] {
      Dl_info info;
      if (dladdr(reinterpret_cast<void*>(&at::get_num_threads), &info) == 0 || info.dli_fname == nullptr) {
        return SetLocal{nullptr};
      }
      void* aten = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD);
      return aten == nullptr ? SetLocal{nullptr} : reinterpret_cast<SetLocal>(dlsym(aten, "MKL_Set_Num_Threads_Local"));
    }();
    return found;
#else
    return nullptr;
#endif
  }
  SetLocal set_local_;
  int previous_ = 0;
};

// The CPU's batched thin SVD (LAPACK) for the small cores and dense W.
std::tuple<at::Tensor, at::Tensor, at::Tensor> thin_svd(const at::Tensor& matrices) {
  return at::linalg_svd(matrices, /*full_matrices=*/false);
}

// Modules per batched LAPACK call: enough to amortise ATen's per-call cost, few enough that a
// batch's temporaries (P, Q, their QR factors, U, Vh: a few MB) stay in cache and are reused heap
// memory. One big batch per group was slower: every temporary was a fresh mapping of tens of MB
// whose page faults cost more than the LAPACK work. The Gram route's float64 copies of P and Q count
// (three floats per value), and its modules, R >= 64 wide, are big enough to go one at a time: each
// thread keeps its largest batch's temporaries in the heap, and at two modules per batch an SD1.5
// 128 + 128 merge's held 160 MB (SD1.5's 10240 x 1280 modules: 80 MB a batch, two threads).
int64_t batch_modules(const GroupShape& g) {
  constexpr int64_t kBatchFloats = int64_t{1} << 19;
  if (!g.dense && gram_pays(g)) {
    return std::clamp<int64_t>(kBatchFloats / (3 * g.total_rank * (g.out + g.in)), 1, 128);
  }
  const int64_t per_module = g.dense ? g.out * g.in + g.total_rank * (g.out + g.in)
                                     : g.total_rank * (g.out + g.in);
  return std::clamp<int64_t>(kBatchFloats / std::max<int64_t>(per_module, 1), 2, 128);
}

// What merge_batch reads and writes: the op's arguments and its three outputs.
struct GroupCall {
  const GroupShape& g;
  at::TensorList ups;
  at::TensorList downs;
  const float* scales;
  at::IntArrayRef ranks;
  float quantile;
  bool clamps;
  bool sqrt_split;
  at::Tensor up;    // (B, out, K), the op's out_dtype
  at::Tensor down;  // (B, K, in), likewise
  float* singular;
};

// Merges modules [begin, end) of the group into their blocks of up, down and singular, on the
// calling thread: assembles P and Q in float32, decomposes them with batched ATen calls, then
// writes, sign-fixes and clamps each module — in place for a float32 output, else in a float32
// scratch that is converted into the output while it is in cache (no float32 copy of the whole
// output is ever allocated).
void merge_batch(const GroupCall& call, int64_t begin, int64_t end) {
  const GroupShape& g = call.g;
  const auto options = at::TensorOptions().dtype(at::kFloat);
  const int64_t count = end - begin;
  at::Tensor p = at::empty({count, g.out, g.total_rank}, options);
  at::Tensor q = at::empty({count, g.total_rank, g.in}, options);
  for (int64_t i = 0; i < count; ++i) {
    float* p_i = p.data_ptr<float>() + i * g.out * g.total_rank;
    float* q_i = q.data_ptr<float>() + i * g.total_rank * g.in;
    assemble_module(g, call.ups, call.downs, call.scales, begin + i, p_i, q_i);
    TORCH_CHECK(all_finite(p_i, g.out * g.total_rank) && all_finite(q_i, g.total_rank * g.in), kNonFiniteFactor);
  }
  const int64_t kk = g.computed;
  const Decomposition d = decompose(g, p, q, Method::kAuto, thin_svd);  // u (count, out, kk), s (count, m), vh (count, kk, in)
  const at::Tensor& u = d.u;
  const at::Tensor& s = d.s;
  const at::Tensor& vh = d.vh;
  const float* u_data = u.const_data_ptr<float>();
  const float* s_data = s.const_data_ptr<float>();
  const float* vh_data = vh.const_data_ptr<float>();
  std::copy_n(s_data, count * g.singular, call.singular + begin * g.singular);
  const bool in_place = call.up.scalar_type() == at::kFloat;
  at::Tensor up_scratch = in_place ? at::Tensor() : at::empty({g.out, g.max_rank}, options);
  at::Tensor down_scratch = in_place ? at::Tensor() : at::empty({g.max_rank, g.in}, options);
  std::vector<float> buffer;
  for (int64_t i = 0; i < count; ++i) {
    const int64_t b = begin + i;
    float* up_b = in_place ? call.up.data_ptr<float>() + b * g.out * g.max_rank : up_scratch.data_ptr<float>();
    float* down_b = in_place ? call.down.data_ptr<float>() + b * g.max_rank * g.in : down_scratch.data_ptr<float>();
    // Both blocks are uninitialised: write_factors writes every value of them.
    write_factors(g, u_data + i * g.out * kk, s_data + i * g.singular, vh_data + i * kk * g.in, kk,
                  std::min(call.ranks[b], g.singular), call.sqrt_split, up_b, down_b);
    if (call.clamps) {
      clamp_module(g, call.ranks[b], call.quantile, up_b, down_b, buffer);
    }
    if (!in_place) {
      call.up.select(0, b).copy_(up_scratch);
      call.down.select(0, b).copy_(down_scratch);
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> merge_group_cpu(
    at::TensorList ups, at::TensorList downs, const at::Tensor& scales, at::IntArrayRef ranks,
    double clamp_quantile, bool sqrt_split, std::optional<at::ScalarType> out_dtype) {
  const GroupShape g = check_group(ups, downs, scales, ranks, clamp_quantile);
  const auto options = scales.options().dtype(at::kFloat);
  const auto out_options = options.dtype(check_out_dtype(out_dtype));
  at::Tensor up = at::empty({g.modules, g.out, g.max_rank}, out_options);
  at::Tensor down = at::empty({g.modules, g.max_rank, g.in}, out_options);
  at::Tensor singular = at::empty({g.modules, g.singular}, options);
  if (g.modules == 0) {
    return {up, down, singular};
  }
  const at::Tensor scales_c = scales.contiguous();
  const GroupCall call{g, ups, downs, scales_c.const_data_ptr<float>(), ranks, static_cast<float>(clamp_quantile),
                       clamp_quantile < 1.0, sqrt_split, up, down, singular.data_ptr<float>()};
  const int64_t batch = batch_modules(g);
  // One parallel region per group: each thread takes its share of the modules and works through
  // it in batches, its MKL held to one thread (MKL's own threading misbehaves when entered from
  // inside an OpenMP team — results drifted and a later threaded MKL call span forever — and a
  // module's result must not depend on the thread count). A NaN raises in the thread that finds
  // it; at::parallel_for rethrows that here.
  at::parallel_for(0, g.modules, 1, [&](int64_t first, int64_t last) {
    const SingleThreadedMkl same_result_at_any_thread_count;
    for (int64_t begin = first; begin < last; begin += batch) {
      merge_batch(call, begin, std::min(last, begin + batch));
    }
  });
  return {up, down, singular};
}

// copylora::factored_svd: one batch's decomposition exactly as merge_group makes it, with the route
// each module took. For tests and benchmarks; merge_group is the op the engine calls.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> factored_svd_cpu(const at::Tensor& p, const at::Tensor& q,
                                                                            int64_t kept, c10::string_view method) {
  const GroupShape g = factored_shape(p, q, kept);
  const SingleThreadedMkl same_as_merge_group;
  const Decomposition d = decompose(g, p.contiguous(), q.contiguous(), parse_method(method), thin_svd);
  return {d.u, d.s, d.vh, d.route};
}

}  // namespace

TORCH_LIBRARY_IMPL(copylora, CPU, m) {
  m.impl("merge_group", &merge_group_cpu);
  m.impl("factored_svd", &factored_svd_cpu);
}

}  // namespace copylora
