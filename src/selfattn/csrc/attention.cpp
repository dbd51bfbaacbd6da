// selfattn's native CPU kernel: FlashAttention-2's tiling, forward and backward, in float32.
//
// How it differs from the oracle (selfattn/reference.py, float64, the whole N_q x N_k matrix):
//   * Scores are made one tile at a time (query rows x BK keys) with a float32 GEMM (MKL's sgemm where torch carries
//     it; bf16 inputs on an AVX512-BF16 CPU multiply in bf16 through oneDNN's brgemm), and the softmax is online: a running row maximum m and sum l; the tile's weights rescale the output rows
//     by exp(m_old - m_new). Only O and lse = m + log(l) leave the forward.
//   * Score modifiers, the bias, the mask and dropout are applied to a row of the tile while it sits in L1, in the
//     order of the oracle: s = scale * q.k -> [additive terms] -> soft-cap -> [additive terms] -> + bias -> mask.
//     Which of them are present is a template argument (RowOps), so a call without them pays nothing.
//   * Additive ready-made modifiers (ALiBi, relative and T5 biases) depend on kv - q only: Python hands the kernel
//     one float per head and distance (`dist`, O(N)), and the backward returns its gradient per head and distance;
//     autograd carries that to slopes and tables. The kernel knows no modifier by name.
//   * Masks: plain causal is computed from positions (no mask bits). Any other mask arrives as a block table
//     (EMPTY / PARTIAL / FULL per query block x key block) and the bits of the PARTIAL tiles, made by the mask's own
//     mask_mod in Python. EMPTY tiles are never computed.
//   * Dropout regenerates the same counter-based bits as every other backend: the per-row and per-key halves of the
//     hash come from Python (score_mods.dropout_rows / dropout_cols), the per-score round is done here.
//   * Grouped-query attention folds the query heads that share a K/V head into the rows of one GEMM (K, V read once
//     per group); decoding splits the keys over the cores when there are fewer work items than cores
//     (flash-decoding) and merges the parts by log-sum-exp.
//   * Backward: parallel over (batch, K/V head, key block); each item owns its dK, dV rows (summed over the group's
//     heads) and adds its dQ share into its worker's buffer, summed at the end. Items are dealt to workers by a fixed
//     rule, so there are no atomics and the result is the same run to run at a fixed thread count.
//
// Every entry point checks what it is given (dtypes, shapes, strides, overlap) and raises rather than reading out of
// bounds; selfattn/backends/native.py validates the user's call before that.

#include <torch/extension.h>

#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#ifndef SELFATTN_ISA
#define SELFATTN_ISA "default"
#endif

#ifdef SELFATTN_MKL
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc);
int MKL_Set_Num_Threads_Local(int nt);  // the C name (lower case is the Fortran one, by pointer)
}
#endif

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int8_t kEmpty = 0, kPartial = 1, kFull = 2;  // selfattn.masks.EMPTY / PARTIAL / FULL
constexpr uint32_t kMix = 0x45D9F3Bu;                   // score_mods._MIX: the hash's multiply
constexpr uint32_t kGolden = 0x61C88647u;                // score_mods._GOLDEN: spreads consecutive counters

// Row-major C (M x N, ldc) = alpha * op(A) * op(B) + beta * C. BLAS is column-major, and a row-major matrix read
// column-major is its transpose, so this is C^T = op(B)^T op(A)^T with the operands swapped.
void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
          const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
#ifdef SELFATTN_MKL
  const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
  const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
  sgemm_(tb ? "T" : "N", ta ? "T" : "N", &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
#else
  // Without MKL (torch builds for other CPUs): plain loops, correct and slow; `selfattn info` says which is in use.
  for (int64_t i = 0; i < M; ++i) {
    float* c = C + i * ldc;
    for (int64_t j = 0; j < N; ++j) c[j] = beta == 0.f ? 0.f : beta * c[j];
    for (int64_t p = 0; p < K; ++p) {
      const float a = alpha * (ta ? A[p * lda + i] : A[i * lda + p]);
      if (tb) {
        for (int64_t j = 0; j < N; ++j) c[j] += a * B[j * ldb + p];
      } else {
        const float* b = B + p * ldb;
        for (int64_t j = 0; j < N; ++j) c[j] += a * b[j];
      }
    }
  }
#endif
}

// Few query rows (decoding: one new token per head of a group): BLAS's kernels are built for tall panels, and with
// M = 1..8 rows they spend more time packing K than multiplying (measured 3x slower than the loops below at 512
// keys). These read each key and value row once for all the rows, a dot product per (row, key) for the scores and
// an axpy per (row, key) for the output, so decoding streams the cache at memory speed.
constexpr int64_t kFewRows = 8;

// S (rows x n, lds) = Q (rows x D, contiguous) K^T, K rows ldk apart.
void few_rows_qk(int64_t rows, int64_t n, int64_t D, const float* Q, const float* K, int64_t ldk, float* S,
                 int64_t lds) {
  constexpr int64_t W = Vec::size();
  const int64_t tail = D % W, Dw = D - tail;
  for (int64_t j = 0; j < n; ++j) {
    const float* kj = K + j * ldk;
    for (int64_t r = 0; r < rows; ++r) {
      const float* qr = Q + r * D;
      Vec acc(0.f);
      for (int64_t d = 0; d < Dw; d += W) acc = at::vec::fmadd(Vec::loadu(qr + d), Vec::loadu(kj + d), acc);
      if (tail) acc = at::vec::fmadd(Vec::loadu(qr + Dw, tail), Vec::loadu(kj + Dw, tail), acc);
      S[r * lds + j] = at::vec::vec_reduce_all<float>([](Vec x, Vec y) { return x + y; }, acc);
    }
  }
}

// O (rows x Dv, contiguous) += P (rows x n, ldp) V, V rows ldv apart. The output rows stay in registers, CH vectors
// of each at a time, while the keys stream past (updating O in memory per key was store-bound, 2x slower).
template <int R, int CH>
void few_rows_pv_r(int64_t n, int64_t Dv, const float* P, int64_t ldp, const float* V, int64_t ldv, float* O) {
  constexpr int64_t W = Vec::size();
  for (int64_t d0 = 0; d0 < Dv; d0 += CH * W) {
    int64_t w[CH];
    Vec acc[CH][R];
    for (int c = 0; c < CH; ++c) {
      w[c] = std::max<int64_t>(0, std::min(W, Dv - d0 - c * W));
      for (int r = 0; r < R; ++r) acc[c][r] = w[c] ? Vec::loadu(O + r * Dv + d0 + c * W, w[c]) : Vec(0.f);
    }
    for (int64_t j = 0; j < n; ++j) {
      const float* vj = V + j * ldv + d0;
      for (int c = 0; c < CH; ++c) {
        const Vec x = Vec::loadu(vj + c * W, w[c]);
        for (int r = 0; r < R; ++r) acc[c][r] = at::vec::fmadd(Vec(P[r * ldp + j]), x, acc[c][r]);
      }
    }
    for (int c = 0; c < CH; ++c)
      for (int r = 0; r < R; ++r)
        if (w[c]) acc[c][r].store(O + r * Dv + d0 + c * W, w[c]);
  }
}

void few_rows_pv(int64_t rows, int64_t n, int64_t Dv, const float* P, int64_t ldp, const float* V, int64_t ldv,
                 float* O) {
  switch (rows) {  // two output vectors per pass for up to 4 rows: enough independent FMA chains to hide latency
    case 1: return few_rows_pv_r<1, 2>(n, Dv, P, ldp, V, ldv, O);
    case 2: return few_rows_pv_r<2, 2>(n, Dv, P, ldp, V, ldv, O);
    case 3: return few_rows_pv_r<3, 2>(n, Dv, P, ldp, V, ldv, O);
    case 4: return few_rows_pv_r<4, 2>(n, Dv, P, ldp, V, ldv, O);
    case 5: return few_rows_pv_r<5, 1>(n, Dv, P, ldp, V, ldv, O);
    case 6: return few_rows_pv_r<6, 1>(n, Dv, P, ldp, V, ldv, O);
    case 7: return few_rows_pv_r<7, 1>(n, Dv, P, ldp, V, ldv, O);
    default: return few_rows_pv_r<8, 1>(n, Dv, P, ldp, V, ldv, O);
  }
}

// MKL runs one thread per call inside our parallel region (its own threads would fight ours); restored on exit.
struct OneBlasThread {
#ifdef SELFATTN_MKL
  int saved = MKL_Set_Num_Threads_Local(1);
  ~OneBlasThread() { MKL_Set_Num_Threads_Local(saved); }
#endif
};

