// Causal attention of a prefill chunk over its sequence's keys on CPU, with the log-sum-exp.
//
// Queries sit at consecutive positions q_offset .. q_offset + Tq - 1, keys at positions 0 .. Tk - 1 (the
// sequence's cached KV, then the chunk's own): key j is visible to query i iff j <= q_offset + i. This is what a
// chunk of one sequence on one rank needs; the general cases (zigzag pieces, windows, arbitrary positions) stay
// with the torch path. The plain-torch twin and oracle is csps.kernels.attention_torch.attention_torch
// (tests/test_prefill_attention_kernel.py compares them).
//
// Flash attention's loop, in fp32 whatever the storage: a work item is one KV head and two query tiles (tile t
// and tile nt-1-t, so that every item carries the same causal work and the static split over threads is even).
// A tile's rows are its kQTile positions times the query heads that share the KV head (GQA); keys go in blocks of
// kKeyBlock. K is packed once per call, transposed block by block ([Hkv][block][D][kKeyBlock], contiguous per
// block): widened to fp32, or, for bf16 on CPUs with AVX512-BF16, kept in bf16 as pairs of d
// ([Hkv][block][D/2][kKeyBlock][2]) for vdpbf16ps, which multiplies bf16 pairs exactly and sums them in fp32 at
// twice the FMA's rate; that path also runs P·V by vdpbf16ps, from probabilities rounded to bf16 (as GPU flash
// attention does) and V packed as pairs of keys. Otherwise V is read in place and P·V runs in fp32. Scores come from a register tile of
// kRowsQK rows x 4 vectors of keys, the softmax is online (running max and sum per row), and P·V from a register
// tile of rows x head_dim. Key blocks past a tile's last position are skipped; only the block(s) that straddle
// the tile's positions are masked.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "vec.h"

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#define CSPS_BF16_DOT 1
#else
#define CSPS_BF16_DOT 0
#endif

namespace {

constexpr int64_t kQTile = 16;             // query positions per tile
constexpr int kKeyVecs = 4;                // vectors of keys per block
constexpr int64_t kKeyBlock = kKeyVecs * kLanes;  // keys per block
constexpr int kRowsQK = kLanes == 16 ? 6 : 3;     // rows of a score micro-tile: kRowsQK x kKeyVecs accumulators
constexpr int kAccRegs = kLanes == 16 ? 24 : 12;  // accumulators a P·V micro-tile may hold in registers
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Problem {
  int64_t tq, tk, num_q_heads, num_kv_heads, head_dim, q_offset;
  int64_t q_token_stride, q_head_stride, k_token_stride, k_head_stride, v_token_stride, v_head_stride;
  float scale;
};

// s[r][0:kKeyBlock] = qs[r][:] · kt[:][0:kKeyBlock] for kRowsQK rows; qs [rows][D], kt [D][kKeyBlock]
inline void score_micro_tile(const float* qs, int64_t D, const float* kt, float* s) {
  v8f acc[kRowsQK][kKeyVecs];
  for (int r = 0; r < kRowsQK; ++r)
    for (int c = 0; c < kKeyVecs; ++c) acc[r][c] = v8f{};
  for (int64_t d = 0; d < D; ++d) {
    v8f kv[kKeyVecs];
    for (int c = 0; c < kKeyVecs; ++c) kv[c] = load8(kt + d * kKeyBlock + c * kLanes);
    for (int r = 0; r < kRowsQK; ++r) {
      const float qv = qs[r * D + d];
      for (int c = 0; c < kKeyVecs; ++c) acc[r][c] += qv * kv[c];
    }
  }
  for (int r = 0; r < kRowsQK; ++r)
    for (int c = 0; c < kKeyVecs; ++c) std::memcpy(s + r * kKeyBlock + c * kLanes, &acc[r][c], sizeof(v8f));
}

#if CSPS_BF16_DOT
// the same from bf16: qs [rows][D] bf16, kt [D/2][kKeyBlock][2] bf16 (pairs of d side by side per key)
inline void score_micro_tile_bf16(const uint16_t* qs, int64_t D, const uint16_t* kt, float* s) {
  __m512 acc[kRowsQK][kKeyVecs];
  for (int r = 0; r < kRowsQK; ++r)
    for (int c = 0; c < kKeyVecs; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t d2 = 0; d2 < D / 2; ++d2) {
    __m512bh kv[kKeyVecs];
    for (int c = 0; c < kKeyVecs; ++c)
      kv[c] = (__m512bh)_mm512_loadu_si512(kt + (d2 * kKeyBlock + c * kLanes) * 2);
    for (int r = 0; r < kRowsQK; ++r) {
      int32_t pair;
      std::memcpy(&pair, qs + r * D + 2 * d2, sizeof(pair));
      const __m512bh qv = (__m512bh)_mm512_set1_epi32(pair);
      for (int c = 0; c < kKeyVecs; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], qv, kv[c]);
    }
  }
  for (int r = 0; r < kRowsQK; ++r)
    for (int c = 0; c < kKeyVecs; ++c) _mm512_storeu_ps(s + r * kKeyBlock + c * kLanes, acc[r][c]);
}
#endif

