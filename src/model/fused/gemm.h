// The products of gemm.inc, declared once per instruction set they are compiled for
// (namespaces isa_v4, isa_v3, isa_base, and isa_v4_bf16 for x86-64-v4 with AVX512-BF16);
// kernels.cpp picks one set at load time.

#pragma once

#include <cstdint>

// Output columns per packed weight panel: a packed [n, k] f32 matrix is
// [ceil(n / kPanelCols)][k][kPanelCols] floats, a bf16 one [ceil(n / kPanelCols)][ceil(k / 2)]
// [kPanelCols][2] bf16 values (weights for inputs 2j and 2j + 1 side by side); padding is
// zero.
constexpr int64_t kPanelCols = 32;

// A weight matrix kept as its file's quantised blocks, re-laid per column panel by
// quantised.rs (`pack_quantised`, which documents the layouts): panel p has ggml type
// types[p] and starts at data + offsets[p]. Each product dequantises one panel at a time into
// the packed f32 or bf16 layout above, exactly as the f32 dequantiser and f32→bf16 rounding
// would, so its results are those of the packed path over the dequantised matrix, bit for
// bit.
struct QuantPanels {
  const uint8_t* data;
  const int64_t* offsets;
  const int32_t* types;
};

// Values per super-block of a quantised panel's ggml type along k (0: not a type the
// quantised products read), and bytes per super-block of a 32-column panel.
int64_t quant_block_values(int32_t type);
int64_t quant_block_bytes(int32_t type);

#define CAIRN_DECLARE_GEMM(ns)                                                                 \
  namespace ns {                                                                               \
  /* y[m, n] = x[m, k] · W[n, k]ᵀ (+ bias[n]) (+ y when `accumulate`), for the output        \
     columns of panels [panel_begin, panel_end) of the packed W; rows of x and y are           \
     contiguous (strides k and n). */                                                          \
  void linear_panels(const float* x, int64_t m, int64_t k, const float* packed, int64_t n,      \
                     const float* bias, float* y, bool accumulate, int64_t panel_begin,        \
                     int64_t panel_end);                                                       \
  /* The same for bf16 x and packed W (bit patterns), into f32 y32, or bf16 y16 when set;    \
     bf16 pairs widened to f32. */                                                             \
  void linear_panels_bf16(const uint16_t* x, int64_t m, int64_t k, const uint16_t* packed,      \
                          int64_t n, const float* bias, float* y32, uint16_t* y16,              \
                          bool accumulate, int64_t panel_begin, int64_t panel_end);             \
  /* The same on AVX512-BF16's VDPBF16PS (isa_v4_bf16; elsewhere linear_panels_bf16). */      \
  void linear_panels_bf16_dot(const uint16_t* x, int64_t m, int64_t k, const uint16_t* packed,  \
                              int64_t n, const float* bias, float* y32, uint16_t* y16,          \
                              bool accumulate, int64_t panel_begin, int64_t panel_end);         \
  /* linear_panels, linear_panels_bf16 and linear_panels_bf16_dot over quantised panels. */   \
  void linear_quant(const float* x, int64_t m, int64_t k, const QuantPanels& w, int64_t n,     \
                    const float* bias, float* y, bool accumulate, int64_t panel_begin,         \
                    int64_t panel_end);                                                        \
  void linear_quant_bf16(const uint16_t* x, int64_t m, int64_t k, const QuantPanels& w,        \
                         int64_t n, const float* bias, float* y32, uint16_t* y16,               \
                         bool accumulate, int64_t panel_begin, int64_t panel_end);              \
  void linear_quant_bf16_dot(const uint16_t* x, int64_t m, int64_t k, const QuantPanels& w,    \
                             int64_t n, const float* bias, float* y32, uint16_t* y16,           \
                             bool accumulate, int64_t panel_begin, int64_t panel_end);          \
  }

CAIRN_DECLARE_GEMM(isa_v4)
CAIRN_DECLARE_GEMM(isa_v3)
CAIRN_DECLARE_GEMM(isa_base)
CAIRN_DECLARE_GEMM(isa_v4_bf16)
