# The SIMT-on-CPU emulator build (see emu_runtime.h). Included by the top-level CMakeLists.txt when
# SCALEKV_EMU=ON, or by kernels/emu/CMakeLists.txt for a standalone build. Needs Boost.Context
# (apt: libboost-context-dev) for the fiber switch. Defines:
#   skv_emu_runtime   static library: fibers, scheduler, warp collectives, mma/ldmatrix/cp.async emulation
#   skv_emu_add_kernels(<target> <.cu files> [RUNTIME <runtime target>])
#                     compiles CUDA sources as C++ (-x c++ -DSCALEKV_EMU) into a static library
#   skv_emu_kernels   kernels/cuda/*.cu except backend_cuda.cu          (when any .cu exists)
#   skv_emu_backend   the emu scalekv::Backend, make_emu_backend()      (when any .cu exists)
#   emu_selftest      the emulator's own tests (test/emu/test_*.cc), with planted bugs
#   emu_kernel_check  the real kernels on the emu backend against the CPU backend (test/emu/check_*.cc)
# Sanitizers. A sanitized library cannot be loaded into a plain `node`, so the libraries the addon links
# follow SCALEKV_EMU_SANITIZER (default none), while the two test executables get their own copy built with
# SCALEKV_EMU_TEST_SANITIZER (default address: out-of-bounds global and shared-memory accesses abort).
#   address  AddressSanitizer (fibers are announced to it, so no false stack reports)
#   thread   ThreadSanitizer: races between simulated threads (e.g. a missing __syncthreads or __syncwarp)
#            are reported whatever the schedule; the runtime itself stays uninstrumented, its barriers and
#            collectives are the happens-before edges
#   none     fastest, for timing
include_guard(GLOBAL)

set(SKV_EMU_DIR "${CMAKE_CURRENT_LIST_DIR}")
get_filename_component(SKV_EMU_REPO "${SKV_EMU_DIR}/../.." ABSOLUTE)
set(SCALEKV_EMU_SANITIZER "none" CACHE STRING "Sanitizer of skv_emu_runtime/kernels/backend: none, address, thread")
set(SCALEKV_EMU_TEST_SANITIZER "address" CACHE STRING "Sanitizer of emu_selftest and emu_kernel_check")
option(SCALEKV_EMU_TESTS "Build emu_selftest and emu_kernel_check" ON)

find_package(Boost 1.66 REQUIRED COMPONENTS context)
find_package(Threads REQUIRED)
include(CheckCXXCompilerFlag)
# Uninitialised locals ("registers") get a fixed pattern instead of whatever the stack held, so a kernel
# that reads one fails the same way every run.
check_cxx_compiler_flag(-ftrivial-auto-var-init=pattern SKV_EMU_HAS_AUTO_VAR_INIT)

foreach(san address thread)
  if(NOT TARGET skv_emu_san_${san})
    add_library(skv_emu_san_${san} INTERFACE)
    target_compile_options(skv_emu_san_${san} INTERFACE -fsanitize=${san} -fno-omit-frame-pointer)
    target_link_options(skv_emu_san_${san} INTERFACE -fsanitize=${san})
  endif()
endforeach()

# The cost counters (emu_profile.h) see every load and store through GCC's kernel-address instrumentation in
# callback mode: each access calls __asan_{load,store}N_noabort(addr), defined by the runtime of the flavour
# without a sanitizer (a sanitizer runtime defines them itself). No shadow memory, stack or globals checks.
if(NOT TARGET skv_emu_access_hooks)
  add_library(skv_emu_access_hooks INTERFACE)
  target_compile_options(skv_emu_access_hooks INTERFACE -fsanitize=kernel-address
    --param=asan-instrumentation-with-call-threshold=0 --param=asan-stack=0 --param=asan-globals=0)
endif()

set(SKV_EMU_RUNTIME_SOURCES
  ${SKV_EMU_DIR}/fiber.cc
  ${SKV_EMU_DIR}/host_api.cc
  ${SKV_EMU_DIR}/launch.cc
  ${SKV_EMU_DIR}/numerics.cc
  ${SKV_EMU_DIR}/profile.cc
  ${SKV_EMU_DIR}/report.cc
  ${SKV_EMU_DIR}/scheduler.cc
  ${SKV_EMU_DIR}/tensor_ops.cc)

