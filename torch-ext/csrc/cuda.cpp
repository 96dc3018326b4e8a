// CUDA only (compiled when build.rs finds libtorch_cuda and the CUDA headers): graph capture
// and replay, the stream pool, and the NCCL process group.
//
// Streams, events and guards go through c10's device-generic classes (c10::Stream, c10::Event,
// c10::StreamGuard), which call libc10_cuda through its registered implementation: the CUDA
// flavours are inline wrappers around the CUDA runtime, and calling them would make selfplay
// link libcudart itself, found at run time only where it was built.
#include "common.h"
#include <ATen/cuda/CUDAGraph.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/Event.h>
#include <c10/core/StreamGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>

using BackendHandle = c10::intrusive_ptr<c10d::Backend>;
using StoreHandle = c10::intrusive_ptr<c10d::Store>;

extern "C" {

// A pool id that graphs captured with it share (captures replayed in capture order may).
char* sp_graph_pool_handle(uint64_t* a, uint64_t* b) {
  SP_TRY
  auto id = at::cuda::graph_pool_handle();
  *a = id.first;
  *b = id.second;
  SP_CATCH
}

// Captures everything `body` enqueues on `device` into a new graph. The capture runs on a
// side stream from the pool (capture on the default stream is illegal), ordered after the
// work already queued on the current stream, and the current stream waits for it after.
// `body` returns nonzero when it failed; the capture is then ended and discarded.
char* sp_graph_capture(int device, uint64_t pool_a, uint64_t pool_b, int (*body)(void*), void* data,
                       at::cuda::CUDAGraph** out) {
  SP_TRY
  c10::Device dev(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(device));
  c10::DeviceGuard device_guard(dev);
  c10::Stream current = c10::cuda::getCurrentCUDAStream(dev.index()).unwrap();
  c10::Stream side = c10::cuda::getStreamFromPool(false, dev.index()).unwrap();
  c10::Event before(c10::DeviceType::CUDA);
  before.record(current);
  before.block(side);
  auto graph = std::make_unique<at::cuda::CUDAGraph>();
  int rc = 0;
  {
    c10::StreamGuard stream_guard(side);
    graph->capture_begin({pool_a, pool_b});
    try {
      rc = body(data);
    } catch (...) {
      rc = -1;
    }
    graph->capture_end();
  }
  c10::Event after(c10::DeviceType::CUDA);
  after.record(side);
  after.block(current);
  TORCH_CHECK(rc == 0, "the captured body failed (its error was reported on the Rust side)");
  *out = graph.release();
  SP_CATCH
}

// Replays on the current stream of the graph's device.
char* sp_graph_replay(at::cuda::CUDAGraph* g) {
  SP_TRY
  g->replay();
  SP_CATCH
}

char* sp_graph_pool(at::cuda::CUDAGraph* g, uint64_t* a, uint64_t* b) {
  SP_TRY
  auto id = g->pool();
  *a = id.first;
  *b = id.second;
  SP_CATCH
}

void sp_graph_free(at::cuda::CUDAGraph* g) { delete g; }

char* sp_cuda_synchronize(int device) {
  SP_TRY
  c10::Device dev(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(device));
  c10::DeviceGuard device_guard(dev);
  c10::Stream current = c10::cuda::getCurrentCUDAStream(dev.index()).unwrap();
  current.synchronize();
  SP_CATCH
}

// An NCCL process group over `store`, for rank `rank` of `size`, on the current device (the
// caller sets it with LOCAL_RANK before).
char* sp_pg_nccl(StoreHandle* s, int rank, int size, int64_t timeout_ms, BackendHandle** out) {
  SP_TRY
  auto opts = c10d::ProcessGroupNCCL::Options::create();
  opts->timeout = std::chrono::milliseconds(timeout_ms);
  auto pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(*s, rank, size, opts);
  *out = new BackendHandle(pg);
  SP_CATCH
}

}  // extern "C"
