// NCCL-native grouped collectives for CUDA tensors.
//
// Compiled only where CUDA headers and NCCL are found (setup.py, M2_BUILD_NCCL). Registers CUDA
// kernels for the m2kernels ops defined in collectives.cpp; CUDA tensors then bypass c10d and use
// this library's own NCCL communicators (one per process group and device, created from a unique id
// that rank 0 publishes through the group's store). Several tensors go out in one
// ncclGroupStart/ncclGroupEnd, without packing into a flat buffer, on the current CUDA stream.
//
// No libc10_cuda symbols are used (the current stream and device guard come through c10's device
// guard interface), so the library links against any torch build, CPU builds included; the CUDA
// kernels only ever run where torch has CUDA.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/Stream.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/csrc/distributed/c10d/GroupRegistry.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/library.h>

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "common.h"

extern "C" __attribute__((used, visibility("default"))) const char m2kernels_nccl_build_marker[] =
    "M2KERNELS_BUILD_TORCH_VERSION=" M2_TORCH_VERSION ";";

#define M2_NCCL_CHECK(cmd)                                                                        \
  do {                                                                                            \
    ncclResult_t m2_res = (cmd);                                                                  \
    TORCH_CHECK(m2_res == ncclSuccess, "m2kernels NCCL error in `", #cmd, "` (", __FILE__, ":",  \
                __LINE__, "): ", ncclGetErrorString(m2_res), ". ", ncclGetLastError(nullptr));   \
  } while (0)

#define M2_CUDA_CHECK(cmd)                                                                        \
  do {                                                                                            \
    cudaError_t m2_err = (cmd);                                                                   \
    TORCH_CHECK(m2_err == cudaSuccess, "m2kernels CUDA error in `", #cmd, "` (", __FILE__, ":",  \
                __LINE__, "): ", cudaGetErrorString(m2_err));                                     \
  } while (0)

