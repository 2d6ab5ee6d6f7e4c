// Paged decode attention on CPU: one query token per sequence over that sequence's KV blocks, read in
// place from the paged cache (no gather into a padded batch, no cast of the cache), accumulated in fp32.
//
// The plain-torch twin and oracle is csps.kernels.attention_torch.decode_attention over
// csps.kernels.paged.gather_kv_padded (tests/test_cpu_ext.py compares them).
//
// Work is split into (sequence, partition of at most `partition_tokens` keys) items, so that a batch of one
// long sequence still keeps every thread busy (flash-decoding's split-K). An item computes every query head
// over its keys, reading each cache row (all KV heads of a token) once, front to back, with the next rows
// prefetched (a sequence's blocks are scattered); it writes its partial softmax state, and a second pass
// merges the partitions of every (sequence, query head) by log-sum-exp. Query heads that share a KV head
// (GQA, or an uneven TP head map) are scored together, four at a time, from one load of each K/V vector.
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

#if defined(__AVX512F__)
#include <immintrin.h>
#define CSPS_CHUNKED_SCORES 1  // scores 16 keys at a time, one transposing lane sum per 16 (below)
#else
#define CSPS_CHUNKED_SCORES 0
#endif
#if CSPS_CHUNKED_SCORES && defined(__AVX512BF16__)
#define CSPS_DECODE_BF16_DOT 1  // bf16 q x bf16 K by vdpbf16ps: exact products, fp32 sums, half the instructions
#else
#define CSPS_DECODE_BF16_DOT 0
#endif

namespace {

// rows ahead of the one being read that are prefetched (blocks are scattered: the hardware prefetcher
// cannot guess the next block)
constexpr int64_t kPrefetchRows = 32;
inline void prefetch_row(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(c + i, 0, 1);
}

struct Shape {
  int64_t batch, num_q_heads, num_kv_heads, head_dim, block_size, table_width;
};

// scores of G query heads (pre-scaled, qv [G][C] vectors) against one key row of C·8 values
template <int G, typename T>
inline void score_row(const v8f* qv, const T* krow, int64_t C, float* out, int64_t out_stride) {
  v8f acc[G];
  for (int g = 0; g < G; ++g) acc[g] = v8f{};
  for (int64_t c = 0; c < C; ++c) {
    const v8f k = load8(krow + kLanes * c);
    for (int g = 0; g < G; ++g) acc[g] += qv[g * C + c] * k;
  }
  for (int g = 0; g < G; ++g) out[g * out_stride] = hsum(acc[g]);
}

// acc[g] += p[g] · v for G query heads; acc [G][C] vectors
template <int G, typename T>
inline void accumulate_row(const float* p, int64_t p_stride, const T* vrow, int64_t C, v8f* acc) {
  float w[G];
  for (int g = 0; g < G; ++g) w[g] = p[g * p_stride];
  for (int64_t c = 0; c < C; ++c) {
    const v8f v = load8(vrow + kLanes * c);
    for (int g = 0; g < G; ++g) acc[g * C + c] += w[g] * v;
  }
}

// G (<= 4) query heads at a time: score_row / accumulate_row with G a compile-time constant
template <typename T>
inline void score_heads(int G, const v8f* qv, const T* krow, int64_t C, float* out, int64_t out_stride) {
  switch (G) {
    case 1: return score_row<1>(qv, krow, C, out, out_stride);
    case 2: return score_row<2>(qv, krow, C, out, out_stride);
    case 3: return score_row<3>(qv, krow, C, out, out_stride);
    default: return score_row<4>(qv, krow, C, out, out_stride);
  }
}
template <typename T>
inline void accumulate_heads(int G, const float* p, int64_t p_stride, const T* vrow, int64_t C, v8f* acc) {
  switch (G) {
    case 1: return accumulate_row<1>(p, p_stride, vrow, C, acc);
    case 2: return accumulate_row<2>(p, p_stride, vrow, C, acc);
    case 3: return accumulate_row<3>(p, p_stride, vrow, C, acc);
    default: return accumulate_row<4>(p, p_stride, vrow, C, acc);
  }
}

#if CSPS_CHUNKED_SCORES
// partial dot products (16 lanes each, summed later by sum16) of G query heads with one key row:
// out[g · 16] for g < G; fp32 q (pre-scaled) against a row widened to fp32
template <typename T>
inline void partial_scores(const v8f* qv, int64_t G, const T* krow, int64_t C, v8f* out) {
  v8f k[8];  // C <= 8 (head_dim <= 128)
  for (int64_t c = 0; c < C; ++c) k[c] = load8(krow + kLanes * c);
  for (int64_t g = 0; g < G; ++g) {
    v8f acc = qv[g * C] * k[0];
    for (int64_t c = 1; c < C; ++c) acc += qv[g * C + c] * k[c];
    out[g * kLanes] = acc;
  }
}

#if CSPS_DECODE_BF16_DOT
// the same from bf16 q (unscaled, qb [G][D]) and a bf16 row, 32 values per vdpbf16ps
inline void partial_scores_bf16(const uint16_t* qb, int64_t G, const uint16_t* krow, int64_t D, v8f* out) {
  __m512bh k[4];  // D <= 128
  for (int64_t c = 0; c < D / 32; ++c) k[c] = (__m512bh)_mm512_loadu_si512(krow + 32 * c);
  for (int64_t g = 0; g < G; ++g) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t c = 0; c < D / 32; ++c)
      acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(qb + g * D + 32 * c), k[c]);
    out[g * kLanes] = (v8f)acc;
  }
}
#endif
#endif

