// y = x @ Wᵀ for a few rows of x (decode steps of 1-8 sequences): W [out, in] in torch's layout is streamed
// once, row by row, each row dotted with every row of x (fp32 accumulation, fp32 or bf16 operands). A decode
// step's linear layers are bound by reading their weights; MKL's GEMM paths for so few rows read them at a
// fraction of the memory bandwidth (benchmarks/cpu_kernels.py linear). The plain-torch twin and oracle is
// F.linear.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "vec.h"

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#define CSPS_GEMM_BF16_DOT 1
#else
#define CSPS_GEMM_BF16_DOT 0
#endif

namespace {

// R rows of x (already fp32, [R][in]) against W rows [o0, o1), G W rows at a time: R·G independent accumulator
// chains (one chain per W row stalls on the FMA latency: 1 row of x ran at half the memory's bandwidth)
template <int R, int G, typename T>
void rows_block(const float* xf, const T* w, const T* bias, T* y, int64_t in, int64_t out, int64_t o0, int64_t o1) {
  const int64_t n8 = in - in % kLanes;
  int64_t o = o0;
  for (; o + G <= o1; o += G) {
    const T* wr[G];
    for (int g = 0; g < G; ++g) {
      wr[g] = w + (o + g) * in;
      __builtin_prefetch(wr[g] + 4 * G * in, 0, 0);
    }
    v8f acc[R][G];
    for (int r = 0; r < R; ++r)
      for (int g = 0; g < G; ++g) acc[r][g] = v8f{};
    for (int64_t i = 0; i < n8; i += kLanes) {
      v8f wv[G];
      for (int g = 0; g < G; ++g) wv[g] = load8(wr[g] + i);
      for (int r = 0; r < R; ++r) {
        const v8f xv = load8(xf + r * in + i);
        for (int g = 0; g < G; ++g) acc[r][g] += xv * wv[g];
      }
    }
    for (int r = 0; r < R; ++r)
      for (int g = 0; g < G; ++g) {
        float s = hsum(acc[r][g]);
        for (int64_t i = n8; i < in; ++i) s += xf[r * in + i] * to_f(wr[g][i]);
        if (bias != nullptr) s += to_f(bias[o + g]);
        store_f(y + r * out + o + g, s);
      }
  }
  if (o < o1) rows_block<R, 1>(xf, w, bias, y, in, out, o, o1);  // the tile's last W rows
}

template <typename T>
void rows_any(int rows, const float* xf, const T* w, const T* bias, T* y, int64_t in, int64_t out, int64_t o0,
              int64_t o1) {
  switch (rows) {  // R·G <= 8 accumulators
    case 1: return rows_block<1, 4>(xf, w, bias, y, in, out, o0, o1);
    case 2: return rows_block<2, 4>(xf, w, bias, y, in, out, o0, o1);
    case 3: return rows_block<3, 2>(xf, w, bias, y, in, out, o0, o1);
    case 4: return rows_block<4, 2>(xf, w, bias, y, in, out, o0, o1);
    case 5: return rows_block<5, 1>(xf, w, bias, y, in, out, o0, o1);
    case 6: return rows_block<6, 1>(xf, w, bias, y, in, out, o0, o1);
    case 7: return rows_block<7, 1>(xf, w, bias, y, in, out, o0, o1);
    default: return rows_block<8, 1>(xf, w, bias, y, in, out, o0, o1);
  }
}

#if CSPS_GEMM_BF16_DOT
// bf16 x and W on CPUs with AVX512-BF16: 4 rows of x against 4 W rows per pass, 32 products per vdpbf16ps (exact
// bf16 products, fp32 sums, half the FMA's instructions); the 16 accumulators are summed at once (sum16)
constexpr int kDotRows = 4, kDotW = 4;

void rows_block_bf16(int rows, const uint16_t* x, const uint16_t* w, const uint16_t* bias, uint16_t* y, int64_t in,
                     int64_t out, int64_t o0, int64_t o1) {
  const int64_t n32 = in - in % 32;
  for (int64_t o = o0; o < o1; o += kDotW) {
    const int gw = static_cast<int>(std::min<int64_t>(kDotW, o1 - o));
    const uint16_t* wr[kDotW];
    for (int g = 0; g < kDotW; ++g) wr[g] = w + (o + std::min(g, gw - 1)) * in;  // a short group repeats its last row
    const uint16_t* xr[kDotRows];
    for (int r = 0; r < kDotRows; ++r) xr[r] = x + std::min(r, rows - 1) * in;
    __m512 acc[kDotRows * kDotW];
    for (int a = 0; a < kDotRows * kDotW; ++a) acc[a] = _mm512_setzero_ps();
    for (int64_t i = 0; i < n32; i += 32) {
      __m512bh wv[kDotW];
      for (int g = 0; g < kDotW; ++g) wv[g] = (__m512bh)_mm512_loadu_si512(wr[g] + i);
      for (int r = 0; r < kDotRows; ++r) {
        const __m512bh xv = (__m512bh)_mm512_loadu_si512(xr[r] + i);
        for (int g = 0; g < kDotW; ++g) acc[r * kDotW + g] = _mm512_dpbf16_ps(acc[r * kDotW + g], xv, wv[g]);
      }
    }
    v8f part[kDotRows * kDotW];
    for (int a = 0; a < kDotRows * kDotW; ++a) part[a] = (v8f)acc[a];
    const v8f sums = sum16(part);  // lane r·kDotW + g
    for (int r = 0; r < rows; ++r)
      for (int g = 0; g < gw; ++g) {
        float s = sums[r * kDotW + g];
        for (int64_t i = n32; i < in; ++i) s += to_f(xr[r][i]) * to_f(wr[g][i]);
        if (bias != nullptr) s += to_f(bias[o + g]);
        store_f(y + r * out + o + g, s);
      }
  }
}
#endif

// rows in blocks of 8 over a tile of W rows: the tile is read from memory once, the later blocks find it in cache
constexpr int64_t kTile = 32;

#if CSPS_GEMM_BF16_DOT
void run_bf16_dot(const uint16_t* x, const uint16_t* w, const uint16_t* bias, uint16_t* y, int64_t rows, int64_t in,
                  int64_t out) {
  at::parallel_for(0, (out + kTile - 1) / kTile, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t o0 = t * kTile, o1 = std::min(out, o0 + kTile);
      for (int64_t r = 0; r < rows; r += kDotRows)
        rows_block_bf16(static_cast<int>(std::min<int64_t>(kDotRows, rows - r)), x + r * in, w, bias, y + r * out,
                        in, out, o0, o1);
    }
  });
}
#endif

