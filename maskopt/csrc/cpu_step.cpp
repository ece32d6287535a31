// The compiled CPU step of maskopt: masked AdamW with the exact per-tensor selection.
//
// Built on first use by maskopt/cpu_step.py (plain C++17 and OpenMP, no torch headers) and
// called through ctypes with raw pointers. The contract it implements is docs/semantics.md;
// the rounding of every operation is that of torch.optim.AdamW(fused=True) on the CPU:
//   exp_avg    = fma(w, g - m, m)               (w = 1 - beta1 < 0.5; torch's lerp)
//                fma(w - 1, g - m, g)           (w >= 0.5)
//   exp_avg_sq = fma((1 - beta2) * g, g, v * beta2)
//   denom      = sqrt(v) / bias_correction2_sqrt + eps       (IEEE sqrt and division)
//   param      = param * decay + (step_size * m) / denom
// and the file is compiled with -ffp-contract=off so that no other product is fused.
// Scalars arrive as float, rounded from Python's doubles exactly as torch rounds them.
//
// Selection (one "segment" is a tensor, or a block of block_size entries of it):
//   all           every entry moves: one pass.
//   random        u(i) < threshold, u the counter hash of maskopt/_hash.py: one pass.
//   top-k kinds   the k = topk_count(n, alpha) largest keys, ties to the lowest index.
//                 Short segments select in cache in one pass (nth_element on their keys).
//                 Long ones take two passes over memory, as the GPU kernels do: pass 1
//                 updates the moments and counts the keys in a histogram of their top bits
//                 per chunk; the boundary bin holding the k-th key follows from the counts;
//                 pass 2 updates the entries above that bin and lists the ones in it
//                 (in index order); an exact selection among the listed entries finishes.
//   random_exact  the top-k of the hash values u(i) (distinct below 2**32 entries).
// Keys of magnitudes are their IEEE bits, every NaN mapped to 0x7F800001 (above +inf).

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

// The flag scan reads eight one-byte flags as one little-endian word; elsewhere the build
// fails and maskopt takes the PyTorch path.
#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "maskopt's compiled CPU step assumes a little-endian CPU and GCC or Clang"
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

enum Kind : int32_t {
  kAll = 0,
  kTopkMomentum = 1,
  kTopkGradient = 2,
  kRandom = 3,
  kRandomExact = 4,
  kGivenIndices = 5,  // the entries listed by the caller (a selection made across shards)
  kMomentsOnly = 6,   // update the moments, leave the parameter (the caller selects next)
  // A top-k across shards (the caller all-reduces between the calls): the digit histograms of
  // the keys, then the update of the entries above the k-th key and of the first ties.
  kDigitHistogram = 7,
  kApplyAboveKey = 8,
};

enum DecayMode : int32_t { kNoDecay = 0, kDecaySelected = 1, kDecayAll = 2 };

struct TensorArgs {
  float* param;
  const float* grad;
  float* exp_avg;
  float* exp_avg_sq;
  const int64_t* indices;  // kGivenIndices: sorted flat indices to update
  int64_t numel;
  int64_t index_count;   // kGivenIndices: how many
  int64_t index_offset;  // kRandom: global flat index of entry 0 (a shard of a larger tensor)
  float step_size;       // -lr / (1 - beta1**t)
  float bias_correction2_sqrt;
  uint32_t hash_key;  // random kinds: the stream key of this tensor and step
  uint32_t pad;
  int64_t key_prefix;    // kDigitHistogram: the key bits above digit_high; kApplyAboveKey: the k-th key
  int64_t ties_to_take;  // kApplyAboveKey: how many entries equal to the k-th key move (lowest first)
  int64_t* histogram;    // kDigitHistogram: 256 counts, added to
};

struct Config {
  int32_t kind;
  int32_t threads;
  int32_t decay_mode;
  int32_t has_grad_scale;
  int64_t block_size;   // top-k kinds: <= 0 selects over the whole tensor
  int64_t wave_chunks;  // top-k kinds: chunks whose histograms are held at once (16 KiB each)
  int32_t score_kind;   // kDigitHistogram, kApplyAboveKey: kTopkMomentum or kTopkGradient
  int32_t digit_high;   // kDigitHistogram: the digit is key bits [digit_low, digit_high)
  int32_t digit_low;
  int32_t pad;
  double alpha;
  uint64_t hash_threshold;  // kRandom: selected iff u < hash_threshold (2**32: every entry)
  float lerp_weight;        // 1 - beta1
  float beta2;
  float one_minus_beta2;
  float eps;
  float decay;  // 1 - lr * weight_decay
  float grad_scale;
};

constexpr uint32_t kNanKey = 0x7F800001u;
constexpr int64_t kChunk = int64_t(1) << 17;        // entries per work item of a long segment
constexpr int64_t kSmallSegment = int64_t(1) << 15;  // segments up to this select in cache
constexpr int64_t kSmallItem = int64_t(1) << 16;     // entries per work item of short segments
constexpr int kBins = 4096;
constexpr int64_t kTile = 1024;  // entries whose keys a pass computes before counting them

