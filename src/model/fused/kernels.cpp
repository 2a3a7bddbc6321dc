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

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <limits>
#include <vector>

using at::Tensor;

namespace {

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

// exp(x) as branch-free arithmetic the compiler vectorises (libm's expf is a call per
// element). Round-to-nearest range reduction by the 1.5·2^23 trick, then the Cephes
// polynomial on [-ln2/2, ln2/2]: relative error ~2e-7, enough for softmax weights and
// log-normalisers kept in f32. Inputs are clamped to the finite range of the result.
inline __attribute__((always_inline)) float vexp(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float shifter = 12582912.0f;
  float n = (x * 1.44269504088896341f + shifter) - shifter;
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  float y = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return y * scale;
}

// Sixteen floats as one value: the compiler maps it to one AVX-512 register, two AVX2 ones or
// four SSE ones, depending on the clone being compiled. `aligned(4)` allows loads from any
// float address.
typedef float v16 __attribute__((vector_size(64), aligned(4), may_alias));
typedef int v16i __attribute__((vector_size(64)));

inline __attribute__((always_inline)) v16 load16(const float* p) {
  return *reinterpret_cast<const v16*>(p);
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

// Sum of the sixteen lanes by a shuffle tree (four steps rather than fifteen serial adds).
inline __attribute__((always_inline)) float hsum(v16 s) {
  s += __builtin_shuffle(s, v16i{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
  s += __builtin_shuffle(s, v16i{4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11});
  s += __builtin_shuffle(s, v16i{2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13});
  s += __builtin_shuffle(s, v16i{1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14});
  return s[0];
}

// Softmax in place over one row of scores; masked columns hold -inf and get weight zero.
inline __attribute__((always_inline)) void softmax_row(float* s, int64_t total) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < total; ++j) {
    m = s[j] > m ? s[j] : m;
  }
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < total; ++j) {
    // exp(-inf - m) would be clamped, not zero: masked columns are zeroed explicitly.
    float e = s[j] == -std::numeric_limits<float>::infinity() ? 0.0f : vexp(s[j] - m);
    s[j] = e;
    sum += e;
  }
  const float inv = 1.0f / sum;
#pragma omp simd
  for (int64_t j = 0; j < total; ++j) {
    s[j] *= inv;
  }
}

// attend_one for a head size known at compile time (a multiple of 16): each query row and
// each output row lives in registers while the cached rows stream past, and a dot product
// ends in one shuffle-tree reduction. Query rows are taken one at a time, so the keys and
// values of this (sequence, head) are read from memory once and from L1/L2 for the others.
template <int HD>
inline __attribute__((always_inline)) void attend_fixed(const float* q, const float* k,
                                                        const float* v, const bool* valid,
                                                        int64_t total, int64_t group,
                                                        float scale, float* out,
                                                        float* scores) {
  constexpr int C = HD / 16;
  for (int64_t g = 0; g < group; ++g) {
    v16 qr[C];
    for (int c = 0; c < C; ++c) {
      qr[c] = load16(q + g * HD + 16 * c);
    }
    float* s = scores + g * total;
    for (int64_t j = 0; j < total; ++j) {
      if (!(valid[j] || j == total - 1)) {
        s[j] = -std::numeric_limits<float>::infinity();
        continue;
      }
      const float* kr = k + j * HD;
      v16 acc = qr[0] * load16(kr);
      for (int c = 1; c < C; ++c) {
        acc += qr[c] * load16(kr + 16 * c);
      }
      s[j] = hsum(acc) * scale;
    }
    softmax_row(s, total);
  }
  for (int64_t g = 0; g < group; ++g) {
    v16 acc[C];
    for (int c = 0; c < C; ++c) {
      acc[c] = v16{};
    }
    const float* s = scores + g * total;
    for (int64_t j = 0; j < total; ++j) {
      const float w = s[j];
      if (w == 0.0f) {
        continue;
      }
      const float* vr = v + j * HD;
      for (int c = 0; c < C; ++c) {
        acc[c] += w * load16(vr + 16 * c);
      }
    }
    for (int c = 0; c < C; ++c) {
      *reinterpret_cast<v16*>(out + g * HD + 16 * c) = acc[c];
    }
  }
}

// attend_fixed for a small group known at compile time as well (group · HD/16 ≤ 16
// registers): every cached row is loaded once and used by all the group's query rows, whose
// queries and outputs stay in registers (10.6 against 11.7 ms per step in benches/kernels).
template <int HD, int G>
inline __attribute__((always_inline)) void attend_grouped(const float* q, const float* k,
                                                          const float* v, const bool* valid,
                                                          int64_t total, float scale,
                                                          float* out, float* scores) {
  constexpr int C = HD / 16;
  v16 qr[G][C];
  for (int g = 0; g < G; ++g) {
    for (int c = 0; c < C; ++c) {
      qr[g][c] = load16(q + g * HD + 16 * c);
    }
  }
  for (int64_t j = 0; j < total; ++j) {
    if (!(valid[j] || j == total - 1)) {
      for (int g = 0; g < G; ++g) {
        scores[g * total + j] = -std::numeric_limits<float>::infinity();
      }
      continue;
    }
    v16 kr[C];
    for (int c = 0; c < C; ++c) {
      kr[c] = load16(k + j * HD + 16 * c);
    }
    for (int g = 0; g < G; ++g) {
      v16 acc = qr[g][0] * kr[0];
      for (int c = 1; c < C; ++c) {
        acc += qr[g][c] * kr[c];
      }
      scores[g * total + j] = hsum(acc) * scale;
    }
  }
  for (int g = 0; g < G; ++g) {
    softmax_row(scores + g * total, total);
  }
  v16 acc[G][C];
  for (int g = 0; g < G; ++g) {
    for (int c = 0; c < C; ++c) {
      acc[g][c] = v16{};
    }
  }
  for (int64_t j = 0; j < total; ++j) {
    if (!(valid[j] || j == total - 1)) {
      continue;
    }
    v16 vr[C];
    for (int c = 0; c < C; ++c) {
      vr[c] = load16(v + j * HD + 16 * c);
    }
    for (int g = 0; g < G; ++g) {
      const float w = scores[g * total + j];
      for (int c = 0; c < C; ++c) {
        acc[g][c] += w * vr[c];
      }
    }
  }
  for (int g = 0; g < G; ++g) {
    for (int c = 0; c < C; ++c) {
      *reinterpret_cast<v16*>(out + g * HD + 16 * c) = acc[g][c];
    }
  }
}

// One (sequence, kv head) of a decode step: `group` query rows attend over `total` cached
// positions. `scores` has room for group·total floats. Masked columns (padding) get zero
// weight; the last column (the query's own position) is always attended.
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) void attend_one(
    const float* q, const float* k, const float* v, const bool* valid, int64_t total,
    int64_t group, int64_t hd, float scale, float* out, float* scores) {
  if (hd == 64) {
    switch (group) {
      case 1: return attend_grouped<64, 1>(q, k, v, valid, total, scale, out, scores);
      case 2: return attend_grouped<64, 2>(q, k, v, valid, total, scale, out, scores);
      case 3: return attend_grouped<64, 3>(q, k, v, valid, total, scale, out, scores);
      case 4: return attend_grouped<64, 4>(q, k, v, valid, total, scale, out, scores);
      default: return attend_fixed<64>(q, k, v, valid, total, group, scale, out, scores);
    }
  }
  if (hd == 128) {
    switch (group) {
      case 1: return attend_grouped<128, 1>(q, k, v, valid, total, scale, out, scores);
      case 2: return attend_grouped<128, 2>(q, k, v, valid, total, scale, out, scores);
      default: return attend_fixed<128>(q, k, v, valid, total, group, scale, out, scores);
    }
  }
  // Any other head size: the same arithmetic with plain loops.
  for (int64_t j = 0; j < total; ++j) {
    const bool live = valid[j] || j == total - 1;
    const float* kr = k + j * hd;
    for (int64_t g = 0; g < group; ++g) {
      float acc = 0.0f;
      if (live) {
        const float* qr = q + g * hd;
#pragma omp simd reduction(+ : acc)
        for (int64_t d = 0; d < hd; ++d) {
          acc += qr[d] * kr[d];
        }
      }
      scores[g * total + j] = live ? acc * scale : -std::numeric_limits<float>::infinity();
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    softmax_row(scores + g * total, total);
    float* o = out + g * hd;
    for (int64_t d = 0; d < hd; ++d) {
      o[d] = 0.0f;
    }
  }
  for (int64_t j = 0; j < total; ++j) {
    const float* vr = v + j * hd;
    for (int64_t g = 0; g < group; ++g) {
      const float w = scores[g * total + j];
      if (w == 0.0f) {
        continue;
      }
      float* o = out + g * hd;
#pragma omp simd
      for (int64_t d = 0; d < hd; ++d) {
        o[d] += w * vr[d];
      }
    }
  }
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

}  // namespace

extern "C" {

// Releases an error message returned by one of the kernels.
void cairn_free_error(char* msg) { std::free(msg); }

// Whether autograd records operations on this thread (the fused path has no backward).
int cairn_grad_enabled() { return c10::GradMode::is_enabled() ? 1 : 0; }

// Rotary embedding of the query and key heads of a fused projection, with the keys and
// values appended to the cache. `qkv` is [b, t, (nh + 2·nkv)·hd]; positions [b, t] (i64);
// cos and signed sin [max_pos, hd] (rotate-half layout, the sine's first half negated);
// the caches [b, nkv, capacity, hd] receive positions past..past+t. Returns the rotated
// queries as [b, nh, t, hd].
char* cairn_rope_append(const Tensor* qkv, const Tensor* positions, const Tensor* cos,
                        const Tensor* sin, Tensor* k_cache, Tensor* v_cache, int64_t past,
                        int64_t nh, int64_t nkv, Tensor** q_out) {
  return guarded([&] {
    check_f32_or_bf16(*qkv, "qkv");
    check_f32_cpu(*cos, "cos table");
    check_f32_cpu(*sin, "sin table");
    check_f32_cpu(*k_cache, "key cache");
    check_f32_cpu(*v_cache, "value cache");
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
    float* kc = k_cache->data_ptr<float>();
    float* vc = v_cache->data_ptr<float>();
    float* qo = q.data_ptr<float>();
    const int64_t width = (nh + 2 * nkv) * hd, half = hd / 2;
    auto run = [&](const auto* x) {
      at::parallel_for(0, b * t, 1, [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) {
          const int64_t bi = row / t, ti = row % t;
          const auto* xr = x + row * width;
          const float* c = ct + pos[row] * hd;
          const float* s = st + pos[row] * hd;
          for (int64_t h = 0; h < nh + nkv; ++h) {
            const auto* xh = xr + h * hd;
            float* dst = h < nh ? qo + ((bi * nh + h) * t + ti) * hd
                                : kc + ((bi * nkv + (h - nh)) * cap + past + ti) * hd;
            for (int64_t d = 0; d < half; ++d) {
              dst[d] = to_f32(xh[d]) * c[d] + to_f32(xh[d + half]) * s[d];
            }
            for (int64_t d = half; d < hd; ++d) {
              dst[d] = to_f32(xh[d]) * c[d] + to_f32(xh[d - half]) * s[d];
            }
          }
          for (int64_t h = 0; h < nkv; ++h) {
            float* dst = vc + ((bi * nkv + h) * cap + past + ti) * hd;
            const auto* src = xr + (nh + nkv + h) * hd;
            for (int64_t d = 0; d < hd; ++d) {
              dst[d] = to_f32(src[d]);
            }
          }
        }
      });
    };
    if (qkv->scalar_type() == at::kBFloat16) {
      run(qkv->data_ptr<c10::BFloat16>());
    } else {
      run(qkv->data_ptr<float>());
    }
    *q_out = new Tensor(std::move(q));
  });
}

// Attention of one new query per sequence over the cached keys and values: q [b, nh, 1, hd],
// caches [b, nkv, capacity, hd], valid [b, capacity] (bool; the last of the `total` columns
// always counts). Returns [b, 1, nh·hd], the layout the output projection takes.
char* cairn_decode_attention(const Tensor* q, const Tensor* k_cache, const Tensor* v_cache,
                             const Tensor* valid, int64_t total, double scale, int out_bf16,
                             Tensor** out) {
  return guarded([&] {
    check_f32_cpu(*q, "queries");
    check_f32_cpu(*k_cache, "key cache");
    check_f32_cpu(*v_cache, "value cache");
    TORCH_CHECK(valid->scalar_type() == at::kBool && valid->is_contiguous(),
                "validity must be contiguous bool");
    TORCH_CHECK(q->dim() == 4 && q->size(2) == 1, "queries must be [b, heads, 1, hd]");
    TORCH_CHECK(k_cache->dim() == 4 && v_cache->sizes() == k_cache->sizes(), "cache shapes");
    const int64_t b = q->size(0), nh = q->size(1), hd = q->size(3);
    const int64_t nkv = k_cache->size(1), cap = k_cache->size(2);
    TORCH_CHECK(k_cache->size(0) == b && k_cache->size(3) == hd, "cache does not match queries");
    TORCH_CHECK(nkv > 0 && nh % nkv == 0, "query heads must be a multiple of kv heads");
    TORCH_CHECK(valid->dim() == 2 && valid->size(0) == b && valid->size(1) == cap,
                "validity shape");
    TORCH_CHECK(total >= 1 && total <= cap, "attended length outside the cache");
    const int64_t group = nh / nkv;
    Tensor o = at::empty({b, 1, nh * hd}, q->options().dtype(out_bf16 ? at::kBFloat16 : at::kFloat));
    const float* qp = q->data_ptr<float>();
    const float* kp = k_cache->data_ptr<float>();
    const float* vp = v_cache->data_ptr<float>();
    const bool* vm = valid->data_ptr<bool>();
    const float sc = static_cast<float>(scale);
    at::parallel_for(0, b * nkv, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scores(group * total);
      std::vector<float> rows(out_bf16 ? group * hd : 0);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t bi = item / nkv, h = item % nkv;
        const int64_t head0 = bi * nh + h * group;
        float* dst = out_bf16 ? rows.data() : o.data_ptr<float>() + head0 * hd;
        attend_one(qp + head0 * hd, kp + item * cap * hd, vp + item * cap * hd, vm + bi * cap,
                   total, group, hd, sc, dst, scores.data());
        if (out_bf16) {
          c10::BFloat16* ob = o.data_ptr<c10::BFloat16>() + head0 * hd;
          for (int64_t i = 0; i < group * hd; ++i) {
            ob[i] = c10::BFloat16(rows[i]);
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

}  // extern "C"
