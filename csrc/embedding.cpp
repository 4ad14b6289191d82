#include "embedding.h"

#include <cmath>
#include <string>

namespace fasttransformer {
namespace {

constexpr const char* kOp = "fasttransformer::token_positional_embedding: ";

ScalarKind scalar_kind(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return ScalarKind::Float32;
    case at::kHalf: return ScalarKind::Float16;
    case at::kBFloat16: return ScalarKind::BFloat16;
    case at::kDouble: return ScalarKind::Float64;
    default: TORCH_CHECK(false, kOp, "unsupported dtype ", type);
  }
}

void set_dropout(double dropout_p, const std::optional<at::Tensor>& seed, bool& dropout,
                 uint32_t& threshold, double& drop_scale, const int64_t*& seed_ptr) {
  dropout = dropout_p > 0.0;
  threshold = static_cast<uint32_t>(std::llround(dropout_p * 16777216.0));
  drop_scale = dropout_p < 1.0 ? 1.0 / (1.0 - dropout_p) : 0.0;
  seed_ptr = dropout ? seed->data_ptr<int64_t>() : nullptr;
}

void check_dropout(double dropout_p, const std::optional<at::Tensor>& seed,
                   const at::Tensor& like) {
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p <= 1.0, kOp, "dropout_p must be in [0, 1], got ",
              dropout_p);
  if (dropout_p > 0.0) {
    TORCH_CHECK(seed.has_value() && seed->scalar_type() == at::kLong && seed->numel() == 1,
                kOp, "dropout needs seed, a one-element int64 tensor");
    TORCH_CHECK(seed->device() == like.device(), kOp, "seed is on ", seed->device(),
                " but the tensors are on ", like.device());
  }
}

}  // namespace

at::Tensor embedding_forward_prepare(const at::Tensor& input_ids, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& pos_weight,
                                     const std::optional<at::Tensor>& start_pos,
                                     int64_t start_offset, double dropout_p,
                                     const std::optional<at::Tensor>& seed) {
  TORCH_CHECK(input_ids.dim() == 2, kOp, "input_ids must be (batch, seq_len), got shape ",
              input_ids.sizes());
  TORCH_CHECK(input_ids.scalar_type() == at::kInt || input_ids.scalar_type() == at::kLong, kOp,
              "input_ids must be int32 or int64, got ", input_ids.scalar_type());
  TORCH_CHECK(weight.dim() == 2, kOp, "weight must be (num_embeddings, dim), got shape ",
              weight.sizes());
  scalar_kind(weight.scalar_type());
  TORCH_CHECK(input_ids.device() == weight.device(), kOp, "input_ids is on ",
              input_ids.device(), " but weight is on ", weight.device());
  const int64_t dim = weight.size(1);
  if (pos_weight.has_value()) {
    TORCH_CHECK(pos_weight->dim() == 2 && pos_weight->size(1) == dim, kOp,
                "pos_weight must be (max_positions, ", dim, "), got shape ", pos_weight->sizes());
    TORCH_CHECK(pos_weight->scalar_type() == weight.scalar_type(), kOp, "pos_weight is ",
                pos_weight->scalar_type(), " but weight is ", weight.scalar_type());
    TORCH_CHECK(pos_weight->device() == weight.device(), kOp, "pos_weight is on ",
                pos_weight->device(), " but weight is on ", weight.device());
  } else {
    TORCH_CHECK(dim % 2 == 0, kOp, "the sinusoidal encoding needs an even embedding dim, got ",
                dim, " (pass pos_weight for learned positions)");
  }
  if (start_pos.has_value()) {
    TORCH_CHECK(start_pos->dim() == 1 && start_pos->size(0) == input_ids.size(0), kOp,
                "start_pos must be an int (or a (batch,) int tensor), got shape ",
                start_pos->sizes());
    TORCH_CHECK(start_pos->scalar_type() == at::kLong, kOp, "start_pos must be int64, got ",
                start_pos->scalar_type());
    TORCH_CHECK(start_pos->device() == weight.device(), kOp, "start_pos is on ",
                start_pos->device(), " but weight is on ", weight.device());
  }
  TORCH_CHECK(start_offset >= 0, kOp, "start_pos must be >= 0, got ", start_offset);
  check_dropout(dropout_p, seed, weight);
  return at::empty({input_ids.size(0), input_ids.size(1), dim}, weight.options());
}

