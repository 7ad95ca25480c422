// The SIMT-on-CPU emulator's one public header (portable.cuh includes it under SCALEKV_EMU). It provides
// what the nvcc branch of portable.cuh provides: the CUDA subset, SKV_LAUNCH, SKV_DYNAMIC_SMEM and the
// skv:: mma / ldmatrix / cp.async wrappers, so kernels/cuda/*.cu compile with g++ -x c++ -DSCALEKV_EMU.
//
// Each CUDA thread is a fiber; a block's fibers run on one OS thread, each until it blocks at a barrier, a
// warp collective or its exit, in a seeded random order (SKV_EMU_SCHEDULE=random|forward|reverse,
// SKV_EMU_SEED=n), so a missing __syncthreads reads poisoned shared memory instead of going unnoticed.
#pragma once

#include "emu_cuda_types.h"
#include "emu_device.h"
#include "emu_host_api.h"
#include "emu_launch.h"
#include "emu_tensor_ops.h"
