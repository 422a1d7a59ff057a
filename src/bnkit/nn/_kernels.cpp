// bnkit's CPU fast path: BatchNorm training forward/backward and eval forward.
//
// The same math as bnkit/nn/functional.py (shifted sums, float64 accumulation, output from
// the shifted values), written as two passes over memory:
//   NCHW (N, C, L): one task per channel; pass 1 accumulates sum(x - s) and sum((x - s)^2)
//     over each contiguous run in chunks of kChunk values in the input type, flushing the
//     chunk sums to double; pass 2 re-reads the channel (from L2) and writes the output.
//   channels-fastest (R, C) (channels_last, 2D input): rows split across threads, each with
//     per-channel partial sums (vectorised over C), merged at the end.
// s is a per-channel shift (the mean of a few strided samples) so that x - s is small and
// exact; mean = s + sum(x - s) / n and var = sum((x - s)^2) / n - (sum(x - s) / n)^2.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

// x86 intrinsics (non-temporal stores) only where the compiler targets x86 and the build
// does not ask for the portable code (-DBNKIT_PORTABLE: what every other architecture
// compiles; the test suite builds and runs it on x86 too). Everything else is plain C++.
#if !defined(BNKIT_PORTABLE) && (defined(__x86_64__) || defined(__i386__) || defined(_M_X64)) && \
    (defined(__AVX__) || defined(__SSE2__))
#define BNKIT_X86 1
#include <immintrin.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace {

constexpr int64_t kChunk = 256;      // values summed in the input type before a flush
constexpr int64_t kShiftSamples = 16;  // enough to put the shift within a fraction of a std of the mean

// A kernel whose tensors (inputs and output together) take at least the last-level cache
// (8 MiB at least) writes its output with non-temporal stores: the output would not stay
// in cache anyway, and a normal store first reads every output line from memory
// (read-for-ownership), a third more traffic for a kernel that is bound by it (see
// docs/performance.md for what it buys).
// BNKIT_STREAM_BYTES overrides it (0: always, a huge value: never).
// The last-level cache of this machine in bytes (0 when unknown): sysfs on Linux.
int64_t l3_bytes() {
#if defined(__linux__)
  for (int idx = 3; idx >= 2; --idx) {
    const std::string path =
        "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(idx) + "/size";
    if (FILE* f = std::fopen(path.c_str(), "r")) {
      char buf[32] = {0};
      const size_t got = std::fread(buf, 1, sizeof(buf) - 1, f);
      std::fclose(f);
      if (got == 0) continue;
      char* end = nullptr;
      const long long v = std::strtoll(buf, &end, 10);
      if (v <= 0) continue;
      const char unit = (end && *end) ? *end : ' ';
      return static_cast<int64_t>(v) * (unit == 'K' ? 1024 : unit == 'M' ? (1 << 20) : 1);
    }
  }
#endif
  return 0;
}

int64_t stream_bytes() {
  static const int64_t v = [] {
    const char* e = std::getenv("BNKIT_STREAM_BYTES");
    // A kernel's tensors that fit in the last-level cache stay there for whoever reads
    // them next (the following layer): normal stores. Beyond it, stream.
    if (e == nullptr || *e == '\0') return std::max<int64_t>(int64_t(8) << 20, l3_bytes());
    char* end = nullptr;
    const long long b = std::strtoll(e, &end, 10);
    TORCH_CHECK(*end == '\0' && b >= 0, "BNKIT_STREAM_BYTES='", e,
                "': expected a number of bytes (0: stream every output)");
    return static_cast<int64_t>(b);
  }();
  return v;
}

inline void stream_fence() {
#if defined(BNKIT_X86)
  _mm_sfence();
#endif
}

// Copies n values from an L1 buffer to dst, non-temporal where dst is vector-aligned;
// returns how many were written (whole vectors only, unless `all`). Without x86
// intrinsics it copies all n with ordinary stores: the Writer's buffer must always drain.
inline int64_t stream_copy(float* dst, const float* src, int64_t n, bool all) {
  int64_t i = 0;
#if !defined(BNKIT_X86)
  (void)all;
  std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
  return n;
#elif defined(__AVX__)
  for (; i < n && (reinterpret_cast<std::uintptr_t>(dst + i) & 31) != 0; ++i) dst[i] = src[i];
  for (; i + 8 <= n; i += 8) _mm256_stream_ps(dst + i, _mm256_loadu_ps(src + i));
#elif defined(__SSE2__)
  for (; i < n && (reinterpret_cast<std::uintptr_t>(dst + i) & 15) != 0; ++i) dst[i] = src[i];
  for (; i + 4 <= n; i += 4) _mm_stream_ps(dst + i, _mm_loadu_ps(src + i));
#endif
  if (all)
    for (; i < n; ++i) dst[i] = src[i];
  return i;
}
inline int64_t stream_copy(double* dst, const double* src, int64_t n, bool all) {
  int64_t i = 0;
#if !defined(BNKIT_X86)
  (void)all;
  std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(double));
  return n;
#elif defined(__AVX__)
  for (; i < n && (reinterpret_cast<std::uintptr_t>(dst + i) & 31) != 0; ++i) dst[i] = src[i];
  for (; i + 4 <= n; i += 4) _mm256_stream_pd(dst + i, _mm256_loadu_pd(src + i));
#elif defined(__SSE2__)
  for (; i < n && (reinterpret_cast<std::uintptr_t>(dst + i) & 15) != 0; ++i) dst[i] = src[i];
  for (; i + 2 <= n; i += 2) _mm_stream_pd(dst + i, _mm_loadu_pd(src + i));
#endif
  if (all)
    for (; i < n; ++i) dst[i] = src[i];
  return i;
}

