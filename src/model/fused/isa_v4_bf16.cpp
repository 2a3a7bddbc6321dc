// The products of gemm.inc for x86-64-v4 with AVX512-BF16 (build.rs compiles this file with
// -march=x86-64-v4 -mavx512bf16); only its linear_panels_bf16_dot is used.
#define CAIRN_ISA isa_v4_bf16
#include "gemm.inc"
