// c10d from libtorch_cpu: the TCPStore rendezvous, the Gloo process group, and the collectives
// the learner needs. The NCCL process group is made in cuda.cpp; both are c10d::Backend, so
// every collective below serves both.
#include <chrono>
#include "common.h"
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

using StoreHandle = c10::intrusive_ptr<c10d::Store>;
using BackendHandle = c10::intrusive_ptr<c10d::Backend>;

extern "C" {

// A TCPStore client, or (is_server) the server plus its own client. port 0 on a server picks
// a free port (read it back with sp_store_port). world_size <= 0: do not wait for workers.
char* sp_store_tcp(const char* host, uint16_t port, int64_t world_size, int is_server,
                   int64_t timeout_ms, StoreHandle** out, uint16_t* bound_port) {
  SP_TRY
  c10d::TCPStoreOptions opts;
  opts.port = port;
  opts.isServer = is_server != 0;
  if (world_size > 0) opts.numWorkers = static_cast<size_t>(world_size);
  opts.waitWorkers = false;
  opts.timeout = std::chrono::milliseconds(timeout_ms);
  auto store = c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
  *bound_port = store->getPort();
  *out = new StoreHandle(store);
  SP_CATCH
}

void sp_store_free(StoreHandle* s) { delete s; }

char* sp_store_set(StoreHandle* s, const char* key, const uint8_t* data, size_t len) {
  SP_TRY
  (*s)->set(std::string(key), std::vector<uint8_t>(data, data + len));
  SP_CATCH
}

// Waits (up to the store's timeout) for `key`; the value is malloc'd, freed by sp_free_error.
char* sp_store_get(StoreHandle* s, const char* key, uint8_t** data, size_t* len) {
  SP_TRY
  auto v = (*s)->get(std::string(key));
  *len = v.size();
  *data = static_cast<uint8_t*>(std::malloc(v.size() ? v.size() : 1));
  if (!v.empty()) std::memcpy(*data, v.data(), v.size());
  SP_CATCH
}

char* sp_store_delete(StoreHandle* s, const char* key) {
  SP_TRY
  (*s)->deleteKey(std::string(key));
  SP_CATCH
}

// A Gloo process group over `store`. The transport binds to `hostname` (an address of this
// machine the other ranks can reach), or to the interface named by GLOO_SOCKET_IFNAME when
// set, as torch.distributed does.
char* sp_pg_gloo(StoreHandle* s, int rank, int size, const char* hostname, int64_t timeout_ms,
                 BackendHandle** out) {
  SP_TRY
  auto opts = c10d::ProcessGroupGloo::Options::create(std::chrono::milliseconds(timeout_ms));
  const char* ifname = std::getenv("GLOO_SOCKET_IFNAME");
  if (ifname && *ifname) {
    opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(ifname));
  } else if (hostname && *hostname) {
    opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(hostname));
  } else {
    opts->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
  }
  auto pg = c10::make_intrusive<c10d::ProcessGroupGloo>(*s, rank, size, opts);
  *out = new BackendHandle(pg);
  SP_CATCH
}

void sp_pg_free(BackendHandle* pg) { delete pg; }

static c10d::ReduceOp reduce_op(int op) {
  switch (op) {
    case 0: return c10d::ReduceOp::SUM;
    case 1: return c10d::ReduceOp::AVG;
    case 2: return c10d::ReduceOp::MAX;
    case 3: return c10d::ReduceOp::MIN;
    default: TORCH_CHECK(false, "unknown reduce op ", op);
  }
}

static void wait(const c10::intrusive_ptr<c10d::Work>& work) {
  TORCH_CHECK(work->wait(), "collective did not complete");
}

char* sp_pg_all_reduce(BackendHandle* pg, at::Tensor* t, int op) {
  SP_TRY
  std::vector<at::Tensor> ts{*t};
  c10d::AllreduceOptions o;
  o.reduceOp = reduce_op(op);
  wait((*pg)->allreduce(ts, o));
  SP_CATCH
}

char* sp_pg_broadcast(BackendHandle* pg, at::Tensor* t, int64_t root) {
  SP_TRY
  std::vector<at::Tensor> ts{*t};
  c10d::BroadcastOptions o;
  o.rootRank = root;
  wait((*pg)->broadcast(ts, o));
  SP_CATCH
}

// out (size x input's elements, flat) receives every rank's input in rank order.
char* sp_pg_all_gather(BackendHandle* pg, at::Tensor* out, at::Tensor* input) {
  SP_TRY
  wait((*pg)->_allgather_base(*out, *input));
  SP_CATCH
}

// out receives this rank's 1/size share of the reduction of every rank's input.
char* sp_pg_reduce_scatter(BackendHandle* pg, at::Tensor* out, at::Tensor* input, int op) {
  SP_TRY
  c10d::ReduceScatterOptions o;
  o.reduceOp = reduce_op(op);
  wait((*pg)->_reduce_scatter_base(*out, *input, o));
  SP_CATCH
}

char* sp_pg_barrier(BackendHandle* pg) {
  SP_TRY
  wait((*pg)->barrier());
  SP_CATCH
}

}  // extern "C"