// Writes a contiguous output region front to back. put(n) hands out room for the next n
// values (n <= kRun): directly in the output when not streaming, else in an L1 buffer
// that is written out with aligned non-temporal stores (only the region's first and last
// few values take normal stores). finish() must be called once at the end.
template <typename T>
class Writer {
 public:
  static constexpr int64_t kRun = 1024;  // most values asked for at once
  Writer(T* dst, bool stream) : dst_(dst), stream_(stream) {}
  T* put(int64_t n) {
    if (!stream_) {
      T* p = dst_;
      dst_ += n;
      return p;
    }
    TORCH_CHECK(n >= 0 && n <= kRun, "bnkit Writer: asked for ", n, " values (at most ", kRun, ")");
    if (fill_ + n > kCap) drain(false);  // leaves fewer than one vector's worth
    TORCH_CHECK(fill_ + n <= kCap, "bnkit Writer: buffer did not drain");
    T* p = buf_ + fill_;
    fill_ += n;
    return p;
  }
  void finish() {
    if (stream_) {
      drain(true);
      stream_fence();
    }
  }

 private:
  void drain(bool all) {
    const int64_t done = stream_copy(dst_, buf_, fill_, all);
    dst_ += done;
    fill_ -= done;
    if (fill_ > 0) std::memmove(buf_, buf_ + done, static_cast<size_t>(fill_) * sizeof(T));
  }
  static constexpr int64_t kCap = kRun + 64 / sizeof(T);
  T* dst_;
  bool stream_;
  int64_t fill_ = 0;
  alignas(64) T buf_[kCap];
};

// at::parallel_for over [0, n), run on the calling thread when the whole job touches
// fewer than kInline values: waking the OpenMP team costs more than such a job.
constexpr int64_t kInline = 1 << 15;
template <typename F>
void parallel(int64_t n, int64_t numel, const F& f) {
  if (numel < kInline || n <= 1) {
    if (n > 0) f(int64_t(0), n);
    return;
  }
  at::parallel_for(0, n, 1, f);
}

// Threads for a channels-fastest (R, C) pass: rows split in nt contiguous ranges, the
// same in the statistics pass and the output pass (so the output pass finds its rows in
// the cache of the thread that read them).
int row_threads(int64_t R) {
  return std::max<int>(1, std::min<int64_t>(at::get_num_threads(), (R + 255) / 256));
}

// Whether a kernel reading `inputs` tensors of numel values and writing one streams it.
template <typename T>
bool streaming(int64_t numel, int inputs) {
  return numel * static_cast<int64_t>(sizeof(T)) * (inputs + 1) >= stream_bytes();
}

// The output tensor, like x. Large outputs are often fresh memory from the OS (glibc maps
// every block of 32 MiB or more anew, and gives smaller ones back when the top of its heap
// holds more than twice its current mmap threshold free), and the first write to each
// 4 KiB page faults: for a 50 MB output that costs more than the kernel itself. Asking
// for transparent huge pages there (what torch's THP_MEM_ALLOC_ENABLE does for every
// allocation) makes it one fault per 2 MiB. Only the 2 MiB-aligned interior of our own
// buffer is advised, for outputs of 4 MiB or more (a syscall of ~1 us against a kernel of
// >= 0.3 ms); glibc also returns blocks smaller than 32 MiB to the OS after a trim, so the
// hint starts well below that.
at::Tensor new_output(const at::Tensor& x) {
  at::Tensor y = at::empty_like(x);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const int64_t nbytes = y.numel() * static_cast<int64_t>(y.element_size());
  if (nbytes >= (int64_t(4) << 20)) {
    constexpr std::uintptr_t kHuge = std::uintptr_t(2) << 20;
    const auto p = reinterpret_cast<std::uintptr_t>(y.data_ptr());
    const std::uintptr_t a = (p + kHuge - 1) & ~(kHuge - 1);
    const std::uintptr_t e = (p + static_cast<std::uintptr_t>(nbytes)) & ~(kHuge - 1);
    if (e > a) madvise(reinterpret_cast<void*>(a), e - a, MADV_HUGEPAGE);  // a hint only
  }
#endif
  return y;
}

struct Layout {
  bool fastest;  // channels move fastest in memory: (R, C)
  int64_t N, C, L, R;
};

Layout layout_of(const at::Tensor& x) {
  Layout lo{};
  lo.C = x.size(1);
  lo.N = x.size(0);
  lo.L = lo.C > 0 && lo.N > 0 ? x.numel() / (lo.N * lo.C) : 0;
  lo.R = lo.N * lo.L;
  lo.fastest = x.dim() == 2 || !x.is_contiguous();
  return lo;
}

// The memory order the kernels read: contiguous NCHW, or channels-fastest.
at::Tensor as_layout(const at::Tensor& t, bool fastest) {
  if (!fastest) return t.contiguous();
  if (t.dim() == 2) return t.contiguous();
  auto fmt = t.dim() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d;
  return t.contiguous(fmt);
}

bool usable(const at::Tensor& x) {
  if (x.dim() == 2) return x.is_contiguous();
  if (x.is_contiguous()) return true;
  if (x.dim() == 4) return x.is_contiguous(at::MemoryFormat::ChannelsLast);
  if (x.dim() == 5) return x.is_contiguous(at::MemoryFormat::ChannelsLast3d);
  return false;
}