// What one call computes; pointers are float32 unless said, strides in elements, the last dim contiguous.
struct Params {
  int64_t B, Hq, Hkv, Nq, Nk, D, Dv;
  float scale;
  int64_t q_start, k_pos0;  // positions of query row 0 and key 0 (what mask_mod sees)
  const float *q, *k, *v;  // float32 inputs; with bf16/fp16 ones (forward only) these are null and
  const void* raw[3] = {nullptr, nullptr, nullptr};  // q, k, v are read from here, converted tile by tile
  at::ScalarType dtype = at::kFloat;
  int64_t sq[3], sk[3], sv[3];  // strides of (b, h, n)
  // mask: 0 none, 1 causal (from positions), 2 block table + bits of the partial tiles
  int mask_kind = 0;
  int64_t BQ, BK;           // the block table's tile: BQ query rows x BK keys (also the kernel's tiles)
  int64_t nqb = 0, nkb = 0;  // blocks along N_q and N_k
  const int8_t* states = nullptr;     // (nqb, nkb)
  const int32_t* bits_at = nullptr;   // (nqb, nkb): index of the tile's bits in `bits`, -1 for none
  const uint8_t* bits = nullptr;      // (P, Bm, Hm, BQ, BK)
  int64_t bits_B = 1, bits_H = 1;     // Bm, Hm: 1 when the mask does not depend on b or h
  // modifiers
  float cap = 0.f;                    // soft-cap; 0 = none
  const float* dist = nullptr;        // (Bd, Hq, L) additive term by distance kv_pos - q_pos, index d - d_min
  int64_t dist_B = 1, dist_sb = 0, dist_sh = 0, dist_L = 0, d_min = 0;  // dist's batches, strides and length
  bool dist_after_cap = true;
  const float* bias = nullptr;        // additive bias, strides (b, h, q, k); k stride 0 or 1
  int64_t sbias[4] = {0, 0, 0, 0};
  const int32_t* drop_rows = nullptr;  // (B, Hq, Nq) per-row half of the dropout hash
  const int32_t* drop_cols = nullptr;  // (Nk) per-key half
  uint32_t drop_T = 0;                 // kept when the hash >= T = round(p * 2^32)
  float drop_scale = 1.f;              // 1 / (1 - p)

  int64_t group() const { return Hq / Hkv; }
  const float* qrow(int64_t b, int64_t h, int64_t i) const { return q + b * sq[0] + h * sq[1] + i * sq[2]; }
  const float* krow(int64_t b, int64_t h, int64_t j) const { return k + b * sk[0] + h * sk[1] + j * sk[2]; }
  const float* vrow(int64_t b, int64_t h, int64_t j) const { return v + b * sv[0] + h * sv[1] + j * sv[2]; }
  int64_t q_pos(int64_t i) const { return q_start + i; }
};

// The state of tile (qb, kb) and, for causal, the keys of it that any of its rows can see: [k0, k_end).
struct Tile {
  int8_t state;
  int64_t k0, k_end;
  const uint8_t* bits;  // PARTIAL with a table: the tile's bits for (b, h) = (0, 0); see bits_for
};

Tile tile(const Params& p, int64_t qb, int64_t kb) {
  const int64_t q0 = qb * p.BQ, q1 = std::min(p.Nq, q0 + p.BQ);
  const int64_t k0 = kb * p.BK, k1 = std::min(p.Nk, k0 + p.BK);
  if (p.mask_kind == 1) {  // key j visible from row i when k_pos0 + j <= q_start + i
    const int64_t last = p.q_pos(q1 - 1) - p.k_pos0;  // last key the block's last row sees
    if (last < k0) return {kEmpty, k0, k0, nullptr};
    const int64_t end = std::min(k1, last + 1);
    const int64_t first_row_last = p.q_pos(q0) - p.k_pos0;
    return {first_row_last >= end - 1 ? kFull : kPartial, k0, end, nullptr};
  }
  if (p.mask_kind == 2) {
    const int8_t s = p.states[qb * p.nkb + kb];
    const int32_t at = p.bits_at[qb * p.nkb + kb];
    const uint8_t* bits = at >= 0 ? p.bits + static_cast<int64_t>(at) * p.bits_B * p.bits_H * p.BQ * p.BK : nullptr;
    return {s, k0, k1, bits};
  }
  return {kFull, k0, k1, nullptr};
}

inline const uint8_t* bits_for(const Params& p, const Tile& t, int64_t b, int64_t h) {
  return t.bits + ((p.bits_B > 1 ? b : 0) * p.bits_H + (p.bits_H > 1 ? h : 0)) * p.BQ * p.BK;
}

// ------------------------------------------------------------------------------------------------ one row of a tile

// tanh for the soft-cap. Scores well inside the cap (|x| = |s / cap| <= 0.75 in every lane, as a model's usually
// are) take an odd polynomial, tanh(x) = x + x t R(t) with t = x^2 and R of degree 5: our own minimax fit of the
// relative error on [0, 0.75] (1.6e-9), 0.84 ulp in float32 over 2e7 samples (tests/test_native.py checks it
// against float64 through `_tanh`). A vector with any lane beyond, or NaN, takes SLEEF's 3.5-ulp tanh, which costs
// ~3x the polynomial (ATen's Vectorized::tanh is the 1-ulp one, ~1.6x more again).
inline Vec soft_tanh(Vec x) {
  const Vec t = x * x;
  if ((t <= Vec(0.5625f)).zero_mask() == 0) {  // every lane |x| <= 0.75 (a NaN lane compares false)
    Vec r = Vec(0.00173693511f);
    r = at::vec::fmadd(r, t, Vec(-0.00765725458f));
    r = at::vec::fmadd(r, t, Vec(0.0214520339f));
    r = at::vec::fmadd(r, t, Vec(-0.0538927242f));
    r = at::vec::fmadd(r, t, Vec(0.133326948f));
    r = at::vec::fmadd(r, t, Vec(-0.333333164f));
    return at::vec::fmadd(x, t * r, x);
  }
#if defined(CPU_CAPABILITY_AVX512)
  return Vec(Sleef_tanhf16_u35(x));
#elif defined(CPU_CAPABILITY_AVX2)
  return Vec(Sleef_tanhf8_u35(x));
#else
  return x.tanh();
#endif
}

template <bool CAP, bool DIST, bool BIAS, bool DROP>
struct RowOps {
  static constexpr bool cap = CAP, dist = DIST, bias = BIAS, drop = DROP;
};

// s[0:n) = scores of row i (head h, batch b) against keys k0..k0+n: modifiers, bias, mask, in the oracle's order.
// `t` (backward with a soft-cap) receives tanh(x / cap) for dS * (1 - tanh^2).
// The additive terms of one row as modify_row and the fused pass read them: `dist` (the modifiers' term by distance, key j at
// dist[j]; before the cap or after it) and `bias` (key j at bias[j * bias_step], step 0 or 1).
struct RowTerms {
  const float* dist = nullptr;
  bool dist_after = true;
  const float* bias = nullptr;
  int64_t bias_step = 1;
};

template <class Ops>
inline RowTerms row_terms(const Params& p, int64_t b, int64_t h, int64_t i, int64_t k0) {
  RowTerms rt;
  if constexpr (Ops::dist) {  // key k0 + j is at distance kv_pos - q_pos; its term is dist[j]
    rt.dist = p.dist + b * p.dist_sb + h * p.dist_sh + (p.k_pos0 + k0 - p.q_pos(i) - p.d_min);
    rt.dist_after = p.dist_after_cap;
  }
  if constexpr (Ops::bias) {
    rt.bias = p.bias + b * p.sbias[0] + h * p.sbias[1] + i * p.sbias[2] + k0 * p.sbias[3];
    rt.bias_step = p.sbias[3];
  }
  return rt;
}

template <class Ops>
inline void modify_row(const Params& p, float* s, int64_t n, int64_t b, int64_t h, int64_t i, int64_t k0,
                       int8_t state, const uint8_t* bits_row, float* t) {
  const int64_t VN = Vec::size();
  const RowTerms rt = row_terms<Ops>(p, b, h, i, k0);
  // the scale after the product, as the naive computation rounds it (scaling Q first was measured 3x less exact)
  const Vec sc(p.scale);
  at::vec::map([sc](Vec x) { return x * sc; }, s, s, n);
  if constexpr (Ops::dist) {
    if (!rt.dist_after) at::vec::map2([](Vec x, Vec y) { return x + y; }, s, s, rt.dist, n);
  }
  if constexpr (Ops::cap) {
    const Vec inv(1.f / p.cap), c(p.cap);
    int64_t j = 0;
    for (; j + VN <= n; j += VN) {
      Vec th = soft_tanh(Vec::loadu(s + j) * inv);
      if (t) th.store(t + j);
      (th * c).store(s + j);
    }
    if (j < n) {
      Vec th = soft_tanh(Vec::loadu(s + j, n - j) * inv);
      if (t) th.store(t + j, n - j);
      (th * c).store(s + j, n - j);
    }
  }
  if constexpr (Ops::dist) {
    if (rt.dist_after) at::vec::map2([](Vec x, Vec y) { return x + y; }, s, s, rt.dist, n);
  }
  if constexpr (Ops::bias) {
    if (rt.bias_step == 1) {
      at::vec::map2([](Vec x, Vec y) { return x + y; }, s, s, rt.bias, n);
    } else {
      const float add = rt.bias[0];
      at::vec::map([add](Vec x) { return x + Vec(add); }, s, s, n);
    }
  }
  if (state == kPartial) {
    if (p.mask_kind == 1) {
      const int64_t last = p.q_pos(i) - p.k_pos0 - k0;  // last visible key of this row, relative to k0
      for (int64_t j = std::max<int64_t>(0, last + 1); j < n; ++j) s[j] = kNegInf;
    } else {
      for (int64_t j = 0; j < n; ++j) s[j] = bits_row[j] ? s[j] : kNegInf;
    }
  }
}

