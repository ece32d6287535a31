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
};

struct Config {
  int32_t kind;
  int32_t threads;
  int32_t decay_mode;
  int32_t has_grad_scale;
  int64_t block_size;  // top-k kinds: <= 0 selects over the whole tensor
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

inline float scaled_grad(const TensorArgs& t, const Config& c, int64_t i) {
  float g = t.grad[i];
  return c.has_grad_scale ? g / c.grad_scale : g;
}

// Moments of entries [begin, end), vectorised; torch's lerp and addcmul rounding.
inline void update_moments(const TensorArgs& t, const Config& c, int64_t begin, int64_t end) {
  float* __restrict m = t.exp_avg;
  float* __restrict v = t.exp_avg_sq;
  const float* __restrict g = t.grad;
  const float w = c.lerp_weight, b2 = c.beta2, c2 = c.one_minus_beta2;
  const bool small_weight = std::fabs(w) < 0.5f;
  const float coeff = small_weight ? w : w - 1.0f;
  if (c.has_grad_scale) {
    const float s = c.grad_scale;
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) {
      const float gi = g[i] / s;
      const float d = gi - m[i];
      m[i] = std::fma(coeff, d, small_weight ? m[i] : gi);
      v[i] = std::fma(c2 * gi, gi, v[i] * b2);
    }
  } else {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) {
      const float gi = g[i];
      const float d = gi - m[i];
      m[i] = std::fma(coeff, d, small_weight ? m[i] : gi);
      v[i] = std::fma(c2 * gi, gi, v[i] * b2);
    }
  }
}

// The parameter update of one selected entry (its moments already updated).
inline void update_entry(const TensorArgs& t, const Config& c, int64_t i) {
  const float denom = std::sqrt(t.exp_avg_sq[i]) / t.bias_correction2_sqrt + c.eps;
  float p = t.param[i];
  if (c.decay_mode != kNoDecay) p = p * c.decay;
  t.param[i] = p + (t.step_size * t.exp_avg[i]) / denom;
}

inline void skip_entry(const TensorArgs& t, const Config& c, int64_t i) {
  if (c.decay_mode == kDecayAll) t.param[i] = t.param[i] * c.decay;
}

// Every entry of [begin, end) moves: moments and parameters in one vectorised pass.
void dense_range(const TensorArgs& t, const Config& c, int64_t begin, int64_t end) {
  update_moments(t, c, begin, end);
  float* __restrict p = t.param;
  const float* __restrict m = t.exp_avg;
  const float* __restrict v = t.exp_avg_sq;
  const float bc2 = t.bias_correction2_sqrt, eps = c.eps, step = t.step_size, decay = c.decay;
  if (c.decay_mode != kNoDecay) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) p[i] = p[i] * decay + (step * m[i]) / (std::sqrt(v[i]) / bc2 + eps);
  } else {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) p[i] = p[i] + (step * m[i]) / (std::sqrt(v[i]) / bc2 + eps);
  }
}

// The key entry i of a segment is ranked by.
inline uint32_t key_at(const TensorArgs& t, const Config& c, int64_t i) {
  switch (c.kind) {
    case kTopkMomentum:
      return magnitude_key(t.exp_avg[i]);
    case kTopkGradient:
      return magnitude_key(scaled_grad(t, c, i));
    default:  // kRandomExact
      return hash_u(static_cast<uint64_t>(i + t.index_offset), t.hash_key);
  }
}

inline int bin_shift(const Config& c) { return c.kind == kRandomExact ? 20 : 19; }

// The k-th largest of keys[0..n) and how many of the k are ties equal to it (lowest first).
struct Boundary {
  uint32_t kth;
  int64_t ties;  // entries equal to kth that are selected, in order
};

Boundary find_boundary(const uint32_t* keys, int64_t n, int64_t k, std::vector<uint32_t>& scratch) {
  scratch.assign(keys, keys + n);
  std::nth_element(scratch.begin(), scratch.begin() + (n - k), scratch.end());
  const uint32_t kth = scratch[n - k];
  int64_t above = 0;
  for (int64_t i = 0; i < n; ++i) above += keys[i] > kth;
  return {kth, k - above};
}

// A short segment: moments, keys in cache, exact selection, update; one pass over memory.
void small_segment(const TensorArgs& t, const Config& c, int64_t begin, int64_t n, std::vector<uint32_t>& keys,
                   std::vector<uint32_t>& scratch) {
  update_moments(t, c, begin, begin + n);
  const int64_t k = topk_count(n, c.alpha);
  if (k >= n) {
    for (int64_t i = begin; i < begin + n; ++i) update_entry(t, c, i);
    return;
  }
  keys.resize(n);
  for (int64_t i = 0; i < n; ++i) keys[i] = key_at(t, c, begin + i);
  Boundary b = find_boundary(keys.data(), n, k, scratch);
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t key = keys[i];
    if (key > b.kth || (key == b.kth && b.ties-- > 0)) {
      update_entry(t, c, begin + i);
    } else {
      skip_entry(t, c, begin + i);
    }
  }
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

