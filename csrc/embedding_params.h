// Plain parameter blocks for the token + positional embedding kernels (CPU and CUDA).
// Torch-free and CUDA-free, so the .cu files can include it.
#pragma once
#include <cstdint>

namespace fasttransformer {

enum class ScalarKind : int { Float32 = 0, Float16 = 1, BFloat16 = 2, Float64 = 3 };

// No token has hit an error while an error slot holds this value.
constexpr unsigned long long kNoError = ~0ull;

struct EmbeddingForwardParams {
  const void* input_ids;        // (n_tokens,) int32 or int64
  bool ids_int64;
  const void* weight;           // (vocab, dim)
  const void* pos_weight;       // (max_positions, dim) or nullptr for the sinusoid
  const int64_t* start_pos;     // (batch,) or nullptr
  int64_t start_offset;         // added to every position
  void* out;                    // (n_tokens, dim)
  int64_t n_tokens, seq_len, dim, vocab, max_positions;
  ScalarKind dtype;
  double scale;                 // double: exact for float64 tables
  double log2_base_over_half_dim;  // log2(10000) * 2 / dim: inv_freq(i) = 2^(-i * this)
  bool dropout;
  uint32_t drop_threshold;      // round(p * 2^24)
  double drop_scale;            // 1 / (1 - p), or 0 when p == 1
  const int64_t* seed;          // one int64 on the tensors' device
  // error_slots[0]: smallest token index with an id outside [0, vocab);
  // error_slots[1]: smallest token index with a position outside the table (or negative).
  unsigned long long* error_slots;
  bool trap_on_error;           // CUDA only: device-side assert instead (error_slots is null)
};

struct EmbeddingBackwardParams {
  const void* grad_output;      // (n_tokens, dim), contiguous
  ScalarKind dtype;
  const int64_t* keys;          // (n_tokens,) row of the gradient each token adds to
  const int64_t* sorted_keys;   // keys sorted (stable), for the deterministic path
  const int64_t* order;         // token index of each sorted key
  void* grad;                   // (num_rows, dim), zero-initialised by the caller
  void* partial;                // deterministic CUDA path: 2 * num_chunks * dim accumulators
  int64_t n_tokens, dim, num_rows;
  int64_t padding_idx;          // -1: none
  double multiplier;            // `scale` for the token table, 1 for the position table
  bool dropout;
  uint32_t drop_threshold;
  double drop_scale;
  const int64_t* seed;
};

}  // namespace fasttransformer
