// Fused CPU kernels for the decoder's inference path (see fused.rs for the Rust side).
//
// A decode step at batch 64 spends as long in ~25 small tensor ops per layer as the
// projections leave over: each op is a dispatch, an allocation and an OpenMP region over a
// few hundred kilobytes. These kernels do the work of several ops in one pass, and run in
// libtorch's own OpenMP pool (at::parallel_for), so they never compete with its spinning
// worker threads the way a second thread pool would.
//
// Every output element is computed by one thread in a fixed order, so results do not depend
// on the number of threads. Errors are C++ exceptions turned into malloc'd strings at the C
// boundary; nothing unwinds into Rust.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/GradMode.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <limits>
#include <type_traits>
#include <vector>

#include "attention.h"
#include "gemm.h"
#include "simd.h"

using at::Tensor;

int64_t quant_block_values(int32_t type) {
  switch (type) {
    case 2: case 3: case 8: return 32;     // Q4_0, Q4_1, Q8_0
    case 12: case 13: case 14: return 256;  // Q4_K, Q5_K, Q6_K
    default: return 0;
  }
}

int64_t quant_block_bytes(int32_t type) {
  switch (type) {
    case 2: return 64 + 32 * 16;                      // Q4_0: d, nibbles
    case 3: return 128 + 32 * 16;                     // Q4_1: d, m, nibbles
    case 8: return 64 + 32 * 32;                      // Q8_0: d, bytes
    case 12: return 128 + 256 + 256 + 256 * 16;       // Q4_K: d, dmin, scales, mins, nibbles
    case 13: return 128 + 256 + 256 + 256 * 32;       // Q5_K: as Q4_K with bytes
    case 14: return 64 + 16 * 32 + 256 * 32;          // Q6_K: d, scales, bytes
    default: return 0;
  }
}

namespace {

// The kernels of attention.inc and gemm.inc, compiled per instruction set.
struct IsaKernels {
  decltype(&isa_base::attend_f32) attend_f32;
  decltype(&isa_base::attend_f16) attend_f16;
  decltype(&isa_base::store_f16) store_f16;
  decltype(&isa_base::linear_panels) linear_f32;
  decltype(&isa_base::linear_panels_bf16) linear_bf16;
  decltype(&isa_base::linear_quant) quant_f32;
  decltype(&isa_base::linear_quant_bf16) quant_bf16;
};

#define CAIRN_ISA_KERNELS(ns, bf16, quant_bf16)                                            \
  IsaKernels {                                                                            \
    ns::attend_f32, ns::attend_f16, ns::store_f16, ns::linear_panels, bf16,              \
        ns::linear_quant, quant_bf16                                                     \
  }
constexpr IsaKernels kIsaBase =
    CAIRN_ISA_KERNELS(isa_base, isa_base::linear_panels_bf16, isa_base::linear_quant_bf16);
constexpr IsaKernels kIsaV3 =
    CAIRN_ISA_KERNELS(isa_v3, isa_v3::linear_panels_bf16, isa_v3::linear_quant_bf16);
constexpr IsaKernels kIsaV4 =
    CAIRN_ISA_KERNELS(isa_v4, isa_v4::linear_panels_bf16, isa_v4::linear_quant_bf16);
// x86-64-v4 plus AVX512-BF16 (Zen 4 and later, Cooper Lake, Sapphire Rapids): bf16 products
// on VDPBF16PS.
constexpr IsaKernels kIsaV4Bf16 = CAIRN_ISA_KERNELS(isa_v4, isa_v4_bf16::linear_panels_bf16_dot,
                                                    isa_v4_bf16::linear_quant_bf16_dot);
#undef CAIRN_ISA_KERNELS

// The set for `isa`: 0 baseline, 1 x86-64-v3, 2 x86-64-v4, 3 x86-64-v4 with AVX512-BF16, -1
// the best this CPU runs (the explicit levels let the tests check every compiled set on one
// machine).
const IsaKernels& isa_kernels(int isa) {
  // Read once: every decode step asks, hundreds of times.
  static const bool v4 = (__builtin_cpu_init(), __builtin_cpu_supports("x86-64-v4"));
  static const bool v3 = (__builtin_cpu_init(), __builtin_cpu_supports("x86-64-v3"));
  static const bool bf16 = v4 && __builtin_cpu_supports("avx512bf16");
  switch (isa) {
    case -1: return bf16 ? kIsaV4Bf16 : (v4 ? kIsaV4 : (v3 ? kIsaV3 : kIsaBase));
    case 0: return kIsaBase;
    case 1: TORCH_CHECK(v3, "this CPU lacks x86-64-v3"); return kIsaV3;
    case 2: TORCH_CHECK(v4, "this CPU lacks x86-64-v4"); return kIsaV4;
    case 3: TORCH_CHECK(bf16, "this CPU lacks AVX512-BF16"); return kIsaV4Bf16;
    default: TORCH_CHECK(false, "unknown instruction-set level ", isa);
  }
}

// Largest magnitude an f16 cache holds; a larger key or value is an error, not an infinity.
constexpr float kHalfMax = 65504.0f;

char* copy_message(const char* msg) {
  size_t n = std::strlen(msg);
  char* out = static_cast<char*>(std::malloc(n + 1));
  if (out != nullptr) {
    std::memcpy(out, msg, n + 1);
  }
  return out;
}

template <typename F>
char* guarded(F&& body) {
  try {
    body();
    return nullptr;
  } catch (const std::exception& e) {
    return copy_message(e.what());
  } catch (...) {
    return copy_message("unknown C++ exception in a fused kernel");
  }
}

void check_f32_cpu(const Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), what, " must be on the CPU");
  TORCH_CHECK(t.scalar_type() == at::kFloat, what, " must be f32");
  TORCH_CHECK(t.is_contiguous(), what, " must be contiguous");
}