inline int64_t topk_count(int64_t n, double alpha) {
  if (n <= 0) return 0;
  int64_t k = static_cast<int64_t>(std::floor(alpha * static_cast<double>(n) + 0.5));
  return std::min(n, std::max<int64_t>(1, k));
}

inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

inline uint32_t hash_u(uint64_t i, uint32_t key) {
  uint32_t u = mix32(static_cast<uint32_t>(i) * 0x9E3779B9u + key);
  uint32_t hi = static_cast<uint32_t>(i >> 32);
  return hi ? u ^ mix32(hi) : u;
}

inline uint32_t magnitude_key(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  bits &= 0x7FFFFFFFu;
  return bits > 0x7F800000u ? kNanKey : bits;
}

// The moments of one entry: torch's lerp and addcmul rounding.
struct MomentRule {
  float coeff;  // w or w - 1
  bool small_weight;
  float beta2, one_minus_beta2;
  explicit MomentRule(const Config& c)
      : coeff(std::fabs(c.lerp_weight) < 0.5f ? c.lerp_weight : c.lerp_weight - 1.0f),
        small_weight(std::fabs(c.lerp_weight) < 0.5f),
        beta2(c.beta2),
        one_minus_beta2(c.one_minus_beta2) {}
  inline void apply(float g, float& m, float& v) const {
    const float d = g - m;
    m = std::fma(coeff, d, small_weight ? m : g);
    v = std::fma(one_minus_beta2 * g, g, v * beta2);
  }
};

// The parameter rule: a selected entry becomes param * decay_selected + (step * m) / denom,
// an unselected one param * decay_unselected (a factor 1 leaves every bit as it is).
struct ParamRule {
  float step_size, bias_correction2_sqrt, eps, decay_selected, decay_unselected;
  ParamRule(const TensorArgs& t, const Config& c)
      : step_size(t.step_size),
        bias_correction2_sqrt(t.bias_correction2_sqrt),
        eps(c.eps),
        decay_selected(c.decay_mode != kNoDecay ? c.decay : 1.0f),
        decay_unselected(c.decay_mode == kDecayAll ? c.decay : 1.0f) {}
  inline float moved(float p, float m, float v) const {
    return p * decay_selected + (step_size * m) / (std::sqrt(v) / bias_correction2_sqrt + eps);
  }
  inline float kept(float p) const { return p * decay_unselected; }
};

inline float load_grad(const float* g, int64_t i, bool scaled, float scale) {
  return scaled ? g[i] / scale : g[i];
}

// Moments of entries [begin, end) (the caller selects next).
void update_moments(const TensorArgs& t, const Config& c, int64_t begin, int64_t end) {
  float* __restrict m = t.exp_avg;
  float* __restrict v = t.exp_avg_sq;
  const float* __restrict g = t.grad;
  const MomentRule rule(c);
  const bool scaled = c.has_grad_scale;
  const float scale = c.grad_scale;
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) rule.apply(load_grad(g, i, scaled, scale), m[i], v[i]);
}

// The parameter update of one selected entry (its moments already updated).
inline void update_entry(const TensorArgs& t, const Config& c, int64_t i) {
  t.param[i] = ParamRule(t, c).moved(t.param[i], t.exp_avg[i], t.exp_avg_sq[i]);
}

// One vectorised pass over [begin, end): moments and parameters. Every entry moves, or with
// `Hashed` the entries RandomBCD's Bernoulli mask selects (u(i) < threshold).
template <bool Hashed>
void one_pass_range(const TensorArgs& t, const Config& c, int64_t begin, int64_t end) {
  float* __restrict p = t.param;
  float* __restrict m = t.exp_avg;
  float* __restrict v = t.exp_avg_sq;
  const float* __restrict g = t.grad;
  const MomentRule moments(c);
  const ParamRule rule(t, c);
  const bool scaled = c.has_grad_scale;
  const float scale = c.grad_scale;
  const uint64_t threshold = c.hash_threshold;
  const uint32_t key = t.hash_key;
  const int64_t offset = t.index_offset;
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    float mi = m[i], vi = v[i];
    moments.apply(load_grad(g, i, scaled, scale), mi, vi);
    m[i] = mi;
    v[i] = vi;
    const float pi = p[i];
    if constexpr (Hashed) {
      const bool selected = hash_u(static_cast<uint64_t>(i + offset), key) < threshold;
      p[i] = selected ? rule.moved(pi, mi, vi) : rule.kept(pi);
    } else {
      p[i] = rule.moved(pi, mi, vi);
    }
  }
}

// The key of entry i (its moments already updated), one entry at a time.
inline uint32_t key_of(const TensorArgs& t, const Config& c, int64_t i) {
  if (c.kind == kTopkMomentum) return magnitude_key(t.exp_avg[i]);
  if (c.kind == kTopkGradient) return magnitude_key(load_grad(t.grad, i, c.has_grad_scale, c.grad_scale));
  return hash_u(static_cast<uint64_t>(i + t.index_offset), t.hash_key);
}