// The dropout round for row i: w[j] *= keep ? 1/(1-p) : 0 (the bits of score_mods.dropout_kept).
inline void drop_row(const Params& p, float* w, int64_t n, int64_t b, int64_t h, int64_t i, int64_t k0) {
  const uint32_t row = static_cast<uint32_t>(p.drop_rows[(b * p.Hq + h) * p.Nq + i]);
  const int32_t* cols = p.drop_cols + k0;
  const uint32_t T = p.drop_T;
  const float ds = p.drop_scale;
  // the hash on int32 lanes: a multiply keeps the low 32 bits as uint32's does, >> 16 & 0xffff is the logical shift,
  // and x >= T unsigned is (x ^ 2^31) >= (T ^ 2^31) signed (gcc left the scalar loop unvectorized for AVX2)
  using VI = at::vec::Vectorized<int32_t>;
  static_assert(VI::size() == Vec::size(), "int32 and float lanes must pair up");
  constexpr int64_t W = Vec::size();
  const VI vrow(static_cast<int32_t>(row)), mix(static_cast<int32_t>(kMix)), sixteen(16), low(0xffff);
  const VI flip(std::numeric_limits<int32_t>::min()), vT(static_cast<int32_t>(T ^ 0x80000000u));
  const Vec vds(ds), zero(0.f);
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    VI x = (vrow ^ VI::loadu(cols + j)) * mix;
    x = x ^ ((x >> sixteen) & low);
    const Vec keep = at::vec::cast<float>((x ^ flip) >= vT);
    Vec::blendv(zero, Vec::loadu(w + j) * vds, keep).store(w + j);
  }
  for (; j < n; ++j) {
    uint32_t x = (row ^ static_cast<uint32_t>(cols[j])) * kMix;
    x ^= x >> 16;
    w[j] = x >= T ? w[j] * ds : 0.f;
  }
}

// ------------------------------------------------------------------------------------------------------ scheduling

// Runs work(item, slot) for items 0..n over the cores. Items are dealt to workers by cost, largest first, each to
// the least loaded worker (causal items differ in cost): a fixed deal, so a worker's sums (its dQ share) are the same
// run to run at a fixed thread count. `slot` < slots() is the worker's index, for its own buffers.
int64_t slots() { return std::max<int64_t>(1, at::get_num_threads()); }

// Below this many multiply-adds a call runs on the calling thread: waking the other cores costs more (decoding
// against a short cache). Measured on 2 cores (AMD EPYC, AVX-512): one query against 8 heads x 64 keys (65k) took
// 5.9 us on two threads against 6.5 on one, 8 x 32 keys (33k) 5.0 against 4.9; 2^18, the value before, kept a
// 128-key step (131k) on one thread at 10.4 us where two take 7.7.
constexpr int64_t kSerialWork = int64_t(1) << 16;

// Each worker thread's scratch floats, kept between calls: a call's tile buffers (up to a few MiB) are not allocated
// and faulted in again per call, which cost small calls (N = 128) 5-10 %. Grown with NaN, never zeros, so that a read
// of scratch the kernel did not write first shows as NaN in the tests instead of passing on fresh zeros.
inline float* scratch(int64_t n) {
  thread_local std::vector<float> buf;
  if (static_cast<int64_t>(buf.size()) < n) {
    buf.clear();
    buf.shrink_to_fit();
    buf.assign(n, std::numeric_limits<float>::quiet_NaN());
  }
  return buf.data();
}

template <class F>
void run_items(const std::vector<int64_t>& cost, int64_t work_macs, F&& work) {
  const int64_t n = static_cast<int64_t>(cost.size());
  if (n == 0) return;
  std::vector<int64_t> order(n);
  for (int64_t i = 0; i < n; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return cost[a] > cost[b]; });
  const int64_t workers = std::min(slots(), n);
  if (work_macs < kSerialWork || workers == 1) {
    OneBlasThread one;
    for (int64_t it : order) work(it, 0);
    return;
  }
  std::vector<std::vector<int64_t>> deal(workers);
  std::vector<int64_t> load(workers, 0);
  for (int64_t it : order) {
    const int64_t w = std::min_element(load.begin(), load.end()) - load.begin();
    deal[w].push_back(it);
    load[w] += std::max<int64_t>(cost[it], 1);
  }
  at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
    OneBlasThread one;
    for (int64_t w = w0; w < w1; ++w)
      for (int64_t it : deal[w]) work(it, w);
  });
}

// ---------------------------------------------------------------------------------------------------------- forward

// bf16 / fp16 inputs (the forward): n rows of w values, `ld` elements apart, converted to float32 rows w apart.
// Converting the tile the kernel is about to read keeps it in cache and costs no copy of the whole K and V (a
// decoding step in bf16 would otherwise convert the cache on every call).
template <class T>
void rows_to_float(const T* src, int64_t ld, int64_t n, int64_t w, float* dst) {
  using VT = at::vec::Vectorized<T>;
  for (int64_t r = 0; r < n; ++r) {
    const T* a = src + r * ld;
    float* o = dst + r * w;
    int64_t j = 0;
    for (; j + VT::size() <= w; j += VT::size()) {
      auto [lo, hi] = at::vec::convert_to_float<T>(VT::loadu(a + j));
      lo.store(o + j);
      hi.store(o + j + Vec::size());
    }
    for (; j < w; ++j) o[j] = static_cast<float>(a[j]);
  }
}

// Rows [j0, j0 + n) of k (which = 1) or v (2) for (b, h): a pointer into the float32 input, or the rows converted into
// `tmp`; `ld` receives their stride.
const float* input_rows(const Params& p, int which, int64_t b, int64_t h, int64_t j0, int64_t n, int64_t w,
                        float* tmp, int64_t& ld) {
  const int64_t* st = which == 0 ? p.sq : which == 1 ? p.sk : p.sv;
  if (p.dtype == at::kFloat) {
    ld = st[2];
    return (which == 0 ? p.q : which == 1 ? p.k : p.v) + b * st[0] + h * st[1] + j0 * st[2];
  }
  const int64_t off = b * st[0] + h * st[1] + j0 * st[2];
  if (p.dtype == at::kBFloat16)
    rows_to_float(static_cast<const c10::BFloat16*>(p.raw[which]) + off, st[2], n, w, tmp);
  else
    rows_to_float(static_cast<const c10::Half*>(p.raw[which]) + off, st[2], n, w, tmp);
  ld = w;
  return tmp;
}

// The forward's row pass, fused as torch's CPU kernel fuses it: s *= scale with the row maximum in one pass, and
// s = exp(s - m) with the row sum in another (four passes before). exp is SLEEF's 1-ulp one (Vectorized::exp), not
// ATen's faster exp_u20 polynomial that torch's own kernel uses: exp_u20(0) is not 1, so a row's lse was off by up
// to 4.4 eps, and the backward's P = exp(S - lse) carried it past the 3x rule (found by make fuzz: one key, dV).
// s = the modified scores of one row (modify_row's ops in its order, for keys [0, n)) with the row maximum, in one
// pass: x * scale, + dist (before the cap), cap * tanh(x / cap), + dist (after it), + bias.
template <class Ops>
inline float scale_max(float* s, int64_t n, float scale, float cap, const RowTerms& rt) {
  constexpr int64_t W = Vec::size();
  const Vec sc(scale), inv(Ops::cap ? 1.f / cap : 1.f), c(cap);
  const float b0 = Ops::bias ? rt.bias[0] : 0.f;
  auto f = [&](Vec x, int64_t j, int64_t m) {
    auto load = [m](const float* a) { return m == W ? Vec::loadu(a) : Vec::loadu(a, m); };
    x = x * sc;
    if constexpr (Ops::dist) if (!rt.dist_after) x = x + load(rt.dist + j);
    if constexpr (Ops::cap) x = soft_tanh(x * inv) * c;
    if constexpr (Ops::dist) if (rt.dist_after) x = x + load(rt.dist + j);
    if constexpr (Ops::bias) x = x + (rt.bias_step ? load(rt.bias + j) : Vec(b0));
    return x;
  };
  Vec mx(kNegInf);
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    const Vec x = f(Vec::loadu(s + j), j, W);
    x.store(s + j);
    mx = at::vec::maximum(mx, x);
  }
  if (j < n) {
    const Vec x = f(Vec::loadu(s + j, n - j), j, n - j);
    x.store(s + j, n - j);
    mx = at::vec::maximum(mx, Vec::set(Vec(kNegInf), x, n - j));
  }
  return at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return at::vec::maximum(a, b); }, mx);
}

inline float exp_sum(float* s, int64_t n, float m) {
  constexpr int64_t W = Vec::size();
  const Vec mv(m);
  Vec acc(0.f);
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    const Vec e = (Vec::loadu(s + j) - mv).exp();
    e.store(s + j);
    acc = acc + e;
  }
  if (j < n) {
    const Vec e = (Vec::loadu(s + j, n - j) - mv).exp();
    e.store(s + j, n - j);
    acc = acc + Vec::set(Vec(0.f), e, n - j);
  }
  return at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return a + b; }, acc);
}

// ------------------------------------------------------------------------------ bf16 dot products (AVX512-BF16)

// On a CPU with AVX512-BF16 a bf16 forward multiplies in bf16 with float32 sums: oneDNN's brgemm micro-kernel
// through ATen (at::native::cpublas::brgemm), 1.6-2x MKL's sgemm on the tile shapes measured. Its B operand is in
// VNNI-2 layout: element (k, n) at ((k / 2) * N + n) * 2 + k % 2, so the pairs of the reduction dimension sit in
// one 32-bit word. The operands are packed per tile with zero padding: rows to a multiple of 16, keys to 32 (a
// bounded set of shapes, each JIT-compiled once per thread), the reduction to even. P is rounded to bf16 before
// P V, as a bf16 computation rounds it. The AVX2 and default builds, AMX CPUs (oneDNN's AMX layout is not this one
// and no AMX machine was at hand to test it) and a failed self-test keep the float32 path (`selfattn info` says
// which).
constexpr int64_t kPadRows = 16, kPadKeys = 32;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

