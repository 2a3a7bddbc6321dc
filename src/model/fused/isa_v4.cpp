// The kernels of attention.inc and gemm.inc for x86-64-v4 (build.rs compiles this file with
// -march=x86-64-v4; kernels.cpp picks a set at load time).
#define CAIRN_ISA isa_v4
#include "attention.inc"
#include "gemm.inc"