namespace m2kernels {
namespace {

ncclDataType_t nccl_dtype(at::ScalarType t, const char* op) {
  switch (t) {
    case at::kFloat: return ncclFloat32;
    case at::kDouble: return ncclFloat64;
    case at::kHalf: return ncclFloat16;
    case at::kBFloat16: return ncclBfloat16;
    case at::kInt: return ncclInt32;
    case at::kLong: return ncclInt64;
    case at::kByte: return ncclUint8;
    case at::kChar: return ncclInt8;
    case at::kBool: return ncclUint8;
    default: TORCH_CHECK_TYPE(false, op, ": dtype ", t, " is not supported by the NCCL path");
  }
  return ncclUint8;  // unreachable
}

struct Comm {
  ncclComm_t comm = nullptr;
  const c10d::ProcessGroup* pg = nullptr;  // the group it was made for (names are reused after re-init)
  int rank = 0;
  int size = 1;
};

std::mutex g_mutex;
std::map<std::pair<std::string, int>, Comm> g_comms;
std::map<std::pair<std::string, int>, int> g_generation;

// One communicator per (group name, device): rank 0 creates the unique id and publishes it in the
// group's store; every rank initialises its communicator from it. A group destroyed and re-created
// under the same name gets a new communicator, under a new store key (every rank counts the
// communicators it made for a name in the same order, so the keys agree). Communicators live until
// the process exits (destroying one is a synchronising call that must not run at exit).
Comm& comm_for(const std::string& group_name, const at::Device& device) {
  std::lock_guard<std::mutex> lock(g_mutex);
  auto key = std::make_pair(group_name, static_cast<int>(device.index()));
  auto pg = c10d::resolve_process_group(group_name);
  auto it = g_comms.find(key);
  if (it != g_comms.end() && it->second.pg == pg.get() && it->second.size == pg->getSize() &&
      it->second.rank == pg->getRank()) {
    return it->second;
  }
  auto store = pg->getStore();
  TORCH_CHECK(store, "m2kernels NCCL: process group '", group_name, "' has no store to share the NCCL id");
  Comm c;
  c.pg = pg.get();
  c.rank = pg->getRank();
  c.size = pg->getSize();
  const int generation = g_generation[key]++;
  const std::string store_key = "m2kernels/nccl_uid/" + group_name + "/" + std::to_string(device.index()) +
                                "/" + std::to_string(generation);
  ncclUniqueId uid;
  if (c.rank == 0) {
    M2_NCCL_CHECK(ncclGetUniqueId(&uid));
    std::vector<uint8_t> bytes(sizeof(uid));
    std::memcpy(bytes.data(), &uid, sizeof(uid));
    store->set(store_key, bytes);
  } else {
    std::vector<uint8_t> bytes = store->get(store_key);  // blocks until rank 0 has set it
    TORCH_CHECK(bytes.size() == sizeof(uid), "m2kernels NCCL: malformed unique id in the store");
    std::memcpy(&uid, bytes.data(), sizeof(uid));
  }
  c10::DeviceGuard guard(device);
  M2_NCCL_CHECK(ncclCommInitRank(&c.comm, c.size, uid, c.rank));
  g_comms[key] = c;
  return g_comms[key];
}

cudaStream_t current_stream(const at::Device& device) {
  const auto* impl = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
  return static_cast<cudaStream_t>(impl->getStream(device).native_handle());
}

void check_cuda(const std::vector<at::Tensor>& tensors, const char* op) {
  TORCH_CHECK_VALUE(tensors[0].is_cuda(), op, ": the NCCL path needs CUDA tensors");
}

// Runs `body` between ncclGroupStart and ncclGroupEnd and checks for launch errors afterwards.
template <typename F>
void nccl_group(F&& body) {
  M2_NCCL_CHECK(ncclGroupStart());
  try {
    body();
  } catch (...) {
    ncclGroupEnd();
    throw;
  }
  M2_NCCL_CHECK(ncclGroupEnd());
  M2_CUDA_CHECK(cudaPeekAtLastError());
}

std::vector<at::Tensor> all_gather_coalesced_nccl(at::TensorList tensor_list, std::string group_name) {
  std::vector<at::Tensor> tensors = tensor_list.vec();
  check_tensor_list(tensors, "all_gather_coalesced", false);
  check_cuda(tensors, "all_gather_coalesced");
  const at::Device device = tensors[0].device();
  c10::DeviceGuard guard(device);
  Comm& c = comm_for(group_name, device);
  cudaStream_t stream = current_stream(device);
  std::vector<at::Tensor> inputs, outputs;
  for (const auto& t : tensors) {
    inputs.push_back(t.contiguous());
    outputs.push_back(at::empty(gathered_shape(t, c.size), t.options().memory_format(at::MemoryFormat::Contiguous)));
  }
  // Rank-major output of a contiguous tensor == concatenation along dim 0: no unpacking needed.
  nccl_group([&] {
    for (size_t i = 0; i < inputs.size(); ++i) {
      if (inputs[i].numel() == 0) continue;
      M2_NCCL_CHECK(ncclAllGather(inputs[i].data_ptr(), outputs[i].data_ptr(), nbytes_of(inputs[i]),
                                  ncclUint8, c.comm, stream));
    }
  });
  return outputs;
}

std::vector<at::Tensor> reduce_scatter_coalesced_nccl(at::TensorList tensor_list, std::string group_name) {
  std::vector<at::Tensor> tensors = tensor_list.vec();
  check_tensor_list(tensors, "reduce_scatter_coalesced", true);
  check_cuda(tensors, "reduce_scatter_coalesced");
  const at::Device device = tensors[0].device();
  c10::DeviceGuard guard(device);
  Comm& c = comm_for(group_name, device);
  cudaStream_t stream = current_stream(device);
  const ncclDataType_t dtype = nccl_dtype(tensors[0].scalar_type(), "reduce_scatter_coalesced");
  std::vector<at::Tensor> inputs, outputs;
  for (size_t i = 0; i < tensors.size(); ++i) {
    outputs.push_back(at::empty(scattered_shape(tensors[i], c.size, "reduce_scatter_coalesced", i),
                                tensors[i].options().memory_format(at::MemoryFormat::Contiguous)));
    inputs.push_back(tensors[i].contiguous());
  }
  nccl_group([&] {
    for (size_t i = 0; i < inputs.size(); ++i) {
      if (outputs[i].numel() == 0) continue;
      M2_NCCL_CHECK(ncclReduceScatter(inputs[i].data_ptr(), outputs[i].data_ptr(), outputs[i].numel(),
                                      dtype, ncclSum, c.comm, stream));
    }
  });
  return outputs;
}

std::vector<at::Tensor> ring_exchange_nccl(at::TensorList tensor_list, std::string group_name, int64_t shift) {
  std::vector<at::Tensor> tensors = tensor_list.vec();
  check_tensor_list(tensors, "ring_exchange", false);
  check_cuda(tensors, "ring_exchange");
  const at::Device device = tensors[0].device();
  c10::DeviceGuard guard(device);
  Comm& c = comm_for(group_name, device);
  cudaStream_t stream = current_stream(device);
  const int s = static_cast<int>(((shift % c.size) + c.size) % c.size);
  const int next = (c.rank + s) % c.size;
  const int prev = (c.rank - s + c.size) % c.size;
  std::vector<at::Tensor> inputs, outputs;
  for (const auto& t : tensors) {
    inputs.push_back(t.contiguous());
    outputs.push_back(at::empty(t.sizes(), t.options().memory_format(at::MemoryFormat::Contiguous)));
  }
  if (c.size == 1 || s == 0) {
    for (size_t i = 0; i < inputs.size(); ++i) outputs[i].copy_(inputs[i]);
    return outputs;
  }
  nccl_group([&] {
    for (size_t i = 0; i < inputs.size(); ++i) {
      const int64_t nb = nbytes_of(inputs[i]);
      if (nb == 0) continue;
      M2_NCCL_CHECK(ncclSend(inputs[i].data_ptr(), nb, ncclUint8, next, c.comm, stream));
      M2_NCCL_CHECK(ncclRecv(outputs[i].data_ptr(), nb, ncclUint8, prev, c.comm, stream));
    }
  });
  return outputs;
}

int64_t nccl_version() {
  int v = 0;
  M2_NCCL_CHECK(ncclGetVersion(&v));
  return v;
}

}  // namespace
}  // namespace m2kernels

TORCH_LIBRARY_FRAGMENT(m2kernels, m) {
  m.def("nccl_version() -> int", &m2kernels::nccl_version);
}

// ring_exchange_start keeps its c10d kernel on CUDA too (work objects awaited via wait_tensor);
// NCCL calls on the current stream are already asynchronous with respect to the host.
TORCH_LIBRARY_IMPL(m2kernels, CUDA, m) {
  m.impl("all_gather_coalesced", &m2kernels::all_gather_coalesced_nccl);
  m.impl("reduce_scatter_coalesced", &m2kernels::reduce_scatter_coalesced_nccl);
  m.impl("ring_exchange", &m2kernels::ring_exchange_nccl);
}