struct Bf16Dot {
  bool ok = false;
  std::string why;
};

// K rows (n x D, `ld` apart) -> B = K^T (D2 x np) in VNNI-2: word (d / 2, j) holds K[j][d], K[j][d + 1].
inline void pack_kt(const uint16_t* K, int64_t ld, int64_t n, int64_t D, int64_t np, uint32_t* out) {
  const int64_t pairs = (D + 1) / 2, full = D / 2;
#if defined(CPU_CAPABILITY_AVX512)
  const bool words = ld % 2 == 0 && D % 2 == 0;  // rows of whole words: ATen's 16 x 16 register transpose
#else
  const bool words = false;
#endif
  if (words) {  // moves only, no arithmetic: the bits of every pair arrive as they left
    at::vec::transpose_mxn<float>(reinterpret_cast<const float*>(K), ld / 2, reinterpret_cast<float*>(out), np,
                                  static_cast<int>(n), static_cast<int>(full));
  } else {
    for (int64_t j = 0; j < n; ++j) {
      const uint16_t* row = K + j * ld;
      for (int64_t pp = 0; pp < full; ++pp) {
        uint32_t w;
        std::memcpy(&w, row + 2 * pp, 4);
        out[pp * np + j] = w;
      }
      if (full < pairs) out[full * np + j] = row[D - 1];
    }
  }
  if (np > n)
    for (int64_t pp = 0; pp < pairs; ++pp) std::fill(out + pp * np + n, out + (pp + 1) * np, 0u);
}

// V rows (n x Dv, `ld` apart) -> B = V (np x Dv) in VNNI-2: word (j / 2, c) holds V[j][c], V[j + 1][c].
inline void pack_v(const uint16_t* V, int64_t ld, int64_t n, int64_t Dv, int64_t np, uint32_t* out) {
  for (int64_t j = 0; j < np; j += 2) {
    uint32_t* o = out + (j / 2) * Dv;
    if (j + 1 < n) {
      const uint16_t *a = V + j * ld, *b = a + ld;
      for (int64_t c = 0; c < Dv; ++c) o[c] = uint32_t(a[c]) | (uint32_t(b[c]) << 16);
    } else if (j < n) {
      const uint16_t* a = V + j * ld;
      for (int64_t c = 0; c < Dv; ++c) o[c] = a[c];
    } else {
      std::fill(o, o + Dv, 0u);
    }
  }
}

// Row j0 of q (which = 0), k (1) or v (2) at (b, h), as the raw 16-bit values of a bf16 input.
inline const uint16_t* raw_rows(const Params& p, int which, int64_t b, int64_t h, int64_t j0) {
  const int64_t* st = which == 0 ? p.sq : which == 1 ? p.sk : p.sv;
  return static_cast<const uint16_t*>(p.raw[which]) + b * st[0] + h * st[1] + j0 * st[2];
}

// C (M x N, ldc) (+)= A (M x K bf16, lda) B (VNNI-2, K x N).
inline void bf16_gemm(int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda, const uint32_t* B, float* C,
                      int64_t ldc, bool add) {
  at::native::cpublas::brgemm(M, N, K, lda, N, ldc, add, reinterpret_cast<const at::BFloat16*>(A),
                              reinterpret_cast<const at::BFloat16*>(B), C, /*is_vnni=*/true);
}

// Whether the bf16 path runs here, checked once: built for AVX-512, the CPU has AVX512-BF16 and no AMX, and oneDNN's
// brgemm gives the exact products of small integers on the shapes the kernel uses (odd reduction, odd N, 512 keys).
const Bf16Dot& bf16_dot() {
  static const Bf16Dot state = [] {
    Bf16Dot s;
#if defined(CPU_CAPABILITY_AVX512) && defined(__GNUC__)
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx512bf16")) {
      s.why = "this CPU has no AVX512-BF16";
      return s;
    }
    if (__builtin_cpu_supports("amx-bf16")) {
      s.why = "AMX CPU: oneDNN's AMX operand layout is untested here";
      return s;
    }
    try {
      for (auto [M, K, N] : {std::array<int64_t, 3>{16, 30, 59}, std::array<int64_t, 3>{32, 64, 512}}) {
        const int64_t K2 = round_up(K, 2);
        std::vector<uint16_t> A(M * K2), Bt(N * K2);
        std::vector<float> a(M * K), b(N * K), C(M * N, 0.f);
        for (int64_t i = 0; i < M * K; ++i) a[i] = float(int((i * 7 + 3) % 9) - 4);
        for (int64_t i = 0; i < N * K; ++i) b[i] = float(int((i * 5 + 1) % 7) - 3);
        for (int64_t i = 0; i < M; ++i)
          for (int64_t k = 0; k < K; ++k) A[i * K2 + k] = c10::BFloat16(a[i * K + k]).x;
        for (int64_t j = 0; j < N; ++j)
          for (int64_t k = 0; k < K; ++k) Bt[j * K2 + k] = c10::BFloat16(b[j * K + k]).x;
        std::vector<uint32_t> Bv(K2 / 2 * N);
        pack_kt(Bt.data(), K2, N, K2, N, Bv.data());
        bf16_gemm(M, N, K2, A.data(), K2, Bv.data(), C.data(), N, false);
        at::native::cpublas::brgemm_release(true);
        for (int64_t i = 0; i < M; ++i)
          for (int64_t j = 0; j < N; ++j) {
            float want = 0.f;
            for (int64_t k = 0; k < K; ++k) want += a[i * K + k] * b[j * K + k];
            if (C[i * N + j] != want) {
              s.why = "oneDNN's bf16 brgemm failed its self-test";
              return s;
            }
          }
      }
    } catch (const c10::Error& e) {  // e.g. ONEDNN_MAX_CPU_ISA below AVX-512, or oneDNN disabled
      s.why = std::string("oneDNN's bf16 brgemm is unavailable: ") + e.what_without_backtrace();
      return s;
    } catch (const std::exception& e) {
      s.why = std::string("oneDNN's bf16 brgemm is unavailable: ") + e.what();
      return s;
    }
    s.ok = true;
#else
    s.why = "built without AVX-512";
#endif
    return s;
  }();
  return state;
}

struct Forward {
  const Params& p;
  int64_t fold;    // query heads folded into one item's rows (the group when the mask ignores h, else 1)
  int64_t splits;  // key ranges per item (flash-decoding); > 1 writes parts to be merged
  float* out;      // (B, Hq, Nq, Dv) contiguous
  float* lse;      // (B, Hq, Nq)
  float* part_o;   // (splits, B, Hq, Nq, Dv) when splits > 1
  float* part_m;   // (splits, B, Hq, Nq): row maximum
  float* part_l;   // (splits, B, Hq, Nq): row sum
  const float* sinks = nullptr;  // (Hq) per-head sink logits, or none
  bool dot16 = false;  // bf16 inputs multiplied in bf16 (bf16_dot()) on tiles of more than kFewRows rows

  int64_t heads_per_b() const { return p.Hq / fold; }
  int64_t items() const { return p.B * heads_per_b() * p.nqb * splits; }

