// A device-side timeline for benchmarks on an NVIDIA GPU: loaded with LD_PRELOAD into a process
// that runs MLX CUDA, it records through CUPTI every kernel, copy and memset the GPU runs, and
// every CUDA driver call the process makes, with their start and end times.
//
//   CUPTI_TRACE_OUT=/tmp/run.csv   where the records go (text, one per line; names in .names)
//   CUPTI_TRACE_SWITCH=/tmp/on     records are kept only while this file exists
//
// Lines: `K,start,end,name,stream,graph` (kernel), `C,start,end,bytes,kind,stream` (copy),
// `S,start,end,bytes,stream` (memset), `D,start,end,name,thread` (driver call), `M,time,1|0`
// (the switch file appeared or went). Times are CUPTI's nanoseconds; `name` indexes the names
// file (`index<TAB>name`). benches/gpu/bench.py --trace reads them (benches/gpu/timeline.py).
#include <cupti.h>
#include <cxxabi.h>
#include <sys/stat.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>

namespace {

std::mutex mu;
FILE* out = nullptr;
FILE* names_out = nullptr;
std::unordered_map<std::string, int> names;
std::atomic<bool> on{false};
std::atomic<bool> stop{false};
std::thread poller;

int name_id(const char* raw) {
  std::string key = raw ? raw : "?";
  auto it = names.find(key);
  if (it != names.end()) return it->second;
  int id = static_cast<int>(names.size());
  names.emplace(key, id);
  int status = 0;
  char* nice = abi::__cxa_demangle(key.c_str(), nullptr, nullptr, &status);
  std::string shown = status == 0 && nice ? nice : key;
  std::free(nice);
  for (char& c : shown) {
    if (c == '\t' || c == '\n') c = ' ';
  }
  std::fprintf(names_out, "%d\t%s\n", id, shown.c_str());
  return id;
}

void CUPTIAPI buffer_requested(uint8_t** buffer, size_t* size, size_t* max_records) {
  *size = 16 << 20;
  *buffer = static_cast<uint8_t*>(std::aligned_alloc(8, *size));
  *max_records = 0;
}

void CUPTIAPI buffer_completed(CUcontext, uint32_t, uint8_t* buffer, size_t, size_t valid) {
  std::lock_guard<std::mutex> g(mu);
  CUpti_Activity* r = nullptr;
  while (out && cuptiActivityGetNextRecord(buffer, valid, &r) == CUPTI_SUCCESS) {
    switch (r->kind) {
      case CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL:
      case CUPTI_ACTIVITY_KIND_KERNEL: {
        auto* k = reinterpret_cast<CUpti_ActivityKernel10*>(r);
        std::fprintf(out, "K,%lu,%lu,%d,%u,%u\n", (unsigned long)k->start, (unsigned long)k->end, name_id(k->name),
                     k->streamId, k->graphId);
        break;
      }
      case CUPTI_ACTIVITY_KIND_MEMCPY: {
        auto* c = reinterpret_cast<CUpti_ActivityMemcpy6*>(r);
        std::fprintf(out, "C,%lu,%lu,%lu,%u,%u\n", (unsigned long)c->start, (unsigned long)c->end,
                     (unsigned long)c->bytes, (unsigned)c->copyKind, c->streamId);
        break;
      }
      case CUPTI_ACTIVITY_KIND_MEMSET: {
        auto* s = reinterpret_cast<CUpti_ActivityMemset4*>(r);
        std::fprintf(out, "S,%lu,%lu,%lu,%u\n", (unsigned long)s->start, (unsigned long)s->end,
                     (unsigned long)s->bytes, s->streamId);
        break;
      }
      case CUPTI_ACTIVITY_KIND_DRIVER: {
        auto* a = reinterpret_cast<CUpti_ActivityAPI*>(r);
        const char* n = nullptr;
        cuptiGetCallbackName(CUPTI_CB_DOMAIN_DRIVER_API, a->cbid, &n);
        std::fprintf(out, "D,%lu,%lu,%d,%u\n", (unsigned long)a->start, (unsigned long)a->end, name_id(n), a->threadId);
        break;
      }
      default:
        break;
    }
  }
  std::free(buffer);
}

void mark(bool now_on) {
  uint64_t t = 0;
  cuptiGetTimestamp(&t);
  std::lock_guard<std::mutex> g(mu);
  if (out) std::fprintf(out, "M,%lu,%d\n", (unsigned long)t, now_on ? 1 : 0);
}

// Watches the switch file; forces the records out after the switch goes off, so that the file
// holds the window before the process ends.
void poll(std::string path) {
  while (!stop.load()) {
    struct stat st;
    bool exists = !path.empty() && ::stat(path.c_str(), &st) == 0;
    if (exists != on.load()) {
      on.store(exists);
      mark(exists);
      if (!exists) {
        cuptiActivityFlushAll(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED);
        std::lock_guard<std::mutex> g(mu);
        std::fflush(out);
        std::fflush(names_out);
      }
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
}

struct Tracer {
  Tracer() {
    const char* path = std::getenv("CUPTI_TRACE_OUT");
    if (!path) return;
    out = std::fopen(path, "w");
    names_out = std::fopen((std::string(path) + ".names").c_str(), "w");
    if (!out || !names_out) return;
    if (cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed) != CUPTI_SUCCESS) {
      std::fprintf(stderr, "cupti_trace: cannot register callbacks\n");
      return;
    }
    for (auto kind : {CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL, CUPTI_ACTIVITY_KIND_MEMCPY, CUPTI_ACTIVITY_KIND_MEMSET,
                      CUPTI_ACTIVITY_KIND_DRIVER}) {
      CUptiResult r = cuptiActivityEnable(kind);
      if (r != CUPTI_SUCCESS) {
        const char* msg = nullptr;
        cuptiGetResultString(r, &msg);
        std::fprintf(stderr, "cupti_trace: cannot enable kind %d: %s\n", (int)kind, msg ? msg : "?");
      }
    }
    const char* sw = std::getenv("CUPTI_TRACE_SWITCH");
    poller = std::thread(poll, std::string(sw ? sw : ""));
  }
  ~Tracer() {
    if (!out) return;
    stop.store(true);
    if (poller.joinable()) poller.join();
    cuptiActivityFlushAll(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED);
    std::lock_guard<std::mutex> g(mu);
    std::fclose(out);
    std::fclose(names_out);
    out = nullptr;
  }
};

Tracer tracer;

}  // namespace
