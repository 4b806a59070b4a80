// Token statistics over logits (DESIGN.md): forward and backward kernels, their launchers and
// host emulations. Math per row, with a = cap(z) / T, b = cap(r) / T, m = mix(a, b, c):
//   L_a = logsumexp(a), p = exp(a - L_a)   (likewise L_b, q and L_m, pi)
//   logprobs = a[t] - L_a, entropy = -sum p log p, ref_logprobs = b[t] - L_b,
//   kl = sum p (log p - log q), mixture_logprobs = m[t] - L_m.
//
// Forward: one online pass per row
// ---------------------------------
// A block owns one row (or one split of it, when there are too few rows to fill the device);
// its threads walk the row in 16-byte vector steps (scalar prologue up to the first column at
// which every tensor of the row is aligned, scalar tail; a coalesced scalar walk when the two
// tensors of a row cannot be aligned together), reading each logits tensor exactly once. Each
// thread keeps, per model, a running max M and fp32 sums relative to shift(M) (M, or 0 while M is
// -inf):
//   S = sum exp(a - M)               -> L_a = M + log S
//   E = sum exp(a - M) (a - M)       -> H   = log S - E / S
//   K = sum exp(a - M) (a - b)       -> KL  = K / S - (L_a - L_b)
// and S for b and for m (only when the mixture is needed: targets, a reference, 0 < c < 1).
// When M grows to M' the sums are rescaled by exp(M - M') and E also gains (M - M') S — once per
// vector step, not per element. Products with a zero weight exp(a - M) == 0 (masked columns,
// underflow) are selected away, so p == 0 terms contribute exactly 0. Thread states merge with
// the same rule (warp shuffles, then shared memory); thread 0 loads the target logits (one scalar
// load per model) and writes the row's 5 statistics and 3 log-sum-exps. Split rows write their
// merged partial state to a workspace instead, and a merge kernel (one warp per row) finishes
// them. A NaN reaches the sums of its own row only; rows whose target is ignore_index read
// nothing and get zeros. At c == 0 / 1 the mixture statistics are the policy's / reference's,
// bit for bit.
//
// Backward: grid (row, column chunk)
// ----------------------------------
// Reads the logits once more and writes each gradient once (same vector walk; a scalar walk when
// the inputs and the contiguous outputs of a row cannot be aligned together), recomputing p, q
// and pi from lse. Every term is guarded with `g != 0`, so e.g. an infinite KL with a zero
// upstream grad cannot poison the log-prob gradient. At c == 0 / 1 the mixture's upstream grad
// is folded into the policy's / reference's log-prob grad.
#include "common.cuh"

