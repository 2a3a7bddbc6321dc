// The attention kernels of attention.inc for x86-64-v4 (build.rs compiles this file with -march=x86-64-v4).
#define CAIRN_ISA isa_v4
#include "attention.inc"
