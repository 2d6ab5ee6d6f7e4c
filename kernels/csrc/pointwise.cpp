// The pointwise work of a decoder layer, fused so each activation is read and written once: RMSNorm (alone, and
// after the residual add) and RoPE in place. Over a 4,096-token bf16 prefill, torch's versions (pow, mean, mul,
// cast; mul, neg, cat, add) were a tenth of the layer's time, each op a pass over the activations. (A fused
// SiLU(gate) * up with a polynomial exp ran 2-6x slower than torch's silu then mul here, and was dropped.)
// Every op computes in fp32 and rounds where the plain-torch twin rounds (Llama's RMSNorm casts the normalised
// row back before the weight multiplies it), so fp32 results match the twins to the last few ulps and bf16 ones
// to one rounding. The twins (kernels/norm.py, kernels/rope.py) are the oracles in
// tests/test_pointwise_kernels.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "vec.h"

namespace {

// the storage type's value of an fp32 (to_f / to_bf16 from vec.h)
template <typename T>
inline T from_f(float v);
template <>
inline float from_f<float>(float v) {
  return v;
}
template <>
inline uint16_t from_f<uint16_t>(float v) {
  return to_bf16(v);
}
// the value a tensor of dtype T holds after a cast: identity for fp32, one rounding for bf16
template <typename T>
inline float round_to(float v) {
  return to_f(from_f<T>(v));
}

template <typename T>
const T* ptr(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.data_ptr());
}
template <typename T>
T* mut(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

constexpr int64_t kRowsGrain = 4;

// y[t] = w * cast(x[t] * rsqrt(mean(x[t]^2) + eps)); with `delta`, first x[t] += delta[t] (in x's dtype)
template <typename T>
void rms_rows(T* x, const T* delta, const T* w, T* y, int64_t rows, int64_t hidden, int64_t x_stride,
              int64_t delta_stride, float eps) {
  at::parallel_for(0, rows, kRowsGrain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      T* xr = x + r * x_stride;
      if (delta != nullptr) {
        const T* dr = delta + r * delta_stride;
        for (int64_t i = 0; i < hidden; ++i) xr[i] = from_f<T>(to_f(xr[i]) + to_f(dr[i]));
      }
      float part[16] = {};  // 16 partial sums: the loop vectorizes without reassociating a single sum
      int64_t i = 0;
      for (; i + 16 <= hidden; i += 16)
        for (int k = 0; k < 16; ++k) part[k] += to_f(xr[i + k]) * to_f(xr[i + k]);
      for (; i < hidden; ++i) part[0] += to_f(xr[i]) * to_f(xr[i]);
      float ss = 0.f;
      for (int k = 0; k < 16; ++k) ss += part[k];
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(hidden) + eps);
      T* yr = y + r * hidden;
      for (int64_t i = 0; i < hidden; ++i) yr[i] = from_f<T>(to_f(w[i]) * round_to<T>(to_f(xr[i]) * inv));
    }
  });
}

void check_norm_args(const at::Tensor& x, const at::Tensor& w, const char* name) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, name, ": x [T, H] with contiguous rows");
  TORCH_CHECK(w.dim() == 1 && w.is_contiguous() && w.size(0) == x.size(1), name, ": weight [H]");
  TORCH_CHECK(x.scalar_type() == w.scalar_type() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              name, ": x and weight both float32 or both bfloat16");
}

at::Tensor rms_norm_impl(const at::Tensor& x, const c10::optional<at::Tensor>& delta, const at::Tensor& w,
                         double eps, const char* name) {
  check_norm_args(x, w, name);
  if (delta.has_value()) {
    TORCH_CHECK(delta->sizes() == x.sizes() && delta->stride(1) == 1 && delta->scalar_type() == x.scalar_type(),
                name, ": delta like x");
  }
  auto y = at::empty({x.size(0), x.size(1)}, x.options());
  if (x.size(0) == 0) return y;
  const int64_t delta_stride = delta.has_value() ? delta->stride(0) : 0;
  auto run = [&](auto tag) {
    using T = decltype(tag);
    rms_rows<T>(mut<T>(x), delta.has_value() ? ptr<T>(*delta) : nullptr, ptr<T>(w), mut<T>(y), x.size(0),
                x.size(1), x.stride(0), delta_stride, static_cast<float>(eps));
  };
  if (x.scalar_type() == at::kFloat) run(float{}); else run(uint16_t{});
  return y;
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  // x: [T, H], w: [H] -> [T, H]
  return rms_norm_impl(x, c10::nullopt, w, eps, "rms_norm");
}

at::Tensor add_rms_norm_(at::Tensor& x, const at::Tensor& delta, const at::Tensor& w, double eps) {
  // x: [T, H] (updated in place: x += delta), delta: [T, H], w: [H] -> rms_norm(x) [T, H]
  return rms_norm_impl(x, delta, w, eps, "add_rms_norm_");
}

// x[t, h] = x * cos + rotate_half(x) * sin, rotate_half(x) = (-x[D/2:], x[:D/2]); cos/sin [T, D] (halves equal)
template <typename T>
void rope_rows(T* x, const T* cos, const T* sin, int64_t rows, int64_t heads, int64_t d, int64_t row_stride,
               int64_t head_stride) {
  const int64_t half = d / 2;
  at::parallel_for(0, rows, kRowsGrain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* c = cos + r * d;
      const T* s = sin + r * d;
      for (int64_t h = 0; h < heads; ++h) {
        T* xh = x + r * row_stride + h * head_stride;
        for (int64_t i = 0; i < half; ++i) {
          const float a = to_f(xh[i]), b = to_f(xh[i + half]);
          xh[i] = from_f<T>(round_to<T>(a * to_f(c[i])) + round_to<T>(-b * to_f(s[i])));
          xh[i + half] = from_f<T>(round_to<T>(b * to_f(c[i + half])) + round_to<T>(a * to_f(s[i + half])));
        }
      }
    }
  });
}

at::Tensor& rope_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  // x: [T, H, D] (rows may be strided, e.g. a view into a fused QKV output), cos/sin: [T, D] -> x, rotated
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.size(2) % 2 == 0, "rope_: x [T, H, D], D even, contiguous D");
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.dim() == 2 && cos.size(0) == x.size(0) && cos.size(1) == x.size(2) &&
                  cos.is_contiguous() && sin.is_contiguous(),
              "rope_: cos/sin [T, D] contiguous");
  TORCH_CHECK(cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "rope_: x, cos and sin of one dtype, float32 or bfloat16");
  if (x.size(0) == 0) return x;
  auto run = [&](auto tag) {
    using T = decltype(tag);
    rope_rows<T>(mut<T>(x), ptr<T>(cos), ptr<T>(sin), x.size(0), x.size(1), x.size(2), x.stride(0), x.stride(1));
  };
  if (x.scalar_type() == at::kFloat) run(float{}); else run(uint16_t{});
  return x;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(csps, m) {
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor");
  m.def("add_rms_norm_(Tensor(a!) x, Tensor delta, Tensor w, float eps) -> Tensor");
  m.def("rope_(Tensor(a!) x, Tensor cos, Tensor sin) -> Tensor(a!)");
}

TORCH_LIBRARY_IMPL(csps, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm_", &add_rms_norm_);
  m.impl("rope_", &rope_);
}