function(skv_emu_add_runtime target sanitizer)
  if(NOT sanitizer MATCHES "^(none|address|thread)$")
    message(FATAL_ERROR "scalekv emu: sanitizer must be none, address or thread (got '${sanitizer}')")
  endif()
  add_library(${target} STATIC ${SKV_EMU_RUNTIME_SOURCES})
  target_compile_features(${target} PUBLIC cxx_std_17)
  target_compile_options(${target} PRIVATE -Wall -Wextra)
  target_link_libraries(${target} PRIVATE Boost::context PUBLIC Threads::Threads ${CMAKE_DL_LIBS})
  set_target_properties(${target} PROPERTIES POSITION_INDEPENDENT_CODE ON)
  if(sanitizer STREQUAL "address")
    target_link_libraries(${target} PUBLIC skv_emu_san_address)
  elseif(sanitizer STREQUAL "none")
    target_compile_definitions(${target} PRIVATE SKV_EMU_PROFILE)
  elseif(sanitizer STREQUAL "thread")
    # The scheduler hands state between fibers without happens-before edges on purpose; instrumenting it
    # would report those hand-offs. Everything linking the runtime (kernels, tests) is instrumented.
    target_link_libraries(${target} INTERFACE skv_emu_san_thread)
  endif()
endfunction()

# Compiles CUDA sources as C++ against the emulator into a static library.
function(skv_emu_add_kernels target)
  cmake_parse_arguments(ARG "ACCESS_HOOKS" "RUNTIME" "" ${ARGN})
  if(NOT ARG_RUNTIME)
    set(ARG_RUNTIME skv_emu_runtime)
  endif()
  # Each .cu is compiled through a generated one-line .cc that includes it: marking the .cu files themselves
  # as C++ would change them for the nvcc build of the same directory too.
  set(wrappers "")
  foreach(cu ${ARG_UNPARSED_ARGUMENTS})
    get_filename_component(cu_abs "${cu}" ABSOLUTE)
    get_filename_component(cu_name "${cu}" NAME_WE)
    set(wrapper "${CMAKE_CURRENT_BINARY_DIR}/${target}_src/${cu_name}.cc")
    file(CONFIGURE OUTPUT "${wrapper}" CONTENT "#include \"${cu_abs}\"\n")
    list(APPEND wrappers "${wrapper}")
  endforeach()
  add_library(${target} STATIC ${wrappers})
  # CUDA code type-puns freely (shared memory seen as float, uint4, bf16...); nvcc does not exploit strict
  # aliasing, g++ would, so the kernels are compiled without it to keep their meaning.
  # `#pragma unroll` means nothing to g++.
  target_compile_options(${target} PRIVATE -fno-strict-aliasing -Wno-unknown-pragmas)
  target_compile_definitions(${target} PRIVATE SCALEKV_EMU)
  if(SKV_EMU_HAS_AUTO_VAR_INIT)
    target_compile_options(${target} PRIVATE -ftrivial-auto-var-init=pattern)
  endif()
  target_link_libraries(${target} PUBLIC ${ARG_RUNTIME})
  if(ARG_ACCESS_HOOKS)
    target_link_libraries(${target} PRIVATE skv_emu_access_hooks)
  endif()
  set_target_properties(${target} PROPERTIES POSITION_INDEPENDENT_CODE ON LINKER_LANGUAGE CXX)
endfunction()

file(GLOB SKV_EMU_CUDA_SOURCES CONFIGURE_DEPENDS "${SKV_EMU_REPO}/kernels/cuda/*.cu")
list(FILTER SKV_EMU_CUDA_SOURCES EXCLUDE REGEX "/backend_cuda\\.cu$")