namespace nk {
namespace {

// Everything a token_stats kernel needs, by value in the kernel's parameter space.
struct TokenStatsParams {
  const void* z;         // [G, R, V] policy logits (Tz), unit stride over V
  int64_t z_stride_g;    // elements between groups of z
  int64_t z_stride_r;    // elements between rows of a group of z
  const void* r;         // [G, R, V] reference logits (Tr), or null (no reference)
  int64_t r_stride_g;    // elements between groups of r
  int64_t r_stride_r;    // elements between rows of a group of r
  const int64_t* targets;  // [N] targets, or null (no log-prob fields)
  int64_t ignore_index;    // target of rows that get zeros and no gradient
  // forward
  float* stats;            // [5, N] out
  float* lse;              // [3, N] out
  void* partials;          // [N, num_splits] FwdState workspace (num_splits > 1)
  int num_splits;          // blocks per row
  int64_t cols_per_split;  // columns per split (a multiple of cfg::kSplitAlign)
  // backward
  const float* grad_stats;  // [5, N] upstream gradients
  const float* stats_in;    // [5, N] forward statistics (entropy and KL are read)
  const float* lse_in;      // [3, N] forward log-sum-exps
  void* dz;                 // [N, V] contiguous out (Tz), or null
  void* dr;                 // [N, V] contiguous out (Tr), or null
  int64_t cols_per_block;   // backward column chunk per block
  // shape and scalars
  int64_t N;      // rows
  int64_t R;      // rows per group
  int64_t V;      // vocabulary size
  int mix;        // MixMode: kMixNone unless targets, a reference and a coef are all given
  MixCoef coef;   // (1 - c, c)
  Scale scale;    // softcap and temperature
};

// ---- online accumulators -------------------------------------------------------------------
struct PolicyAcc {
  float max;  // running max of a
  float sum;  // sum exp(a - shift(max))
  float ent;  // sum exp(a - shift(max)) * (a - shift(max))
  float kl;   // sum exp(a - shift(max)) * (a - b)
};
struct LseAcc {
  float max;  // running max
  float sum;  // sum exp(x - shift(max))
};
struct FwdState {  // all 32-bit fields: shuffled word by word, stored as the split workspace
  PolicyAcc a;
  LseAcc b;
  LseAcc m;
};

NK_HD FwdState fwd_identity() {
  FwdState s;
  s.a.max = -kInf;
  s.a.sum = 0.0f;
  s.a.ent = 0.0f;
  s.a.kl = 0.0f;
  s.b.max = -kInf;
  s.b.sum = 0.0f;
  s.m.max = -kInf;
  s.m.sum = 0.0f;
  return s;
}

// K more columns of the policy: a[k] (and b[k] for the KL when HAS_REF).
template <int K, bool HAS_REF>
NK_HD void policy_update(PolicyAcc& s, const float* a, const float* b) {
  float mx = s.max;
#pragma unroll
  for (int k = 0; k < K; ++k) mx = fmaxf(mx, a[k]);  // fmaxf skips NaN; the sums carry it
  if (mx != s.max) {
    const float step = shift_step(s.max, finite_shift(mx));
    const float alpha = fast_exp(step);
    s.ent = (s.ent + step * s.sum) * alpha;
    s.sum *= alpha;
    if (HAS_REF) s.kl *= alpha;
    s.max = mx;
  }
  const float shift = finite_shift(s.max);
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const float d = a[k] - shift;
    const float e = fast_exp(d);
    const bool live = e > 0.0f;  // select, never multiply, the p == 0 terms
    s.sum += e;
    s.ent += live ? e * d : 0.0f;
    if (HAS_REF) s.kl += live ? e * (a[k] - b[k]) : 0.0f;
  }
}

template <int K>
NK_HD void lse_update(LseAcc& s, const float* x) {
  float mx = s.max;
#pragma unroll
  for (int k = 0; k < K; ++k) mx = fmaxf(mx, x[k]);
  if (mx != s.max) {
    s.sum *= fast_exp(shift_step(s.max, finite_shift(mx)));
    s.max = mx;
  }
  const float shift = finite_shift(s.max);
#pragma unroll
  for (int k = 0; k < K; ++k) s.sum += fast_exp(x[k] - shift);
}

NK_HD void policy_merge(PolicyAcc& s, const PolicyAcc& o) {
  const float shift = finite_shift(fmaxf(s.max, o.max));
  const float step_s = shift_step(s.max, shift);
  const float step_o = shift_step(o.max, shift);
  const float alpha_s = fast_exp(step_s);
  const float alpha_o = fast_exp(step_o);
  s.ent = (s.ent + step_s * s.sum) * alpha_s + (o.ent + step_o * o.sum) * alpha_o;
  s.sum = s.sum * alpha_s + o.sum * alpha_o;
  s.kl = s.kl * alpha_s + o.kl * alpha_o;
  s.max = fmaxf(s.max, o.max);
}

NK_HD void lse_merge(LseAcc& s, const LseAcc& o) {
  const float shift = finite_shift(fmaxf(s.max, o.max));
  s.sum = s.sum * fast_exp(shift_step(s.max, shift)) + o.sum * fast_exp(shift_step(o.max, shift));
  s.max = fmaxf(s.max, o.max);
}

struct FwdMerge {
  bool has_ref;  // merge the reference's sums and the policy's KL sum
  bool blend;    // merge the mixture's sums
  NK_HD void operator()(FwdState& s, const FwdState& o) const {
    policy_merge(s.a, o.a);
    if (has_ref) lse_merge(s.b, o.b);
    if (blend) lse_merge(s.m, o.m);
  }
};

// ---- the rows ------------------------------------------------------------------------------
template <typename Tz, typename Tr, bool HAS_REF>
struct RowRef {
  const Tz* z;     // row start of the policy logits
  const Tr* r;     // row start of the reference logits (HAS_REF), else null
  int64_t target;  // target column, -1 without targets (or for an ignored row)
  bool valid;      // false: the target is ignore_index
};

template <typename Tz, typename Tr, bool HAS_REF>
NK_HD RowRef<Tz, Tr, HAS_REF> row_ref(const TokenStatsParams& p, int64_t n) {
  RowRef<Tz, Tr, HAS_REF> row;
  row.z = static_cast<const Tz*>(p.z) + row_offset(n, p.R, p.z_stride_g, p.z_stride_r);
  row.r = HAS_REF ? static_cast<const Tr*>(p.r) + row_offset(n, p.R, p.r_stride_g, p.r_stride_r)
                  : nullptr;
  row.target = -1;
  row.valid = true;
  if (p.targets != nullptr) {
    const int64_t t = p.targets[n];
    row.valid = t != p.ignore_index;
    row.target = row.valid ? t : -1;
  }
  return row;
}

// Columns per forward vector step: every tensor read advances by whole 16-byte vectors.
template <typename Tz, typename Tr, bool HAS_REF>
NK_HD constexpr int fwd_step() {
  return HAS_REF ? cmax(vec_elems<Tz>(), vec_elems<Tr>()) : vec_elems<Tz>();
}

// The per-thread forward work on one row: consumes the columns walk_row hands it.
template <typename Tz, typename Tr, bool HAS_REF>
struct FwdCols {
  static constexpr int S = fwd_step<Tz, Tr, HAS_REF>();
  const Tz* z;    // policy row
  const Tr* r;    // reference row (HAS_REF)
  Scale scale;    // cap / T
  MixCoef coef;   // mixture weights
  bool blend;     // accumulate the mixture's sums
  FwdState st;    // this thread's accumulators

