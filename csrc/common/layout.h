#pragma once
// How the ops see their inputs: a (rows, cols) matrix, where cols is the product of
// the last `event_dims` dims (summed per row) and rows the product of the rest.

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <vector>

namespace vae_fast {

struct RowLayout {
  int64_t rows = 1;
  int64_t cols = 1;
  std::vector<int64_t> batch_shape;  // the output shape
};

inline RowLayout row_layout(const at::Tensor& x, int64_t event_dims) {
  RowLayout layout;
  const int64_t batch_dims = x.dim() - event_dims;
  for (int64_t d = 0; d < x.dim(); ++d) {
    if (d < batch_dims) {
      layout.rows *= x.size(d);
      layout.batch_shape.push_back(x.size(d));
    } else {
      layout.cols *= x.size(d);
    }
  }
  return layout;
}

// The per-row sums every kernel writes (log-likelihoods, KLs), uninitialised: in the
// accumulation dtype (float32 for bf16/fp16 inputs), so that a loss formed from them is
// not rounded twice (beta*kl - ll rounded from half-precision rows loses the loss where
// the two nearly cancel). The single-term ops return them in their input's dtype.
inline at::Tensor empty_rows(at::IntArrayRef shape, const at::Tensor& like) {
  return at::empty(shape, like.options().dtype(at::toOpMathType(like.scalar_type())));
}

// A tensor broadcastable to x, as the kernels read it. A shared (scalar or
// per-feature) log-variance stays small: its gradient is reduced over rows inside
// the kernel instead of materialising a full-size temporary and summing it.
enum class Broadcast { kScalar, kFeature, kElement };

struct BroadcastOperand {
  Broadcast kind = Broadcast::kElement;
  at::Tensor data;  // kScalar: 1 element; kFeature: (cols); kElement: (rows, cols)
};

inline BroadcastOperand broadcast_operand(const at::Tensor& t, const at::Tensor& x,
                                          int64_t event_dims, const RowLayout& layout) {
  if (t.numel() == 1) {
    return {Broadcast::kScalar, t.reshape({1}).contiguous()};
  }
  // Per-feature: every dim of t aligned with a batch dim of x is 1 (or absent), and
  // every dim aligned with an event dim equals x's.
  bool per_feature = true;
  for (int64_t i = 1; i <= t.dim() && per_feature; ++i) {
    const bool event_dim = i <= event_dims;
    per_feature = event_dim ? t.size(-i) == x.size(-i) : t.size(-i) == 1;
  }
  for (int64_t i = t.dim() + 1; i <= event_dims && per_feature; ++i) {
    per_feature = x.size(-i) == 1;
  }
  if (per_feature) {
    return {Broadcast::kFeature, t.reshape({layout.cols}).contiguous()};
  }
  return {Broadcast::kElement, t.expand(x.sizes()).reshape({layout.rows, layout.cols}).contiguous()};
}

// The gradient of a BroadcastOperand, returned in the original tensor's shape.
inline at::Tensor gradient_in_shape(const at::Tensor& grad, const at::Tensor& original) {
  if (grad.sizes() == original.sizes()) return grad;
  if (grad.numel() == original.numel()) return grad.reshape(original.sizes());
  return grad.sum_to_size(original.sizes()).contiguous();
}

// The gradient of a BroadcastOperand, written by a kernel in the operand's layout
// (1 element, (cols) or (rows, cols)), in the original tensor's shape.
inline at::Tensor operand_gradient_in_shape(Broadcast kind, const at::Tensor& grad_layout,
                                            const at::Tensor& x, const at::Tensor& original) {
  return kind == Broadcast::kElement ? gradient_in_shape(grad_layout.view(x.sizes()), original)
                                     : grad_layout.reshape(original.sizes());
}

inline at::Tensor as_matrix(const at::Tensor& t, const RowLayout& layout) {
  return t.reshape({layout.rows, layout.cols}).contiguous();
}

}  // namespace vae_fast
