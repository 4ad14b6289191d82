// CPU kernels of the token + positional embedding op: the same semantics as the CUDA kernels
// (and the same Philox dropout mask), parallel over tokens (forward) or columns (backward).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "embedding.h"
#include "philox.h"

namespace fasttransformer {
namespace {

// After this many rotation steps the sinusoid is recomputed from sin/cos: the rotation in double
// drifts by ~1e-16 a step, and recomputing costs d sin/cos calls (at every 32 steps it was 40%
// of the forward's time at d = 512).
constexpr int kRotationSteps = 256;

template <typename T>
using acc_type_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

void record_error(std::atomic<unsigned long long>& slot, int64_t token) {
  unsigned long long current = slot.load();
  const auto value = static_cast<unsigned long long>(token);
  while (value < current && !slot.compare_exchange_weak(current, value)) {
  }
}

// Philox words of the elements [e0, e0 + n): element e draws word e % 4 of block e / 4.
// The blocks are independent, so the loop over them vectorises.
void random_words(uint64_t seed, int64_t e0, int64_t n, std::vector<uint32_t>& blocks,
                  const uint32_t*& words) {
  const int64_t first = e0 / 4, count = (e0 + n + 3) / 4 - first;
  blocks.resize(4 * count);
  uint32_t* out = blocks.data();
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) philox4x32_10(static_cast<uint64_t>(first + i), seed, out + 4 * i);
  words = out + (e0 - 4 * first);
}

template <typename acc_t>
void apply_dropout(acc_t* values, int64_t e0, int64_t n, uint64_t seed, uint32_t threshold,
                   double drop_scale, std::vector<uint32_t>& blocks) {
  const uint32_t* words;
  random_words(seed, e0, n, blocks, words);
  const acc_t kept = static_cast<acc_t>(drop_scale);
  for (int64_t j = 0; j < n; ++j) values[j] *= dropout_keep(words[j], threshold) ? kept : acc_t(0);
}

// Conversions written on the bits, so the loops that use them vectorise (c10's operators do not).
inline float to_acc(float v) { return v; }
inline double to_acc(double v) { return v; }
inline float to_acc(c10::Half v) { return static_cast<float>(v); }
inline float to_acc(c10::BFloat16 v) {
  const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}
inline void from_acc(float v, float& out) { out = v; }
inline void from_acc(double v, double& out) { out = v; }
inline void from_acc(float v, c10::Half& out) { out = c10::Half(v); }
inline void from_acc(float v, c10::BFloat16& out) {  // round to nearest even, NaN kept
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  out.x = static_cast<uint16_t>(v != v ? 0x7FC0u : rounded);
}

// sin/cos of pos * inv_freq[i] for consecutive positions: each step rotates the pairs by
// inv_freq[i] (in double), and every kRotationSteps (or on a jump) they are recomputed.
class SinusoidStream {
 public:
  SinusoidStream(const std::vector<double>& inv_freq, const std::vector<double>& step_sin,
                 const std::vector<double>& step_cos)
      : inv_freq_(inv_freq), step_sin_(step_sin), step_cos_(step_cos),
        sin_(inv_freq.size()), cos_(inv_freq.size()) {}

  void seek(int64_t pos) {
    const int64_t pairs = static_cast<int64_t>(inv_freq_.size());
    if (pos == pos_ + 1 && steps_ < kRotationSteps) {
      for (int64_t i = 0; i < pairs; ++i) {
        const double s = sin_[i], c = cos_[i];
        sin_[i] = s * step_cos_[i] + c * step_sin_[i];
        cos_[i] = c * step_cos_[i] - s * step_sin_[i];
      }
      ++steps_;
    } else if (pos != pos_) {
      for (int64_t i = 0; i < pairs; ++i) {
        sin_[i] = std::sin(static_cast<double>(pos) * inv_freq_[i]);
        cos_[i] = std::cos(static_cast<double>(pos) * inv_freq_[i]);
      }
      steps_ = 0;
    }
    pos_ = pos;
  }

  // P[pos] interleaved (sin, cos, sin, ...) into out[0, 2 * pairs).
  template <typename acc_t>
  void write(acc_t* out) const {
    for (size_t i = 0; i < sin_.size(); ++i) {
      out[2 * i] = static_cast<acc_t>(sin_[i]);
      out[2 * i + 1] = static_cast<acc_t>(cos_[i]);
    }
  }