  template <int K>
  NK_HD void consume(const float* a, const float* b) {
    policy_update<K, HAS_REF>(st.a, a, b);
    if (HAS_REF) {
      lse_update<K>(st.b, b);
      if (blend) {
        float m[K];
#pragma unroll
        for (int k = 0; k < K; ++k) m[k] = mix(a[k], b[k], coef);
        lse_update<K>(st.m, m);
      }
    }
  }

  NK_HD void scalar(int64_t c) {
    float a[1], b[1] = {0.0f};
    a[0] = scaled(to_float(z[c]), scale);
    if (HAS_REF) b[0] = scaled(to_float(r[c]), scale);
    consume<1>(a, b);
  }

  template <int U>
  NK_HD void steps(const int64_t (&cols)[U]) {
    float zf[U][S];
    float rf[U][S];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      load_cols<Tz, S>(z + cols[u], zf[u]);
      if (HAS_REF) load_cols<Tr, S>(r + cols[u], rf[u]);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float a[S], b[S];
#pragma unroll
      for (int k = 0; k < S; ++k) {
        a[k] = scaled(zf[u][k], scale);
        b[k] = HAS_REF ? scaled(rf[u][k], scale) : 0.0f;
      }
      consume<S>(a, b);
    }
  }
};

// Thread `tid` of `nthreads` accumulates columns [v0, v1) of a row.
template <typename Tz, typename Tr, bool HAS_REF>
NK_HD FwdState fwd_thread(const TokenStatsParams& p, const RowRef<Tz, Tr, HAS_REF>& row,
                          int64_t v0, int64_t v1, int tid, int nthreads) {
  FwdCols<Tz, Tr, HAS_REF> f;
  f.z = row.z;
  f.r = row.r;
  f.scale = p.scale;
  f.coef = p.coef;
  f.blend = p.mix == kMixBlend;
  f.st = fwd_identity();
  const void* ptrs[2] = {row.z + v0, HAS_REF ? static_cast<const void*>(row.r + v0) : nullptr};
  const int esize[2] = {static_cast<int>(sizeof(Tz)), static_cast<int>(sizeof(Tr))};
  const int head = aligned_head(ptrs, esize, HAS_REF ? 2 : 1, FwdCols<Tz, Tr, HAS_REF>::S);
  walk_row<FwdCols<Tz, Tr, HAS_REF>::S, cfg::kFwdUnroll>(v0, v1, head, tid, nthreads, f);
  return f.st;
}

// The 5 statistics and 3 log-sum-exps of a finished row.
struct RowOut {
  float stats[kNumStats];
  float lse[kNumLse];
};

NK_HD RowOut zero_row() {
  RowOut o;
  for (int k = 0; k < kNumStats; ++k) o.stats[k] = 0.0f;
  for (int k = 0; k < kNumLse; ++k) o.lse[k] = 0.0f;
  return o;
}

NK_HD void store_row(const TokenStatsParams& p, int64_t n, const RowOut& o) {
  for (int k = 0; k < kNumStats; ++k) p.stats[k * p.N + n] = o.stats[k];
  for (int k = 0; k < kNumLse; ++k) p.lse[k * p.N + n] = o.lse[k];
}

// Finishes a valid row from its merged state: loads the target logits and writes the outputs.
template <typename Tz, typename Tr, bool HAS_REF>
NK_HD void finish_row(const TokenStatsParams& p, const RowRef<Tz, Tr, HAS_REF>& row, int64_t n,
                      const FwdState& st) {
  RowOut o = zero_row();
  const bool has_targets = p.targets != nullptr;
  const float log_sum_a = logf(st.a.sum);
  const float lse_a = finite_shift(st.a.max) + log_sum_a;
  o.lse[kLsePolicy] = lse_a;
  o.stats[kEntropy] = log_sum_a - st.a.ent / st.a.sum;
  float a_t = 0.0f, b_t = 0.0f;
  if (has_targets) {
    a_t = scaled(to_float(row.z[row.target]), p.scale);
    o.stats[kLogprobs] = a_t - lse_a;
  }
  if (HAS_REF) {
    const float lse_b = finite_shift(st.b.max) + logf(st.b.sum);
    o.lse[kLseRef] = lse_b;
    o.stats[kKl] = st.a.kl / st.a.sum - (lse_a - lse_b);
    if (has_targets) {
      b_t = scaled(to_float(row.r[row.target]), p.scale);
      o.stats[kRefLogprobs] = b_t - lse_b;
    }
    if (p.mix == kMixBlend) {
      const float lse_m = finite_shift(st.m.max) + logf(st.m.sum);
      o.lse[kLseMixture] = lse_m;
      o.stats[kMixtureLogprobs] = mix(a_t, b_t, p.coef) - lse_m;
    } else if (p.mix == kMixPolicy) {  // the same operations as logprobs: the same bits
      o.lse[kLseMixture] = lse_a;
      o.stats[kMixtureLogprobs] = a_t - lse_a;
    } else if (p.mix == kMixRef) {
      o.lse[kLseMixture] = lse_b;
      o.stats[kMixtureLogprobs] = b_t - lse_b;
    }
  }
  store_row(p, n, o);
}