// Activations enter and leave some kernels in bf16 when the weights are bf16, so the
// projections take and give their own format without separate conversion passes.
inline __attribute__((always_inline)) float to_f32(float x) { return x; }
inline __attribute__((always_inline)) float to_f32(c10::BFloat16 x) {
  return static_cast<float>(x);
}
template <typename T>
inline __attribute__((always_inline)) T from_f32(float x) {
  return T(x);
}

// Max, first argmax and log-sum-exp of one row of logits.
template <typename T>
inline __attribute__((always_inline)) void summarise_any(const T* x, int64_t n, float* log_z,
                                                         float* max_out, int64_t* argmax_out) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) {
    const float xj = to_f32(x[j]);
    m = xj > m ? xj : m;
  }
  int64_t arg = 0;
  for (int64_t j = 0; j < n; ++j) {
    if (to_f32(x[j]) == m) {
      arg = j;
      break;
    }
  }
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    sum += vexp(to_f32(x[j]) - m);
  }
  *log_z = m + std::log(sum);
  *max_out = m;
  *argmax_out = arg;
}

__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) void summarise_row(
    const float* x, int64_t n, float* log_z, float* max_out, int64_t* argmax_out) {
  summarise_any(x, n, log_z, max_out, argmax_out);
}

__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) void summarise_row(
    const c10::BFloat16* x, int64_t n, float* log_z, float* max_out, int64_t* argmax_out) {
  summarise_any(x, n, log_z, max_out, argmax_out);
}

// silu(gate) · up for one row of a fused [gate | up] projection.
template <typename T>
inline __attribute__((always_inline)) void silu_mul_any(const T* gate, const T* up, int64_t n,
                                                        T* out) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float g = to_f32(gate[j]);
    out[j] = from_f32<T>(g / (1.0f + vexp(-g)) * to_f32(up[j]));
  }
}

__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) void silu_mul_row(
    const float* gate, const float* up, int64_t n, float* out) {
  silu_mul_any(gate, up, n, out);
}

__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) void silu_mul_row(
    const c10::BFloat16* gate, const c10::BFloat16* up, int64_t n, c10::BFloat16* out) {
  silu_mul_any(gate, up, n, out);
}