  template <class Ops>
  void item(int64_t it) const {
    const int64_t sp = it % splits, qb = (it / splits) % p.nqb, hg = (it / splits / p.nqb) % heads_per_b();
    const int64_t b = it / splits / p.nqb / heads_per_b();
    const int64_t h0 = hg * fold, hk = h0 / p.group();
    const int64_t q0 = qb * p.BQ, nr = std::min(p.Nq, q0 + p.BQ) - q0, rows = fold * nr;
    const int64_t kb0 = sp * p.nkb / splits, kb1 = (sp + 1) * p.nkb / splits;
    const int64_t D = p.D, Dv = p.Dv, BK = p.BK;
    const bool half = p.dtype != at::kFloat, d16 = dot16 && rows > kFewRows;
    // with bf16 products: rows padded to R, keys to NP, the reduction to D2; the bf16 operands after the floats
    const int64_t R = d16 ? round_up(rows, kPadRows) : rows, NP = round_up(BK, kPadKeys), D2 = round_up(D, 2);
    const int64_t floats = R * (D + Dv + BK + 2) + (half && !d16 ? BK * (D + Dv) : 0);
    const int64_t words = d16 ? R * D2 / 2 + D2 / 2 * NP + R * NP / 2 + NP / 2 * Dv : 0;  // 32-bit words
    float* const buf = scratch(floats + words + 16);
    float *Q = buf, *O = Q + R * D, *S = O + R * Dv, *m = S + R * BK, *l = m + R;
    float *Kt = l + R, *Vt = Kt + BK * D;  // converted K and V tiles (bf16 / fp16 inputs)
    uint32_t* w16 = reinterpret_cast<uint32_t*>(buf + round_up(floats, 16));  // 64 bytes past the floats
    uint16_t *Qb = reinterpret_cast<uint16_t*>(w16), *Pb = Qb + R * D2;   // R x D2, R x NP (bf16)
    uint32_t *Kv = w16 + (R * D2 + R * NP) / 2, *Vv = Kv + D2 / 2 * NP;     // packed K^T and V tiles
    for (int64_t r = 0; r < rows; ++r) {  // Q rows of the folded heads, side by side for one GEMM
      if (d16) {
        const int64_t h = h0 + r / nr, i = q0 + r % nr;
        const uint16_t* src = raw_rows(p, 0, b, h, i);
        std::copy(src, src + D, Qb + r * D2);
        if (D2 > D) Qb[r * D2 + D] = 0;
      } else {
        int64_t ld;
        const float* src = input_rows(p, 0, b, h0 + r / nr, q0 + r % nr, 1, D, Q + r * D, ld);
        if (src != Q + r * D) std::copy(src, src + D, Q + r * D);
      }
      m[r] = kNegInf;
      l[r] = 0.f;
    }
    if (d16) {  // padding rows: zero Q (their scores are ignored) and zero P (their output rows stay zero)
      std::fill(Qb + rows * D2, Qb + R * D2, uint16_t(0));
      std::fill(Pb + rows * NP, Pb + R * NP, uint16_t(0));
    }
    std::fill(O, O + R * Dv, 0.f);
    for (int64_t kb = kb0; kb < kb1; ++kb) {
      const Tile t = tile(p, qb, kb);
      if (t.state == kEmpty) continue;
      const int64_t n = t.k_end - t.k0, np = round_up(n, kPadKeys);
      int64_t ldk, ldv;
      if (d16) {  // S = Q K^T in bf16 products
        pack_kt(raw_rows(p, 1, b, hk, t.k0), p.sk[2], n, D, np, Kv);
        bf16_gemm(R, np, D2, Qb, D2, Kv, S, BK, false);
      } else {
        const float* K = input_rows(p, 1, b, hk, t.k0, n, D, Kt, ldk);
        if (rows <= kFewRows)  // S = Q K^T
          few_rows_qk(rows, n, D, Q, K, ldk, S, BK);
        else
          gemm(false, true, rows, n, D, 1.f, Q, D, K, ldk, 0.f, S, BK);
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t h = h0 + r / nr, i = q0 + r % nr;
        float* s = S + r * BK;
        const uint8_t* bits = t.bits ? bits_for(p, t, b, h) + (i - q0) * p.BK : nullptr;
        float mx;
        if (t.state != kPartial || p.mask_kind == 1) {  // no mask bits: one pass over the keys the row sees
          int64_t nv = n;  // (causal or not), the rest -inf
          if (t.state == kPartial) nv = std::clamp<int64_t>(p.q_pos(i) - p.k_pos0 - t.k0 + 1, 0, n);
          mx = nv > 0 ? scale_max<Ops>(s, nv, p.scale, p.cap, row_terms<Ops>(p, b, h, i, t.k0)) : kNegInf;
          std::fill(s + nv, s + n, kNegInf);
        } else {
          modify_row<Ops>(p, s, n, b, h, i, t.k0, t.state, bits, nullptr);
          mx = at::vec::reduce_all<float>([](Vec x, Vec y) { return at::vec::maximum(x, y); }, s, n);
        }
        if (std::isnan(mx)) {  // NaN scores: the maximum of the others, as torch's kernel takes it (a row of NaN
          mx = kNegInf;        // scores reads as fully masked, a row with some makes NaN weights: SDPA's results)
          for (int64_t j = 0; j < n; ++j) mx = s[j] > mx ? s[j] : mx;
        }
        const float m_new = std::max(m[r], mx);
        if (m_new == kNegInf) {  // nothing visible yet in this row: weights 0, state unchanged
          std::fill(s, s + n, 0.f);
          continue;
        }
        const float sum = exp_sum(s, n, m_new);
        const float alpha = m[r] == kNegInf ? 0.f : std::exp(m[r] - m_new);
        l[r] = l[r] * alpha + sum;
        m[r] = m_new;
        if (alpha != 1.f) at::vec::map([alpha](Vec x) { return x * Vec(alpha); }, O + r * Dv, O + r * Dv, Dv);
        if constexpr (Ops::drop) drop_row(p, s, n, b, h, i, t.k0);
      }
      if (d16) {  // O += P V: P rounded to bf16 as a bf16 computation rounds it
        for (int64_t r = 0; r < rows; ++r) {
          at::vec::convert(S + r * BK, reinterpret_cast<c10::BFloat16*>(Pb + r * NP), n);
          std::fill(Pb + r * NP + n, Pb + r * NP + np, uint16_t(0));
        }
        pack_v(raw_rows(p, 2, b, hk, t.k0), p.sv[2], n, Dv, np, Vv);
        bf16_gemm(R, Dv, np, Pb, NP, Vv, O, Dv, true);
        continue;
      }
      const float* V = input_rows(p, 2, b, hk, t.k0, n, Dv, Vt, ldv);
      if (rows <= kFewRows)  // O += P V
        few_rows_pv(rows, n, Dv, S, BK, V, ldv, O);
      else
        gemm(false, false, rows, Dv, n, 1.f, S, BK, V, ldv, 1.f, O, Dv);
    }
    if (d16) at::native::cpublas::brgemm_release(true);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t h = h0 + r / nr, i = q0 + r % nr, row = (b * p.Hq + h) * p.Nq + i;
      if (splits > 1) {
        const int64_t at = sp * p.B * p.Hq * p.Nq + row;
        std::copy(O + r * Dv, O + (r + 1) * Dv, part_o + at * Dv);
        part_m[at] = m[r];
        part_l[at] = l[r];
        continue;
      }
      finish(out + row * Dv, lse + row, O + r * Dv, m[r], l[r], h);
    }
  }

  // A row's output and lse from its unnormalised sum O, maximum M and sum L; a head's sink joins the denominator
  // as score_mods.add_sinks does it: L' = logaddexp(L, sink), out = O / L * exp(L - L') = O / L * sigmoid(L - sink).
  // A row that saw no key (L = 0) gets zeros and lse = -inf, or the sink.
  void finish(float* o, float* lse_row, const float* O, float M, float L, int64_t h) const {
    const float L_row = L == 0.f ? kNegInf : M + std::log(L);
    float keep = 1.f, lse_ = L_row;
    if (sinks) {
      const float s = sinks[h];
      keep = 1.f / (1.f + std::exp(s - L_row));
      lse_ = L_row == kNegInf ? s : s == kNegInf ? L_row : L_row == s ? L_row + std::log(2.f)
                                 : std::max(L_row, s) + std::log1p(std::exp(-std::abs(L_row - s)));
    }
    *lse_row = lse_;
    if (L == 0.f) {
      std::fill(o, o + p.Dv, 0.f);
      return;
    }
    const float inv = keep / L;
    at::vec::map([inv](Vec x) { return x * Vec(inv); }, o, O, p.Dv);
  }

  // splits > 1: out = sum_s exp(m_s - M) O_s / sum_s exp(m_s - M) l_s, row by row
  void merge() const {
    const int64_t R = p.B * p.Hq * p.Nq, Dv = p.Dv;
    at::parallel_for(0, R, 256, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        float M = kNegInf;
        for (int64_t s = 0; s < splits; ++s) M = std::max(M, part_m[s * R + r]);
        float* o = out + r * Dv;
        std::fill(o, o + Dv, 0.f);
        float L = 0.f;
        for (int64_t s = 0; M != kNegInf && s < splits; ++s) {
          const float ms = part_m[s * R + r];
          if (ms == kNegInf) continue;
          const float w = std::exp(ms - M);
          L += w * part_l[s * R + r];
          const float* os = part_o + (s * R + r) * Dv;
          for (int64_t d = 0; d < Dv; ++d) o[d] += w * os[d];
        }
        finish(o, lse + r, o, M, L, (r / p.Nq) % p.Hq);
      }
    });
  }

  template <class Ops>
  void run() const {
    std::vector<int64_t> cost(items());
    for (int64_t it = 0; it < items(); ++it) {
      const int64_t sp = it % splits, qb = (it / splits) % p.nqb;
      int64_t c = 0;
      for (int64_t kb = sp * p.nkb / splits; kb < (sp + 1) * p.nkb / splits; ++kb) {
        const Tile t = tile(p, qb, kb);
        c += t.state == kEmpty ? 0 : t.k_end - t.k0;
      }
      cost[it] = c;
    }
    int64_t keys = 0;
    for (int64_t c : cost) keys += c;
    run_items(cost, keys * p.BQ * fold * (p.D + p.Dv), [&](int64_t it, int64_t) { item<Ops>(it); });
    if (splits > 1) merge();
  }
};

// --------------------------------------------------------------------------------------------------------- backward

struct Backward {
  const Params& p;
  const float *out, *dout, *lse, *delta;  // (B, Hq, Nq, Dv), (B, Hq, Nq, Dv), (B, Hq, Nq), (B, Hq, Nq)
  float *dq_slots;                        // (slots, B, Hq, Nq, D): each worker's dQ share
  float *dk, *dv;                         // (B, Hkv, Nk, D), (B, Hkv, Nk, Dv)
  float *ddist_slots;                     // (slots, Bd, Hq, L) or null
  int64_t Bd = 1;

  int64_t items() const { return p.B * p.Hkv * p.nkb; }

