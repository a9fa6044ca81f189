// Grouped collectives over any c10d backend (gloo on CPU, NCCL through ProcessGroupNCCL on GPU).
//
// Every op takes the process group by name (a Python group's `group.group_name`) and resolves it
// with c10d::resolve_process_group, so the ops are real dispatcher ops that torch.compile can trace
// (Meta kernels below give the output shapes). Several tensors travel through ONE flat byte buffer
// and ONE collective per call.
#include <Python.h>

#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/GroupRegistry.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/library.h>

#include <string>
#include <vector>

#include "common.h"

// Read from the file by m2kernels/_ext.py BEFORE the library is loaded, so that an extension built
// against another torch is refused with a warning instead of failing to link (or worse) at load.
extern "C" __attribute__((used, visibility("default"))) const char m2kernels_build_marker[] =
    "M2KERNELS_BUILD_TORCH_VERSION=" M2_TORCH_VERSION ";";

namespace m2kernels {
namespace {

constexpr int kRingTag = 0x4d32;  // "M2"

c10::intrusive_ptr<c10d::ProcessGroup> group_of(const std::string& group_name) {
  TORCH_CHECK_VALUE(!group_name.empty(), "m2kernels: empty process-group name");
  return c10d::resolve_process_group(group_name);
}

at::Tensor pack_bytes(const std::vector<at::Tensor>& tensors) {
  std::vector<at::Tensor> parts;
  parts.reserve(tensors.size());
  for (const auto& t : tensors) parts.push_back(as_bytes(t));
  return at::cat(parts);  // always a fresh buffer, never a view of an input
}

// Copies a flat byte buffer into fresh tensors shaped like `like` (same order and dtypes).
std::vector<at::Tensor> unpack_bytes(const at::Tensor& flat, const std::vector<at::Tensor>& like) {
  std::vector<at::Tensor> out;
  out.reserve(like.size());
  int64_t off = 0;
  for (const auto& t : like) {
    at::Tensor o = at::empty(t.sizes(), t.options().memory_format(at::MemoryFormat::Contiguous));
    const int64_t nb = nbytes_of(t);
    if (nb > 0) o.view({-1}).view(at::kByte).copy_(flat.narrow(0, off, nb));
    off += nb;
    out.push_back(o);
  }
  return out;
}

std::vector<at::Tensor> all_gather_coalesced(at::TensorList tensor_list, std::string group_name) {
  std::vector<at::Tensor> tensors = tensor_list.vec();
  check_tensor_list(tensors, "all_gather_coalesced", /*same_dtype=*/false);
  auto pg = group_of(group_name);
  const int64_t world = pg->getSize();
  at::Tensor flat = pack_bytes(tensors);
  const int64_t n = flat.numel();
  at::Tensor gathered = at::empty({world * n}, flat.options());
  if (world == 1) {
    gathered.copy_(flat);
  } else if (n > 0) {
    pg->all_gather_single(gathered, flat)->wait();
  }
  // gathered is (world, n): rank r's bytes of tensor i sit at [r, off_i : off_i + nb_i].
  at::Tensor rows = gathered.view({world, n});
  std::vector<at::Tensor> out;
  out.reserve(tensors.size());
  int64_t off = 0;
  for (const auto& t : tensors) {
    at::Tensor o = at::empty(gathered_shape(t, world), t.options().memory_format(at::MemoryFormat::Contiguous));
    const int64_t nb = nbytes_of(t);
    if (nb > 0) o.view({-1}).view(at::kByte).view({world, nb}).copy_(rows.narrow(1, off, nb));
    off += nb;
    out.push_back(o);
  }
  return out;
}

std::vector<at::Tensor> reduce_scatter_coalesced(at::TensorList tensor_list, std::string group_name) {
  std::vector<at::Tensor> tensors = tensor_list.vec();
  check_tensor_list(tensors, "reduce_scatter_coalesced", /*same_dtype=*/true);
  auto pg = group_of(group_name);
  const int64_t world = pg->getSize();
  // Lay the inputs out as (world, sum_i chunk_i): row r holds the chunks destined for rank r.
  std::vector<at::Tensor> cols;
  cols.reserve(tensors.size());
  std::vector<std::vector<int64_t>> shapes;
  for (size_t i = 0; i < tensors.size(); ++i) {
    shapes.push_back(scattered_shape(tensors[i], world, "reduce_scatter_coalesced", i));
    cols.push_back(tensors[i].contiguous().view({world, tensors[i].numel() / world}));
  }
  at::Tensor flat = at::cat(cols, 1).contiguous().view({-1});
  const int64_t chunk = flat.numel() / world;
  at::Tensor reduced = at::empty({chunk}, flat.options());
  if (world == 1) {
    reduced.copy_(flat);
  } else if (chunk > 0) {
    c10d::ReduceScatterOptions opts;
    opts.reduceOp = c10d::ReduceOp::SUM;
    pg->reduce_scatter_single(reduced, flat, opts)->wait();
  }
  std::vector<at::Tensor> out;
  out.reserve(tensors.size());
  int64_t off = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const int64_t c = tensors[i].numel() / world;
    out.push_back(reduced.narrow(0, off, c).view(shapes[i]).clone(at::MemoryFormat::Contiguous));
    off += c;
  }
  return out;
}

// Posts send(flat, rank+shift) and recv(buffer, rank-shift); returns {recv_buffer, send_buffer} with the
// pending work registered on both (c10d::register_work), to be awaited with
// torch.ops._c10d_functional.wait_tensor. The send buffer is returned so it stays alive until then.
std::vector<at::Tensor> ring_exchange_start(at::TensorList tensor_list, std::string group_name, int64_t shift) {
  std::vector<at::Tensor> tensors = tensor_list.vec();
  check_tensor_list(tensors, "ring_exchange", /*same_dtype=*/false);
  auto pg = group_of(group_name);
  const int world = pg->getSize();
  const int rank = pg->getRank();
  at::Tensor send = pack_bytes(tensors);
  at::Tensor recv = at::empty_like(send);
  const int s = static_cast<int>(((shift % world) + world) % world);
  if (s == 0) {  // world size 1, or a shift that comes back to this rank
    recv.copy_(send);
    return {recv, send};
  }
  if (send.numel() == 0) return {recv, send};
  std::vector<at::Tensor> sv{send};
  std::vector<at::Tensor> rv{recv};
  const int next = (rank + s) % world;
  const int prev = (rank - s + world) % world;
  if (send.is_cuda()) {
    // NCCL: both point-to-point ops in one group call, otherwise the ring can deadlock.
    pg->startCoalescing(c10::DeviceType::CUDA);
    pg->send(sv, next, kRingTag);
    pg->recv(rv, prev, kRingTag);
    auto work = pg->endCoalescing(c10::DeviceType::CUDA);
    TORCH_CHECK(work, "ring_exchange: endCoalescing returned no work object");
    c10d::register_work(recv, work);
    c10d::register_work(send, work);
  } else {
    auto send_work = pg->send(sv, next, kRingTag);
    auto recv_work = pg->recv(rv, prev, kRingTag);
    c10d::register_work(send, send_work);
    c10d::register_work(recv, recv_work);
  }
  return {recv, send};
}

std::vector<at::Tensor> ring_exchange(at::TensorList tensor_list, std::string group_name, int64_t shift) {
  std::vector<at::Tensor> tensors = tensor_list.vec();
  auto bufs = ring_exchange_start(tensor_list, std::move(group_name), shift);
  c10d::wait_tensor(bufs[1]);
  c10d::wait_tensor(bufs[0]);
  return unpack_bytes(bufs[0], tensors);
}

// ---- Meta kernels: shapes only, for FakeTensor tracing under torch.compile. ----

int64_t group_size(const std::string& group_name) { return group_of(group_name)->getSize(); }

std::vector<at::Tensor> all_gather_coalesced_meta(at::TensorList tensor_list, std::string group_name) {
  std::vector<at::Tensor> tensors = tensor_list.vec();
  check_tensor_list(tensors, "all_gather_coalesced", false);
  const int64_t world = group_size(group_name);
  std::vector<at::Tensor> out;
  for (const auto& t : tensors) out.push_back(at::empty(gathered_shape(t, world), t.options()));
  return out;
}

std::vector<at::Tensor> reduce_scatter_coalesced_meta(at::TensorList tensor_list, std::string group_name) {
  std::vector<at::Tensor> tensors = tensor_list.vec();
  check_tensor_list(tensors, "reduce_scatter_coalesced", true);
  const int64_t world = group_size(group_name);
  std::vector<at::Tensor> out;
  for (size_t i = 0; i < tensors.size(); ++i) {
    out.push_back(at::empty(scattered_shape(tensors[i], world, "reduce_scatter_coalesced", i),
                            tensors[i].options()));
  }
  return out;
}

std::vector<at::Tensor> ring_exchange_meta(at::TensorList tensor_list, std::string group_name, int64_t shift) {
  std::vector<at::Tensor> tensors = tensor_list.vec();
  check_tensor_list(tensors, "ring_exchange", false);
  std::vector<at::Tensor> out;
  for (const auto& t : tensors) out.push_back(at::empty(t.sizes(), t.options()));
  return out;
}

std::vector<at::Tensor> ring_exchange_start_meta(at::TensorList tensor_list, std::string group_name,
                                                 int64_t shift) {
  std::vector<at::Tensor> tensors = tensor_list.vec();
  check_tensor_list(tensors, "ring_exchange", false);
  int64_t total = 0;
  for (const auto& t : tensors) total += nbytes_of(t);
  auto opts = tensors[0].options().dtype(at::kByte);
  return {at::empty({total}, opts), at::empty({total}, opts)};
}

std::string build_torch_version() { return M2_TORCH_VERSION; }

}  // namespace
}  // namespace m2kernels

