// CPU kernels of the token + positional embedding op: the same semantics as the CUDA kernels
// (and the same Philox dropout mask), parallel over tokens (forward) or columns (backward).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
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
constexpr int64_t kColumnsPerTask = 64;

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

  // Consecutive positions advance each (sin, cos) pair by a rotation of inv_freq[i] radians.
  std::vector<double> inv_freq(half_dim), step_sin(half_dim), step_cos(half_dim);
  for (int64_t i = 0; i < half_dim; ++i) {
    inv_freq[i] = std::exp2(-static_cast<double>(i) * p.log2_base_over_half_dim);
    step_sin[i] = std::sin(inv_freq[i]);
    step_cos[i] = std::cos(inv_freq[i]);
  }
  std::atomic<unsigned long long> bad_id{kNoError}, bad_pos{kNoError};
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(dim, 1));

  at::parallel_for(0, p.n_tokens, grain, [&](int64_t begin, int64_t end) {
    std::vector<double> sin_pos(half_dim), cos_pos(half_dim);
    std::vector<acc_t> values(dim);
    std::vector<uint32_t> blocks;
    int64_t state_pos = -2;
    int steps = 0;
    for (int64_t token = begin; token < end; ++token) {
      const int64_t id = static_cast<int64_t>(ids[token]);
      const int64_t b = token / p.seq_len;
      const int64_t pos = p.start_offset + (p.start_pos ? p.start_pos[b] : 0) + (token - b * p.seq_len);
      T* out_row = out + token * dim;
      const bool bad_id_here = id < 0 || id >= p.vocab;
      if (bad_id_here || pos < 0 || (learned && pos >= p.max_positions)) {
        record_error(bad_id_here ? bad_id : bad_pos, token);
        std::fill(out_row, out_row + dim, T(0));
        continue;
      }
      const T* w = weight + id * dim;
      if (learned) {
        const T* pe = pos_weight + pos * dim;
        for (int64_t j = 0; j < dim; ++j) {
          values[j] = static_cast<acc_t>(w[j]) * static_cast<acc_t>(p.scale) + static_cast<acc_t>(pe[j]);
        }
      } else {
        if (pos == state_pos + 1 && steps < kRotationSteps) {
          for (int64_t i = 0; i < half_dim; ++i) {
            const double s = sin_pos[i], c = cos_pos[i];
            sin_pos[i] = s * step_cos[i] + c * step_sin[i];
            cos_pos[i] = c * step_cos[i] - s * step_sin[i];
          }
          ++steps;
        } else {
          for (int64_t i = 0; i < half_dim; ++i) {
            sin_pos[i] = std::sin(static_cast<double>(pos) * inv_freq[i]);
            cos_pos[i] = std::cos(static_cast<double>(pos) * inv_freq[i]);
          }
          steps = 0;
        }
        state_pos = pos;
        for (int64_t i = 0; i < half_dim; ++i) {
          values[2 * i] = static_cast<acc_t>(w[2 * i]) * static_cast<acc_t>(p.scale) +
                          static_cast<acc_t>(sin_pos[i]);
          values[2 * i + 1] = static_cast<acc_t>(w[2 * i + 1]) * static_cast<acc_t>(p.scale) +
                              static_cast<acc_t>(cos_pos[i]);
        }
      }
      if (p.dropout) apply_dropout(values.data(), token * dim, dim, seed, p.drop_threshold, p.drop_scale, blocks);
      for (int64_t j = 0; j < dim; ++j) out_row[j] = static_cast<T>(values[j]);
    }
  });
  slots[0] = bad_id.load();
  slots[1] = bad_pos.load();
}

// Sorted, column-parallel reduction: each task owns a band of columns and walks the tokens in
// key order, so every gradient element is summed by one thread in one fixed order
// (deterministic), in float32 (float64 for float64 tables), and written once.
template <typename T>
void backward_kernel(const EmbeddingBackwardParams& p) {
  using acc_t = acc_type_t<T>;
  const T* grad_output = static_cast<const T*>(p.grad_output);
  T* grad = static_cast<T*>(p.grad);
  const int64_t dim = p.dim;
  const uint64_t seed = p.dropout ? static_cast<uint64_t>(*p.seed) : 0;
  const int64_t tasks = (dim + kColumnsPerTask - 1) / kColumnsPerTask;

  at::parallel_for(0, tasks, 1, [&](int64_t task_begin, int64_t task_end) {
    std::vector<acc_t> acc(kColumnsPerTask), row(kColumnsPerTask);
    std::vector<uint32_t> blocks;
    for (int64_t task = task_begin; task < task_end; ++task) {
      const int64_t j0 = task * kColumnsPerTask;
      const int64_t width = std::min(kColumnsPerTask, dim - j0);
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t i = 0; i < p.n_tokens; ++i) {
        const int64_t key = p.sorted_keys[i];
        const bool counted = key != p.padding_idx && key >= 0 && key < p.num_rows;
        if (counted) {
          const int64_t token = p.order[i];
          const T* g = grad_output + token * dim + j0;
          for (int64_t j = 0; j < width; ++j) row[j] = static_cast<acc_t>(g[j]);
          if (p.dropout) {
            apply_dropout(row.data(), token * dim + j0, width, seed, p.drop_threshold, p.drop_scale, blocks);
          }
          for (int64_t j = 0; j < width; ++j) acc[j] += row[j];
        }
        if (i + 1 < p.n_tokens && p.sorted_keys[i + 1] == key) continue;
        if (counted) {
          T* out = grad + key * dim + j0;
          for (int64_t j = 0; j < width; ++j) {
            out[j] = static_cast<T>(acc[j] * static_cast<acc_t>(p.multiplier));
          }
        }
        std::fill(acc.begin(), acc.end(), acc_t(0));
      }
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