 private:
  const std::vector<double>& inv_freq_;
  const std::vector<double>& step_sin_;
  const std::vector<double>& step_cos_;
  std::vector<double> sin_, cos_;
  int64_t pos_ = -2;
  int steps_ = 0;
};

// When every sequence starts at the same position (start_pos an int), the sinusoid of the L
// positions is computed once per call and shared by the batch rows, up to this many elements.
constexpr int64_t kMaxSharedSinusoid = int64_t{1} << 22;
// Weight rows are prefetched this many tokens ahead (bf16, d = 512, 16k tokens, 2 threads:
// 4.0 ms without, 3.1 ms at 4 or 8 ahead, 3.4 ms at 16).
constexpr int64_t kPrefetchTokens = 4;

template <typename T, typename Index>
void forward_kernel(const EmbeddingForwardParams& p, unsigned long long slots[2]) {
  using acc_t = acc_type_t<T>;
  const Index* ids = static_cast<const Index*>(p.input_ids);
  const T* weight = static_cast<const T*>(p.weight);
  const T* pos_weight = static_cast<const T*>(p.pos_weight);
  T* out = static_cast<T*>(p.out);
  const bool learned = pos_weight != nullptr;
  const int64_t dim = p.dim, half_dim = learned ? 0 : dim / 2;
  const uint64_t seed = p.dropout ? static_cast<uint64_t>(*p.seed) : 0;
  const acc_t scale = static_cast<acc_t>(p.scale);

  std::vector<double> inv_freq(half_dim), step_sin(half_dim), step_cos(half_dim);
  for (int64_t i = 0; i < half_dim; ++i) {
    inv_freq[i] = std::exp2(-static_cast<double>(i) * p.log2_base_over_half_dim);
    step_sin[i] = std::sin(inv_freq[i]);
    step_cos[i] = std::cos(inv_freq[i]);
  }
  std::vector<acc_t> shared;  // (seq_len, dim): P[start_offset + t]
  if (!learned && p.start_pos == nullptr && p.seq_len * dim <= kMaxSharedSinusoid) {
    shared.resize(p.seq_len * dim);
    at::parallel_for(0, p.seq_len, std::max<int64_t>(1, 4096 / std::max<int64_t>(dim, 1)),
                     [&](int64_t begin, int64_t end) {
      SinusoidStream stream(inv_freq, step_sin, step_cos);
      for (int64_t t = begin; t < end; ++t) {
        stream.seek(p.start_offset + t);
        stream.write(shared.data() + t * dim);
      }
    });
  }

  std::atomic<unsigned long long> bad_id{kNoError}, bad_pos{kNoError};
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(dim, 1));
  at::parallel_for(0, p.n_tokens, grain, [&](int64_t begin, int64_t end) {
    SinusoidStream stream(inv_freq, step_sin, step_cos);
    std::vector<acc_t> values(dim), encoding(learned || !shared.empty() ? 0 : dim);
    std::vector<uint32_t> blocks;
    for (int64_t token = begin; token < end; ++token) {
      const int64_t id = static_cast<int64_t>(ids[token]);
      const int64_t b = token / p.seq_len, t = token - b * p.seq_len;
      const int64_t pos = p.start_offset + (p.start_pos ? p.start_pos[b] : 0) + t;
      T* out_row = out + token * dim;
      const bool bad_id_here = id < 0 || id >= p.vocab;
      if (bad_id_here || pos < 0 || (learned && pos >= p.max_positions)) {
        record_error(bad_id_here ? bad_id : bad_pos, token);
        std::fill(out_row, out_row + dim, T(0));
        continue;
      }
      if (token + kPrefetchTokens < end) {  // rows are gathered at random: fetch ahead
        const int64_t ahead = static_cast<int64_t>(ids[token + kPrefetchTokens]);
        if (ahead >= 0 && ahead < p.vocab) {
          const char* row = reinterpret_cast<const char*>(weight + ahead * dim);
          for (int64_t byte = 0; byte < dim * static_cast<int64_t>(sizeof(T)); byte += 64) {
            __builtin_prefetch(row + byte);
          }
        }
      }
      const T* w = weight + id * dim;
      acc_t* v = values.data();
      if (learned) {
        const T* pe = pos_weight + pos * dim;
#pragma omp simd
        for (int64_t j = 0; j < dim; ++j) v[j] = to_acc(w[j]) * scale + to_acc(pe[j]);
      } else {
        const acc_t* pe = shared.empty() ? encoding.data() : shared.data() + t * dim;
        if (shared.empty()) {
          stream.seek(pos);
          stream.write(encoding.data());
        }
#pragma omp simd
        for (int64_t j = 0; j < dim; ++j) v[j] = to_acc(w[j]) * scale + pe[j];
      }
      if (p.dropout) apply_dropout(v, token * dim, dim, seed, p.drop_threshold, p.drop_scale, blocks);
#pragma omp simd
      for (int64_t j = 0; j < dim; ++j) from_acc(v[j], out_row[j]);
    }
  });
  slots[0] = bad_id.load();
  slots[1] = bad_pos.load();
}