// RMSNorm of one row: x · w / sqrt(mean(x²) + eps), written in the output's format.
template <typename T>
inline __attribute__((always_inline)) void rms_norm_any(const float* x, const float* w,
                                                        int64_t n, float eps, T* out) {
  float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
  for (int64_t j = 0; j < n; ++j) {
    ss += x[j] * x[j];
  }
  const float inv = 1.0f / std::sqrt(ss / static_cast<float>(n) + eps);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    out[j] = from_f32<T>(x[j] * inv * w[j]);
  }
}

__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) void rms_norm_row(
    const float* x, const float* w, int64_t n, float eps, float* out) {
  rms_norm_any(x, w, n, eps, out);
}

__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) void rms_norm_row(
    const float* x, const float* w, int64_t n, float eps, c10::BFloat16* out) {
  rms_norm_any(x, w, n, eps, out);
}

// The element type of a kernel input that may be f32 or bf16.
void check_f32_or_bf16(const Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), what, " must be on the CPU");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, what,
              " must be f32 or bf16");
  TORCH_CHECK(t.is_contiguous(), what, " must be contiguous");
}

// A key/value cache pair: on the CPU, contiguous, same shape, both f32 or both f16.
void check_cache(const Tensor& k, const Tensor& v) {
  TORCH_CHECK(k.device().is_cpu() && v.device().is_cpu(), "caches must be on the CPU");
  TORCH_CHECK(k.scalar_type() == at::kFloat || k.scalar_type() == at::kHalf,
              "caches must be f32 or f16");
  TORCH_CHECK(v.scalar_type() == k.scalar_type(), "key and value caches differ in format");
  TORCH_CHECK(k.is_contiguous() && v.is_contiguous(), "caches must be contiguous");
}

// The sizes an attention kernel reads, after checking that queries [b, nh, t, hd] (f32),
// caches [b, nkv, capacity, hd] and validity [b, capacity] (contiguous bool) fit together.
struct AttentionShape {
  int64_t b, nh, hd, nkv, cap;
};

AttentionShape check_attention(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                               const Tensor& valid) {
  check_f32_cpu(q, "queries");
  check_cache(k_cache, v_cache);
  TORCH_CHECK(valid.scalar_type() == at::kBool && valid.is_contiguous(),
              "validity must be contiguous bool");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "cache shapes");
  const AttentionShape shape{q.size(0), q.size(1), q.size(3), k_cache.size(1), k_cache.size(2)};
  TORCH_CHECK(k_cache.size(0) == shape.b && k_cache.size(3) == shape.hd,
              "cache does not match queries");
  TORCH_CHECK(shape.nkv > 0 && shape.nh % shape.nkv == 0,
              "query heads must be a multiple of kv heads");
  TORCH_CHECK(valid.dim() == 2 && valid.size(0) == shape.b && valid.size(1) == shape.cap,
              "validity shape");
  return shape;
}

}  // namespace