// softmax state of one partition: scores [slots][P] become exp(score - max) in place
inline void softmax_rows(float* scores, int64_t num_slots, int64_t P, int64_t n, float* max_out, float* sum_out) {
  const int64_t n8 = n - n % kLanes;
  for (int64_t j = 0; j < num_slots; ++j) {
    float* sj = scores + j * P;
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t i = 0; i < n; ++i) m = std::max(m, sj[i]);
    v8f l8 = v8f{};
    for (int64_t i = 0; i < n8; i += kLanes) {
      const v8f e = exp8(load8(sj + i) - m);
      std::memcpy(sj + i, &e, sizeof(e));
      l8 += e;
    }
    float l = hsum(l8);
    for (int64_t i = n8; i < n; ++i) {
      sj[i] = std::exp(sj[i] - m);
      l += sj[i];
    }
    max_out[j] = m;
    sum_out[j] = l;
  }
}

template <typename T>
void run(const float* q, const T* kc, const T* vc, const int32_t* tables, const int64_t* rows,
         const int64_t* lens, const int64_t* kv_q_offsets, const int64_t* kv_q_index, const Shape& s, float scale,
         int64_t window, int64_t partition_tokens, bool q_is_bf16, float* out, float* lse) {
  // Query heads are handled in "slots": slot j is query head kv_q_index[j], so the query heads of KV
  // head h are the slots [kv_q_offsets[h], kv_q_offsets[h + 1]). A work item is one partition of one
  // sequence's keys for every head: each cache row (all KV heads of a token) is read once, front to back.
  constexpr int kGroup = 4;  // query heads per pass over a KV head's row
  const int64_t B = s.batch, Hq = s.num_q_heads, Hkv = s.num_kv_heads, D = s.head_dim, BS = s.block_size;
  const int64_t C = D / kLanes, P = partition_tokens;
  // visible keys [lo, hi) of every sequence and its partitions
  std::vector<int64_t> lo(B), first_part(B + 1, 0);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t hi = lens[b];
    lo[b] = window > 0 ? std::max<int64_t>(0, hi - window) : 0;
    const int64_t n = std::max<int64_t>(0, hi - lo[b]);
    first_part[b + 1] = first_part[b] + (n + P - 1) / P;
  }
  const int64_t num_parts = first_part[B];
  // per partition and slot: the unnormalised output, the max score and the sum of exp(score - max)
  std::vector<float> part_acc(static_cast<size_t>(std::max<int64_t>(1, num_parts * Hq * D)));
  std::vector<float> part_max(static_cast<size_t>(std::max<int64_t>(1, num_parts * Hq)));
  std::vector<float> part_sum(static_cast<size_t>(std::max<int64_t>(1, num_parts * Hq)));
  std::vector<int64_t> seq_of_part(static_cast<size_t>(std::max<int64_t>(1, num_parts)));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t p = first_part[b]; p < first_part[b + 1]; ++p) seq_of_part[p] = b;
  const int64_t row_stride = Hkv * D;  // one token's row in a cache block
  const int bs_shift = (BS & (BS - 1)) == 0 ? __builtin_ctzll(static_cast<unsigned long long>(BS)) : -1;
  const int64_t row_bytes = row_stride * static_cast<int64_t>(sizeof(T));

  at::parallel_for(0, num_parts, 1, [&](int64_t begin, int64_t end) {
    std::vector<v8f> qv(static_cast<size_t>(Hq * C)), acc(static_cast<size_t>(Hq * C));
    std::vector<float> scores(static_cast<size_t>(Hq * P));
#if CSPS_CHUNKED_SCORES
    std::vector<v8f> partial(static_cast<size_t>(Hq * kLanes));
    // bf16 q (exact: q was bf16) for vdpbf16ps over a bf16 cache; the scale is applied to the summed scores
    const bool bf16_dot = CSPS_DECODE_BF16_DOT && sizeof(T) == 2 && q_is_bf16 && D % 32 == 0;
    std::vector<uint16_t> qb(bf16_dot ? static_cast<size_t>(Hq * D) : 0);
#endif
    for (int64_t part = begin; part < end; ++part) {
      const int64_t b = seq_of_part[part];
      const int64_t t0 = lo[b] + (part - first_part[b]) * P, t1 = std::min(lens[b], t0 + P), n = t1 - t0;
      const int32_t* table = tables + rows[b] * s.table_width;
      for (int64_t j = 0; j < Hq; ++j) {
        const float* qh = q + (b * Hq + kv_q_index[j]) * D;
        for (int64_t c = 0; c < C; ++c) qv[j * C + c] = load8(qh + kLanes * c) * scale;
#if CSPS_CHUNKED_SCORES
        if (bf16_dot)
          for (int64_t d = 0; d < D; ++d) qb[j * D + d] = to_bf16(qh[d]);
#endif
      }
      // the cache row of key t (all KV heads of the token), read in place
      // (block sizes are powers of two in practice: a shift and a mask instead of two 64-bit divisions per row)
      auto row = [&](const T* cache, int64_t t) {
        const int64_t blk = bs_shift >= 0 ? t >> bs_shift : t / BS, off = bs_shift >= 0 ? t & (BS - 1) : t % BS;
        return cache + (static_cast<int64_t>(table[blk]) * BS + off) * row_stride;
      };
#if CSPS_CHUNKED_SCORES
      for (int64_t tc = t0; tc < t1; tc += kLanes) {  // scores, 16 keys at a time
        const int64_t nc = std::min<int64_t>(kLanes, t1 - tc);
        for (int64_t i = 0; i < nc; ++i) {
          const int64_t t = tc + i;
          const T* krow = row(kc, t);
          if (t + kPrefetchRows < t1) prefetch_row(row(kc, t + kPrefetchRows), row_bytes);
          for (int64_t h = 0; h < Hkv; ++h) {
            const int64_t j = kv_q_offsets[h], G = kv_q_offsets[h + 1] - j;
#if CSPS_DECODE_BF16_DOT
            if constexpr (sizeof(T) == 2) {
              if (bf16_dot) {
                partial_scores_bf16(qb.data() + j * D, G, krow + h * D, D, partial.data() + j * kLanes + i);
                continue;
              }
            }
#endif
            partial_scores(qv.data() + j * C, G, krow + h * D, C, partial.data() + j * kLanes + i);
          }
        }
        for (int64_t j = 0; j < Hq; ++j) {
          for (int64_t i = nc; i < kLanes; ++i) partial[j * kLanes + i] = v8f{};
          v8f sc = sum16(partial.data() + j * kLanes);
          if (bf16_dot) sc *= scale;
          std::memcpy(scores.data() + j * P + (tc - t0), &sc, nc * sizeof(float));
        }
      }
#else
      for (int64_t t = t0; t < t1; ++t) {  // scores
        const T* krow = row(kc, t);
        if (t + kPrefetchRows < t1) prefetch_row(row(kc, t + kPrefetchRows), row_bytes);
        for (int64_t h = 0; h < Hkv; ++h)
          for (int64_t j = kv_q_offsets[h]; j < kv_q_offsets[h + 1]; j += kGroup)
            score_heads(static_cast<int>(std::min<int64_t>(kGroup, kv_q_offsets[h + 1] - j)), qv.data() + j * C,
                        krow + h * D, C, scores.data() + j * P + (t - t0), P);
      }
#endif
      softmax_rows(scores.data(), Hq, P, n, part_max.data() + part * Hq, part_sum.data() + part * Hq);
      std::fill(acc.begin(), acc.end(), v8f{});
      for (int64_t t = t0; t < t1; ++t) {
        const T* vrow = row(vc, t);
        if (t + kPrefetchRows < t1) prefetch_row(row(vc, t + kPrefetchRows), row_bytes);
        for (int64_t h = 0; h < Hkv; ++h)
          for (int64_t j = kv_q_offsets[h]; j < kv_q_offsets[h + 1]; j += kGroup)
            accumulate_heads(static_cast<int>(std::min<int64_t>(kGroup, kv_q_offsets[h + 1] - j)),
                             scores.data() + j * P + (t - t0), P, vrow + h * D, C, acc.data() + j * C);
      }
      std::memcpy(part_acc.data() + part * Hq * D, acc.data(), Hq * D * sizeof(float));
    }
  });

  // merge the partitions of every (sequence, query head) by log-sum-exp
  at::parallel_for(0, B * Hq, 16, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / Hq, j = item % Hq;  // slot j is query head kv_q_index[j]
      const int64_t qh = kv_q_index[j];
      float* o = out + (b * Hq + qh) * D;
      std::fill(o, o + D, 0.f);
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t p = first_part[b]; p < first_part[b + 1]; ++p) mx = std::max(mx, part_max[p * Hq + j]);
      if (first_part[b] == first_part[b + 1] || !std::isfinite(mx)) {
        lse[b * Hq + qh] = -std::numeric_limits<float>::infinity();
        continue;
      }
      float sum = 0.f;
      for (int64_t p = first_part[b]; p < first_part[b + 1]; ++p) {
        const float w = std::exp(part_max[p * Hq + j] - mx);
        sum += w * part_sum[p * Hq + j];
        const float* a = part_acc.data() + (p * Hq + j) * D;
        for (int64_t i = 0; i < D; ++i) o[i] += w * a[i];
      }
      const float inv = 1.f / sum;
      for (int64_t i = 0; i < D; ++i) o[i] *= inv;
      lse[b * Hq + qh] = mx + std::log(sum);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> paged_decode(const at::Tensor& q, const at::Tensor& k_cache,
                                                const at::Tensor& v_cache, const at::Tensor& block_tables,
                                                const at::Tensor& table_rows, const at::Tensor& kv_lens,
                                                const at::Tensor& kv_q_offsets, const at::Tensor& kv_q_index,
                                                double scale, int64_t window, int64_t partition_tokens) {
  // q: [B, Hq, D]; k_cache/v_cache: [num_blocks, block_size, Hkv, D] (fp32 or bf16, contiguous);
  // block_tables: [R, W] int32 (a row per request); table_rows: [B] int64 (each query's row);
  // kv_lens: [B] int64; kv_q_offsets: [Hkv + 1] and kv_q_index: [Hq] int64 (the query heads of KV head h
  // are kv_q_index[kv_q_offsets[h]:kv_q_offsets[h+1]]); window: 0 = none, else the last `window` keys.
  // Returns out [B, Hq, D] fp32 and lse [B, Hq] fp32 (-inf and out 0 where a sequence has no key).
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4, "paged_decode: q [B, Hq, D], cache [N, BS, Hkv, D]");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes() && k_cache.scalar_type() == v_cache.scalar_type(),
              "paged_decode: k and v caches differ");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "paged_decode: caches must be contiguous");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && table_rows.scalar_type() == at::kLong &&
                  kv_lens.scalar_type() == at::kLong,
              "paged_decode: block_tables int32, table_rows and kv_lens int64");
  TORCH_CHECK(partition_tokens > 0, "paged_decode: partition_tokens must be positive");
  const auto qf = q.to(at::kFloat).contiguous();
  const auto tables = block_tables.contiguous();
  const auto rows = table_rows.contiguous();
  const auto lens = kv_lens.contiguous();
  const auto offs = kv_q_offsets.contiguous();
  const auto index = kv_q_index.contiguous();
  Shape s{q.size(0), q.size(1), k_cache.size(2), q.size(2), k_cache.size(1), tables.size(1)};
  TORCH_CHECK(k_cache.size(3) == s.head_dim, "paged_decode: head_dim differs between q and the cache");
  TORCH_CHECK(s.head_dim % kLanes == 0 && s.head_dim <= 128, "paged_decode: head_dim must be a multiple of ",
              kLanes, " up to 128");
  TORCH_CHECK(rows.size(0) == s.batch && lens.size(0) == s.batch, "paged_decode: one row and length per query");
  TORCH_CHECK(offs.size(0) == s.num_kv_heads + 1 && index.size(0) == s.num_q_heads, "paged_decode: bad head map");
  const int64_t* rp = rows.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < s.batch; ++b) {
    TORCH_CHECK(rp[b] >= 0 && rp[b] < tables.size(0), "paged_decode: table row out of range");
    TORCH_CHECK(lp[b] >= 0 && lp[b] <= s.table_width * s.block_size, "paged_decode: kv_lens beyond the table");
  }
  auto out = at::empty({s.batch, s.num_q_heads, s.head_dim}, q.options().dtype(at::kFloat));
  auto lse = at::empty({s.batch, s.num_q_heads}, q.options().dtype(at::kFloat));
  const float sc = static_cast<float>(scale);
  if (k_cache.scalar_type() == at::kFloat) {
    run<float>(qf.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(),
               tables.data_ptr<int32_t>(), rp, lp, offs.data_ptr<int64_t>(), index.data_ptr<int64_t>(), s, sc,
               window, partition_tokens, false, out.data_ptr<float>(), lse.data_ptr<float>());
  } else {
    TORCH_CHECK(k_cache.scalar_type() == at::kBFloat16, "paged_decode: cache must be float32 or bfloat16");
    run<uint16_t>(qf.data_ptr<float>(), reinterpret_cast<const uint16_t*>(k_cache.data_ptr()),
                  reinterpret_cast<const uint16_t*>(v_cache.data_ptr()), tables.data_ptr<int32_t>(), rp, lp,
                  offs.data_ptr<int64_t>(), index.data_ptr<int64_t>(), s, sc, window, partition_tokens,
                  q.scalar_type() == at::kBFloat16, out.data_ptr<float>(), lse.data_ptr<float>());
  }
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY(csps, m) {
  m.def(
      "paged_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor table_rows, "
      "Tensor kv_lens, Tensor kv_q_offsets, Tensor kv_q_index, float scale, int window, int partition_tokens) "
      "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(csps, CPU, m) { m.impl("paged_decode", &paged_decode); }