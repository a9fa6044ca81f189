// Shared helpers of the m2kernels grouped-collective extensions.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <vector>

namespace m2kernels {

// The torch version the extension was compiled against: setup.py writes m2_build_info.h into the
// build directory (a header, not a -D flag, so no shell quoting is involved).
#if __has_include("m2_build_info.h")
#include "m2_build_info.h"
#endif
#ifndef M2_TORCH_VERSION
#error "M2_TORCH_VERSION must be defined by the build (setup.py generates m2_build_info.h)"
#endif

// Validates a list of tensors passed to a collective: non-empty, defined, at least one dimension
// (outputs concatenate along dim 0), one device, and one dtype where the collective reduces.
inline void check_tensor_list(const std::vector<at::Tensor>& tensors, const char* op, bool same_dtype) {
  TORCH_CHECK_VALUE(!tensors.empty(), op, ": expected a non-empty list of tensors");
  const at::Tensor& first = tensors[0];
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK_VALUE(t.defined(), op, ": tensor ", i, " is undefined (None)");
    TORCH_CHECK_VALUE(t.dim() >= 1, op, ": tensor ", i, " is 0-dimensional; collectives here ",
                      "concatenate or split along dim 0, so every tensor needs at least one dimension");
    TORCH_CHECK_VALUE(t.device() == first.device(), op, ": tensor ", i, " is on ", t.device(),
                      " but tensor 0 is on ", first.device(), "; all tensors must share one device");
    if (same_dtype) {
      TORCH_CHECK_TYPE(t.scalar_type() == first.scalar_type(), op, ": tensor ", i, " has dtype ",
                       t.scalar_type(), " but tensor 0 has dtype ", first.scalar_type(),
                       "; a reducing collective needs one dtype for all tensors");
    }
  }
}

// A contiguous 1-D uint8 view of a tensor's bytes (copies only if the tensor is not contiguous).
inline at::Tensor as_bytes(const at::Tensor& t) {
  return t.contiguous().view({-1}).view(at::kByte);
}

inline int64_t nbytes_of(const at::Tensor& t) {
  return t.numel() * static_cast<int64_t>(t.element_size());
}

// Shape of rank-concatenated output: dim 0 multiplied by the group size.
inline std::vector<int64_t> gathered_shape(const at::Tensor& t, int64_t world) {
  std::vector<int64_t> shape(t.sizes().begin(), t.sizes().end());
  shape[0] *= world;
  return shape;
}

inline std::vector<int64_t> scattered_shape(const at::Tensor& t, int64_t world, const char* op, size_t i) {
  TORCH_CHECK_VALUE(t.size(0) % world == 0, op, ": tensor ", i, " has ", t.size(0),
                    " rows, which is not divisible by the group size ", world);
  std::vector<int64_t> shape(t.sizes().begin(), t.sizes().end());
  shape[0] /= world;
  return shape;
}

}  // namespace m2kernels
