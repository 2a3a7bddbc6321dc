// The kernels compiled once per instruction set (attention.inc, gemm.inc) for x86-64-v4 (build.rs
// compiles this file with -march=x86-64-v4).
#define CAIRN_ISA isa_v4
#include "attention.inc"
#include "gemm.inc"
