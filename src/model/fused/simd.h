// Vector helpers shared by the fused kernels (kernels.cpp) and the attention kernels compiled
// once per instruction set (attention.inc). Header-only and in an anonymous namespace on
// purpose: each translation unit gets its own copies, compiled for its own instruction set,
// so the linker can never pick an AVX-512 copy for code that runs on an older CPU.

#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace {

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

// Sum of the sixteen lanes by a shuffle tree (four steps rather than fifteen serial adds).
inline __attribute__((always_inline)) float hsum(v16 s) {
  s += __builtin_shuffle(s, v16i{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
  s += __builtin_shuffle(s, v16i{4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11});
  s += __builtin_shuffle(s, v16i{2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13});
  s += __builtin_shuffle(s, v16i{1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14});
  return s[0];
}

// The sum of n floats in a fixed order: sixteen lanes by index, their shuffle-tree sum, then
// the tail one by one. Spelled out rather than left to the vectoriser, whose peeling for
// alignment could move lanes with the buffer's address.
inline __attribute__((always_inline)) float block_sum(const float* x, int64_t n) {
  v16 acc = v16{};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc += load16(x + i);
  }
  float sum = hsum(acc);
  for (; i < n; ++i) {
    sum += x[i];
  }
  return sum;
}

// Softmax in place over one row of scores; masked columns hold -inf and get weight zero.
inline __attribute__((always_inline)) void softmax_row(float* s, int64_t total) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < total; ++j) {
    m = s[j] > m ? s[j] : m;
  }
#pragma omp simd
  for (int64_t j = 0; j < total; ++j) {
    // exp(-inf - m) would be clamped, not zero: masked columns are zeroed explicitly.
    s[j] = s[j] == -std::numeric_limits<float>::infinity() ? 0.0f : vexp(s[j] - m);
  }
  // The sum runs over the nonzero weights only, packed side by side in blocks of 256, so
  // each weight's lane in the vector reduction is set by how many nonzero weights come
  // before it, not by its column: the total does not depend on how much padding sits
  // between the real columns, and a row's result does not change with its batch-mates'
  // lengths. (Masked columns are exact zeros; leaving out a zero changes no sum.)
  constexpr int64_t kBlock = 256;
  float packed[kBlock];
  float sum = 0.0f;
  int64_t n = 0;
  for (int64_t j = 0; j < total; ++j) {
    packed[n] = s[j];
    n += s[j] != 0.0f;
    if (n == kBlock) {
      sum += block_sum(packed, kBlock);
      n = 0;
    }
  }
  sum += block_sum(packed, n);
  const float inv = 1.0f / sum;
#pragma omp simd
  for (int64_t j = 0; j < total; ++j) {
    s[j] *= inv;
  }
}

}  // namespace