extern "C" {

// Releases an error message returned by one of the kernels.
void cairn_free_error(char* msg) { std::free(msg); }

// Whether autograd records operations on this thread (the fused path has no backward).
int cairn_grad_enabled() { return c10::GradMode::is_enabled() ? 1 : 0; }

// Rotary embedding of the query and key heads of a fused projection, with the keys and
// values appended to the cache. `qkv` is [b, t, (nh + 2·nkv)·hd] (f32 or bf16); positions
// [b, t] (i64); cos and signed sin [max_pos, hd] (rotate-half layout, the sine's first half
// negated); the caches [b, nkv, capacity, hd] (both f32, or both f16) receive positions
// past..past+t. Returns the rotated queries as [b, nh, t, hd] (f32). A key or value beyond
// the f16 range is refused rather than cached as infinity. `isa` as in isa_kernels.
char* cairn_rope_append(const Tensor* qkv, const Tensor* positions, const Tensor* cos,
                        const Tensor* sin, Tensor* k_cache, Tensor* v_cache, int64_t past,
                        int64_t nh, int64_t nkv, int isa, Tensor** q_out) {
  return guarded([&] {
    check_f32_or_bf16(*qkv, "qkv");
    check_f32_cpu(*cos, "cos table");
    check_f32_cpu(*sin, "sin table");
    check_cache(*k_cache, *v_cache);
    TORCH_CHECK(positions->scalar_type() == at::kLong && positions->is_contiguous(),
                "positions must be contiguous i64");
    TORCH_CHECK(qkv->dim() == 3 && k_cache->dim() == 4, "qkv must be 3-d and caches 4-d");
    const int64_t b = qkv->size(0), t = qkv->size(1);
    const int64_t hd = k_cache->size(3), cap = k_cache->size(2);
    TORCH_CHECK(qkv->size(2) == (nh + 2 * nkv) * hd, "qkv width does not match the heads");
    TORCH_CHECK(k_cache->size(0) == b && k_cache->size(1) == nkv, "key cache shape");
    TORCH_CHECK(v_cache->sizes() == k_cache->sizes(), "value cache shape");
    TORCH_CHECK(positions->numel() == b * t, "positions shape");
    TORCH_CHECK(past >= 0 && past + t <= cap, "cache overflow");
    TORCH_CHECK(cos->dim() == 2 && cos->size(1) == hd && sin->sizes() == cos->sizes(),
                "rotary tables shape");
    TORCH_CHECK(hd % 2 == 0, "head size must be even");
    const int64_t max_pos = cos->size(0);
    const int64_t* pos = positions->data_ptr<int64_t>();
    for (int64_t i = 0; i < b * t; ++i) {
      TORCH_CHECK(pos[i] >= 0 && pos[i] < max_pos, "position ", pos[i], " outside the table");
    }
    Tensor q = at::empty({b, nh, t, hd}, qkv->options().dtype(at::kFloat));
    const float* ct = cos->data_ptr<float>();
    const float* st = sin->data_ptr<float>();
    float* qo = q.data_ptr<float>();
    const bool half = k_cache->scalar_type() == at::kHalf;
    const auto store_f16 = isa_kernels(isa).store_f16;
    std::atomic<bool> out_of_range{false};
    const int64_t width = (nh + 2 * nkv) * hd, half_hd = hd / 2;
    auto run = [&](const auto* x, auto* kc, auto* vc) {
      // float, or uint16_t holding f16 bit patterns.
      using Cached = std::remove_pointer_t<decltype(kc)>;
      at::parallel_for(0, b * t, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> row(hd);
        auto put = [&](Cached* dst) {
          if constexpr (std::is_same_v<Cached, float>) {
            std::memcpy(dst, row.data(), hd * sizeof(float));
          } else if (store_f16(row.data(), dst, hd) > kHalfMax) {
            out_of_range = true;
          }
        };
        for (int64_t r = begin; r < end; ++r) {
          const int64_t bi = r / t, ti = r % t;
          const auto* xr = x + r * width;
          const float* c = ct + pos[r] * hd;
          const float* s = st + pos[r] * hd;
          for (int64_t h = 0; h < nh + nkv; ++h) {
            const auto* xh = xr + h * hd;
            float* dst = h < nh ? qo + ((bi * nh + h) * t + ti) * hd : row.data();
            for (int64_t d = 0; d < half_hd; ++d) {
              dst[d] = to_f32(xh[d]) * c[d] + to_f32(xh[d + half_hd]) * s[d];
            }
            for (int64_t d = half_hd; d < hd; ++d) {
              dst[d] = to_f32(xh[d]) * c[d] + to_f32(xh[d - half_hd]) * s[d];
            }
            if (h >= nh) {
              put(kc + ((bi * nkv + (h - nh)) * cap + past + ti) * hd);
            }
          }
          for (int64_t h = 0; h < nkv; ++h) {
            const auto* src = xr + (nh + nkv + h) * hd;
            for (int64_t d = 0; d < hd; ++d) {
              row[d] = to_f32(src[d]);
            }
            put(vc + ((bi * nkv + h) * cap + past + ti) * hd);
          }
        }
      });
    };
    auto with_cache = [&](const auto* x) {
      if (half) {
        run(x, reinterpret_cast<uint16_t*>(k_cache->data_ptr<c10::Half>()),
            reinterpret_cast<uint16_t*>(v_cache->data_ptr<c10::Half>()));
      } else {
        run(x, k_cache->data_ptr<float>(), v_cache->data_ptr<float>());
      }
    };
    if (qkv->scalar_type() == at::kBFloat16) {
      with_cache(qkv->data_ptr<c10::BFloat16>());
    } else {
      with_cache(qkv->data_ptr<float>());
    }
    TORCH_CHECK(!out_of_range, "a key or value exceeds the f16 cache's range (65504); ",
                "use an f32 model");
    *q_out = new Tensor(std::move(q));
  });
}