  template <class Ops>
  void item(int64_t it, int64_t slot) const {
    const int64_t kb = it % p.nkb, hk = (it / p.nkb) % p.Hkv, b = it / p.nkb / p.Hkv;
    const int64_t D = p.D, Dv = p.Dv, BQ = p.BQ, BK = p.BK, g = p.group();
    const int64_t k0 = kb * BK, nk = std::min(p.Nk, k0 + BK) - k0;
    float *dK = scratch(nk * (D + Dv) + 3 * BQ * BK + BQ * (Ops::cap ? BK : 0)), *dV = dK + nk * D;
    float *S = dV + nk * Dv, *W = S + BQ * BK;
    float *dP = W + BQ * BK, *T = dP + BQ * BK;
    std::fill(dK, dK + nk * (D + Dv), 0.f);
    float* dq = dq_slots + slot * p.B * p.Hq * p.Nq * D;
    float* ddist = ddist_slots ? ddist_slots + slot * Bd * p.Hq * p.dist_L : nullptr;
    const float* K = p.krow(b, hk, k0);
    const float* V = p.vrow(b, hk, k0);
    for (int64_t h = hk * g; h < (hk + 1) * g; ++h) {
      for (int64_t qb = 0; qb < p.nqb; ++qb) {
        const Tile t = tile(p, qb, kb);
        if (t.state == kEmpty) continue;
        const int64_t n = t.k_end - t.k0;  // keys of this block some row sees (causal trims the tail)
        const int64_t q0 = qb * BQ, nr = std::min(p.Nq, q0 + BQ) - q0;
        const int64_t row0 = (b * p.Hq + h) * p.Nq + q0;
        const float* Q = p.qrow(b, h, q0);
        gemm(false, true, nr, n, D, 1.f, Q, p.sq[2], K, p.sk[2], 0.f, S, BK);
        for (int64_t r = 0; r < nr; ++r) {  // P = exp(S - lse) with the final lse; W = P * dropout
          const int64_t i = q0 + r;
          float* s = S + r * BK;
          const uint8_t* bits = t.bits ? bits_for(p, t, b, h) + r * BK : nullptr;
          modify_row<Ops>(p, s, n, b, h, i, k0, t.state, bits, Ops::cap ? T + r * BK : nullptr);
          const float L = lse[row0 + r];
          if (L == kNegInf) {
            std::fill(s, s + n, 0.f);
          } else {
            const Vec lv(L);
            at::vec::map([lv](Vec x) { return (x - lv).exp(); }, s, s, n);
          }
          if constexpr (Ops::drop) {  // without dropout W is P itself
            float* w = W + r * BK;
            std::copy(s, s + n, w);
            drop_row(p, w, n, b, h, i, k0);
          }
        }
        const float* Wt = Ops::drop ? W : S;
        const float* dO = dout + row0 * Dv;
        gemm(true, false, n, Dv, nr, 1.f, Wt, BK, dO, Dv, 1.f, dV, Dv);    // dV += W^T dO
        gemm(false, true, nr, n, Dv, 1.f, dO, Dv, V, p.sv[2], 0.f, dP, BK);  // dP = dO V^T
        for (int64_t r = 0; r < nr; ++r) {  // dS = W * dP - P * delta, then back through the modifiers
          const int64_t i = q0 + r;
          float *s = S + r * BK, *dp = dP + r * BK;
          const float* w = Wt + r * BK;
          const Vec dl(delta[row0 + r]);
          at::vec::map3([dl](Vec pp, Vec ww, Vec gg) { return ww * gg - pp * dl; }, dp, s, w, dp, n);
          float* dd = nullptr;
          if constexpr (Ops::dist) {
            if (ddist) {  // (null: the table's gradient is not wanted)
              dd = ddist + ((p.dist_B > 1 ? b : 0) * p.Hq + h) * p.dist_L + (p.k_pos0 + k0 - p.q_pos(i) - p.d_min);
              if (p.dist_after_cap) at::vec::map2([](Vec x, Vec y) { return x + y; }, dd, dd, dp, n);
            }
          }
          if constexpr (Ops::cap) {
            at::vec::map2([](Vec g_, Vec th) { return g_ * (Vec(1.f) - th * th); }, dp, dp, T + r * BK, n);
          }
          if constexpr (Ops::dist) {
            if (dd && !p.dist_after_cap) at::vec::map2([](Vec x, Vec y) { return x + y; }, dd, dd, dp, n);
          }
        }
        gemm(false, false, nr, D, n, 1.f, dP, BK, K, p.sk[2], 1.f, dq + row0 * D, D);  // dQ += dS K (x scale at the end)
        gemm(true, false, n, D, nr, 1.f, dP, BK, Q, p.sq[2], 1.f, dK, D);            // dK += dS^T Q (x scale below)
      }
    }
    for (int64_t j = 0; j < nk; ++j) {
      const int64_t at = (b * p.Hkv + hk) * p.Nk + k0 + j;
      const float sc = p.scale;
      at::vec::map([sc](Vec x) { return x * Vec(sc); }, dk + at * D, dK + j * D, D);
      std::copy(dV + j * Dv, dV + (j + 1) * Dv, dv + at * Dv);
    }
  }

  template <class Ops>
  void run() const {
    std::vector<int64_t> cost(items());
    for (int64_t it = 0; it < items(); ++it) {
      const int64_t kb = it % p.nkb;
      int64_t c = 0;
      for (int64_t qb = 0; qb < p.nqb; ++qb) c += tile(p, qb, kb).state != kEmpty;
      cost[it] = c;
    }
    int64_t tiles = 0;
    for (int64_t c : cost) tiles += c;
    run_items(cost, tiles * p.group() * p.BQ * p.BK * (2 * p.D + 2 * p.Dv),
              [&](int64_t it, int64_t slot) { item<Ops>(it, slot); });
  }
};

// One template instance per combination of modifiers, chosen once per call.
template <class F>
void with_ops(const Params& p, F&& f) {
  const bool cap = p.cap > 0.f, dist = p.dist != nullptr, bias = p.bias != nullptr, drop = p.drop_rows != nullptr;
  auto go = [&](auto ops) { f(ops); };
#define SELFATTN_OPS(C, DI, BI, DR) \
  if (cap == C && dist == DI && bias == BI && drop == DR) return go(RowOps<C, DI, BI, DR>{});
  SELFATTN_OPS(false, false, false, false) SELFATTN_OPS(true, false, false, false)
  SELFATTN_OPS(false, true, false, false) SELFATTN_OPS(true, true, false, false)
  SELFATTN_OPS(false, false, true, false) SELFATTN_OPS(true, false, true, false)
  SELFATTN_OPS(false, true, true, false) SELFATTN_OPS(true, true, true, false)
  SELFATTN_OPS(false, false, false, true) SELFATTN_OPS(true, false, false, true)
  SELFATTN_OPS(false, true, false, true) SELFATTN_OPS(true, true, false, true)
  SELFATTN_OPS(false, false, true, true) SELFATTN_OPS(true, false, true, true)
  SELFATTN_OPS(false, true, true, true) SELFATTN_OPS(true, true, true, true)
#undef SELFATTN_OPS
}

// --------------------------------------------------------------------------------------------- checks and bindings

void check_f32(const at::Tensor& t, const char* name, std::initializer_list<int64_t> shape, bool half_ok = false) {
  const auto st = t.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || (half_ok && (st == at::kBFloat16 || st == at::kHalf)), "selfattn native: ",
                   name, " must be float32", half_ok ? " (or bf16 / fp16, as q)" : "", ", got ", st);
  TORCH_CHECK_VALUE(t.device().is_cpu(), "selfattn native: ", name, " must be on the CPU");
  TORCH_CHECK_VALUE(t.dim() == static_cast<int64_t>(shape.size()), "selfattn native: ", name, " must have ",
                    shape.size(), " dims, got ", t.sizes());
  int64_t d = 0;
  for (int64_t s : shape) {
    TORCH_CHECK_VALUE(s < 0 || t.size(d) == s, "selfattn native: ", name, " has shape ", t.sizes(),
                      ", expected size ", s, " in dim ", d);
    ++d;
  }
}

void check_rows(const at::Tensor& t, const char* name) {  // (B, H, N, D) with a unit stride along D
  TORCH_CHECK_VALUE(t.size(3) <= 1 || t.stride(3) == 1, "selfattn native: ", name,
                    " needs its last dim contiguous (stride 1), got strides ", t.strides(), "; pass .contiguous()");
  for (int d = 0; d < 3; ++d)
    TORCH_CHECK_VALUE(t.stride(d) >= 0, "selfattn native: ", name, " has a negative stride: ", t.strides());
  TORCH_CHECK_VALUE(t.size(2) <= 1 || t.stride(2) >= t.size(3), "selfattn native: ", name,
                    "'s rows overlap (stride ", t.stride(2), " along N < D = ", t.size(3),
                    "): BLAS cannot read them; pass .contiguous()");
}

void check_out(const at::Tensor& t, const char* name, std::initializer_list<int64_t> shape) {
  check_f32(t, name, shape);
  TORCH_CHECK_VALUE(t.is_contiguous(), "selfattn native: output ", name, " must be contiguous");
}