// Offsets (relative to channel 0) of up to kShiftSamples values spread over a channel;
// computed once per call, so that no channel pays an integer division per sample.
std::vector<int64_t> sample_offsets(const Layout& lo) {
  const int64_t n = lo.N * lo.L;
  const int64_t k = std::min<int64_t>(kShiftSamples, n);
  const int64_t step = std::max<int64_t>(1, n / std::max<int64_t>(k, 1));
  const int64_t L = std::max<int64_t>(lo.L, 1);
  std::vector<int64_t> off(static_cast<size_t>(k));
  for (int64_t i = 0; i < k; ++i) {
    const int64_t idx = i * step;  // flat index within the channel: (sample, position)
    off[i] = lo.fastest ? idx * lo.C : (idx / L) * lo.C * L + idx % L;
  }
  return off;
}

// Per-channel shift: the mean of the sampled values, rounded to T so that x - s is exact.
// Only finite samples count (0 when there is none): an inf or NaN then reaches the sums
// as itself, and the statistics come out as torch's (mean inf/-inf/NaN, variance NaN).
template <typename T>
double channel_shift(const T* x, const Layout& lo, const std::vector<int64_t>& off, int64_t c) {
  const int64_t base = lo.fastest ? c : c * std::max<int64_t>(lo.L, 1);
  double acc = 0;
  int64_t k = 0;
  for (const int64_t o : off) {
    const double v = static_cast<double>(x[o + base]);
    if (std::isfinite(v)) {
      acc += v;
      ++k;
    }
  }
  return k ? static_cast<double>(static_cast<T>(acc / static_cast<double>(k))) : 0.0;
}

// Per-channel shifts of a channels-fastest (R, C) input: the samples are whole rows,
// summed vectorised over the channels. (NCHW shifts are taken per block in nchw_fused.)
template <typename T>
void row_shifts(const T* x, const Layout& lo, double* s) {
  const std::vector<int64_t> off = sample_offsets(lo);
  std::vector<double> acc(lo.C, 0.0), cnt(lo.C, 0.0);
  double* a = acc.data();
  double* k = cnt.data();
  for (const int64_t o : off) {  // finite samples only, as in channel_shift
    const T* xp = x + o;
#pragma omp simd
    for (int64_t c = 0; c < lo.C; ++c) {
      const double v = static_cast<double>(xp[c]);
      const bool ok = std::isfinite(v);
      a[c] += ok ? v : 0.0;
      k[c] += ok ? 1.0 : 0.0;
    }
  }
  for (int64_t c = 0; c < lo.C; ++c)
    s[c] = k[c] > 0 ? static_cast<double>(static_cast<T>(a[c] / k[c])) : 0.0;
}

// Per-channel (sum d, sum d * e) over a channels-fastest (R, C) input, d = x - s and
// e = other or d. (NCHW sums are taken per block in nchw_fused.)
template <typename T>
void row_sums(const T* x, const T* other, const Layout& lo, const double* s, double* sum1,
              double* sum2) {
  const int64_t C = lo.C;
  // Rows split across threads, each streaming its rows once with per-channel
  // accumulators in the input type (L1-resident, vectorised over C), flushed to
  // per-thread float64 partials every kChunk rows at most; partials merged at the end.
  const int64_t R = lo.R;
  const int nt = row_threads(R);
  std::vector<double> part(static_cast<size_t>(nt) * 2 * C, 0.0);
  std::vector<T> sc(C);
  for (int64_t c = 0; c < C; ++c) sc[c] = static_cast<T>(s[c]);
  // Accumulators 64-byte aligned and padded, so that each vector store forwards cleanly
  // to the next row's load (a store split across cache lines does not, and costs ~10
  // cycles a vector); four rows per sweep so that the read-modify-write of the
  // accumulators is paid once per four rows.
  const int64_t Cp = (C + 15) / 16 * 16;
  parallel(nt, lo.R * C, [&](int64_t t0, int64_t t1) {
    std::vector<T> store(2 * Cp + 64 / sizeof(T));
    T* b1 = store.data();
    while (reinterpret_cast<std::uintptr_t>(b1) % 64 != 0) ++b1;
    T* b2 = b1 + Cp;
    const T* sh = sc.data();
    auto flush = [C, Cp](double* p1, double* p2, T* b1, T* b2) {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        p1[c] += static_cast<double>(b1[c]);
        p2[c] += static_cast<double>(b2[c]);
      }
      std::fill(b1, b1 + 2 * Cp, T(0));
    };
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = R * t / nt, r1 = R * (t + 1) / nt;
      double* p1 = part.data() + t * 2 * C;
      double* p2 = p1 + C;
      // A block of 4 * S rows is read as four streams S rows apart, one row of each per
      // sweep. Four adjacent rows per sweep (the obvious order) read at half the DRAM
      // bandwidth with C = 64..512 (8-10 against 19-20 GB/s on 2 threads: the hardware
      // prefetcher does not follow four interleaved positions within a page); streams at
      // least 16 KiB apart are each followed as a sequential stream.
      const int64_t row_bytes = C * static_cast<int64_t>(sizeof(T));
      const int64_t S = std::max<int64_t>(kChunk / 4, (16 * 1024 + row_bytes - 1) / row_bytes);
      for (int64_t rb = r0; rb < r1; rb += 4 * S) {
        const int64_t m = std::min(r1 - rb, 4 * S), q = m / 4;  // b1, b2 are zero here
        for (int64_t k = 0; k < q; ++k) {
          if (k > 0 && k % (kChunk / 4) == 0) flush(p1, p2, b1, b2);
          const T *x0 = x + (rb + k) * C, *x1 = x0 + q * C, *x2 = x1 + q * C, *x3 = x2 + q * C;
          if (other) {
            const T* o0 = other + (rb + k) * C;
            const T *o1 = o0 + q * C, *o2 = o1 + q * C, *o3 = o2 + q * C;
#pragma omp simd aligned(b1, b2 : 64)
            for (int64_t c = 0; c < C; ++c) {
              const T s_ = sh[c];
              b1[c] += (o0[c] + o1[c]) + (o2[c] + o3[c]);
              b2[c] += (o0[c] * (x0[c] - s_) + o1[c] * (x1[c] - s_)) +
                       (o2[c] * (x2[c] - s_) + o3[c] * (x3[c] - s_));
            }
          } else {
#pragma omp simd aligned(b1, b2 : 64)
            for (int64_t c = 0; c < C; ++c) {
              const T s_ = sh[c];
              const T d0 = x0[c] - s_, d1 = x1[c] - s_, d2 = x2[c] - s_, d3 = x3[c] - s_;
              b1[c] += (d0 + d1) + (d2 + d3);
              b2[c] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3);
            }
          }
        }
        for (int64_t r = rb + 4 * q; r < rb + m; ++r) {  // at most three rows left over
          const T* xp = x + r * C;
          if (other) {
            const T* op = other + r * C;
#pragma omp simd aligned(b1, b2 : 64)
            for (int64_t c = 0; c < C; ++c) {
              b1[c] += op[c];
              b2[c] += op[c] * (xp[c] - sh[c]);
            }
          } else {
#pragma omp simd aligned(b1, b2 : 64)
            for (int64_t c = 0; c < C; ++c) {
              const T d = xp[c] - sh[c];
              b1[c] += d;
              b2[c] += d * d;
            }
          }
        }
        flush(p1, p2, b1, b2);
      }
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    double a1 = 0, a2 = 0;
    for (int t = 0; t < nt; ++t) {
      a1 += part[t * 2 * C + c];
      a2 += part[t * 2 * C + C + c];
    }
    sum1[c] = a1;
    sum2[c] = a2;
  }
}