// Pass 1 over [begin, end): the moments, and the keys into out[0 .. end - begin).
template <int Kind>
void moments_and_keys_of(const TensorArgs& t, const Config& c, int64_t begin, int64_t end,
                         uint32_t* __restrict out) {
  float* __restrict m = t.exp_avg + begin;
  float* __restrict v = t.exp_avg_sq + begin;
  const float* __restrict g = t.grad + begin;
  const MomentRule rule(c);
  const bool scaled = c.has_grad_scale;
  const float scale = c.grad_scale;
  const int64_t offset = begin + t.index_offset;
  const uint32_t hash_key = t.hash_key;
  const int64_t n = end - begin;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float gi = load_grad(g, i, scaled, scale);
    float mi = m[i], vi = v[i];
    rule.apply(gi, mi, vi);
    m[i] = mi;
    v[i] = vi;
    if constexpr (Kind == kTopkMomentum) {
      out[i] = magnitude_key(mi);
    } else if constexpr (Kind == kTopkGradient) {
      out[i] = magnitude_key(gi);
    } else {
      out[i] = hash_u(static_cast<uint64_t>(i + offset), hash_key);
    }
  }
}

void moments_and_keys(const TensorArgs& t, const Config& c, int64_t begin, int64_t end, uint32_t* out) {
  if (c.kind == kTopkMomentum) {
    moments_and_keys_of<kTopkMomentum>(t, c, begin, end, out);
  } else if (c.kind == kTopkGradient) {
    moments_and_keys_of<kTopkGradient>(t, c, begin, end, out);
  } else {
    moments_and_keys_of<kRandomExact>(t, c, begin, end, out);
  }
}

// The key of entry `begin + i` in a vectorised loop over [begin, end).
template <int Kind>
struct KeyReader {
  const float* __restrict m;
  const float* __restrict g;
  bool scaled;
  float scale;
  int64_t offset;
  uint32_t hash_key;
  KeyReader(const TensorArgs& t, const Config& c, int64_t begin)
      : m(t.exp_avg + begin),
        g(t.grad + begin),
        scaled(c.has_grad_scale),
        scale(c.grad_scale),
        offset(begin + t.index_offset),
        hash_key(t.hash_key) {}
  inline uint32_t operator()(int64_t i) const {
    if constexpr (Kind == kTopkMomentum) {
      return magnitude_key(m[i]);
    } else if constexpr (Kind == kTopkGradient) {
      return magnitude_key(load_grad(g, i, scaled, scale));
    } else {
      return hash_u(static_cast<uint64_t>(i + offset), hash_key);
    }
  }
};

// flags[i] = 1 where the key of entry begin + i lies in the boundary bin, else 0; padded with
// zeros to a multiple of 8.
template <int Kind>
void flag_bin_of(const TensorArgs& t, const Config& c, int64_t begin, int64_t end, int shift, uint32_t bin,
                 uint8_t* __restrict flags) {
  const KeyReader<Kind> key(t, c, begin);
  const int64_t n = end - begin;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) flags[i] = (key(i) >> shift) == bin;
  for (int64_t i = n; i < ((n + 7) & ~int64_t(7)); ++i) flags[i] = 0;
}

// Pass 2 over [begin, end): entries whose key lies in a bin >= lowest_selected move, the others
// are kept (and decay where every entry does). A single two-way choice per entry keeps the loop
// vectorised well (measured: a three-way one took twice as long).
template <int Kind>
void apply_from_bin_of(const TensorArgs& t, const Config& c, int64_t begin, int64_t end, int shift,
                       uint32_t lowest_selected, const ParamRule& rule) {
  const KeyReader<Kind> key(t, c, begin);
  float* __restrict p = t.param + begin;
  const float* __restrict m = t.exp_avg + begin;
  const float* __restrict v = t.exp_avg_sq + begin;
  const int64_t n = end - begin;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float pi = p[i];
    p[i] = (key(i) >> shift) >= lowest_selected ? rule.moved(pi, m[i], v[i]) : rule.kept(pi);
  }
}

void flag_bin(const TensorArgs& t, const Config& c, int64_t begin, int64_t end, int shift, uint32_t bin,
              uint8_t* flags) {
  if (c.kind == kTopkMomentum) {
    flag_bin_of<kTopkMomentum>(t, c, begin, end, shift, bin, flags);
  } else if (c.kind == kTopkGradient) {
    flag_bin_of<kTopkGradient>(t, c, begin, end, shift, bin, flags);
  } else {
    flag_bin_of<kRandomExact>(t, c, begin, end, shift, bin, flags);
  }
}

void apply_from_bin(const TensorArgs& t, const Config& c, int64_t begin, int64_t end, int shift,
                    uint32_t lowest_selected, const ParamRule& rule) {
  if (c.kind == kTopkMomentum) {
    apply_from_bin_of<kTopkMomentum>(t, c, begin, end, shift, lowest_selected, rule);
  } else if (c.kind == kTopkGradient) {
    apply_from_bin_of<kTopkGradient>(t, c, begin, end, shift, lowest_selected, rule);
  } else {
    apply_from_bin_of<kRandomExact>(t, c, begin, end, shift, lowest_selected, rule);
  }
}

