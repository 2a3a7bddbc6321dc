// The kernels of attention.inc and gemm.inc for baseline x86-64 (build.rs compiles this file
// without -march; kernels.cpp picks a set at load time).
#define CAIRN_ISA isa_base
#include "attention.inc"
#include "gemm.inc"