#if CSPS_BF16_DOT
// P·V from bf16 probabilities (p [rows][kKeyBlock], rounded from fp32) and V packed as pairs of keys
// (vb [kKeyBlock/2][D][2] bf16): o[r][:] = o[r][:] · alpha[r] + Σ_j p[r][j] · v[j][:] over the first n keys
template <int MR, int C>
inline void pv_micro_tile_bf16(const uint16_t* p, const float* alpha, const uint16_t* vb, int64_t n, float* o) {
  constexpr int64_t D = C * 16;
  __m512 acc[MR][C];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_mul_ps(_mm512_loadu_ps(o + r * D + c * 16), _mm512_set1_ps(alpha[r]));
  for (int64_t j2 = 0; j2 < (n + 1) / 2; ++j2) {
    __m512bh vv[C];
    for (int c = 0; c < C; ++c) vv[c] = (__m512bh)_mm512_loadu_si512(vb + (j2 * D + c * 16) * 2);
    for (int r = 0; r < MR; ++r) {
      int32_t pair;
      std::memcpy(&pair, p + r * kKeyBlock + 2 * j2, sizeof(pair));
      const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], a, vv[c]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(o + r * D + c * 16, acc[r][c]);
}
#endif

// o[r][:] = o[r][:] · alpha[r] + p[r][0:n] · v[0:n][:] for MR rows; C vectors per row (head_dim = C·kLanes);
// v: key j's row of this head at v + j·v_stride
template <int MR, int C, typename T>
inline void pv_micro_tile(const float* p, const float* alpha, const T* v, int64_t v_stride, int64_t n, float* o) {
  v8f acc[MR][C];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = load8(o + r * C * kLanes + c * kLanes) * alpha[r];
  for (int64_t j = 0; j < n; ++j) {
    v8f vv[C];
    for (int c = 0; c < C; ++c) vv[c] = load8(v + j * v_stride + c * kLanes);
    for (int r = 0; r < MR; ++r) {
      const float w = p[r * kKeyBlock + j];
      for (int c = 0; c < C; ++c) acc[r][c] += w * vv[c];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < C; ++c) std::memcpy(o + r * C * kLanes + c * kLanes, &acc[r][c], sizeof(v8f));
}

// the online softmax of one row's block of raw scores (times `scale`): keys at or past `visible` are masked;
// updates the running max m and sum l, turns s into probabilities and returns the factor the row's output is
// rescaled by
inline float softmax_block(float* s, float scale, int64_t visible, float& m, float& l) {
  v8f sv[kKeyVecs];
  for (int c = 0; c < kKeyVecs; ++c) sv[c] = load8(s + c * kLanes) * scale;
  const bool masked = visible < kKeyBlock;
  if (masked)
    for (int c = 0; c < kKeyVecs; ++c)
      for (int i = 0; i < kLanes; ++i)
        if (c * kLanes + i >= visible) sv[c][i] = kNegInf;
  v8f mx = sv[0];
  for (int c = 1; c < kKeyVecs; ++c) mx = mx > sv[c] ? mx : sv[c];
  float block_max = mx[0];
  for (int i = 1; i < kLanes; ++i) block_max = std::max(block_max, mx[i]);
  const float m_new = std::max(m, block_max);
  const float alpha = m == kNegInf ? 0.f : std::exp(m - m_new);
  v8f sum = v8f{};
  for (int c = 0; c < kKeyVecs; ++c) {
    v8f e = exp8(sv[c] - m_new);
    if (masked)
      for (int i = 0; i < kLanes; ++i)
        if (c * kLanes + i >= visible) e[i] = 0.f;
    sum += e;
    std::memcpy(s + c * kLanes, &e, sizeof(v8f));
  }
  l = l * alpha + hsum(sum);
  m = m_new;
  return alpha;
}

// KT: the packed K's element (float, or uint16_t bf16 pairs for the vdpbf16ps scores); vp: V packed as pairs of
// keys for the bf16 P·V ([Hkv][block][kKeyBlock/2][D][2]), with KT = uint16_t only
template <int C, typename T, typename KT>
void run(const T* q, const KT* kt, const T* v, const uint16_t* vp, const Problem& pb, T* out, float* lse) {
  constexpr int64_t D = C * kLanes;
  constexpr int kRowsPV = std::max(1, kAccRegs / C);
  const int64_t G = pb.num_q_heads / pb.num_kv_heads;
  const int64_t rows_cap = kQTile * G;
  const int64_t rows_pad = (rows_cap + kRowsQK - 1) / kRowsQK * kRowsQK + kRowsPV;  // whole micro-tiles
  const int64_t num_tiles = (pb.tq + kQTile - 1) / kQTile;
  const int64_t pairs = (num_tiles + 1) / 2;
  at::parallel_for(0, pb.num_kv_heads * pairs, 1, [&](int64_t begin, int64_t end) {
    std::vector<KT> qs(rows_pad * D);  // the tile's queries, unscaled, in K's packed type
    std::vector<float> o(rows_pad * D), s(rows_pad * kKeyBlock), m(rows_pad), l(rows_pad),
        alpha(rows_pad);
    std::vector<uint16_t> pbf(sizeof(KT) == 2 ? rows_pad * kKeyBlock : 0);  // bf16 probabilities for P·V
    const int64_t num_blocks = (pb.tk + kKeyBlock - 1) / kKeyBlock;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t h = item / pairs, pair = item % pairs;
      const int64_t tiles[2] = {pair, num_tiles - 1 - pair};
      for (int t = 0; t < (tiles[1] > tiles[0] ? 2 : 1); ++t) {  // the middle tile of an odd count: once
        const int64_t tile = tiles[t];
        const int64_t i0 = tile * kQTile, ni = std::min(kQTile, pb.tq - i0), rows = ni * G;
        // rows r = i·G + g: query i0 + i, query head h·G + g
        std::fill(qs.begin(), qs.end(), KT{});
        for (int64_t i = 0; i < ni; ++i)
          for (int64_t g = 0; g < G; ++g) {
            const T* src = q + (i0 + i) * pb.q_token_stride + (h * G + g) * pb.q_head_stride;
            KT* dst = &qs[(i * G + g) * D];
            if constexpr (sizeof(KT) == sizeof(T)) {
              std::memcpy(dst, src, D * sizeof(T));
            } else {
              for (int64_t c = 0; c < C; ++c) {
                const v8f x = load8(src + c * kLanes);
                std::memcpy(dst + c * kLanes, &x, sizeof(v8f));
              }
            }
          }
        std::fill(o.begin(), o.end(), 0.f);
        std::fill(m.begin(), m.end(), kNegInf);
        std::fill(l.begin(), l.end(), 0.f);
        const int64_t last_pos = pb.q_offset + i0 + ni - 1;  // the tile's last query sees keys 0..last_pos
        const int64_t num_keys = std::min(pb.tk, last_pos + 1);
        for (int64_t j0 = 0; j0 < num_keys; j0 += kKeyBlock) {
          const int64_t nj = std::min(kKeyBlock, num_keys - j0);
          const KT* ktb = kt + (h * num_blocks + j0 / kKeyBlock) * D * kKeyBlock;  // one block of packed K
          for (int64_t r = 0; r < rows; r += kRowsQK) {
#if CSPS_BF16_DOT
            if constexpr (sizeof(KT) == 2) {
              score_micro_tile_bf16(&qs[r * D], D, ktb, &s[r * kKeyBlock]);
              continue;
            }
#endif
            if constexpr (sizeof(KT) == 4) score_micro_tile(&qs[r * D], D, ktb, &s[r * kKeyBlock]);
          }
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t pos = pb.q_offset + i0 + r / G;
            const int64_t visible = std::min(nj, pos - j0 + 1);  // >= 1: key 0 .. pos are visible
            alpha[r] = softmax_block(&s[r * kKeyBlock], pb.scale, visible, m[r], l[r]);
          }
#if CSPS_BF16_DOT
          if constexpr (sizeof(KT) == 2) {
            for (int64_t r = 0; r < rows; ++r)
              for (int c = 0; c < kKeyVecs; c += 2)
                _mm512_storeu_si512(&pbf[r * kKeyBlock + c * 16],
                                    (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(&s[r * kKeyBlock + (c + 1) * 16]),
                                                                 _mm512_loadu_ps(&s[r * kKeyBlock + c * 16])));
            const uint16_t* vpb = vp + (h * num_blocks + j0 / kKeyBlock) * kKeyBlock * D;
            for (int64_t r = 0; r < rows; r += kRowsPV)
              pv_micro_tile_bf16<kRowsPV, C>(&pbf[r * kKeyBlock], &alpha[r], vpb, nj, &o[r * D]);
            continue;
          }
#endif
          for (int64_t r = 0; r < rows; r += kRowsPV)
            pv_micro_tile<kRowsPV, C>(&s[r * kKeyBlock], &alpha[r], v + j0 * pb.v_token_stride + h * pb.v_head_stride,
                                      pb.v_token_stride, nj, &o[r * D]);
        }
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t i = i0 + r / G, qh = h * G + r % G;
          const float inv = 1.f / l[r];
          T* dst = out + (i * pb.num_q_heads + qh) * D;
          for (int64_t d = 0; d < D; ++d) {
            const float x = o[r * D + d] * inv;
            store_f(dst + d, x);
          }
          lse[i * pb.num_q_heads + qh] = m[r] + std::log(l[r]);
        }
      }
    }
  });
}