// The boundary bin's entries of one tile: index, key and parameter (room for a whole vector
// past the last one).
struct Staged {
  alignas(64) int64_t index[kTile + 16];
  alignas(64) uint32_t key[kTile + 16];
  alignas(64) float param[kTile + 16];
  alignas(64) float exp_avg[kTile + 16];
  alignas(64) float exp_avg_sq[kTile + 16];
};

// Lists the entries of [begin, end) whose key lies in the boundary bin into `staged`; returns
// how many. About one entry in fifty qualifies: flags scanned eight at a time.
int64_t collect_bin(const TensorArgs& t, const Config& c, int64_t begin, int64_t end, int shift, uint32_t bin,
                    uint8_t* flags, Staged& staged) {
  int64_t found = 0;
  const int64_t i = 0;
  {
    flag_bin(t, c, begin + i, end, shift, bin, flags);
    const int64_t rest = end - begin - i;
    for (int64_t w = 0; w < rest; w += 8) {
      uint64_t word;
      std::memcpy(&word, flags + w, sizeof word);
      while (word) {
        const int64_t at = begin + i + w + (__builtin_ctzll(word) >> 3);  // a flag byte is 0 or 1
        word &= word - 1;
        staged.index[found] = at;
        staged.key[found] = key_of(t, c, at);
        staged.param[found] = t.param[at];
        staged.exp_avg[found] = t.exp_avg[at];
        staged.exp_avg_sq[found] = t.exp_avg_sq[at];
        ++found;
      }
    }
  }
  return found;
}

#if defined(__AVX512F__)
// Pass 2 over [begin, end) in one sweep, for the magnitude keys: the update of apply_from_bin
// and the listing of collect_bin, sixteen entries at a time (compress instead of branches).
// The same operations in the same order as ParamRule, so the same bits. Returns how many
// entries it listed.
int64_t apply_and_collect_avx512(const TensorArgs& t, const Config& c, int64_t begin, int64_t end, int shift,
                                 uint32_t bin, uint32_t lowest_selected, const ParamRule& rule, Staged& staged) {
  const int64_t n = end - begin;
  const bool momentum = c.kind == kTopkMomentum;
  const float* src = (momentum ? t.exp_avg : t.grad) + begin;
  float* p = t.param + begin;
  const float* m = t.exp_avg + begin;
  const float* v = t.exp_avg_sq + begin;
  const __m512 scale = _mm512_set1_ps(c.grad_scale);
  const bool scaled = !momentum && c.has_grad_scale;
  const __m512i abs_mask = _mm512_set1_epi32(0x7FFFFFFF);
  const __m512i nan_key = _mm512_set1_epi32(static_cast<int>(kNanKey));
  const __m512i bin_vec = _mm512_set1_epi32(static_cast<int>(bin));
  const __m512i lowest_vec = _mm512_set1_epi32(static_cast<int>(lowest_selected));
  const __m512 step = _mm512_set1_ps(rule.step_size), bc2 = _mm512_set1_ps(rule.bias_correction2_sqrt);
  const __m512 eps = _mm512_set1_ps(rule.eps), dsel = _mm512_set1_ps(rule.decay_selected);
  const __m512 dkeep = _mm512_set1_ps(rule.decay_unselected);
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int64_t found = 0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m512 score = _mm512_loadu_ps(src + i);
    if (scaled) score = _mm512_div_ps(score, scale);
    __m512i key = _mm512_and_si512(_mm512_castps_si512(score), abs_mask);
    key = _mm512_min_epi32(key, nan_key);  // non-negative as int32: every NaN -> kNanKey
    const __m512i kb = _mm512_srli_epi32(key, static_cast<unsigned>(shift));
    const __mmask16 selected = _mm512_cmpge_epu32_mask(kb, lowest_vec);
    const __mmask16 listed = _mm512_cmpeq_epu32_mask(kb, bin_vec) & static_cast<__mmask16>(~selected);
    const __m512 pi = _mm512_loadu_ps(p + i);
    const __m512 mi = _mm512_loadu_ps(m + i);
    const __m512 vi = _mm512_loadu_ps(v + i);
    const __m512 denom = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(vi), bc2), eps);
    const __m512 moved = _mm512_add_ps(_mm512_mul_ps(pi, dsel), _mm512_div_ps(_mm512_mul_ps(step, mi), denom));
    _mm512_storeu_ps(p + i, _mm512_mask_blend_ps(selected, _mm512_mul_ps(pi, dkeep), moved));
    const __m512i where = _mm512_maskz_compress_epi32(listed, _mm512_add_epi32(lanes, _mm512_set1_epi32(int(i))));
    _mm512_storeu_si512(staged.key + found, _mm512_maskz_compress_epi32(listed, key));
    _mm512_storeu_ps(staged.param + found, _mm512_maskz_compress_ps(listed, pi));
    _mm512_storeu_ps(staged.exp_avg + found, _mm512_maskz_compress_ps(listed, mi));
    _mm512_storeu_ps(staged.exp_avg_sq + found, _mm512_maskz_compress_ps(listed, vi));
    _mm512_storeu_si512(staged.index + found, _mm512_cvtepi32_epi64(_mm512_castsi512_si256(where)));
    _mm512_storeu_si512(staged.index + found + 8, _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(where, 1)));
    found += __builtin_popcount(listed);
  }
  for (int64_t q = 0; q < found; ++q) staged.index[q] += begin;
  for (; i < n; ++i) {  // the tail, one entry at a time
    const int64_t at = begin + i;
    const uint32_t key = key_of(t, c, at);
    const uint32_t kb = key >> shift;
    if (kb == bin && kb < lowest_selected) {
      staged.index[found] = at;
      staged.key[found] = key;
      staged.param[found] = p[i];
      staged.exp_avg[found] = m[i];
      staged.exp_avg_sq[found] = v[i];
      ++found;
    }
    p[i] = kb >= lowest_selected ? rule.moved(p[i], m[i], v[i]) : rule.kept(p[i]);
  }
  return found;
}
#endif