// A uniform description of the extras: Python builds it from the AttentionCall (selfattn/backends/native.py).
Params make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale, int64_t q_start,
                   int64_t k_pos0, int64_t mask_kind, int64_t BQ, int64_t BK, const c10::optional<at::Tensor>& states,
                   const c10::optional<at::Tensor>& bits_at, const c10::optional<at::Tensor>& bits, double cap,
                   const c10::optional<at::Tensor>& dist, int64_t d_min, bool dist_after_cap,
                   const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& drop_rows,
                   const c10::optional<at::Tensor>& drop_cols, int64_t drop_T, double drop_scale,
                   bool half_ok = false) {
  check_f32(q, "q", {-1, -1, -1, -1}, half_ok);
  const int64_t B = q.size(0), Hq = q.size(1), Nq = q.size(2), D = q.size(3);
  check_f32(k, "k", {B, -1, -1, D}, half_ok);
  const int64_t Hkv = k.size(1), Nk = k.size(2);
  check_f32(v, "v", {B, Hkv, Nk, -1}, half_ok);
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
                   "selfattn native: q, k, v must share one dtype, got ", q.scalar_type(), ", ", k.scalar_type(),
                   ", ", v.scalar_type());
  const int64_t Dv = v.size(3);
  TORCH_CHECK_VALUE(Hkv > 0 && Hq % Hkv == 0, "selfattn native: H_q=", Hq, " is not a multiple of H_kv=", Hkv);
  TORCH_CHECK_VALUE(D > 0 && Dv > 0 && Nq > 0 && Nk > 0, "selfattn native: empty dims");
  check_rows(q, "q");
  check_rows(k, "k");
  check_rows(v, "v");
  TORCH_CHECK_VALUE(BQ > 0 && BK > 0 && BK <= (1 << 16) && BQ <= (1 << 16), "selfattn native: bad tile ", BQ, "x", BK);
  TORCH_CHECK_VALUE(mask_kind >= 0 && mask_kind <= 2, "selfattn native: mask_kind must be 0, 1 or 2");
  Params p{};
  p.B = B, p.Hq = Hq, p.Hkv = Hkv, p.Nq = Nq, p.Nk = Nk, p.D = D, p.Dv = Dv;
  p.scale = static_cast<float>(scale);
  p.q_start = q_start, p.k_pos0 = k_pos0;
  p.dtype = q.scalar_type();
  if (p.dtype == at::kFloat) {
    p.q = q.data_ptr<float>(), p.k = k.data_ptr<float>(), p.v = v.data_ptr<float>();
  } else {
    p.q = p.k = p.v = nullptr;
    p.raw[0] = q.data_ptr(), p.raw[1] = k.data_ptr(), p.raw[2] = v.data_ptr();
  }
  for (int d = 0; d < 3; ++d) p.sq[d] = q.stride(d), p.sk[d] = k.stride(d), p.sv[d] = v.stride(d);
  p.BQ = BQ, p.BK = BK;
  p.nqb = (Nq + BQ - 1) / BQ, p.nkb = (Nk + BK - 1) / BK;
  p.mask_kind = static_cast<int>(mask_kind);
  if (mask_kind == 2) {
    TORCH_CHECK_VALUE(states && bits_at && bits, "selfattn native: mask_kind 2 needs states, bits_at and bits");
    TORCH_CHECK_VALUE(states->scalar_type() == at::kChar && states->is_contiguous() && states->dim() == 2 &&
                          states->size(0) == p.nqb && states->size(1) == p.nkb,
                      "selfattn native: states must be contiguous int8 (", p.nqb, ", ", p.nkb, ")");
    TORCH_CHECK_VALUE(bits_at->scalar_type() == at::kInt && bits_at->is_contiguous() &&
                          bits_at->sizes() == states->sizes(),
                      "selfattn native: bits_at must be contiguous int32 shaped like states");
    TORCH_CHECK_VALUE(bits->scalar_type() == at::kByte && bits->is_contiguous() && bits->dim() == 5 &&
                          bits->size(3) == BQ && bits->size(4) == BK &&
                          (bits->size(1) == 1 || bits->size(1) == B) && (bits->size(2) == 1 || bits->size(2) == Hq),
                      "selfattn native: bits must be contiguous uint8 (P, B or 1, H_q or 1, ", BQ, ", ", BK, ")");
    const int8_t* st = states->data_ptr<int8_t>();
    const int32_t* at_ = bits_at->data_ptr<int32_t>();
    for (int64_t t = 0; t < p.nqb * p.nkb; ++t) {
      TORCH_CHECK_VALUE(st[t] >= kEmpty && st[t] <= kFull, "selfattn native: a block state is not 0, 1 or 2");
      TORCH_CHECK_VALUE(st[t] != kPartial || (at_[t] >= 0 && at_[t] < bits->size(0)),
                        "selfattn native: a partial tile has no bits");
    }
    p.states = st, p.bits_at = at_, p.bits = bits->data_ptr<uint8_t>();
    p.bits_B = bits->size(1), p.bits_H = bits->size(2);
  }
  p.cap = static_cast<float>(cap);
  TORCH_CHECK_VALUE(cap >= 0 && std::isfinite(cap), "selfattn native: cap must be finite and >= 0");
  if (dist) {
    // a table of distances d_min .. d_min + L - 1 (a kept table may be wider than the call's N_q + N_k - 1)
    check_f32(*dist, "dist", {-1, Hq, -1});
    TORCH_CHECK_VALUE((dist->size(0) == 1 || dist->size(0) == B) && dist->stride(2) == 1 && dist->stride(1) >= 0 &&
                          dist->stride(0) >= 0,
                      "selfattn native: dist must be (1 or B, H_q, L) with unit stride along the distances, got "
                      "shape ", dist->sizes(), " and strides ", dist->strides());
    // every row's distances must lie inside the table
    const int64_t lo = k_pos0 - (q_start + Nq - 1), hi = k_pos0 + Nk - 1 - q_start;
    TORCH_CHECK_VALUE(d_min <= lo && d_min + dist->size(2) - 1 >= hi, "selfattn native: dist covers distances ",
                      d_min, " .. ", d_min + dist->size(2) - 1, ", the call needs ", lo, " .. ", hi);
    p.dist = dist->data_ptr<float>();
    p.dist_L = dist->size(2);
    p.dist_B = dist->size(0);
    p.dist_sb = p.dist_B == 1 ? 0 : dist->stride(0);
    p.dist_sh = dist->stride(1);
    p.d_min = d_min;
    p.dist_after_cap = dist_after_cap;
  }
  if (bias) {
    check_f32(*bias, "bias", {-1, -1, -1, -1});
    const int64_t want[4] = {B, Hq, Nq, Nk};
    for (int d = 0; d < 4; ++d) {
      TORCH_CHECK_VALUE(bias->size(d) == want[d] && (bias->stride(d) >= 0),
                        "selfattn native: bias must be expanded to (B, H_q, N_q, N_k), got ", bias->sizes());
      p.sbias[d] = bias->stride(d);
    }
    TORCH_CHECK_VALUE(p.sbias[3] == 0 || p.sbias[3] == 1, "selfattn native: bias needs stride 0 or 1 along N_k");
    p.bias = bias->data_ptr<float>();
  }
  if (drop_rows) {
    TORCH_CHECK_VALUE(drop_cols.has_value(), "selfattn native: dropout needs drop_cols");
    TORCH_CHECK_VALUE(drop_rows->scalar_type() == at::kInt && drop_rows->is_contiguous() &&
                          drop_rows->numel() == B * Hq * Nq,
                      "selfattn native: drop_rows must be contiguous int32 (B, H_q, N_q)");
    TORCH_CHECK_VALUE(drop_cols->scalar_type() == at::kInt && drop_cols->is_contiguous() && drop_cols->numel() == Nk,
                      "selfattn native: drop_cols must be contiguous int32 (N_k,)");
    TORCH_CHECK_VALUE(drop_T >= 0 && drop_T < (int64_t(1) << 32), "selfattn native: drop_T must be in [0, 2^32)");
    p.drop_rows = drop_rows->data_ptr<int32_t>();
    p.drop_cols = drop_cols->data_ptr<int32_t>();
    p.drop_T = static_cast<uint32_t>(drop_T);
    p.drop_scale = static_cast<float>(drop_scale);
  }
  return p;
}

std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                                int64_t q_start, int64_t k_pos0, int64_t mask_kind, int64_t BQ, int64_t BK,
                                const c10::optional<at::Tensor>& states, const c10::optional<at::Tensor>& bits_at,
                                const c10::optional<at::Tensor>& bits, double cap,
                                const c10::optional<at::Tensor>& dist, int64_t d_min, bool dist_after_cap,
                                const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& drop_rows,
                                const c10::optional<at::Tensor>& drop_cols, int64_t drop_T, double drop_scale,
                                int64_t fold, int64_t splits, const c10::optional<at::Tensor>& sinks) {
  const Params p = make_params(q, k, v, scale, q_start, k_pos0, mask_kind, BQ, BK, states, bits_at, bits, cap, dist,
                               d_min, dist_after_cap, bias, drop_rows, drop_cols, drop_T, drop_scale, /*half_ok=*/true);
  TORCH_CHECK_VALUE(fold >= 1 && p.group() % fold == 0, "selfattn native: fold must divide the group");
  TORCH_CHECK_VALUE(fold == 1 || p.mask_kind != 2 || p.bits_H == 1, "selfattn native: fold needs an h-free mask");
  TORCH_CHECK_VALUE(splits >= 1 && splits <= std::max<int64_t>(1, p.nkb), "selfattn native: bad splits");
  const auto f32 = q.options().dtype(at::kFloat);  // float32 out and lse whatever the inputs' dtype
  auto out = at::empty({p.B, p.Hq, p.Nq, p.Dv}, f32);
  auto lse = at::empty({p.B, p.Hq, p.Nq}, f32);
  at::Tensor part_o, part_m, part_l;
  if (splits > 1) {
    part_o = at::empty({splits, p.B, p.Hq, p.Nq, p.Dv}, f32);
    part_m = at::empty({splits, p.B, p.Hq, p.Nq}, f32);
    part_l = at::empty({splits, p.B, p.Hq, p.Nq}, f32);
  }
  Forward f{p, fold, splits, out.data_ptr<float>(), lse.data_ptr<float>(),
            splits > 1 ? part_o.data_ptr<float>() : nullptr, splits > 1 ? part_m.data_ptr<float>() : nullptr,
            splits > 1 ? part_l.data_ptr<float>() : nullptr};
  if (sinks) {
    check_f32(*sinks, "sinks", {p.Hq});
    TORCH_CHECK_VALUE(sinks->is_contiguous(), "selfattn native: sinks must be contiguous (H_q,)");
    f.sinks = sinks->data_ptr<float>();
  }
  // (keys padded to kPadKeys must fit a row of S: BK is 512 from Python, any value at this entry point)
  f.dot16 = p.dtype == at::kBFloat16 && p.BK % kPadKeys == 0 && bf16_dot().ok &&
            at::globalContext().userEnabledMkldnn();
  with_ops(p, [&](auto ops) { f.template run<decltype(ops)>(); });
  return {out, lse};
}