// The output loops of every kernel: n values of (x - s) * a + o * b + z (o = other, may
// be null) appended to w, with one channel's scalars for the whole run (NCHW) ...
template <typename T>
void affine_run(Writer<T>& w, const T* xp, const T* op, int64_t n, T s, T a, T b, T z) {
  for (int64_t i0 = 0; i0 < n; i0 += Writer<T>::kRun) {
    const int64_t m = std::min(Writer<T>::kRun, n - i0);
    T* yp = w.put(m);
    const T* x = xp + i0;
    if (op) {
      const T* o = op + i0;
#pragma omp simd
      for (int64_t i = 0; i < m; ++i) yp[i] = (x[i] - s) * a + o[i] * b + z;
    } else {
#pragma omp simd
      for (int64_t i = 0; i < m; ++i) yp[i] = (x[i] - s) * a + z;
    }
  }
}

// ... or with per-value scalars, value i being channel i (a channels-fastest row).
template <typename T>
void affine_row(Writer<T>& w, const T* xp, const T* op, int64_t C, const T* s, const T* a,
                const T* b, const T* z) {
  for (int64_t c0 = 0; c0 < C; c0 += Writer<T>::kRun) {
    const int64_t m = std::min(Writer<T>::kRun, C - c0);
    T* yp = w.put(m);
    const T *x = xp + c0, *ps = s + c0, *pa = a + c0, *pb = b + c0, *pz = z + c0;
    if (op) {
      const T* o = op + c0;
#pragma omp simd
      for (int64_t i = 0; i < m; ++i) yp[i] = (x[i] - ps[i]) * pa[i] + o[i] * pb[i] + pz[i];
    } else {
#pragma omp simd
      for (int64_t i = 0; i < m; ++i) yp[i] = (x[i] - ps[i]) * pa[i] + pz[i];
    }
  }
}

// out = k_x * (x - s) + k_o * other + k_0, per channel (other may be null).
template <typename T>
void channel_affine(const T* x, const T* other, T* out, const Layout& lo, const double* s,
                    const double* kx, const double* ko, const double* k0, bool reverse) {
  const int64_t C = lo.C;
  const bool stream = streaming<T>(lo.R * C, other ? 2 : 1);
  std::vector<T> vs(C), vx(C), vo(C), v0(C);
  for (int64_t c = 0; c < C; ++c) {
    vs[c] = static_cast<T>(s[c]);
    vx[c] = static_cast<T>(kx[c]);
    vo[c] = ko ? static_cast<T>(ko[c]) : T(0);
    v0[c] = static_cast<T>(k0[c]);
  }
  if (!lo.fastest) {
    // runs (n, c) in order: a thread's range of runs is one contiguous output region
    parallel(lo.N * C, lo.R * C, [&](int64_t i0, int64_t i1) {
      int64_t c = i0 % C;  // one division per thread, not per run
      if (!stream) {  // plain stores: straight loops, no Writer bookkeeping per short run
        const int64_t L = lo.L;
        for (int64_t i = i0; i < i1; ++i) {
          const T *xp = x + i * L, *op = other ? other + i * L : nullptr;
          T* yp = out + i * L;
          const T sc = vs[c], a = vx[c], b = vo[c], z = v0[c];
          if (op) {
#pragma omp simd
            for (int64_t l = 0; l < L; ++l) yp[l] = (xp[l] - sc) * a + op[l] * b + z;
          } else {
#pragma omp simd
            for (int64_t l = 0; l < L; ++l) yp[l] = (xp[l] - sc) * a + z;
          }
          if (++c == C) c = 0;
        }
        return;
      }
      Writer<T> w(out + i0 * lo.L, stream);
      for (int64_t i = i0; i < i1; ++i) {
        affine_run(w, x + i * lo.L, other ? other + i * lo.L : nullptr, lo.L, vs[c], vx[c],
                   vo[c], v0[c]);
        if (++c == C) c = 0;
      }
      w.finish();
    });
    return;
  }
  // Same row split as row_sums. After a statistics pass (reverse = true) the blocks of
  // rows are taken last to first, so that the rows a thread read last are still in
  // cache; each block is written front to back.
  const int nt = row_threads(lo.R);
  const int64_t blk = std::max<int64_t>(1, (64 * 1024) / std::max<int64_t>(1, C * sizeof(T)));
  parallel(nt, lo.R * C, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = lo.R * t / nt, r1 = lo.R * (t + 1) / nt;
      const int64_t nb = (r1 - r0 + blk - 1) / blk;
      for (int64_t k = 0; k < nb; ++k) {
        const int64_t b = reverse ? nb - 1 - k : k;
        const int64_t rb = r0 + b * blk, re = std::min(r1, rb + blk);
        Writer<T> w(out + rb * C, stream);
        for (int64_t r = rb; r < re; ++r) {
          affine_row(w, x + r * C, other ? other + r * C : nullptr, C, vs.data(), vx.data(),
                     vo.data(), v0.data());
        }
        w.finish();
      }
    }
  });
}