inline int bin_shift(const Config& c) { return c.kind == kRandomExact ? 20 : 19; }

// The k-th largest of keys[0..n) and how many of the k are ties equal to it (lowest first).
struct Boundary {
  uint32_t kth;
  int64_t ties;  // entries equal to kth that are selected, in order
};

// The k-th largest of keys[0 .. n) (1 <= k <= n), whose bits above `low_bits` are all equal:
// radix levels of 2048 bins while the list is long, then nth_element on what is left.
uint32_t kth_largest(const uint32_t* keys, int64_t n, int64_t k, int low_bits, std::vector<uint32_t>& scratch) {
  if (n <= 1024 || low_bits <= 0) {
    scratch.assign(keys, keys + n);
    std::nth_element(scratch.begin(), scratch.begin() + (n - k), scratch.end());
    return scratch[n - k];
  }
  const int shift = std::max(0, low_bits - 11);
  const uint32_t mask = (1u << (low_bits - shift)) - 1u;
  std::vector<int64_t> counts(mask + 1, 0);
  for (int64_t i = 0; i < n; ++i) ++counts[(keys[i] >> shift) & mask];
  int64_t above = 0;
  uint32_t bin = mask;
  for (; bin > 0; --bin) {
    if (above + counts[bin] >= k) break;
    above += counts[bin];
  }
  std::vector<uint32_t> inside;
  inside.reserve(counts[bin]);
  for (int64_t i = 0; i < n; ++i)
    if (((keys[i] >> shift) & mask) == bin) inside.push_back(keys[i]);
  return kth_largest(inside.data(), static_cast<int64_t>(inside.size()), k - above, shift, scratch);
}

Boundary find_boundary(const uint32_t* keys, int64_t n, int64_t k, std::vector<uint32_t>& scratch,
                       int low_bits = 32) {
  const uint32_t kth = kth_largest(keys, n, k, low_bits, scratch);
  int64_t above = 0;
#pragma omp simd reduction(+ : above)
  for (int64_t i = 0; i < n; ++i) above += keys[i] > kth;
  return {kth, k - above};
}

// Entries [begin, begin + n) whose keys are keys[0 .. n): those above kth move, those below
// stay, and of those equal to kth the first `ties` move.
void apply_with_boundary(const TensorArgs& t, const Config& c, int64_t begin, int64_t n, const uint32_t* keys,
                         Boundary b) {
  const ParamRule rule(t, c);
  float* __restrict p = t.param + begin;
  const float* __restrict m = t.exp_avg + begin;
  const float* __restrict v = t.exp_avg_sq + begin;
  const uint32_t kth = b.kth;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float pi = p[i];
    p[i] = keys[i] > kth ? rule.moved(pi, m[i], v[i]) : (keys[i] == kth ? pi : rule.kept(pi));
  }
  int64_t ties = b.ties;
  for (int64_t i = 0; i < n; ++i) {
    if (keys[i] == kth) p[i] = ties-- > 0 ? rule.moved(p[i], m[i], v[i]) : rule.kept(p[i]);
  }
}

// A short segment: moments, keys in cache, exact selection, update; one pass over memory.
void small_segment(const TensorArgs& t, const Config& c, int64_t begin, int64_t n, std::vector<uint32_t>& keys,
                   std::vector<uint32_t>& scratch) {
  const int64_t k = topk_count(n, c.alpha);
  if (k >= n) {
    one_pass_range<false>(t, c, begin, begin + n);
    return;
  }
  keys.resize(n);
  moments_and_keys(t, c, begin, begin + n, keys.data());
  apply_with_boundary(t, c, begin, n, keys.data(), find_boundary(keys.data(), n, k, scratch));
}

struct Segment {
  int32_t tensor;
  int64_t begin, numel, k;
  int64_t first_chunk, chunks;  // long segments: their chunks in the chunk list
  int32_t bin;                  // the boundary bin
  int64_t need;                 // keys of the boundary bin that are selected
  bool whole_bin;               // every key of the boundary bin is selected
  std::vector<int64_t> cand_index;
  std::vector<uint32_t> cand_key;
  std::vector<float> cand_param;  // the parameter before pass 2, and the moments
  std::vector<float> cand_exp_avg, cand_exp_avg_sq;
  void release_candidates() {
    std::vector<int64_t>().swap(cand_index);
    std::vector<uint32_t>().swap(cand_key);
    std::vector<float>().swap(cand_param);
    std::vector<float>().swap(cand_exp_avg);
    std::vector<float>().swap(cand_exp_avg_sq);
  }
};