// Attention of t new queries per sequence over the cached keys and values, each over the
// columns up to its own (causal by column): q [b, nh, t, hd] f32 at columns [past, past + t),
// caches [b, nkv, capacity, hd] (both f32, or both f16), valid [b, capacity] (bool; a query's
// own column always counts). A decode step is t = 1. Every (sequence, kv head, query) runs the
// same kernel over exactly the columns it may see, so a token's attention is computed alike
// in a prefill and a decode step, whatever padding or shared prefix surrounds it: masked
// columns are skipped, and the sums run over the unmasked ones in column order. Returns
// [b, t, nh·hd] in f32 or bf16, the layout the output projection takes. `isa` as in
// isa_kernels.
char* cairn_cache_attention(const Tensor* q, const Tensor* k_cache, const Tensor* v_cache,
                            const Tensor* valid, int64_t past, double scale, int out_bf16,
                            int isa, Tensor** out) {
  return guarded([&] {
    TORCH_CHECK(q->dim() == 4, "queries must be [b, heads, t, hd]");
    const AttentionShape shape = check_attention(*q, *k_cache, *v_cache, *valid);
    const int64_t b = shape.b, nh = shape.nh, hd = shape.hd, nkv = shape.nkv, cap = shape.cap;
    const int64_t t = q->size(2);
    TORCH_CHECK(t >= 1 && past >= 0 && past + t <= cap, "queries outside the cache");
    const int64_t group = nh / nkv;
    Tensor o = at::empty({b, t, nh * hd}, q->options().dtype(out_bf16 ? at::kBFloat16 : at::kFloat));
    const float* qp = q->data_ptr<float>();
    const bool half = k_cache->scalar_type() == at::kHalf;
    const char* kp = static_cast<const char*>(k_cache->data_ptr());
    const char* vp = static_cast<const char*>(v_cache->data_ptr());
    const int64_t row_bytes = cap * hd * k_cache->element_size();
    const IsaKernels& kernels = isa_kernels(isa);
    const bool* vm = valid->data_ptr<bool>();
    const float sc = static_cast<float>(scale);
    // Items in (sequence, kv head, query) order: neighbouring items read the same cached rows.
    at::parallel_for(0, b * nkv * t, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scores(group * (past + t));
      std::vector<float> queries(t > 1 ? group * hd : 0);
      std::vector<float> rows(out_bf16 ? group * hd : 0);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t i = item % t, h = (item / t) % nkv, bi = item / (t * nkv);
        const int64_t total = past + i + 1;
        const int64_t head0 = bi * nh + h * group;
        // The group's query rows for this position as [group, hd]: in place for one query,
        // gathered for several.
        const float* qrows = qp + head0 * hd;
        if (t > 1) {
          for (int64_t g = 0; g < group; ++g) {
            const float* src = qp + ((head0 + g) * t + i) * hd;
            std::copy(src, src + hd, queries.data() + g * hd);
          }
          qrows = queries.data();
        }
        const int64_t at_out = ((bi * t + i) * nh + h * group) * hd;
        float* dst = out_bf16 ? rows.data() : o.data_ptr<float>() + at_out;
        const char* k = kp + (bi * nkv + h) * row_bytes;
        const char* v = vp + (bi * nkv + h) * row_bytes;
        // In a decode step the next item is the next (sequence, kv head), whose keys the
        // kernel fetches ahead; in a prefill it reads the same rows again.
        const char* next_k = t == 1 && item + 1 < end ? k + row_bytes : nullptr;
        if (half) {
          kernels.attend_f16(qrows, reinterpret_cast<const uint16_t*>(k),
                             reinterpret_cast<const uint16_t*>(v),
                             reinterpret_cast<const uint16_t*>(next_k), vm + bi * cap, total,
                             group, hd, sc, dst, scores.data());
        } else {
          kernels.attend_f32(qrows, reinterpret_cast<const float*>(k),
                             reinterpret_cast<const float*>(v),
                             reinterpret_cast<const float*>(next_k), vm + bi * cap, total, group,
                             hd, sc, dst, scores.data());
        }
        if (out_bf16) {
          c10::BFloat16* ob = o.data_ptr<c10::BFloat16>() + at_out;
          for (int64_t j = 0; j < group * hd; ++j) {
            ob[j] = c10::BFloat16(rows[j]);
          }
        }
      }
    });
    *out = new Tensor(std::move(o));
  });
}