// NCHW, fused per block of channels: pass 1 (sums) and pass 2 (output) over a block that
// fits in L2, so the second pass does not go back to DRAM. A block of channels is a
// contiguous run of cb * L values in every sample, which the prefetcher follows.
// coef(c, sum1, sum2, shift, &kx, &ko, &k0) turns the sums into the output's coefficients.
template <typename T, typename Coef>
void nchw_fused(const T* x, const T* other, T* out, const Layout& lo, const double* shift_in,
                Coef coef) {
  const int64_t C = lo.C, N = lo.N, L = lo.L;
  const int64_t per_channel = N * L * static_cast<int64_t>(sizeof(T)) * (other ? 2 : 1);
  const int64_t nt = std::max<int64_t>(1, at::get_num_threads());
  // Channels per block: enough that the second pass re-reads the block from L2 (256 KiB
  // of input), but at least enough for contiguous runs of 8 KiB per sample (shorter runs
  // starve the prefetcher: with 14x14 images a channel is 784 bytes per sample) as long
  // as the block stays within 2 MiB (one block per thread in L3), and a number of blocks
  // that is a multiple of the thread count, so that no thread idles at the end.
  const int64_t run = L * static_cast<int64_t>(sizeof(T));
  int64_t cb = std::max<int64_t>(1, (256 * 1024) / std::max<int64_t>(per_channel, 1));
  cb = std::max<int64_t>(cb, (8 * 1024 + run - 1) / std::max<int64_t>(run, 1));
  cb = std::min<int64_t>(cb, std::max<int64_t>(1, (2 << 20) / std::max<int64_t>(per_channel, 1)));
  cb = std::min<int64_t>(cb, std::max<int64_t>(1, (C + nt - 1) / nt));
  int64_t nb = (C + cb - 1) / cb;
  nb = std::min<int64_t>(C, (nb + nt - 1) / nt * nt);
  cb = (C + nb - 1) / nb;
  const int64_t nblocks = (C + cb - 1) / cb;
  const bool stream = streaming<T>(N * C * L, other ? 2 : 1);
  const std::vector<int64_t> off = shift_in ? std::vector<int64_t>() : sample_offsets(lo);
  parallel(nblocks, N * C * L, [&](int64_t b0, int64_t b1) {
    std::vector<double> a1(cb), a2(cb), sh(cb), kx(cb), ko(cb), k0(cb);
    std::vector<T> tsh(cb);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t c0 = blk * cb, c1 = std::min(C, c0 + cb), m = c1 - c0;
      for (int64_t j = 0; j < m; ++j) {
        const int64_t c = c0 + j;
        if (shift_in) {
          sh[j] = static_cast<double>(static_cast<T>(shift_in[c]));
        } else {
          sh[j] = channel_shift(x, lo, off, c);
        }
        tsh[j] = static_cast<T>(sh[j]);
        a1[j] = 0;
        a2[j] = 0;
      }
      for (int64_t nn = 0; nn < N; ++nn) {
        for (int64_t j = 0; j < m; ++j) {
          const int64_t off = (nn * C + c0 + j) * L;
          const T* xp = x + off;
          const T sc = tsh[j];
          for (int64_t l0 = 0; l0 < L; l0 += kChunk) {
            const int64_t l1 = std::min(L, l0 + kChunk);
            T q1 = 0, q2 = 0;
            if (other) {
              const T* op = other + off;
#pragma omp simd reduction(+ : q1, q2)
              for (int64_t l = l0; l < l1; ++l) {
                q1 += op[l];
                q2 += op[l] * (xp[l] - sc);
              }
            } else {
#pragma omp simd reduction(+ : q1, q2)
              for (int64_t l = l0; l < l1; ++l) {
                const T d = xp[l] - sc;
                q1 += d;
                q2 += d * d;
              }
            }
            a1[j] += q1;
            a2[j] += q2;
          }
        }
      }
      for (int64_t j = 0; j < m; ++j) coef(c0 + j, a1[j], a2[j], sh[j], &kx[j], &ko[j], &k0[j]);
      if (!out) continue;
      for (int64_t nn = 0; nn < N; ++nn) {
        Writer<T> w(out + (nn * C + c0) * L, stream);
        for (int64_t j = 0; j < m; ++j) {
          const int64_t off = (nn * C + c0 + j) * L;
          affine_run(w, x + off, other ? other + off : nullptr, L, tsh[j],
                     static_cast<T>(kx[j]), static_cast<T>(ko[j]), static_cast<T>(k0[j]));
        }
        w.finish();
      }
    }
  });
}