struct Chunk {
  int32_t segment;
  int64_t begin, end;
  int64_t cand_offset;  // where this chunk's boundary-bin entries go in its segment's list
};

struct Item {  // a run of short segments of one tensor, or a tensor's range of a dense/random step
  int32_t tensor;
  int64_t begin, end, segment_length;
};

void run_streaming(const TensorArgs* tensors, int32_t count, const Config& c) {
  std::vector<Item> items;
  for (int32_t t = 0; t < count; ++t) {
    const int64_t n = c.kind == kGivenIndices ? tensors[t].index_count : tensors[t].numel;
    for (int64_t b = 0; b < n; b += kChunk) items.push_back({t, b, std::min(n, b + kChunk), 0});
  }
  const int64_t total = static_cast<int64_t>(items.size());
  // Listed entries with every entry decaying: decay them all first, then update the listed
  // ones without decaying them again (the PyTorch path's order).
  if (c.kind == kGivenIndices && c.decay_mode == kDecayAll) {
    std::vector<Item> all;
    for (int32_t t = 0; t < count; ++t)
      for (int64_t b = 0; b < tensors[t].numel; b += kChunk)
        all.push_back({t, b, std::min(tensors[t].numel, b + kChunk), 0});
    const int64_t n_all = static_cast<int64_t>(all.size());
#pragma omp parallel for schedule(dynamic, 1) num_threads(c.threads)
    for (int64_t j = 0; j < n_all; ++j) {
      float* p = tensors[all[j].tensor].param;
      const float decay = c.decay;
#pragma omp simd
      for (int64_t i = all[j].begin; i < all[j].end; ++i) p[i] = p[i] * decay;
    }
  }
  Config given = c;
  if (c.kind == kGivenIndices && c.decay_mode == kDecayAll) given.decay_mode = kNoDecay;
#pragma omp parallel for schedule(dynamic, 1) num_threads(c.threads)
  for (int64_t j = 0; j < total; ++j) {
    const Item& it = items[j];
    const TensorArgs& t = tensors[it.tensor];
    switch (c.kind) {
      case kAll:
        one_pass_range<false>(t, c, it.begin, it.end);
        break;
      case kMomentsOnly:
        update_moments(t, c, it.begin, it.end);
        break;
      case kRandom:
        one_pass_range<true>(t, c, it.begin, it.end);
        break;
      default:  // kGivenIndices
        for (int64_t q = it.begin; q < it.end; ++q) update_entry(t, given, t.indices[q]);
        break;
    }
  }
}