// Thread 0's part once a block's state is merged: finish the row, or park the split's partial.
template <typename Tz, typename Tr, bool HAS_REF>
NK_HD void fwd_block_result(const TokenStatsParams& p, const RowRef<Tz, Tr, HAS_REF>& row,
                            int64_t n, int split, const FwdState& st) {
  if (p.num_splits > 1) {
    static_cast<FwdState*>(p.partials)[n * p.num_splits + split] = st;
  } else {
    finish_row(p, row, n, st);
  }
}

// Lane `lane` of the warp that merges row n's split partials: its share of the splits.
NK_HD FwdState merge_lane(const TokenStatsParams& p, int64_t n, int lane, const FwdMerge& merge) {
  FwdState st = fwd_identity();
  const FwdState* parts = static_cast<const FwdState*>(p.partials) + n * p.num_splits;
  for (int s = lane; s < p.num_splits; s += cfg::kWarpSize) merge(st, parts[s]);
  return st;
}

// ---- forward kernels -----------------------------------------------------------------------
// Grid (N, num_splits), cfg-planned threads: block (n, split) accumulates columns
// [split * cols_per_split, (split + 1) * cols_per_split) of row n.
template <typename Tz, typename Tr, bool HAS_REF>
__global__ void __launch_bounds__(cfg::kFwdMaxThreads)
    token_stats_fwd_kernel(const TokenStatsParams p) {
  const int64_t n = blockIdx.x;
  const int split = static_cast<int>(blockIdx.y);
  const RowRef<Tz, Tr, HAS_REF> row = row_ref<Tz, Tr, HAS_REF>(p, n);
  if (!row.valid) {  // ignored row: nothing read; zeros (the merge kernel writes them if split)
    if (p.num_splits == 1 && threadIdx.x == 0) store_row(p, n, zero_row());
    return;
  }
  const int64_t v0 = split * p.cols_per_split;
  const int64_t v1 = v0 + p.cols_per_split < p.V ? v0 + p.cols_per_split : p.V;
  FwdState st = fwd_thread<Tz, Tr, HAS_REF>(p, row, v0, v1, static_cast<int>(threadIdx.x),
                                            static_cast<int>(blockDim.x));
  st = block_reduce(st, fwd_identity(), FwdMerge{HAS_REF, p.mix == kMixBlend});
  if (threadIdx.x == 0) fwd_block_result(p, row, n, split, st);
}

// Grid ceil(N / warps per block), one warp per row: merges the row's split partials and
// finishes it.
template <typename Tz, typename Tr, bool HAS_REF>
__global__ void __launch_bounds__(cfg::kMergeThreads)
    token_stats_merge_kernel(const TokenStatsParams p) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * (blockDim.x / cfg::kWarpSize) +
                    threadIdx.x / cfg::kWarpSize;
  const int lane = static_cast<int>(threadIdx.x) % cfg::kWarpSize;
  if (n >= p.N) return;  // whole warps leave together
  const RowRef<Tz, Tr, HAS_REF> row = row_ref<Tz, Tr, HAS_REF>(p, n);
  if (!row.valid) {
    if (lane == 0) store_row(p, n, zero_row());
    return;
  }
  const FwdMerge merge{HAS_REF, p.mix == kMixBlend};
  const FwdState st = warp_reduce(merge_lane(p, n, lane, merge), merge);
  if (lane == 0) finish_row(p, row, n, st);
}

// ---- backward ------------------------------------------------------------------------------
// Row-wide inputs of the gradient (DESIGN.md), upstream grads already folded and masked.
struct BwdRow {
  float g_lp, g_ent, g_rlp, g_kl, g_mix;  // upstream grads of the five statistics
  float entropy, kl;                      // forward H and KL
  float lse_a, lse_b, lse_m;              // forward L_a, L_b, L_m
};

template <bool HAS_REF>
NK_HD BwdRow bwd_row(const TokenStatsParams& p, int64_t n) {
  const int64_t N = p.N;
  const float* g = p.grad_stats;
  const bool has_targets = p.targets != nullptr;
  BwdRow w;
  w.g_ent = g[kEntropy * N + n];
  w.entropy = p.stats_in[kEntropy * N + n];
  w.lse_a = p.lse_in[kLsePolicy * N + n];
  w.g_lp = has_targets ? g[kLogprobs * N + n] : 0.0f;
  w.g_rlp = 0.0f;
  w.g_kl = 0.0f;
  w.g_mix = 0.0f;
  w.kl = 0.0f;
  w.lse_b = 0.0f;
  w.lse_m = 0.0f;
  if (HAS_REF) {
    w.g_kl = g[kKl * N + n];
    w.kl = p.stats_in[kKl * N + n];
    w.lse_b = p.lse_in[kLseRef * N + n];
    w.g_rlp = has_targets ? g[kRefLogprobs * N + n] : 0.0f;
    const float g_mix = p.mix != kMixNone ? g[kMixtureLogprobs * N + n] : 0.0f;
    if (p.mix == kMixBlend) {
      w.g_mix = g_mix;
      w.lse_m = p.lse_in[kLseMixture * N + n];
    } else if (p.mix == kMixPolicy) {
      w.g_lp += g_mix;  // pi == p
    } else if (p.mix == kMixRef) {
      w.g_rlp += g_mix;  // pi == q
    }
  }
  return w;
}

