// ATen side of the token + positional embedding op: argument checks and parameter blocks,
// shared by the CPU and CUDA implementations.
#pragma once
#include <ATen/ATen.h>

#include <optional>

#include "embedding_params.h"

namespace fasttransformer {

// Checks every argument (naming it) and returns the output tensor to fill.
at::Tensor embedding_forward_prepare(const at::Tensor& input_ids, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& pos_weight,
                                     const std::optional<at::Tensor>& start_pos,
                                     int64_t start_offset, double dropout_p,
                                     const std::optional<at::Tensor>& seed);

// Parameters for contiguous inputs; error_slots is left for the caller.
EmbeddingForwardParams embedding_forward_params(const at::Tensor& input_ids,
                                                const at::Tensor& weight,
                                                const std::optional<at::Tensor>& pos_weight,
                                                const std::optional<at::Tensor>& start_pos,
                                                int64_t start_offset, double scale,
                                                double dropout_p,
                                                const std::optional<at::Tensor>& seed,
                                                at::Tensor& out);

// Raises the error a kernel recorded in its two error slots, if any (slots on the host).
void raise_token_errors(const unsigned long long slots[2], const EmbeddingForwardParams& params,
                        const at::Tensor& input_ids, const std::optional<at::Tensor>& start_pos);

void embedding_backward_check(const at::Tensor& grad_output, const at::Tensor& keys,
                              int64_t num_rows, double dropout_p,
                              const std::optional<at::Tensor>& seed);

EmbeddingBackwardParams embedding_backward_params(const at::Tensor& grad_output,
                                                  const at::Tensor& keys, at::Tensor& grad,
                                                  double multiplier, double dropout_p,
                                                  const std::optional<at::Tensor>& seed,
                                                  std::optional<int64_t> padding_idx);

}  // namespace fasttransformer