// The two passes and the selection of long segments [first, last), whose chunks are
// consecutive in `chunks`.
void run_wave(const TensorArgs* tensors, const Config& c, std::vector<Segment>& segments, std::vector<Chunk>& chunks,
              int64_t first, int64_t last) {
  const int64_t c0 = segments[first].first_chunk;
  const int64_t c1 = segments[last - 1].first_chunk + segments[last - 1].chunks;
  // The chunks' histograms (each chunk zeroes its own), kept from call to call: a fresh
  // allocation would be zeroed by the kernel page by page.
  static thread_local std::vector<uint32_t> hist_buffer;
  const size_t hist_size = static_cast<size_t>(c1 - c0) * kBins;
  if (hist_buffer.size() < hist_size) hist_buffer.resize(hist_size);
  uint32_t* const hist = hist_buffer.data();
  const int shift = bin_shift(c);

#pragma omp parallel num_threads(c.threads)
  {
    std::vector<uint32_t> scratch;
    uint32_t tile[kTile];
    alignas(64) uint8_t flags[kTile + 8] = {};
    Staged staged;
    std::vector<uint32_t> odd_hist(kBins);

    // pass 1: the moments, and the keys counted per chunk
#pragma omp for schedule(dynamic, 1)
    for (int64_t j = c0; j < c1; ++j) {
      const Chunk& ch = chunks[j];
      const TensorArgs& t = tensors[segments[ch.segment].tensor];
      uint32_t* h = &hist[static_cast<size_t>(j - c0) * kBins];
      std::memset(h, 0, kBins * sizeof(uint32_t));
      // two histograms, even and odd entries: equal neighbouring keys do not wait on each
      // other's increment
      std::fill(odd_hist.begin(), odd_hist.end(), 0u);
      for (int64_t b = ch.begin; b < ch.end; b += kTile) {
        const int64_t e = std::min(ch.end, b + kTile);
        moments_and_keys(t, c, b, e, tile);
        const int64_t n = e - b;
        int64_t i = 0;
        for (; i + 1 < n; i += 2) {
          ++h[tile[i] >> shift];
          ++odd_hist[tile[i + 1] >> shift];
        }
        if (i < n) ++h[tile[i] >> shift];
      }
      for (int b = 0; b < kBins; ++b) h[b] += odd_hist[b];
    }

    // the boundary bin of each segment, and where each chunk lists its entries of it
#pragma omp for schedule(dynamic, 1)
    for (int64_t s = first; s < last; ++s) {
      Segment& seg = segments[s];
      std::vector<uint64_t> total(kBins, 0);
      for (int64_t j = seg.first_chunk; j < seg.first_chunk + seg.chunks; ++j) {
        const uint32_t* h = &hist[static_cast<size_t>(j - c0) * kBins];
        for (int b = 0; b < kBins; ++b) total[b] += h[b];
      }
      int64_t above = 0;
      int bin = kBins - 1;
      for (; bin > 0; --bin) {
        if (above + static_cast<int64_t>(total[bin]) >= seg.k) break;
        above += static_cast<int64_t>(total[bin]);
      }
      seg.bin = bin;
      seg.need = seg.k - above;
      seg.whole_bin = seg.need == static_cast<int64_t>(total[bin]);
      int64_t offset = 0;
      for (int64_t j = seg.first_chunk; j < seg.first_chunk + seg.chunks; ++j) {
        chunks[j].cand_offset = offset;
        offset += hist[static_cast<size_t>(j - c0) * kBins + bin];
      }
      if (!seg.whole_bin) {
        seg.cand_index.resize(offset);
        seg.cand_key.resize(offset);
        seg.cand_param.resize(offset);
        seg.cand_exp_avg.resize(offset);
        seg.cand_exp_avg_sq.resize(offset);
      }
    }

    // pass 2: update the entries above the boundary bin, list the ones in it
#pragma omp for schedule(dynamic, 1)
    for (int64_t j = c0; j < c1; ++j) {
      const Chunk& ch = chunks[j];
      Segment& seg = segments[ch.segment];
      const TensorArgs& t = tensors[seg.tensor];
      const uint32_t bin = static_cast<uint32_t>(seg.bin);
      int64_t out = ch.cand_offset;
      const ParamRule rule(t, c);
      const uint32_t lowest_selected = seg.whole_bin ? bin : bin + 1;
      for (int64_t b = ch.begin; b < ch.end; b += kTile) {
        const int64_t e = std::min(ch.end, b + kTile);
        int64_t found = 0;
#if defined(__AVX512F__)
        if (c.kind != kRandomExact) {
          found = apply_and_collect_avx512(t, c, b, e, shift, bin, lowest_selected, rule, staged);
        } else
#endif
        {
          // list the boundary bin's entries with their parameter before the update below,
          // which treats them as unselected; the selection among them settles them
          if (!seg.whole_bin) found = collect_bin(t, c, b, e, shift, bin, flags, staged);
          apply_from_bin(t, c, b, e, shift, lowest_selected, rule);
        }
        if (found == 0) continue;
        std::memcpy(&seg.cand_index[out], staged.index, found * sizeof(int64_t));
        std::memcpy(&seg.cand_key[out], staged.key, found * sizeof(uint32_t));
        std::memcpy(&seg.cand_param[out], staged.param, found * sizeof(float));
        std::memcpy(&seg.cand_exp_avg[out], staged.exp_avg, found * sizeof(float));
        std::memcpy(&seg.cand_exp_avg_sq[out], staged.exp_avg_sq, found * sizeof(float));
        out += found;
      }
    }

    // the exact selection among the boundary bin's entries
#pragma omp for schedule(dynamic, 1)
    for (int64_t s = first; s < last; ++s) {
      Segment& seg = segments[s];
      if (!seg.whole_bin) {
        const TensorArgs& t = tensors[seg.tensor];
        const int64_t n = static_cast<int64_t>(seg.cand_key.size());
        Boundary b =
            seg.need > 0 ? find_boundary(seg.cand_key.data(), n, seg.need, scratch, shift) : Boundary{0, 0};
        const ParamRule rule(t, c);
        for (int64_t q = 0; q < n; ++q) {  // pass 2 kept them all; the selected ones move
          const uint32_t key = seg.cand_key[q];
          if (seg.need > 0 && (key > b.kth || (key == b.kth && b.ties-- > 0))) {
            const int64_t i = seg.cand_index[q];
            t.param[i] = rule.moved(seg.cand_param[q], seg.cand_exp_avg[q], seg.cand_exp_avg_sq[q]);
          }
        }
      }
      seg.release_candidates();
    }
  }
}

