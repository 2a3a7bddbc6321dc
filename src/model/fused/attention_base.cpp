// The attention kernels of attention.inc for the baseline x86-64 instruction set (build.rs adds no -march).
#define CAIRN_ISA isa_base
#include "attention.inc"