template <typename T, typename KT>
void dispatch_head_dim(const T* q, const KT* kt, const T* v, const uint16_t* vp, const Problem& pb, T* out,
                       float* lse) {
  switch (pb.head_dim) {
    case 64: return run<64 / kLanes>(q, kt, v, vp, pb, out, lse);
    case 128: return run<128 / kLanes>(q, kt, v, vp, pb, out, lse);
    default: TORCH_CHECK(false, "prefill_attention: head_dim must be 64 or 128");
  }
}

std::tuple<at::Tensor, at::Tensor> prefill_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     int64_t q_offset, double scale, bool bf16_dot) {
  // q: [Tq, Hq, D], k/v: [Tk, Hkv, D] (fp32 or bf16, last dim contiguous; any token/head strides);
  // query i at position q_offset + i sees keys 0 .. q_offset + i. Returns out [Tq, Hq, D] (q's dtype) and
  // lse [Tq, Hq] fp32. bf16_dot: bf16 scores by vdpbf16ps where the CPU has it (else ignored).
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "prefill_attention: q [Tq, Hq, D], k/v [Tk, Hkv, D]");
  TORCH_CHECK(k.sizes() == v.sizes() && q.size(2) == k.size(2), "prefill_attention: shapes differ");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type(),
              "prefill_attention: dtypes differ");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1, "prefill_attention: head_dim not contiguous");
  TORCH_CHECK(q.size(1) % k.size(1) == 0, "prefill_attention: query heads must group evenly over KV heads");
  TORCH_CHECK(q_offset >= 0 && q_offset + q.size(0) <= k.size(0), "prefill_attention: queries past the keys");
  Problem pb{q.size(0), k.size(0), q.size(1), k.size(1), q.size(2), q_offset,
             q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), static_cast<float>(scale)};
  auto out = at::empty({pb.tq, pb.num_q_heads, pb.head_dim}, q.options());
  auto lse = at::empty({pb.tq, pb.num_q_heads}, q.options().dtype(at::kFloat));
  TORCH_CHECK(pb.head_dim == 64 || pb.head_dim == 128, "prefill_attention: head_dim must be 64 or 128");
  if (pb.tq == 0) return {out, lse};
  // K per block with one block's keys side by side for each d (zeros past Tk)
  const int64_t num_blocks = (pb.tk + kKeyBlock - 1) / kKeyBlock;
  auto blocks = [&](const at::Tensor& x) {
    return at::constant_pad_nd(x, {0, 0, 0, 0, 0, num_blocks * kKeyBlock - pb.tk}, 0)
        .view({num_blocks, kKeyBlock, pb.num_kv_heads, pb.head_dim});
  };
  auto u16 = [](const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr()); };
  if (q.scalar_type() == at::kFloat) {
    const auto kt = blocks(k).permute({2, 0, 3, 1}).contiguous();  // [Hkv][block][D][kKeyBlock]
    dispatch_head_dim<float, float>(q.data_ptr<float>(), kt.data_ptr<float>(), v.data_ptr<float>(), nullptr, pb,
                                    out.data_ptr<float>(), lse.data_ptr<float>());
    return {out, lse};
  }
  TORCH_CHECK(q.scalar_type() == at::kBFloat16, "prefill_attention: float32 or bfloat16");
  uint16_t* o16 = reinterpret_cast<uint16_t*>(out.data_ptr());