// Sorted reduction: tokens sorted by key form runs of equal keys; each thread owns the runs that
// start in its range of sorted positions and sums each run, whole rows at a time, in sorted
// order, in float32 (float64 for float64 tables), writing its row once. One fixed order per
// row: deterministic. (Column bands over all tokens re-gathered every row 8 times at d = 512:
// 11.5 ms against 4 ms for this.)
template <typename T>
void backward_kernel(const EmbeddingBackwardParams& p) {
  using acc_t = acc_type_t<T>;
  const T* grad_output = static_cast<const T*>(p.grad_output);
  T* grad = static_cast<T*>(p.grad);
  const int64_t dim = p.dim, n = p.n_tokens;
  const uint64_t seed = p.dropout ? static_cast<uint64_t>(*p.seed) : 0;
  const acc_t multiplier = static_cast<acc_t>(p.multiplier);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(dim, 1));

  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(dim), row(dim);
    std::vector<uint32_t> blocks;
    int64_t i = begin;
    while (i > 0 && i < end && p.sorted_keys[i] == p.sorted_keys[i - 1]) ++i;  // not ours
    while (i < end) {
      const int64_t key = p.sorted_keys[i];
      const bool counted = key != p.padding_idx && key >= 0 && key < p.num_rows;
      int64_t k = i;
      if (!counted) {
        while (k < n && p.sorted_keys[k] == key) ++k;
        i = k;
        continue;
      }
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (; k < n && p.sorted_keys[k] == key; ++k) {
        if (k + kPrefetchTokens < n) {
          const char* ahead = reinterpret_cast<const char*>(grad_output + p.order[k + kPrefetchTokens] * dim);
          for (int64_t byte = 0; byte < dim * static_cast<int64_t>(sizeof(T)); byte += 64) {
            __builtin_prefetch(ahead + byte);
          }
        }
        const int64_t token = p.order[k];
        const T* g = grad_output + token * dim;
        acc_t* r = row.data();
#pragma omp simd
        for (int64_t j = 0; j < dim; ++j) r[j] = to_acc(g[j]);
        if (p.dropout) apply_dropout(r, token * dim, dim, seed, p.drop_threshold, p.drop_scale, blocks);
        acc_t* a = acc.data();
#pragma omp simd
        for (int64_t j = 0; j < dim; ++j) a[j] += r[j];
      }
      T* out = grad + key * dim;
      const acc_t* a = acc.data();
#pragma omp simd
      for (int64_t j = 0; j < dim; ++j) from_acc(a[j] * multiplier, out[j]);
      i = k;
    }
  });
}

at::Tensor token_positional_embedding_cpu(const at::Tensor& input_ids, const at::Tensor& weight,
                                          const std::optional<at::Tensor>& pos_weight,
                                          const std::optional<at::Tensor>& start_pos,
                                          int64_t start_offset, double scale, double dropout_p,
                                          const std::optional<at::Tensor>& seed,
                                          std::optional<int64_t> padding_idx, bool check_ids) {
  (void)padding_idx;  // affects only the backward
  (void)check_ids;    // the CPU always checks: no synchronisation to avoid
  at::Tensor out = embedding_forward_prepare(input_ids, weight, pos_weight, start_pos,
                                             start_offset, dropout_p, seed);
  const at::Tensor ids = input_ids.contiguous(), table = weight.contiguous();
  const std::optional<at::Tensor> positions =
      pos_weight.has_value() ? std::optional<at::Tensor>(pos_weight->contiguous()) : std::nullopt;
  const std::optional<at::Tensor> starts =
      start_pos.has_value() ? std::optional<at::Tensor>(start_pos->contiguous()) : std::nullopt;
  EmbeddingForwardParams p = embedding_forward_params(ids, table, positions, starts, start_offset,
                                                      scale, dropout_p, seed, out);
  unsigned long long slots[2] = {kNoError, kNoError};
  if (p.n_tokens > 0) {  // also with dim == 0: ids and positions are still checked
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, table.scalar_type(), "token_positional_embedding_cpu", [&] {
      if (p.ids_int64) forward_kernel<scalar_t, int64_t>(p, slots);
      else forward_kernel<scalar_t, int32_t>(p, slots);
    });
  }
  raise_token_errors(slots, p, ids, starts);
  return out;
}

at::Tensor token_positional_embedding_backward_cpu(const at::Tensor& grad_output,
                                                   const at::Tensor& index, c10::SymInt num_rows,
                                                   double multiplier, double dropout_p,
                                                   const std::optional<at::Tensor>& seed,
                                                   std::optional<int64_t> padding_idx,
                                                   bool deterministic) {
  (void)deterministic;  // the CPU path is always deterministic
  const int64_t rows = num_rows.expect_int();
  embedding_backward_check(grad_output, index, rows, dropout_p, seed);
  const at::Tensor g = grad_output.contiguous();
  const at::Tensor keys = index.reshape({-1}).to(at::kLong).contiguous();
  at::Tensor grad = at::zeros({rows, g.size(2)}, g.options());
  EmbeddingBackwardParams p =
      embedding_backward_params(g, keys, grad, multiplier, dropout_p, seed, padding_idx);
  if (p.n_tokens == 0 || p.dim == 0) return grad;
  auto [sorted_keys, order] = keys.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false);
  p.sorted_keys = sorted_keys.data_ptr<int64_t>();
  p.order = order.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "token_positional_embedding_backward_cpu", [&] {
    backward_kernel<scalar_t>(p);
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(fasttransformer, CPU, m) {
  m.impl("token_positional_embedding", &token_positional_embedding_cpu);
  m.impl("token_positional_embedding_backward", &token_positional_embedding_backward_cpu);
}

}  // namespace fasttransformer