// Per row of logits [rows, vocab] (f32 or bf16): the log-normaliser, the maximum and its first index.
char* cairn_logits_summary(const Tensor* logits, Tensor** log_z, Tensor** max,
                           Tensor** argmax) {
  return guarded([&] {
    check_f32_or_bf16(*logits, "logits");
    TORCH_CHECK(logits->dim() == 2 && logits->size(1) > 0, "logits must be [rows, vocab]");
    const int64_t rows = logits->size(0), n = logits->size(1);
    Tensor z = at::empty({rows}, logits->options().dtype(at::kFloat));
    Tensor m = at::empty({rows}, logits->options().dtype(at::kFloat));
    Tensor a = at::empty({rows}, logits->options().dtype(at::kLong));
    float* zp = z.data_ptr<float>();
    float* mp = m.data_ptr<float>();
    int64_t* ap = a.data_ptr<int64_t>();
    auto run = [&](const auto* x) {
      at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          summarise_row(x + r * n, n, zp + r, mp + r, ap + r);
        }
      });
    };
    if (logits->scalar_type() == at::kBFloat16) {
      run(logits->data_ptr<c10::BFloat16>());
    } else {
      run(logits->data_ptr<float>());
    }
    *log_z = new Tensor(std::move(z));
    *max = new Tensor(std::move(m));
    *argmax = new Tensor(std::move(a));
  });
}

// silu(gate)·up of a fused projection [.., 2·f] (gate columns first) → [.., f], in the
// input's format (f32 or bf16).
char* cairn_silu_mul(const Tensor* gate_up, Tensor** out) {
  return guarded([&] {
    check_f32_or_bf16(*gate_up, "gate/up projection");
    TORCH_CHECK(gate_up->dim() >= 1 && gate_up->size(-1) % 2 == 0,
                "gate/up width must be even");
    const int64_t f = gate_up->size(-1) / 2;
    const int64_t rows = f == 0 ? 0 : gate_up->numel() / (2 * f);
    std::vector<int64_t> shape(gate_up->sizes().begin(), gate_up->sizes().end());
    shape.back() = f;
    Tensor o = at::empty(shape, gate_up->options());
    auto run = [&](const auto* x, auto* op) {
      at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          silu_mul_row(x + r * 2 * f, x + r * 2 * f + f, f, op + r * f);
        }
      });
    };
    if (gate_up->scalar_type() == at::kBFloat16) {
      run(gate_up->data_ptr<c10::BFloat16>(), o.data_ptr<c10::BFloat16>());
    } else {
      run(gate_up->data_ptr<float>(), o.data_ptr<float>());
    }
    *out = new Tensor(std::move(o));
  });
}

// RMSNorm over the last dimension of x [.., h] (f32) with weight w [h] (f32), returned as
// bf16 when out_bf16 is set (the input format of a bf16 projection), else f32.
char* cairn_rms_norm(const Tensor* x, const Tensor* w, double eps, int out_bf16, Tensor** out) {
  return guarded([&] {
    check_f32_cpu(*x, "rms_norm input");
    check_f32_cpu(*w, "rms_norm weight");
    TORCH_CHECK(x->dim() >= 1 && w->dim() == 1 && x->size(-1) == w->size(0),
                "rms_norm weight does not match the last dimension");
    const int64_t n = w->size(0);
    const int64_t rows = n == 0 ? 0 : x->numel() / n;
    Tensor o = at::empty(x->sizes(), x->options().dtype(out_bf16 ? at::kBFloat16 : at::kFloat));
    const float* xp = x->data_ptr<float>();
    const float* wp = w->data_ptr<float>();
    const float e = static_cast<float>(eps);
    auto run = [&](auto* op) {
      at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          rms_norm_row(xp + r * n, wp, n, e, op + r * n);
        }
      });
    };
    if (out_bf16) {
      run(o.data_ptr<c10::BFloat16>());
    } else {
      run(o.data_ptr<float>());
    }
    *out = new Tensor(std::move(o));
  });
}