// Returns dq, dk, dv and, with `dist` and `dist_grad`, its gradient (1 or B, H_q, L): a fixed table (a model's
// ALiBi) skips its accumulation.
std::vector<at::Tensor> backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                                 const at::Tensor& dout, const at::Tensor& lse, double scale,
                                 int64_t q_start, int64_t k_pos0, int64_t mask_kind, int64_t BQ, int64_t BK,
                                 const c10::optional<at::Tensor>& states, const c10::optional<at::Tensor>& bits_at,
                                 const c10::optional<at::Tensor>& bits, double cap,
                                 const c10::optional<at::Tensor>& dist, int64_t d_min, bool dist_after_cap,
                                 const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& drop_rows,
                                 const c10::optional<at::Tensor>& drop_cols, int64_t drop_T, double drop_scale,
                                 bool dist_grad) {
  const Params p = make_params(q, k, v, scale, q_start, k_pos0, mask_kind, BQ, BK, states, bits_at, bits, cap, dist,
                               d_min, dist_after_cap, bias, drop_rows, drop_cols, drop_T, drop_scale);
  check_out(out, "out", {p.B, p.Hq, p.Nq, p.Dv});
  check_out(dout, "d_out", {p.B, p.Hq, p.Nq, p.Dv});
  check_out(lse, "lse", {p.B, p.Hq, p.Nq});
  const int64_t S = slots(), rows = p.B * p.Hq * p.Nq;
  // delta = rowsum(dO * O), the softmax's share of dS, one dot product per row
  auto delta = at::empty({p.B, p.Hq, p.Nq}, q.options());
  {
    const float *o = out.data_ptr<float>(), *g = dout.data_ptr<float>();
    float* dl = delta.data_ptr<float>();
    const int64_t Dv = p.Dv;
    at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / Dv), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        dl[r] = at::vec::map2_reduce_all<float>([](Vec x, Vec y) { return x * y; },
                                               [](Vec x, Vec y) { return x + y; }, o + r * Dv, g + r * Dv, Dv);
    });
  }
  auto dq_slots = at::zeros({S, p.B, p.Hq, p.Nq, p.D}, q.options());
  auto dk = at::empty({p.B, p.Hkv, p.Nk, p.D}, q.options());
  auto dv = at::empty({p.B, p.Hkv, p.Nk, p.Dv}, q.options());
  at::Tensor ddist_slots;
  const int64_t Bd = dist ? dist->size(0) : 1;
  const bool want_ddist = dist.has_value() && dist_grad;
  if (want_ddist) ddist_slots = at::zeros({S, Bd, p.Hq, p.dist_L}, q.options());
  Backward bw{p, out.data_ptr<float>(), dout.data_ptr<float>(), lse.data_ptr<float>(), delta.data_ptr<float>(),
              dq_slots.data_ptr<float>(), dk.data_ptr<float>(), dv.data_ptr<float>(),
              want_ddist ? ddist_slots.data_ptr<float>() : nullptr, Bd};
  with_ops(p, [&](auto ops) { bw.template run<decltype(ops)>(); });
  // slots summed in a fixed order and scaled in one pass: the same result run to run at a fixed thread count
  at::Tensor dq = at::empty({p.B, p.Hq, p.Nq, p.D}, q.options());
  {
    const float* sl = dq_slots.data_ptr<float>();
    float* d = dq.data_ptr<float>();
    const int64_t n = rows * p.D;
    const Vec sc(static_cast<float>(scale));
    at::parallel_for(0, n, 16384, [&](int64_t j0, int64_t j1) {
      if (S == 1) {
        at::vec::map([sc](Vec x) { return x * sc; }, d + j0, sl + j0, j1 - j0);
        return;
      }
      at::vec::map2([](Vec x, Vec y) { return x + y; }, d + j0, sl + j0, sl + n + j0, j1 - j0);
      for (int64_t s_ = 2; s_ < S; ++s_)
        at::vec::map2([](Vec x, Vec y) { return x + y; }, d + j0, d + j0, sl + s_ * n + j0, j1 - j0);
      at::vec::map([sc](Vec x) { return x * sc; }, d + j0, d + j0, j1 - j0);
    });
  }
  std::vector<at::Tensor> res{dq, dk, dv};
  if (want_ddist) res.push_back(S == 1 ? ddist_slots[0] : ddist_slots.sum(0));
  return res;
}

// score_mods._mix on uint32: two multiply-xorshift rounds and a last xorshift (Python's int64 arithmetic masked to
// 32 bits keeps the same low bits)
inline uint32_t mix32(uint32_t x) {
  x = ((x >> 16) ^ x) * kMix;
  x = ((x >> 16) ^ x) * kMix;
  return (x >> 16) ^ x;
}

// The per-row and per-key halves of the dropout hash (score_mods.dropout_rows / dropout_cols, bit for bit) for rows
// (b, h, q_start + i) and keys k_pos0 + j: (B, Hq, Nq) and (Nk) int32. Made here, they cost a few microseconds where
// the Python expressions' thirty tensor operations cost 0.2 ms of a short call.
std::vector<at::Tensor> dropout_halves(int64_t seed, int64_t B, int64_t Hq, int64_t q_start, int64_t Nq,
                                       int64_t k_pos0, int64_t Nk) {
  TORCH_CHECK_VALUE(B > 0 && Hq > 0 && Nq > 0 && Nk > 0, "selfattn native: dropout_halves needs positive sizes");
  const uint32_t s = mix32(static_cast<uint32_t>(seed));
  auto rows = at::empty({B, Hq, Nq}, at::kInt), cols = at::empty({Nk}, at::kInt);
  int32_t* rw = rows.data_ptr<int32_t>();
  int32_t* cl = cols.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hq; ++h) {
      const uint32_t bh = mix32(mix32(s ^ static_cast<uint32_t>(b)) + static_cast<uint32_t>(h) * kGolden);
      int32_t* r = rw + (b * Hq + h) * Nq;
      for (int64_t i = 0; i < Nq; ++i) {
        const uint32_t x = mix32(bh + static_cast<uint32_t>(q_start + i) * kGolden);
        r[i] = static_cast<int32_t>(x ^ (x >> 16));
      }
    }
  for (int64_t j = 0; j < Nk; ++j) {
    const uint32_t x = mix32(s + static_cast<uint32_t>(k_pos0 + j) * kGolden);
    cl[j] = static_cast<int32_t>(x ^ (x >> 16));
  }
  return {rows, cols};
}

bool uses_mkl() {
#ifdef SELFATTN_MKL
  return true;
#else
  return false;
#endif
}

// The soft-cap's tanh on a float32 tensor, vector by vector as the kernel applies it (for the accuracy test).
at::Tensor soft_tanh_of(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous(), "_tanh takes a contiguous float32 tensor");
  at::Tensor y = at::empty_like(x);
  at::vec::map([](Vec v) { return soft_tanh(v); }, y.data_ptr<float>(), x.data_ptr<float>(), x.numel());
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "selfattn's fused CPU attention kernel (see selfattn/csrc/attention.cpp)";
  namespace py = pybind11;
  m.def("forward", &forward, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("scale"), py::arg("q_start"), py::arg("k_pos0"), py::arg("mask_kind"), py::arg("BQ"), py::arg("BK"), py::arg("states"), py::arg("bits_at"), py::arg("bits"), py::arg("cap"), py::arg("dist"), py::arg("d_min"), py::arg("dist_after_cap"), py::arg("bias"), py::arg("drop_rows"), py::arg("drop_cols"), py::arg("drop_T"), py::arg("drop_scale"), py::arg("fold"), py::arg("splits"), py::arg("sinks"));
  m.def("backward", &backward, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("d_out"), py::arg("lse"), py::arg("scale"), py::arg("q_start"), py::arg("k_pos0"), py::arg("mask_kind"), py::arg("BQ"), py::arg("BK"), py::arg("states"), py::arg("bits_at"), py::arg("bits"), py::arg("cap"), py::arg("dist"), py::arg("d_min"), py::arg("dist_after_cap"), py::arg("bias"), py::arg("drop_rows"), py::arg("drop_cols"), py::arg("drop_T"), py::arg("drop_scale"), py::arg("dist_grad") = true);
  m.attr("isa") = SELFATTN_ISA;
  m.def("uses_mkl", &uses_mkl);
  m.def("dropout_halves", &dropout_halves, py::arg("seed"), py::arg("B"), py::arg("H_q"), py::arg("q_start"),
        py::arg("N_q"), py::arg("k_pos0"), py::arg("N_k"));
  m.def("_tanh", &soft_tanh_of, py::arg("x"));
  m.def("bf16_dot", [] { return py::make_tuple(bf16_dot().ok, bf16_dot().why); });
}
