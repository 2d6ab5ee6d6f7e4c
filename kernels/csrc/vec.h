// Fixed-width fp32 vectors for the CPU kernels (GCC/Clang vector extensions, portable across the x86 kinds this
// runs on): loads of fp32 or bf16 rows widened to fp32, and a tree sum of the lanes.
#pragma once

#include <cstdint>
#include <cstring>

// kLanes floats per vector: a whole AVX-512 register where the CPU has them (bf16 rows widen to fp32 in half
// the instructions), else one AVX2 register. Kernels that vectorise over head_dim need it to be a multiple of
// kLanes (paged_decode checks; Python asks for 16).
#ifdef __AVX512F__
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
typedef float v8f __attribute__((vector_size(4 * kLanes)));
typedef int32_t v8i __attribute__((vector_size(4 * kLanes)));
typedef uint32_t v8u __attribute__((vector_size(4 * kLanes)));
typedef uint16_t v8h __attribute__((vector_size(2 * kLanes)));
typedef float v4f __attribute__((vector_size(16)));

inline v8f load8(const float* p) {
  v8f r;
  std::memcpy(&r, p, sizeof(r));
  return r;
}
inline v8f load8(const uint16_t* p) {  // bfloat16: the high half of an fp32
  v8h h;
  std::memcpy(&h, p, sizeof(h));
  const v8u w = __builtin_convertvector(h, v8u) << 16;
  v8f r;
  std::memcpy(&r, &w, sizeof(r));
  return r;
}

// the sum of the lanes as a tree (a lane-by-lane sum is a chain of dependent adds)
inline float hsum(v8f v) {
#ifdef __AVX512F__
  typedef float v8f_half __attribute__((vector_size(32)));
  const v8f_half h = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                     __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  v4f a = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
#else
  v4f a = __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
#endif
  a += __builtin_shufflevector(a, a, 2, 3, 0, 1);
  a += __builtin_shufflevector(a, a, 1, 0, 3, 2);
  return a[0];
}