template <typename T>
void run(const float* xf, const T* w, const T* bias, T* y, int64_t rows, int64_t in, int64_t out) {
  at::parallel_for(0, (out + kTile - 1) / kTile, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t o0 = t * kTile, o1 = std::min(out, o0 + kTile);
      for (int64_t r = 0; r < rows; r += 8)
        rows_any<T>(static_cast<int>(std::min<int64_t>(8, rows - r)), xf + r * in, w, bias, y + r * out, in, out,
                    o0, o1);
    }
  });
}

at::Tensor linear_rows(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  // x: [R, in], w: [out, in], bias: [out]; fp32 or bf16, one dtype -> [R, out] in that dtype
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "linear_rows: x [R, in], w [out, in]");
  TORCH_CHECK(x.size(0) >= 1, "linear_rows: at least one row");
  TORCH_CHECK(x.scalar_type() == w.scalar_type() && (w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16),
              "linear_rows: x and w both float32 or both bfloat16");
  TORCH_CHECK(w.is_contiguous(), "linear_rows: w must be contiguous");
  const auto wb = bias.has_value() ? bias->contiguous() : at::Tensor();
  TORCH_CHECK(!wb.defined() || (wb.numel() == w.size(0) && wb.scalar_type() == w.scalar_type()), "linear_rows: bias [out]");
  const int64_t rows = x.size(0), in = x.size(1), out = w.size(0);
  auto y = at::empty({rows, out}, x.options());
#if CSPS_GEMM_BF16_DOT
  if (w.scalar_type() == at::kBFloat16) {
    auto p = [](const at::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr()); };
    const auto xb = x.contiguous();
    run_bf16_dot(p(xb), p(w), wb.defined() ? p(wb) : nullptr, p(y), rows, in, out);
    return y;
  }
#endif
  const auto xf = x.to(at::kFloat).contiguous();
  if (w.scalar_type() == at::kFloat) {
    run<float>(xf.data_ptr<float>(), w.data_ptr<float>(), wb.defined() ? wb.data_ptr<float>() : nullptr,
               y.data_ptr<float>(), rows, in, out);
  } else {
    auto p = [](const at::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr()); };
    run<uint16_t>(xf.data_ptr<float>(), p(w), wb.defined() ? p(wb) : nullptr, p(y), rows, in, out);
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(csps, m) { m.def("linear_rows(Tensor x, Tensor w, Tensor? bias) -> Tensor"); }

TORCH_LIBRARY_IMPL(csps, CPU, m) { m.impl("linear_rows", &linear_rows); }