// A per-channel tensor (any float dtype, any stride) as C doubles; `fill` when absent.
std::vector<double> doubles(const c10::optional<at::Tensor>& t, int64_t C, double fill) {
  std::vector<double> out(static_cast<size_t>(C), fill);
  if (!t.has_value() || !t->defined()) return out;
  const at::Tensor& v = *t;
  if (v.scalar_type() == at::kFloat && v.is_contiguous()) {
    const float* p = v.data_ptr<float>();
    for (int64_t c = 0; c < C; ++c) out[c] = static_cast<double>(p[c]);
  } else if (v.scalar_type() == at::kDouble && v.is_contiguous()) {
    std::memcpy(out.data(), v.data_ptr<double>(), static_cast<size_t>(C) * sizeof(double));
  } else {
    const at::Tensor d = v.to(at::kDouble).contiguous();
    std::memcpy(out.data(), d.data_ptr<double>(), static_cast<size_t>(C) * sizeof(double));
  }
  return out;
}

// C doubles as a tensor of the given dtype.
at::Tensor tensor_of(const std::vector<double>& v, at::ScalarType dtype) {
  const int64_t C = static_cast<int64_t>(v.size());
  at::Tensor t = at::empty({C}, at::TensorOptions().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "bnkit_tensor_of", [&] {
    scalar_t* p = t.data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) p[c] = static_cast<scalar_t>(v[c]);
  });
  return t;
}

// In place: running = (1 - f) * running + f * batch, with the unbiased batch variance
// var * n / (n - 1); in double (functional.update_running_stats).
void update_running_impl(at::Tensor& running_mean, at::Tensor& running_var, const double* mp,
                         const double* vp, int64_t n, double f) {
  const double corr = n > 1 ? static_cast<double>(n) / static_cast<double>(n - 1) : 1.0;
  const int64_t C = running_mean.numel();
  // written through raw pointers: tell autograd's version counter, as an in-place op would
  running_mean.unsafeGetTensorImpl()->bump_version();
  running_var.unsafeGetTensorImpl()->bump_version();
  AT_DISPATCH_FLOATING_TYPES(running_mean.scalar_type(), "bnkit_update_running", [&] {
    scalar_t* rm = running_mean.data_ptr<scalar_t>();
    scalar_t* rv = running_var.data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) {
      rm[c] = static_cast<scalar_t>((1 - f) * static_cast<double>(rm[c]) + f * mp[c]);
      rv[c] = static_cast<scalar_t>((1 - f) * static_cast<double>(rv[c]) + f * vp[c] * corr);
    }
  });
}

}  // namespace

// Whether this build uses x86 intrinsics (non-temporal stores); false for -DBNKIT_PORTABLE
// and on every other architecture.
bool x86_intrinsics() {
#if defined(BNKIT_X86)
  return true;
#else
  return false;
#endif
}

namespace {

// Preconditions of every entry point, checked here whatever the Python side did: a bad
// tensor is an exception with a message, never a memory error.
void check_input(const at::Tensor& x, const char* fn) {
  TORCH_CHECK(x.defined(), fn, ": the input is undefined");
  TORCH_CHECK(x.device().is_cpu(), fn, ": expected a CPU input, got one on ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, fn,
              ": expected a float32 or float64 input, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 2, fn, ": expected an (N, C, *) input, got ", x.dim(), "D");
  TORCH_CHECK(x.numel() > 0, fn, ": the input holds no values");
  TORCH_CHECK(usable(x), fn, ": expected a contiguous or channels_last input");
}

void check_channel(const at::Tensor& t, int64_t C, const char* fn, const char* name) {
  TORCH_CHECK(t.defined(), fn, ": ", name, " is undefined");
  TORCH_CHECK(t.device().is_cpu(), fn, ": ", name, " must be on the CPU, got ", t.device());
  TORCH_CHECK(t.numel() == C, fn, ": ", name, " should contain ", C, " elements not ",
              t.numel());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), fn, ": ", name,
              " must be a floating tensor, got ", t.scalar_type());
}

void check_channel(const c10::optional<at::Tensor>& t, int64_t C, const char* fn,
                   const char* name) {
  if (t.has_value() && t->defined()) check_channel(*t, C, fn, name);
}

// Buffers written in place through raw pointers: one float dtype, contiguous.
void check_running(const at::Tensor& rm, const at::Tensor& rv, int64_t C, const char* fn) {
  check_channel(rm, C, fn, "running_mean");
  check_channel(rv, C, fn, "running_var");
  TORCH_CHECK(rm.scalar_type() == rv.scalar_type() &&
                  (rm.scalar_type() == at::kFloat || rm.scalar_type() == at::kDouble),
              fn, ": running_mean and running_var must both be float32 or both float64, got ",
              rm.scalar_type(), " and ", rv.scalar_type());
  TORCH_CHECK(rm.is_contiguous() && rv.is_contiguous(), fn,
              ": running_mean and running_var must be contiguous");
}

void check_like(const at::Tensor& t, const at::Tensor& x, const char* fn, const char* name) {
  TORCH_CHECK(t.defined() && t.device().is_cpu() && t.sizes() == x.sizes(), fn, ": ", name,
              " must be a CPU tensor of the input's shape ", x.sizes(), ", got ",
              t.defined() ? t.sizes() : at::IntArrayRef{});
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), fn, ": ", name, " must be floating");
}

}  // namespace

namespace {
std::vector<at::Tensor> train_impl(const at::Tensor& x_in, const c10::optional<at::Tensor>& w,
                                   const c10::optional<at::Tensor>& b, double eps, bool want_y);
}