// Columns per backward vector step: inputs and outputs advance by whole vectors.
template <typename Tz, typename Tr, bool HAS_REF>
NK_HD constexpr int bwd_step() {
  return fwd_step<Tz, Tr, HAS_REF>();
}

// The per-thread backward work on one row.
template <typename Tz, typename Tr, bool HAS_REF>
struct BwdCols {
  static constexpr int S = bwd_step<Tz, Tr, HAS_REF>();
  const Tz* z;     // policy row
  const Tr* r;     // reference row (HAS_REF)
  Tz* dz;          // policy gradient row, or null
  Tr* dr;          // reference gradient row, or null
  int64_t target;  // target column or -1
  BwdRow w;        // row-wide terms
  Scale scale;     // cap / T
  MixCoef coef;    // mixture weights
  bool zero;       // ignored row: write zeros, read nothing

  // Gradients of K columns starting at column c0 from their raw logits.
  template <int K>
  NK_HD void grads(int64_t c0, const float* zf, const float* rf, float* gz, float* gr) const {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const float delta = c0 + k == target ? 1.0f : 0.0f;
      float da;
      const float a = scaled_grad(zf[k], scale, &da);
      const float logp = a - w.lse_a;
      const float pk = fast_exp(logp);
      const bool live = pk > 0.0f;  // p == 0 terms contribute exactly 0
      float ga = 0.0f;
      if (w.g_ent != 0.0f) ga -= w.g_ent * (live ? pk * (logp + w.entropy) : 0.0f);
      if (w.g_lp != 0.0f) ga += w.g_lp * (delta - pk);
      float gb = 0.0f, db = 0.0f;
      if (HAS_REF) {
        const float b = scaled_grad(rf[k], scale, &db);
        const float logq = b - w.lse_b;
        const float q = fast_exp(logq);
        if (w.g_kl != 0.0f) {
          ga += w.g_kl * (live ? pk * (logp - logq - w.kl) : 0.0f);
          gb += w.g_kl * (q - pk);
        }
        if (w.g_rlp != 0.0f) gb += w.g_rlp * (delta - q);
        if (w.g_mix != 0.0f) {
          const float pi = fast_exp(mix(a, b, coef) - w.lse_m);
          const float gm = w.g_mix * (delta - pi);
          ga += coef.one_minus_coef * gm;
          gb += coef.coef * gm;
        }
      }
      // cap'(-inf) = 0: masked columns get exactly 0 (as the torch backend's where()).
      gz[k] = scale.has_softcap && zf[k] == -kInf ? 0.0f : ga * da;
      gr[k] = HAS_REF && scale.has_softcap && rf[k] == -kInf ? 0.0f : gb * db;
    }
  }

  NK_HD void scalar(int64_t c) {
    float zf[1] = {0.0f}, rf[1] = {0.0f}, gz[1] = {0.0f}, gr[1] = {0.0f};
    if (!zero) {
      zf[0] = to_float(z[c]);
      if (HAS_REF) rf[0] = to_float(r[c]);
      grads<1>(c, zf, rf, gz, gr);
    }
    if (dz != nullptr) dz[c] = from_float<Tz>(gz[0]);
    if (HAS_REF && dr != nullptr) dr[c] = from_float<Tr>(gr[0]);
  }

  template <int U>
  NK_HD void steps(const int64_t (&cols)[U]) {
    float zf[U][S];
    float rf[U][S];
    if (!zero) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        load_cols<Tz, S>(z + cols[u], zf[u]);
        if (HAS_REF) load_cols<Tr, S>(r + cols[u], rf[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float gz[S], gr[S];
      if (zero) {
#pragma unroll
        for (int k = 0; k < S; ++k) gz[k] = gr[k] = 0.0f;
      } else {
        grads<S>(cols[u], zf[u], HAS_REF ? rf[u] : zf[u], gz, gr);
      }
      if (dz != nullptr) store_cols<Tz, S>(dz + cols[u], gz);
      if (HAS_REF && dr != nullptr) store_cols<Tr, S>(dr + cols[u], gr);
    }
  }
};