TORCH_LIBRARY(m2kernels, m) {
  m.def("all_gather_coalesced(Tensor[] tensors, str group_name) -> Tensor[]");
  m.def("reduce_scatter_coalesced(Tensor[] tensors, str group_name) -> Tensor[]");
  // shift: send to group rank (rank + shift) mod world, receive from (rank - shift) mod world.
  m.def("ring_exchange(Tensor[] tensors, str group_name, int shift=1) -> Tensor[]");
  m.def("ring_exchange_start(Tensor[] tensors, str group_name, int shift=1) -> Tensor[]");
  m.def("build_torch_version() -> str", &m2kernels::build_torch_version);
}

TORCH_LIBRARY_IMPL(m2kernels, CompositeExplicitAutograd, m) {
  m.impl("all_gather_coalesced", &m2kernels::all_gather_coalesced);
  m.impl("reduce_scatter_coalesced", &m2kernels::reduce_scatter_coalesced);
  m.impl("ring_exchange", &m2kernels::ring_exchange);
  m.impl("ring_exchange_start", &m2kernels::ring_exchange_start);
}

TORCH_LIBRARY_IMPL(m2kernels, Meta, m) {
  m.impl("all_gather_coalesced", &m2kernels::all_gather_coalesced_meta);
  m.impl("reduce_scatter_coalesced", &m2kernels::reduce_scatter_coalesced_meta);
  m.impl("ring_exchange", &m2kernels::ring_exchange_meta);
  m.impl("ring_exchange_start", &m2kernels::ring_exchange_start_meta);
}

// The ring step is not differentiable (its outputs never require grad); all_gather_coalesced and
// reduce_scatter_coalesced get their autograd formulas from m2kernels/_ext.py
// (torch.library.register_autograd).
TORCH_LIBRARY_IMPL(m2kernels, Autograd, m) {
  m.impl("ring_exchange", torch::CppFunction::makeFallthrough());
  m.impl("ring_exchange_start", torch::CppFunction::makeFallthrough());
}

// A Python module init so the library is also importable as `m2kernels._C`; m2kernels/_ext.py
// loads it with torch.ops.load_library after checking the build marker above.
static struct PyModuleDef m2kernels_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&m2kernels_c_module); }