// Returns (y, mean, biased var); mean/var float64 of shape (C,). With running buffers
// (contiguous, one float dtype: the caller checks), also updates them in place with
// factor f (update_running_impl).
std::vector<at::Tensor> forward_train(const at::Tensor& x_in, const c10::optional<at::Tensor>& w,
                                      const c10::optional<at::Tensor>& b, double eps,
                                      c10::optional<at::Tensor> running_mean,
                                      c10::optional<at::Tensor> running_var, double f) {
  const char* fn = "bnkit forward_train";
  check_input(x_in, fn);
  const int64_t C = x_in.size(1);
  check_channel(w, C, fn, "weight");
  check_channel(b, C, fn, "bias");
  TORCH_CHECK(eps >= 0, fn, ": eps must be >= 0, got ", eps);
  const bool has_rm = running_mean.has_value() && running_mean->defined();
  const bool has_rv = running_var.has_value() && running_var->defined();
  TORCH_CHECK(has_rm == has_rv, fn, ": give both running buffers or neither");
  if (has_rm) check_running(*running_mean, *running_var, C, fn);
  auto r = train_impl(x_in, w, b, eps, true);
  if (has_rm) {
    update_running_impl(*running_mean, *running_var, r[1].data_ptr<double>(),
                        r[2].data_ptr<double>(), x_in.numel() / x_in.size(1), f);
  }
  return r;
}

// Returns (mean, biased var), float64 (C,): the statistics pass alone.
std::vector<at::Tensor> stats(const at::Tensor& x_in) {
  check_input(x_in, "bnkit stats");
  auto r = train_impl(x_in, c10::nullopt, c10::nullopt, 1.0, false);
  return {r[1], r[2]};
}

namespace {
std::vector<at::Tensor> train_impl(const at::Tensor& x_in, const c10::optional<at::Tensor>& w,
                                   const c10::optional<at::Tensor>& b, double eps, bool want_y) {
  const Layout lo = layout_of(x_in);
  at::Tensor x = as_layout(x_in, lo.fastest);
  const int64_t C = lo.C;
  const double n = static_cast<double>(lo.N * lo.L);
  auto dopt = at::TensorOptions().dtype(at::kDouble);
  at::Tensor mean = at::empty({C}, dopt), var = at::empty({C}, dopt);
  std::vector<double> s(C), s1(C), s2(C), kx(C), k0(C);
  const std::vector<double> wd = want_y ? doubles(w, C, 1.0) : std::vector<double>(C, 1.0);
  const std::vector<double> bd = want_y ? doubles(b, C, 0.0) : std::vector<double>(C, 0.0);
  at::Tensor y = want_y ? new_output(x) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bnkit_forward_train", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    double* mp = mean.data_ptr<double>();
    double* vp = var.data_ptr<double>();
    const double* wp = wd.data();
    const double* bp = bd.data();
    auto coef = [&](int64_t c, double a1, double a2, double sh, double* ka, double* ko,
                    double* kz) {
      const double lo_mean = a1 / n;
      const double v0 = a2 / n - lo_mean * lo_mean;
      const double v = v0 < 0.0 ? 0.0 : v0;  // keeps NaN (std::max(0.0, NaN) is 0)
      mp[c] = sh + lo_mean;
      vp[c] = v;
      const double a = wp[c] / std::sqrt(v + eps);
      *ka = a;
      *ko = 0;
      *kz = bp[c] - lo_mean * a;
    };
    if (!lo.fastest) {
      nchw_fused<scalar_t>(xp, nullptr, want_y ? y.data_ptr<scalar_t>() : nullptr, lo, nullptr,
                           coef);
      return;
    }
    row_shifts(xp, lo, s.data());
    row_sums<scalar_t>(xp, nullptr, lo, s.data(), s1.data(), s2.data());
    double unused = 0;
    for (int64_t c = 0; c < C; ++c) coef(c, s1[c], s2[c], s[c], &kx[c], &unused, &k0[c]);
    if (!want_y) return;
    channel_affine<scalar_t>(xp, nullptr, y.data_ptr<scalar_t>(), lo, s.data(), kx.data(),
                             nullptr, k0.data(), true);
  });
  return {y, mean, var};
}
}  // namespace