// y = x · Wᵀ (+ bias) as cairn_linear_packed, for W [n, k] kept as quantised panels
// (gemm.h's QuantPanels; `bytes` is the size of `data`, `types` and `offsets` hold one entry
// per panel). Every panel is checked to lie inside `data` before anything is computed.
char* cairn_linear_quant(const Tensor* x, const uint8_t* data, int64_t bytes,
                         const int64_t* offsets, const int32_t* types, int64_t n,
                         const Tensor* bias, Tensor* into, int out_bf16, int isa,
                         Tensor** out) {
  return guarded([&] {
    check_f32_or_bf16(*x, "linear input");
    const bool half = x->scalar_type() == at::kBFloat16;
    TORCH_CHECK(x->dim() >= 1, "linear input must have a last dimension");
    TORCH_CHECK(!out_bf16 || (half && into == nullptr), "only a bf16 product is written as bf16");
    TORCH_CHECK(n >= 0 && bytes >= 0, "negative sizes");
    const int64_t k = x->size(-1);
    const int64_t panels = (n + kPanelCols - 1) / kPanelCols;
    for (int64_t p = 0; p < panels; ++p) {
      const int64_t values = quant_block_values(types[p]);
      TORCH_CHECK(values > 0, "panel ", p, " has ggml type ", types[p],
                  ", which the quantised products do not read");
      TORCH_CHECK(k % values == 0, "k = ", k, " is not a whole number of ", values,
                  "-value blocks (panel ", p, ")");
      const int64_t size = k / values * quant_block_bytes(types[p]);
      TORCH_CHECK(offsets[p] >= 0 && offsets[p] <= bytes && size <= bytes - offsets[p],
                  "panel ", p, " (", size, " bytes at ", offsets[p], ") lies outside the ",
                  bytes, " bytes of the weight");
    }
    const int64_t rows = k == 0 ? 0 : x->numel() / k;
    const float* bp = nullptr;
    if (bias != nullptr) {
      check_f32_cpu(*bias, "linear bias");
      TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, "linear bias must be [", n, "]");
      bp = bias->data_ptr<float>();
    }
    Tensor o;
    if (into != nullptr) {
      check_f32_cpu(*into, "linear accumulator");
      TORCH_CHECK(into->dim() >= 1 && into->size(-1) == n && into->numel() == rows * n,
                  "linear accumulator ", into->sizes(), " is not [", rows, ", ", n, "]");
      o = *into;
    } else {
      std::vector<int64_t> shape(x->sizes().begin(), x->sizes().end());
      shape.back() = n;
      o = at::empty(shape, x->options().dtype(out_bf16 ? at::kBFloat16 : at::kFloat));
    }
    if (rows > 0 && n > 0 && k > 0) {
      const IsaKernels& kernels = isa_kernels(isa);
      const bool accumulate = into != nullptr;
      const QuantPanels w{data, offsets, types};
      if (half) {
        const auto* xp = reinterpret_cast<const uint16_t*>(x->data_ptr<c10::BFloat16>());
        float* y32 = out_bf16 ? nullptr : o.data_ptr<float>();
        uint16_t* y16 =
            out_bf16 ? reinterpret_cast<uint16_t*>(o.data_ptr<c10::BFloat16>()) : nullptr;
        at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
          kernels.quant_bf16(xp, rows, k, w, n, bp, y32, y16, accumulate, begin, end);
        });
      } else {
        const float* xp = x->data_ptr<float>();
        float* op = o.data_ptr<float>();
        at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
          kernels.quant_f32(xp, rows, k, w, n, bp, op, accumulate, begin, end);
        });
      }
    } else if (into == nullptr && n > 0) {
      o.zero_();
    }
    if (into == nullptr) {
      *out = new Tensor(std::move(o));
    }
  });
}