# One flavour: skv_emu_runtime<suffix>, and when there are kernels skv_emu_kernels<suffix> and
# skv_emu_backend<suffix>.
function(skv_emu_add_flavour suffix sanitizer)
  skv_emu_add_runtime(skv_emu_runtime${suffix} ${sanitizer})
  if(SKV_EMU_CUDA_SOURCES)
    set(hooks "")
    if(sanitizer STREQUAL "none")
      set(hooks ACCESS_HOOKS)
    endif()
    skv_emu_add_kernels(skv_emu_kernels${suffix} ${SKV_EMU_CUDA_SOURCES} RUNTIME skv_emu_runtime${suffix} ${hooks})
    add_library(skv_emu_backend${suffix} STATIC ${SKV_EMU_DIR}/backend_emu.cc)
    target_compile_options(skv_emu_backend${suffix} PRIVATE -Wall -Wextra -fno-strict-aliasing)
    target_compile_definitions(skv_emu_backend${suffix} PRIVATE SCALEKV_EMU)
    target_link_libraries(skv_emu_backend${suffix} PUBLIC skv_emu_kernels${suffix})
    set_target_properties(skv_emu_backend${suffix} PROPERTIES POSITION_INDEPENDENT_CODE ON)
  endif()
endfunction()

skv_emu_add_flavour("" ${SCALEKV_EMU_SANITIZER})
if(NOT SKV_EMU_CUDA_SOURCES)
  message(STATUS "scalekv emu: no kernels/cuda/*.cu yet; skv_emu_kernels and skv_emu_backend not defined")
endif()

if(SCALEKV_EMU_TESTS)
  enable_testing()  # `ctest` in the build directory runs emu_selftest and emu_kernel_check
  set(SKV_EMU_TEST_FLAVOUR "")
  if(NOT SCALEKV_EMU_TEST_SANITIZER STREQUAL SCALEKV_EMU_SANITIZER)
    set(SKV_EMU_TEST_FLAVOUR "_${SCALEKV_EMU_TEST_SANITIZER}")
    skv_emu_add_flavour(${SKV_EMU_TEST_FLAVOUR} ${SCALEKV_EMU_TEST_SANITIZER})
  endif()

  set(SKV_EMU_TEST_HARNESS "${SKV_EMU_REPO}/test/emu/selftest_main.cc")
  file(GLOB SKV_EMU_TEST_SOURCES CONFIGURE_DEPENDS "${SKV_EMU_REPO}/test/emu/test_*.cc")
  add_executable(emu_selftest ${SKV_EMU_TEST_HARNESS} ${SKV_EMU_TEST_SOURCES})
  target_link_libraries(emu_selftest PRIVATE skv_emu_runtime${SKV_EMU_TEST_FLAVOUR})
  target_compile_options(emu_selftest PRIVATE -Wall -Wextra -fno-strict-aliasing)
  target_compile_definitions(emu_selftest PRIVATE SCALEKV_EMU)
  if(SKV_EMU_HAS_AUTO_VAR_INIT)
    target_compile_options(emu_selftest PRIVATE -ftrivial-auto-var-init=pattern)
  endif()
  add_test(NAME emu_selftest COMMAND emu_selftest)

  # The cost counters on planted kernels: needs the runtime without a sanitizer (the one defining the access hooks;
  # a sanitizer's own instrumentation cannot be combined with them).
  if(SCALEKV_EMU_SANITIZER STREQUAL "none")
    add_executable(emu_profile_check ${SKV_EMU_TEST_HARNESS} ${SKV_EMU_REPO}/test/emu/profile_check.cc)
    target_link_libraries(emu_profile_check PRIVATE skv_emu_runtime skv_emu_access_hooks)
    target_compile_options(emu_profile_check PRIVATE -Wall -Wextra -fno-strict-aliasing)
    target_compile_definitions(emu_profile_check PRIVATE SCALEKV_EMU)
    add_test(NAME emu_profile_check COMMAND emu_profile_check)
  endif()

  if(TARGET skv_emu_backend${SKV_EMU_TEST_FLAVOUR})
    file(GLOB SKV_EMU_CPU_SOURCES CONFIGURE_DEPENDS "${SKV_EMU_REPO}/kernels/cpu/*.cc")
    file(GLOB SKV_EMU_CHECK_SOURCES CONFIGURE_DEPENDS "${SKV_EMU_REPO}/test/emu/check_*.cc")
    add_executable(emu_kernel_check ${SKV_EMU_TEST_HARNESS} ${SKV_EMU_CHECK_SOURCES} ${SKV_EMU_CPU_SOURCES})
    target_link_libraries(emu_kernel_check PRIVATE skv_emu_backend${SKV_EMU_TEST_FLAVOUR})
    target_compile_definitions(emu_kernel_check PRIVATE SCALEKV_EMU)
    add_test(NAME emu_kernel_check COMMAND emu_kernel_check)
  endif()
endif()
