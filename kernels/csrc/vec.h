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

// exp(x) for x <= 0 (scores minus their maximum), kLanes at a time: exp(x) = 2^n · exp(r), |r| <= ln2/2,
// exp(r) by Cephes' degree-6 polynomial (relative error ~2e-7); x below -87.3 gives ~1e-38, not 0.
inline v8f exp8(v8f x) {
  const v8f lo = v8f{} - 87.3f;
  x = x < lo ? lo : x;
  const v8f magic = v8f{} + 12582912.f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  const v8f n = (x * 1.44269504088896341f + magic) - magic;
  const v8f r = x - n * 0.693359375f + n * 2.12194440e-4f;
  v8f p = v8f{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const v8i e = (__builtin_convertvector(n, v8i) + 127) << 23;
  v8f scale;
  std::memcpy(&scale, &e, sizeof(scale));
  return p * scale;
}

#ifdef __AVX512F__
// lane i of the result = the sum of the 16 lanes of a[i]: 16 dot products' partial sums reduced at once in 4 levels
// of (two shuffles + an add), ~3 instructions a key instead of a tree per key
inline v8f sum16(const v8f* a) {
  v8f z[8], w[4], u[2];
  for (int i = 0; i < 8; ++i)  // 16 partials -> 8: keys 2i, 2i+1
    z[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(a[2 * i], a[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int i = 0; i < 4; ++i)  // 8 -> 4: keys 4i .. 4i+3
    w[i] = __builtin_shufflevector(z[2 * i], z[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           __builtin_shufflevector(z[2 * i], z[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  for (int i = 0; i < 2; ++i)  // 4 -> 2: keys 8i .. 8i+7
    u[i] = __builtin_shufflevector(w[2 * i], w[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
           __builtin_shufflevector(w[2 * i], w[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  return __builtin_shufflevector(u[0], u[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         __builtin_shufflevector(u[0], u[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}
#endif

// scalar element access for fp32 and bf16 (uint16_t bits) storage, plain bit operations so loops vectorize:
// to_f widens, to_bf16 rounds to nearest even as torch's casts round (finite values), store_f stores either way
inline float to_f(float v) { return v; }
inline float to_f(uint16_t v) { return __builtin_bit_cast(float, static_cast<uint32_t>(v) << 16); }
inline uint16_t to_bf16(float v) {
  uint32_t u = __builtin_bit_cast(uint32_t, v);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline void store_f(float* p, float v) { *p = v; }
inline void store_f(uint16_t* p, float v) { *p = to_bf16(v); }