// Thread `tid` of `nthreads` writes the gradients of columns [v0, v1) of row n.
template <typename Tz, typename Tr, bool HAS_REF>
NK_HD void bwd_thread(const TokenStatsParams& p, int64_t n, int64_t v0, int64_t v1, int tid,
                      int nthreads) {
  const RowRef<Tz, Tr, HAS_REF> row = row_ref<Tz, Tr, HAS_REF>(p, n);
  BwdCols<Tz, Tr, HAS_REF> f;
  f.z = row.z;
  f.r = row.r;
  f.dz = p.dz != nullptr ? static_cast<Tz*>(p.dz) + n * p.V : nullptr;
  f.dr = HAS_REF && p.dr != nullptr ? static_cast<Tr*>(p.dr) + n * p.V : nullptr;
  f.target = row.target;
  f.zero = !row.valid;
  if (row.valid) {
    f.w = bwd_row<HAS_REF>(p, n);
  } else {
    f.w = BwdRow{};
  }
  f.scale = p.scale;
  f.coef = p.coef;
  // Streams that must share the vector alignment: the inputs read and the outputs written (a
  // stream not used has element size 0, which every h aligns; fixed indices keep the arrays in
  // registers).
  const void* ptrs[4] = {row.z + v0, HAS_REF ? static_cast<const void*>(row.r + v0) : nullptr,
                         f.dz != nullptr ? static_cast<const void*>(f.dz + v0) : nullptr,
                         f.dr != nullptr ? static_cast<const void*>(f.dr + v0) : nullptr};
  const int esize[4] = {row.valid ? static_cast<int>(sizeof(Tz)) : 0,
                        HAS_REF && row.valid ? static_cast<int>(sizeof(Tr)) : 0,
                        f.dz != nullptr ? static_cast<int>(sizeof(Tz)) : 0,
                        f.dr != nullptr ? static_cast<int>(sizeof(Tr)) : 0};
  const int head = aligned_head(ptrs, esize, 4, BwdCols<Tz, Tr, HAS_REF>::S);
  walk_row<BwdCols<Tz, Tr, HAS_REF>::S, cfg::kBwdUnroll>(v0, v1, head, tid, nthreads, f);
}

// Grid (N, ceil(V / cols_per_block)), cfg::kBwdThreads threads.
template <typename Tz, typename Tr, bool HAS_REF>
__global__ void __launch_bounds__(cfg::kBwdThreads)
    token_stats_bwd_kernel(const TokenStatsParams p) {
  const int64_t n = blockIdx.x;
  const int64_t v0 = static_cast<int64_t>(blockIdx.y) * p.cols_per_block;
  const int64_t v1 = v0 + p.cols_per_block < p.V ? v0 + p.cols_per_block : p.V;
  bwd_thread<Tz, Tr, HAS_REF>(p, n, v0, v1, static_cast<int>(threadIdx.x),
                              static_cast<int>(blockDim.x));
}

// ---- host side: parameters, plans, launches and emulation ---------------------------------
using FwdArgs = NashkernTokenStatsArgs;  // the C arguments, as received (nashkern_cuda.h)

// Validates the shared arguments and fills the shape / scalar part of the parameters.
int make_params(const FwdArgs& a, TokenStatsParams* p) {
  if (a.logits == nullptr) return NASHKERN_EINVAL_POINTER;
  if (a.N < 1 || a.R < 1 || a.V < 1 || a.V > kMaxVocab || a.N % a.R != 0 || a.N > 0x7fffffffLL) {
    return NASHKERN_EINVAL_SIZE;
  }
  if (!(a.temperature > 0.0) || (a.has_coef && !(a.coef >= 0.0 && a.coef <= 1.0)) ||
      (a.has_softcap && !(a.softcap > 0.0))) {
    return NASHKERN_EINVAL_ARG;
  }
  *p = TokenStatsParams{};
  p->z = a.logits;
  p->z_stride_g = a.logits_stride_g;
  p->z_stride_r = a.logits_stride_r;
  p->r = a.ref;
  p->r_stride_g = a.ref_stride_g;
  p->r_stride_r = a.ref_stride_r;
  p->targets = a.targets;
  p->ignore_index = a.ignore_index;
  p->N = a.N;
  p->R = a.R;
  p->V = a.V;
  p->mix = kMixNone;
  if (a.has_coef && a.ref != nullptr && a.targets != nullptr) {
    p->mix = a.coef == 0.0 ? kMixPolicy : (a.coef == 1.0 ? kMixRef : kMixBlend);
  }
  p->coef.one_minus_coef = static_cast<float>(1.0 - (a.has_coef ? a.coef : 0.0));
  p->coef.coef = static_cast<float>(a.has_coef ? a.coef : 0.0);
  p->scale.inv_temperature = static_cast<float>(1.0 / a.temperature);
  p->scale.has_softcap = a.has_softcap ? 1 : 0;
  p->scale.softcap = static_cast<float>(a.has_softcap ? a.softcap : 1.0);
  p->scale.inv_softcap = static_cast<float>(a.has_softcap ? 1.0 / a.softcap : 1.0);
  return 0;
}