#if CSPS_BF16_DOT
  if (bf16_dot) {  // [Hkv][block][D/2][kKeyBlock][2], bf16
    const auto kt = blocks(k).view({num_blocks, kKeyBlock, pb.num_kv_heads, pb.head_dim / 2, 2})
                        .permute({2, 0, 3, 1, 4}).contiguous();
    // V as pairs of keys per block: [Hkv][block][kKeyBlock/2][D][2]
    const auto vp = blocks(v).view({num_blocks, kKeyBlock / 2, 2, pb.num_kv_heads, pb.head_dim})
                        .permute({3, 0, 1, 4, 2}).contiguous();
    dispatch_head_dim<uint16_t, uint16_t>(u16(q), u16(kt), u16(v), u16(vp), pb, o16, lse.data_ptr<float>());
    return {out, lse};
  }
#endif
  const auto kt = blocks(k.to(at::kFloat)).permute({2, 0, 3, 1}).contiguous();
  dispatch_head_dim<uint16_t, float>(u16(q), kt.data_ptr<float>(), u16(v), nullptr, pb, o16, lse.data_ptr<float>());
  return {out, lse};
}

}  // namespace

bool has_bf16_dot() { return CSPS_BF16_DOT; }

TORCH_LIBRARY_FRAGMENT(csps, m) {
  m.def("prefill_attention_has_bf16_dot() -> bool", &has_bf16_dot);
  m.def("prefill_attention(Tensor q, Tensor k, Tensor v, int q_offset, float scale, bool bf16_dot=True) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(csps, CPU, m) { m.impl("prefill_attention", &prefill_attention); }
