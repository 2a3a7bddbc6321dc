// The kernels compiled once per instruction set (attention.inc, gemm.inc) for baseline x86-64 (build.rs
// compiles this file with no -march).
#define CAIRN_ISA isa_base
#include "attention.inc"
#include "gemm.inc"