// Calls f(Tag<Tz>, Tag<Tr>, has_ref) for the dtypes of the arguments (Tr = Tz without ref).
template <class F>
int dispatch_pair(int logits_dtype, bool has_ref, int ref_dtype, F&& f) {
  return dispatch_dtype(logits_dtype, [&](auto tz) {
    using Tz = typename decltype(tz)::type;
    if (!has_ref) return f(tz, Tag<Tz>{}, std::false_type{});
    return dispatch_dtype(ref_dtype, [&](auto tr) { return f(tz, tr, std::true_type{}); });
  });
}

int fwd_plan(long long N, long long V, int step, int num_sms, int threads_override,
             int splits_override, RowPlan* plan) {
  return plan_rows(N, V, step, num_sms, cfg::kFwdBlocksPerSm, cfg::kFwdMinColsPerSplit,
                   cfg::kFwdMaxThreads, cfg::kFwdMinStepsPerThread, threads_override,
                   splits_override, plan);
}

long long fwd_workspace_bytes(const RowPlan& plan, long long N) {
  return plan.splits > 1 ? static_cast<long long>(sizeof(FwdState)) * N * plan.splits : 0;
}

template <typename Tz, typename Tr, bool HAS_REF>
int launch_fwd(const TokenStatsParams& p, const RowPlan& plan, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.N), static_cast<unsigned>(plan.splits));
  token_stats_fwd_kernel<Tz, Tr, HAS_REF><<<grid, plan.threads, 0, stream>>>(p);
  if (plan.splits > 1) {
    const int rows_per_block = cfg::kMergeThreads / cfg::kWarpSize;
    const unsigned blocks = static_cast<unsigned>(ceil_div(p.N, rows_per_block));
    token_stats_merge_kernel<Tz, Tr, HAS_REF><<<blocks, cfg::kMergeThreads, 0, stream>>>(p);
  }
  return static_cast<int>(cudaGetLastError());
}

template <typename Tz, typename Tr, bool HAS_REF>
int emulate_fwd(const TokenStatsParams& p, const RowPlan& plan) {
  const FwdMerge merge{HAS_REF, p.mix == kMixBlend};
  std::vector<FwdState> threads(plan.threads);
  for (int64_t n = 0; n < p.N; ++n) {
    const RowRef<Tz, Tr, HAS_REF> row = row_ref<Tz, Tr, HAS_REF>(p, n);
    for (int split = 0; split < plan.splits; ++split) {
      if (!row.valid) {
        if (plan.splits == 1) store_row(p, n, zero_row());
        continue;
      }
      const int64_t v0 = split * p.cols_per_split;
      const int64_t v1 = v0 + p.cols_per_split < p.V ? v0 + p.cols_per_split : p.V;
      for (int t = 0; t < plan.threads; ++t) {
        threads[t] = fwd_thread<Tz, Tr, HAS_REF>(p, row, v0, v1, t, plan.threads);
      }
      fwd_block_result(p, row, n, split, emu_block_reduce(threads, fwd_identity(), merge));
    }
  }
  if (plan.splits > 1) {
    for (int64_t n = 0; n < p.N; ++n) {
      const RowRef<Tz, Tr, HAS_REF> row = row_ref<Tz, Tr, HAS_REF>(p, n);
      if (!row.valid) {
        store_row(p, n, zero_row());
        continue;
      }
      std::vector<FwdState> lanes(cfg::kWarpSize);
      for (int lane = 0; lane < cfg::kWarpSize; ++lane) lanes[lane] = merge_lane(p, n, lane, merge);
      finish_row(p, row, n, emu_warp_reduce(lanes, merge));
    }
  }
  return 0;
}

int token_stats_forward(bool emulate, const FwdArgs& a, float* stats, float* lse,
                        void* workspace, long long workspace_bytes, int num_sms,
                        int threads_override, int splits_override, int device,
                        unsigned long long stream) {
  TokenStatsParams p;
  int err = make_params(a, &p);
  if (err != 0) return err;
  if (stats == nullptr || lse == nullptr) return NASHKERN_EINVAL_POINTER;
  p.stats = stats;
  p.lse = lse;
  if (!emulate && (err = enter_device(device)) != 0) return err;
  return dispatch_pair(a.logits_dtype, a.ref != nullptr, a.ref_dtype, [&](auto tz, auto tr,
                                                                          auto has_ref) {
    using Tz = typename decltype(tz)::type;
    using Tr = typename decltype(tr)::type;
    constexpr bool kRef = decltype(has_ref)::value;
    RowPlan plan;
    int e = fwd_plan(a.N, a.V, fwd_step<Tz, Tr, kRef>(), num_sms, threads_override,
                     splits_override, &plan);
    if (e != 0) return e;
    if (plan.splits > 1 && (workspace == nullptr || workspace_bytes < fwd_workspace_bytes(plan, a.N))) {
      return NASHKERN_EWORKSPACE;
    }
    TokenStatsParams q = p;
    q.partials = workspace;
    q.num_splits = plan.splits;
    q.cols_per_split = plan.cols_per_split;
    return emulate ? emulated(emulate_fwd<Tz, Tr, kRef>, q, plan)
                   : launch_fwd<Tz, Tr, kRef>(q, plan, as_stream(stream));
  });
}

