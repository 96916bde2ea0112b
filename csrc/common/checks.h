#pragma once
// Input checks shared by the ops' glue (one per op, for every device: csrc/<op>.cpp),
// whose messages name the function and the argument. The Python wrappers check the
// same things first (vae_fast/_validate.py) with the same wording; these guard
// direct torch.ops.vae_fast.* calls, so a bad call never reaches a kernel. The error
// types are the wrappers' too: a wrong dtype raises TypeError, anything else ValueError.

#include <ATen/core/Tensor.h>

namespace vae_fast {

inline void check_float(const char* fn, const char* name, const at::Tensor& t) {
  const at::ScalarType type = t.scalar_type();  // not isFloatingType: it takes float8 too
  const bool ok = type == at::kDouble || type == at::kFloat || type == at::kBFloat16 ||
                  type == at::kHalf;
  TORCH_CHECK_TYPE(ok, fn, ": `", name, "` has dtype ", t.scalar_type(),
                   "; expected a floating dtype (float64, float32, bfloat16 or float16)");
}

// `t` must share dtype and device with `ref` (the first tensor argument).
inline void check_like(const char* fn, const char* name, const at::Tensor& t, const char* ref_name,
                       const at::Tensor& ref) {
  check_float(fn, name, t);
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), fn, ": `", name, "` has dtype ",
                   t.scalar_type(), " but `", ref_name, "` has ", ref.scalar_type(),
                   "; all float inputs of one call must share a dtype");
  TORCH_CHECK_VALUE(t.device() == ref.device(), fn, ": `", name, "` is on ", t.device(),
                    " but `", ref_name, "` is on ", ref.device(),
                    "; all inputs of one call must be on the same device");
}

inline void check_same_shape(const char* fn, const char* name_a, const at::Tensor& a,
                             const char* name_b, const at::Tensor& b) {
  TORCH_CHECK_VALUE(a.sizes() == b.sizes(), fn, ": `", name_b, "` has shape ", b.sizes(),
                    " but `", name_a, "` has shape ", a.sizes(), "; they must be equal");
}

// `t` must broadcast to `shape` without growing it: a scalar, trailing dims, or the same shape.
inline void check_broadcastable(const char* fn, const char* name, const at::Tensor& t,
                                const char* target, at::IntArrayRef shape) {
  bool ok = t.dim() <= static_cast<int64_t>(shape.size());
  for (int64_t i = 1; ok && i <= t.dim(); ++i) {
    const int64_t s = t.size(-i), n = shape[shape.size() - i];
    ok = s == 1 || s == n;
  }
  TORCH_CHECK_VALUE(ok, fn, ": `", name, "` has shape ", t.sizes(),
                    ", which does not broadcast to `", target, "`'s shape ", shape,
                    "; expected a scalar, trailing (per-feature) dims of it, or the same shape");
}

inline void check_event_dims(const char* fn, const at::Tensor& x, int64_t event_dims) {
  TORCH_CHECK_VALUE(event_dims >= 0 && event_dims <= x.dim(), fn, ": `event_dims`=", event_dims,
                    " is out of range for an input with ", x.dim(),
                    " dims; expected 0 <= event_dims <= ", x.dim());
}

inline void check_batch_shape(const char* fn, const char* name, const at::Tensor& grad,
                              at::IntArrayRef batch_shape) {
  TORCH_CHECK_VALUE(grad.sizes() == batch_shape, fn, ": `", name, "` has shape ", grad.sizes(),
                    "; expected the batch shape ", batch_shape);
}

}  // namespace vae_fast