void random_range(const TensorArgs& t, const Config& c, int64_t begin, int64_t end) {
  update_moments(t, c, begin, end);
  for (int64_t i = begin; i < end; ++i) {
    if (hash_u(static_cast<uint64_t>(i + t.index_offset), t.hash_key) < c.hash_threshold) {
      update_entry(t, c, i);
    } else {
      skip_entry(t, c, i);
    }
  }
}

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
        dense_range(t, c, it.begin, it.end);
        break;
      case kMomentsOnly:
        update_moments(t, c, it.begin, it.end);
        break;
      case kRandom:
        random_range(t, c, it.begin, it.end);
        break;
      default:  // kGivenIndices
        for (int64_t q = it.begin; q < it.end; ++q) update_entry(t, given, t.indices[q]);
        break;
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
  const int64_t n_chunks = static_cast<int64_t>(chunks.size());
  const int64_t n_segments = static_cast<int64_t>(segments.size());
  std::vector<uint32_t> hist(static_cast<size_t>(n_chunks) * kBins);
  const int shift = bin_shift(c);

#pragma omp parallel num_threads(c.threads)
  {
    std::vector<uint32_t> keys, scratch;
    keys.reserve(kSmallSegment);
    uint32_t tile[kTile];

    // pass 1 of long segments, and short segments whole
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t j = 0; j < n_small; ++j) {
      const Item& it = small_items[j];
      for (int64_t b = it.begin; b < it.end; b += it.segment_length)
        small_segment(tensors[it.tensor], c, b, std::min(it.segment_length, it.end - b), keys, scratch);
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t j = 0; j < n_chunks; ++j) {
      const Chunk& ch = chunks[j];
      const TensorArgs& t = tensors[segments[ch.segment].tensor];
      uint32_t* h = &hist[static_cast<size_t>(j) * kBins];
      std::memset(h, 0, kBins * sizeof(uint32_t));
      for (int64_t b = ch.begin; b < ch.end; b += kTile) {
        const int64_t e = std::min(ch.end, b + kTile);
        update_moments(t, c, b, e);
        for (int64_t i = b; i < e; ++i) tile[i - b] = key_at(t, c, i);
        for (int64_t i = 0; i < e - b; ++i) ++h[tile[i] >> shift];
      }
    }

    // the boundary bin of each long segment, and where each chunk lists its entries of it
#pragma omp for schedule(dynamic, 1)
    for (int64_t s = 0; s < n_segments; ++s) {
      Segment& seg = segments[s];
      std::vector<uint64_t> total(kBins, 0);
      for (int64_t j = seg.first_chunk; j < seg.first_chunk + seg.chunks; ++j) {
        const uint32_t* h = &hist[static_cast<size_t>(j) * kBins];
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
        offset += hist[static_cast<size_t>(j) * kBins + bin];
      }
      if (!seg.whole_bin) {
        seg.cand_index.resize(offset);
        seg.cand_key.resize(offset);
      }
    }

    // pass 2: update the entries above the boundary bin, list the ones in it
#pragma omp for schedule(dynamic, 1)
    for (int64_t j = 0; j < n_chunks; ++j) {
      const Chunk& ch = chunks[j];
      Segment& seg = segments[ch.segment];
      const TensorArgs& t = tensors[seg.tensor];
      const uint32_t bin = static_cast<uint32_t>(seg.bin);
      int64_t out = ch.cand_offset;
      for (int64_t b = ch.begin; b < ch.end; b += kTile) {
        const int64_t e = std::min(ch.end, b + kTile);
        for (int64_t i = b; i < e; ++i) tile[i - b] = key_at(t, c, i);
        for (int64_t i = b; i < e; ++i) {
          const uint32_t key = tile[i - b];
          const uint32_t kb = key >> shift;
          if (kb > bin || (kb == bin && seg.whole_bin)) {
            update_entry(t, c, i);
          } else if (kb == bin) {
            seg.cand_index[out] = i;
            seg.cand_key[out] = key;
            ++out;
          } else {
            skip_entry(t, c, i);
          }
        }
      }
    }

    // the exact selection among the boundary bin's entries
#pragma omp for schedule(dynamic, 1)
    for (int64_t s = 0; s < n_segments; ++s) {
      Segment& seg = segments[s];
      if (seg.whole_bin) continue;
      const TensorArgs& t = tensors[seg.tensor];
      const int64_t n = static_cast<int64_t>(seg.cand_key.size());
      Boundary b = seg.need > 0 ? find_boundary(seg.cand_key.data(), n, seg.need, scratch) : Boundary{0, 0};
      for (int64_t q = 0; q < n; ++q) {
        const uint32_t key = seg.cand_key[q];
        if (seg.need > 0 && (key > b.kth || (key == b.kth && b.ties-- > 0))) {
          update_entry(t, c, seg.cand_index[q]);
        } else {
          skip_entry(t, c, seg.cand_index[q]);
        }
      }
    }
  }
}

}  // namespace

extern "C" {

// The ABI version: maskopt/cpu_step.py refuses a library that reports another.
int32_t maskopt_cpu_step_abi(void) { return 1; }

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
    default:
      return -1;
  }
}

}  // extern "C"