// y = x · Wᵀ (+ bias) for x [.., k] and W [n, k] packed by fused.rs's pack_linear: f32 x
// with f32 panels [⌈n/32⌉, k, 32], or bf16 x with bf16 panels [⌈n/32⌉, ⌈k/2⌉, 64]. The
// product is f32, or bf16 when out_bf16 is set (bf16 x only); with `into` set it is added
// (+ bias) into that f32 [.., n] tensor in place instead (the residual stream) and *out is
// left untouched. `isa` as in isa_kernels.
char* cairn_linear_packed(const Tensor* x, const Tensor* packed, int64_t n, const Tensor* bias,
                          Tensor* into, int out_bf16, int isa, Tensor** out) {
  return guarded([&] {
    check_f32_or_bf16(*x, "linear input");
    const bool half = x->scalar_type() == at::kBFloat16;
    TORCH_CHECK(packed->device().is_cpu() && packed->is_contiguous() &&
                    packed->scalar_type() == x->scalar_type(),
                "packed weight must be a contiguous CPU tensor in the input's format");
    TORCH_CHECK(x->dim() >= 1, "linear input must have a last dimension");
    TORCH_CHECK(!out_bf16 || (half && into == nullptr), "only a bf16 product is written as bf16");
    const int64_t k = x->size(-1);
    const int64_t panels = (n + kPanelCols - 1) / kPanelCols;
    const int64_t depth = half ? (k + 1) / 2 : k;
    const int64_t width = half ? 2 * kPanelCols : kPanelCols;
    TORCH_CHECK(n >= 0 && packed->dim() == 3 && packed->size(0) == panels &&
                    packed->size(1) == depth && packed->size(2) == width,
                "packed weight ", packed->sizes(), " does not hold ", n, " rows of ", k,
                " columns");
    const int64_t rows = k == 0 ? 0 : x->numel() / k;
    const float* bp = nullptr;
    if (bias != nullptr) {
      check_f32_cpu(*bias, "linear bias");
      TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, "linear bias must be [", n, "]");
      bp = bias->data_ptr<float>();
    }
    Tensor o;
    if (into != nullptr) {
      check_f32_cpu(*into, "linear accumulator");
      TORCH_CHECK(into->dim() >= 1 && into->size(-1) == n && into->numel() == rows * n,
                  "linear accumulator ", into->sizes(), " is not [", rows, ", ", n, "]");
      o = *into;
    } else {
      std::vector<int64_t> shape(x->sizes().begin(), x->sizes().end());
      shape.back() = n;
      o = at::empty(shape, x->options().dtype(out_bf16 ? at::kBFloat16 : at::kFloat));
    }
    if (rows > 0 && n > 0) {
      const IsaKernels& kernels = isa_kernels(isa);
      const bool accumulate = into != nullptr;
      // Threads split the output columns: each weight panel is read by one thread only.
      if (half) {
        const auto* xp = reinterpret_cast<const uint16_t*>(x->data_ptr<c10::BFloat16>());
        const auto* wp = reinterpret_cast<const uint16_t*>(packed->data_ptr<c10::BFloat16>());
        float* y32 = out_bf16 ? nullptr : o.data_ptr<float>();
        uint16_t* y16 =
            out_bf16 ? reinterpret_cast<uint16_t*>(o.data_ptr<c10::BFloat16>()) : nullptr;
        at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
          kernels.linear_bf16(xp, rows, k, wp, n, bp, y32, y16, accumulate, begin, end);
        });
      } else {
        const float* xp = x->data_ptr<float>();
        const float* wp = packed->data_ptr<float>();
        float* op = o.data_ptr<float>();
        at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
          kernels.linear_f32(xp, rows, k, wp, n, bp, op, accumulate, begin, end);
        });
      }
    }
    if (into == nullptr) {
      *out = new Tensor(std::move(o));
    }
  });
}

}  // extern "C"