// Closed-form training backward (see functional._train_backward). `stat` is the biased
// batch variance (invstd = 1 / sqrt(var + eps)), or invstd itself when `is_invstd`.
// Returns (grad_x or undefined, sum(go * xhat), sum(go)): the sums as float64 when
// `raw_sums`, else as the weight and bias gradients (weight's dtype; x's without weight).
std::vector<at::Tensor> backward_train(const at::Tensor& go_in, const at::Tensor& x_in,
                                       const c10::optional<at::Tensor>& w, const at::Tensor& mean,
                                       const at::Tensor& stat, double eps, bool is_invstd,
                                       bool need_gx, bool raw_sums) {
  const char* fn = "bnkit backward_train";
  check_input(x_in, fn);
  check_like(go_in, x_in, fn, "grad_output");
  const int64_t C_in = x_in.size(1);
  check_channel(w, C_in, fn, "weight");
  check_channel(mean, C_in, fn, "mean");
  check_channel(stat, C_in, fn, is_invstd ? "invstd" : "var");
  const Layout lo = layout_of(x_in);
  at::Tensor x = as_layout(x_in, lo.fastest);
  at::Tensor go = as_layout(go_in.scalar_type() == x.scalar_type() ? go_in
                                                                     : go_in.to(x.scalar_type()),
                            lo.fastest);
  const int64_t C = lo.C;
  const double n = static_cast<double>(lo.N * lo.L);
  std::vector<double> gsum(C), gxhat(C);
  const std::vector<double> md = doubles(mean, C, 0.0), wd = doubles(w, C, 1.0);
  std::vector<double> id = doubles(stat, C, 1.0);
  if (!is_invstd)
    for (int64_t c = 0; c < C; ++c) id[c] = 1.0 / std::sqrt(id[c] + eps);
  at::Tensor gx;
  if (need_gx) gx = new_output(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bnkit_backward_train", [&] {
    std::vector<double> s(C), sg(C), sgd(C), kx(C), ko(C), k0(C);
    const double* mp = md.data();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = go.data_ptr<scalar_t>();
    const double* ip = id.data();
    const double* wp = wd.data();
    double* gs = gsum.data();
    double* gh = gxhat.data();
    auto coef = [&](int64_t c, double a1, double a2, double sh, double* ka, double* ko_,
                    double* kz) {
      const double lo_c = mp[c] - sh;  // what the rounded shift missed
      const double sxh = (a2 - lo_c * a1) * ip[c];
      gs[c] = a1;
      gh[c] = sxh;
      const double a = wp[c] * ip[c];
      const double kd = -a * ip[c] * sxh / n;
      *ko_ = a;
      *ka = kd;
      *kz = -a * a1 / n - kd * lo_c;
    };
    scalar_t* outp = need_gx ? gx.data_ptr<scalar_t>() : nullptr;
    if (!lo.fastest) {
      nchw_fused<scalar_t>(xp, gp, outp, lo, mp, coef);
      return;
    }
    for (int64_t c = 0; c < C; ++c) s[c] = static_cast<double>(static_cast<scalar_t>(mp[c]));
    row_sums<scalar_t>(xp, gp, lo, s.data(), sg.data(), sgd.data());
    for (int64_t c = 0; c < C; ++c) coef(c, sg[c], sgd[c], s[c], &kx[c], &ko[c], &k0[c]);
    if (outp) {
      channel_affine<scalar_t>(xp, gp, outp, lo, s.data(), kx.data(), ko.data(), k0.data(),
                               true);
    }
  });
  if (raw_sums) return {gx, tensor_of(gxhat, at::kDouble), tensor_of(gsum, at::kDouble)};
  const bool has_w = w.has_value() && w->defined();
  const at::ScalarType pdt = has_w ? w->scalar_type() : x.scalar_type();
  return {gx, has_w ? tensor_of(gxhat, pdt) : at::Tensor(), tensor_of(gsum, pdt)};
}

// Eval: y = (x - running_mean) * scale + shift per channel, with scale = weight /
// sqrt(running_var + eps) and shift = bias computed here in double.
at::Tensor forward_eval(const at::Tensor& x_in, const at::Tensor& running_mean,
                        const at::Tensor& running_var, const c10::optional<at::Tensor>& w,
                        const c10::optional<at::Tensor>& b, double eps) {
  const char* fn = "bnkit forward_eval";
  check_input(x_in, fn);
  const int64_t C_in = x_in.size(1);
  check_channel(running_mean, C_in, fn, "running_mean");
  check_channel(running_var, C_in, fn, "running_var");
  check_channel(w, C_in, fn, "weight");
  check_channel(b, C_in, fn, "bias");
  const Layout lo = layout_of(x_in);
  at::Tensor x = as_layout(x_in, lo.fastest);
  at::Tensor y = new_output(x);
  const int64_t C = lo.C;
  const std::vector<double> md = doubles(running_mean, C, 0.0), hd = doubles(b, C, 0.0);
  std::vector<double> sd = doubles(running_var, C, 1.0);
  const std::vector<double> wd = doubles(w, C, 1.0);
  for (int64_t c = 0; c < C; ++c) sd[c] = wd[c] / std::sqrt(sd[c] + eps);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bnkit_forward_eval", [&] {
    channel_affine<scalar_t>(x.data_ptr<scalar_t>(), nullptr, y.data_ptr<scalar_t>(), lo,
                             md.data(), sd.data(), nullptr, hd.data(), false);
  });
  return y;
}

// grad_x = ko * go + kx * (x - s) + k0 per channel, s = mean rounded to the input type
// (the apply step of the training backward when the sums come from elsewhere, e.g. an
// all_reduce across ranks).
at::Tensor grad_apply(const at::Tensor& go_in, const at::Tensor& x_in, const at::Tensor& mean,
                      const at::Tensor& kx, const at::Tensor& ko, const at::Tensor& k0) {
  const char* fn = "bnkit grad_apply";
  check_input(x_in, fn);
  check_like(go_in, x_in, fn, "grad_output");
  const int64_t C_in = x_in.size(1);
  check_channel(mean, C_in, fn, "mean");
  check_channel(kx, C_in, fn, "k_centered");
  check_channel(ko, C_in, fn, "k_grad");
  check_channel(k0, C_in, fn, "k_const");
  const Layout lo = layout_of(x_in);
  at::Tensor x = as_layout(x_in, lo.fastest);
  at::Tensor go = as_layout(go_in.to(x.scalar_type()), lo.fastest);
  at::Tensor gx = new_output(x);
  const int64_t C = lo.C;
  const std::vector<double> md = doubles(mean, C, 0.0), xd = doubles(kx, C, 0.0);
  const std::vector<double> od = doubles(ko, C, 0.0), zd = doubles(k0, C, 0.0);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bnkit_grad_apply", [&] {
    std::vector<double> s(C);
    for (int64_t c = 0; c < C; ++c) s[c] = static_cast<double>(static_cast<scalar_t>(md[c]));
    channel_affine<scalar_t>(x.data_ptr<scalar_t>(), go.data_ptr<scalar_t>(),
                             gx.data_ptr<scalar_t>(), lo, s.data(), xd.data(), od.data(),
                             zd.data(), false);
  });
  return gx;
}