EmbeddingForwardParams embedding_forward_params(const at::Tensor& input_ids,
                                                const at::Tensor& weight,
                                                const std::optional<at::Tensor>& pos_weight,
                                                const std::optional<at::Tensor>& start_pos,
                                                int64_t start_offset, double scale,
                                                double dropout_p,
                                                const std::optional<at::Tensor>& seed,
                                                at::Tensor& out) {
  EmbeddingForwardParams p{};
  p.input_ids = input_ids.data_ptr();
  p.ids_int64 = input_ids.scalar_type() == at::kLong;
  p.weight = weight.data_ptr();
  p.pos_weight = pos_weight.has_value() ? pos_weight->data_ptr() : nullptr;
  p.start_pos = start_pos.has_value() ? start_pos->data_ptr<int64_t>() : nullptr;
  p.start_offset = start_offset;
  p.out = out.data_ptr();
  p.n_tokens = input_ids.numel();
  p.seq_len = input_ids.size(1);
  p.dim = weight.size(1);
  p.vocab = weight.size(0);
  p.max_positions = pos_weight.has_value() ? pos_weight->size(0) : 0;
  p.dtype = scalar_kind(weight.scalar_type());
  p.scale = scale;
  p.log2_base_over_half_dim = p.dim > 0 ? std::log2(10000.0) * 2.0 / static_cast<double>(p.dim) : 0.0;
  set_dropout(dropout_p, seed, p.dropout, p.drop_threshold, p.drop_scale, p.seed);
  return p;
}

void raise_token_errors(const unsigned long long slots[2], const EmbeddingForwardParams& p,
                        const at::Tensor& input_ids, const std::optional<at::Tensor>& start_pos) {
  if (slots[0] != kNoError) {
    const int64_t token = static_cast<int64_t>(slots[0]);
    const int64_t id = input_ids.reshape({-1})[token].item<int64_t>();
    TORCH_CHECK_INDEX(false, kOp, "input_ids[", token / p.seq_len, ", ", token % p.seq_len,
                      "] = ", id, " is outside [0, num_embeddings = ", p.vocab, ")");
  }
  if (slots[1] != kNoError) {
    const int64_t token = static_cast<int64_t>(slots[1]);
    const int64_t b = token / p.seq_len, t = token % p.seq_len;
    const int64_t row_start = start_pos.has_value() ? start_pos->select(0, b).item<int64_t>() : 0;
    const int64_t position = p.start_offset + row_start + t;
    TORCH_CHECK_INDEX(false, kOp, "token [", b, ", ", t, "] is at position ", position,
                      " (start_pos", start_pos.has_value() ? "[b]" : "", " + t), outside ",
                      p.pos_weight ? "[0, max_positions = " + std::to_string(p.max_positions) + ")"
                                   : std::string("[0, inf)"));
  }
}

void embedding_backward_check(const at::Tensor& grad_output, const at::Tensor& keys,
                              int64_t num_rows, double dropout_p,
                              const std::optional<at::Tensor>& seed) {
  constexpr const char* op = "fasttransformer::token_positional_embedding_backward: ";
  TORCH_CHECK(grad_output.dim() == 3, op, "grad_output must be (batch, seq_len, dim), got ",
              grad_output.sizes());
  TORCH_CHECK(keys.dim() == 2 && keys.size(0) == grad_output.size(0) &&
                  keys.size(1) == grad_output.size(1),
              op, "index must be (batch, seq_len) = ", grad_output.sizes().slice(0, 2), ", got ",
              keys.sizes());
  TORCH_CHECK(keys.scalar_type() == at::kInt || keys.scalar_type() == at::kLong, op,
              "index must be int32 or int64, got ", keys.scalar_type());
  TORCH_CHECK(keys.device() == grad_output.device(), op, "index is on ", keys.device(),
              " but grad_output is on ", grad_output.device());
  TORCH_CHECK(num_rows >= 0, op, "num_rows must be >= 0, got ", num_rows);
  scalar_kind(grad_output.scalar_type());
  check_dropout(dropout_p, seed, grad_output);
}

EmbeddingBackwardParams embedding_backward_params(const at::Tensor& grad_output,
                                                  const at::Tensor& keys, at::Tensor& grad,
                                                  double multiplier, double dropout_p,
                                                  const std::optional<at::Tensor>& seed,
                                                  std::optional<int64_t> padding_idx) {
  EmbeddingBackwardParams p{};
  p.grad_output = grad_output.data_ptr();
  p.dtype = scalar_kind(grad_output.scalar_type());
  p.keys = keys.data_ptr<int64_t>();
  p.grad = grad.data_ptr();
  p.n_tokens = keys.numel();
  p.dim = grad.size(1);
  p.num_rows = grad.size(0);
  p.padding_idx = padding_idx.value_or(-1);
  p.multiplier = multiplier;
  set_dropout(dropout_p, seed, p.dropout, p.drop_threshold, p.drop_scale, p.seed);
  return p;
}

}  // namespace fasttransformer