int bwd_plan(int step, int threads_override, int* threads, int64_t* cols_per_block) {
  if (threads_override != 0 &&
      (threads_override < cfg::kWarpSize || threads_override > cfg::kBwdThreads ||
       threads_override % cfg::kWarpSize != 0)) {
    return NASHKERN_EINVAL_PLAN;
  }
  *threads = threads_override != 0 ? threads_override : cfg::kBwdThreads;
  *cols_per_block = static_cast<int64_t>(*threads) * cfg::kBwdStepsPerThread * step;
  return 0;
}

template <typename Tz, typename Tr, bool HAS_REF>
int launch_bwd(const TokenStatsParams& p, int threads, cudaStream_t stream) {
  const int64_t chunks = ceil_div(p.V, p.cols_per_block);
  if (chunks > 65535) return NASHKERN_EINVAL_SIZE;
  const dim3 grid(static_cast<unsigned>(p.N), static_cast<unsigned>(chunks));
  token_stats_bwd_kernel<Tz, Tr, HAS_REF><<<grid, threads, 0, stream>>>(p);
  return static_cast<int>(cudaGetLastError());
}

template <typename Tz, typename Tr, bool HAS_REF>
int emulate_bwd(const TokenStatsParams& p, int threads) {
  for (int64_t n = 0; n < p.N; ++n) {
    for (int64_t v0 = 0; v0 < p.V; v0 += p.cols_per_block) {
      const int64_t v1 = v0 + p.cols_per_block < p.V ? v0 + p.cols_per_block : p.V;
      for (int t = 0; t < threads; ++t) bwd_thread<Tz, Tr, HAS_REF>(p, n, v0, v1, t, threads);
    }
  }
  return 0;
}

int token_stats_backward(bool emulate, const FwdArgs& a, const float* grad_stats,
                         const float* stats, const float* lse, void* grad_logits,
                         void* grad_ref, int threads_override, int device,
                         unsigned long long stream) {
  TokenStatsParams p;
  int err = make_params(a, &p);
  if (err != 0) return err;
  if (grad_stats == nullptr || stats == nullptr || lse == nullptr) return NASHKERN_EINVAL_POINTER;
  if (a.ref == nullptr) grad_ref = nullptr;
  if (grad_logits == nullptr && grad_ref == nullptr) return 0;
  p.grad_stats = grad_stats;
  p.stats_in = stats;
  p.lse_in = lse;
  p.dz = grad_logits;
  p.dr = grad_ref;
  if (!emulate && (err = enter_device(device)) != 0) return err;
  return dispatch_pair(a.logits_dtype, a.ref != nullptr, a.ref_dtype, [&](auto tz, auto tr,
                                                                          auto has_ref) {
    using Tz = typename decltype(tz)::type;
    using Tr = typename decltype(tr)::type;
    constexpr bool kRef = decltype(has_ref)::value;
    int threads;
    TokenStatsParams q = p;
    const int e = bwd_plan(bwd_step<Tz, Tr, kRef>(), threads_override, &threads,
                           &q.cols_per_block);
    if (e != 0) return e;
    return emulate ? emulated(emulate_bwd<Tz, Tr, kRef>, q, threads)
                   : launch_bwd<Tz, Tr, kRef>(q, threads, as_stream(stream));
  });
}

}  // namespace

// Used by nashkern_device_check (api.cu): a kernel of this file is loadable on the device.
int token_stats_probe() {
  cudaFuncAttributes attr;
  return static_cast<int>(
      cudaFuncGetAttributes(&attr, token_stats_fwd_kernel<__nv_bfloat16, __nv_bfloat16, true>));
}

}  // namespace nk

// ---- C interface (nashkern_cuda.h) -----------------------------------------------------------
extern "C" {

long long nashkern_token_stats_forward_workspace(long long N, long long V, int num_sms,
                                                 int splits_override) {
  nk::RowPlan plan;
  if (N < 1 || V < 1) return 0;
  if (nk::fwd_plan(N, V, 8, num_sms, 0, splits_override, &plan) != 0) return 0;
  return nk::fwd_workspace_bytes(plan, N);
}

int nashkern_token_stats_forward(const NashkernTokenStatsArgs* a) {
  if (a == nullptr) return NASHKERN_EINVAL_POINTER;
  const NashkernLaunch& l = a->launch;
  return nk::token_stats_forward(l.emulate != 0, *a, a->stats, a->lse, a->workspace,
                                 a->workspace_bytes, l.num_sms, l.threads_override,
                                 l.splits_override, l.device, l.stream);
}

int nashkern_token_stats_backward(const NashkernTokenStatsArgs* a) {
  if (a == nullptr) return NASHKERN_EINVAL_POINTER;
  const NashkernLaunch& l = a->launch;
  return nk::token_stats_backward(l.emulate != 0, *a, a->grad_stats, a->stats, a->lse,
                                  a->grad_logits, a->grad_ref, l.threads_override, l.device,
                                  l.stream);
}

}  // extern "C"
