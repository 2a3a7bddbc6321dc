// The f32 products of gemm.inc, declared once per instruction set they are compiled for
// (namespaces isa_v4, isa_v3, isa_base); kernels.cpp picks one set at load time.

#pragma once

#include <cstdint>

// Output columns per packed weight panel: a packed [n, k] matrix is
// [ceil(n / kPanelCols)][k][kPanelCols] floats, the last panel zero-padded.
constexpr int64_t kPanelCols = 32;

#define CAIRN_DECLARE_GEMM(ns)                                                                 \
  namespace ns {                                                                               \
  /* y[m, n] = x[m, k] · W[n, k]ᵀ (+ bias[n]) (+ y when `accumulate`), for the output        \
     columns of panels [panel_begin, panel_end) of the packed W; rows of x and y are           \
     contiguous (strides k and n). */                                                          \
  void linear_panels(const float* x, int64_t m, int64_t k, const float* packed, int64_t n,      \
                     const float* bias, float* y, bool accumulate, int64_t panel_begin,        \
                     int64_t panel_end);                                                       \
  }

CAIRN_DECLARE_GEMM(isa_v4)
CAIRN_DECLARE_GEMM(isa_v3)
CAIRN_DECLARE_GEMM(isa_base)
