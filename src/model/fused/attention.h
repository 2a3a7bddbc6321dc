// The attention kernels of attention.inc, declared once per instruction set they are
// compiled for (namespaces isa_v4, isa_v3, isa_base); kernels.cpp picks one set at load time.

#pragma once

#include <cstdint>

#define CAIRN_DECLARE_ATTENTION(ns)                                                            \
  namespace ns {                                                                               \
  /* One (sequence, kv head) of a decode step over an f32 cache: `group` query rows [group,   \
     hd] attend over `total` cached rows [total, hd]; masked columns (padding) get zero       \
     weight, the last column is always attended. `scores` has room for group·total floats.   \
     `next_k` (or null) are the keys the caller attends over next, fetched ahead. */         \
  void attend_f32(const float* q, const float* k, const float* v, const float* next_k,         \
                  const bool* valid, int64_t total, int64_t group, int64_t hd, float scale,    \
                  float* out, float* scores);                                                  \
  /* The same over an IEEE f16 cache (bit patterns). */                                        \
  void attend_f16(const float* q, const uint16_t* k, const uint16_t* v,                        \
                  const uint16_t* next_k, const bool* valid, int64_t total, int64_t group,     \
                  int64_t hd, float scale, float* out, float* scores);                         \
  /* Stores n floats as f16 (round to nearest even); returns the largest magnitude seen, so   \
     the caller can refuse values past the f16 range instead of caching infinities. */        \
  float store_f16(const float* src, uint16_t* dst, int64_t n);                                 \
  }

CAIRN_DECLARE_ATTENTION(isa_v4)
CAIRN_DECLARE_ATTENTION(isa_v3)
CAIRN_DECLARE_ATTENTION(isa_base)
