// The kernels compiled once per instruction set (attention.inc, gemm.inc) for x86-64-v3 (build.rs
// compiles this file with -march=x86-64-v3).
#define CAIRN_ISA isa_v3
#include "attention.inc"
#include "gemm.inc"