void run_topk(const TensorArgs* tensors, int32_t count, const Config& c) {
  std::vector<Segment> segments;
  std::vector<Chunk> chunks;
  std::vector<Item> small_items;
  for (int32_t t = 0; t < count; ++t) {
    const int64_t n = tensors[t].numel;
    if (n == 0) continue;
    const int64_t block = (c.block_size > 0 && c.kind != kRandomExact) ? std::min(c.block_size, n) : n;
    if (block <= kSmallSegment) {
      // whole blocks in items of about kSmallItem entries; the last block may be shorter
      const int64_t per_item = std::max<int64_t>(1, kSmallItem / block) * block;
      for (int64_t b = 0; b < n; b += per_item) small_items.push_back({t, b, std::min(n, b + per_item), block});
      continue;
    }
    for (int64_t b = 0; b < n; b += block) {
      const int64_t len = std::min(block, n - b);
      if (len <= kSmallSegment) {  // a short last block
        small_items.push_back({t, b, b + len, len});
        continue;
      }
      Segment s;
      s.tensor = t;
      s.begin = b;
      s.numel = len;
      s.k = topk_count(len, c.alpha);
      s.first_chunk = static_cast<int64_t>(chunks.size());
      for (int64_t q = b; q < b + len; q += kChunk)
        chunks.push_back({static_cast<int32_t>(segments.size()), q, std::min(b + len, q + kChunk), 0});
      s.chunks = static_cast<int64_t>(chunks.size()) - s.first_chunk;
      s.bin = 0;
      s.need = 0;
      s.whole_bin = false;
      segments.push_back(std::move(s));
    }
  }
  const int64_t n_small = static_cast<int64_t>(small_items.size());
  const int64_t n_segments = static_cast<int64_t>(segments.size());

  // Short segments: each whole, in cache.
  if (n_small > 0) {
#pragma omp parallel num_threads(c.threads)
    {
      std::vector<uint32_t> keys, scratch;
      keys.reserve(kSmallSegment);
#pragma omp for schedule(dynamic, 1)
      for (int64_t j = 0; j < n_small; ++j) {
        const Item& it = small_items[j];
        for (int64_t b = it.begin; b < it.end; b += it.segment_length)
          small_segment(tensors[it.tensor], c, b, std::min(it.segment_length, it.end - b), keys, scratch);
      }
    }
  }
  // Long segments, in waves of at most c.wave_chunks chunks (a longer segment alone): a wave's
  // chunk histograms take 16 KiB per chunk, so the extra memory stays bounded.
  for (int64_t first = 0; first < n_segments;) {
    int64_t last = first + 1;
    while (last < n_segments &&
           segments[last].first_chunk + segments[last].chunks - segments[first].first_chunk <= c.wave_chunks)
      ++last;
    run_wave(tensors, c, segments, chunks, first, last);
    first = last;
  }
}

// A top-k across shards, one tensor's local part per call (parallel over tensors): the
// histogram of one digit of the keys whose higher bits equal the prefix.
void digit_histograms(const TensorArgs* tensors, int32_t count, const Config& c) {
  Config keyed = c;
  keyed.kind = c.score_kind;
  const int high = c.digit_high, low = c.digit_low;
  const uint32_t mask = (1u << (high - low)) - 1u;
#pragma omp parallel for schedule(dynamic, 1) num_threads(c.threads)
  for (int32_t t = 0; t < count; ++t) {
    const TensorArgs& x = tensors[t];
    int64_t local[256] = {};
    const uint64_t prefix = static_cast<uint64_t>(x.key_prefix);
    for (int64_t i = 0; i < x.numel; ++i) {
      const uint64_t key = key_of(x, keyed, i);
      if (high >= 64 || (key >> high) == prefix) ++local[(key >> low) & mask];
    }
    for (int b = 0; b < 256; ++b) x.histogram[b] += local[b];
  }
}

// The update once the k-th key is known: entries above it move, and of those equal to it the
// first ties_to_take (in local order; the caller gives each rank its share of the lowest
// global indices).
void apply_above_key(const TensorArgs* tensors, int32_t count, const Config& c) {
  Config keyed = c;
  keyed.kind = c.score_kind;
#pragma omp parallel for schedule(dynamic, 1) num_threads(c.threads)
  for (int32_t t = 0; t < count; ++t) {
    const TensorArgs& x = tensors[t];
    const ParamRule rule(x, c);
    const uint32_t kth = static_cast<uint32_t>(x.key_prefix);
    int64_t ties = x.ties_to_take;
    for (int64_t i = 0; i < x.numel; ++i) {
      const uint32_t key = key_of(x, keyed, i);
      const bool moves = key > kth || (key == kth && ties-- > 0);
      x.param[i] = moves ? rule.moved(x.param[i], x.exp_avg[i], x.exp_avg_sq[i]) : rule.kept(x.param[i]);
    }
  }
}

}  // namespace

extern "C" {

// The ABI version: maskopt/cpu_step.py refuses a library that reports another.
int32_t maskopt_cpu_step_abi(void) { return 3; }

// One step on `count` tensors sharing a Config; returns 0, or -1 on an unknown kind.
int32_t maskopt_cpu_step(const TensorArgs* tensors, int32_t count, const Config* config) {
  const Config& c = *config;
  switch (c.kind) {
    case kAll:
    case kRandom:
    case kGivenIndices:
    case kMomentsOnly:
      run_streaming(tensors, count, c);
      return 0;
    case kTopkMomentum:
    case kTopkGradient:
    case kRandomExact:
      run_topk(tensors, count, c);
      return 0;
    case kDigitHistogram:
      digit_histograms(tensors, count, c);
      return 0;
    case kApplyAboveKey:
      apply_above_key(tensors, count, c);
      return 0;
    default:
      return -1;
  }
}

}  // extern "C"
