// bnkit's CPU fast path: BatchNorm training forward/backward and eval forward.
//
// The same math as bnkit/nn/_stats.py and _backward.py (shifted sums, float64 accumulation, output from
// the shifted values), written as two passes over memory, each read front to back as one
// sequential stream per thread (what the hardware prefetcher follows best):
//   pass 1, the sums: NCHW (N, C, L) runs in order, each added to its channel's lanes
//     (LaneSums); channels-fastest (R, C) (channels_last, 2D input) rows, vectorised over
//     C; in the input type for a few values a lane, then in double; per-thread
//     partial sums merged at the end.
//   pass 2, the output, with the per-channel coefficients from the sums: after pass 1 each
//     thread takes the same range, last block first, so that it finds what it read last
//     still in cache.
// NCHW with long runs (112x112 and more) instead sweeps blocks of channels, each summed
// and then written while it is in cache (nchw_fused): memory read once, not twice.
// s is a per-channel shift (the mean of a few strided samples) so that x - s is small and
// exact; mean = s + sum(x - s) / n and var = sum((x - s)^2) / n - (sum(x - s) / n)^2.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/autograd/forward_grad.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/jit/frontend/tracer.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <string>
#include <utility>
#include <type_traits>
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
constexpr int64_t kLaneChunk = 8;    // lane steps an NCHW lane sums in T (see LaneSums)
// enough samples to put the shift within a fraction of a std of the mean
constexpr int64_t kShiftSamples = 16;

// A kernel whose tensors (inputs and output together) take more than the last-level cache
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

// ---------------------------------------------------------------- storage and compute
// The kernels read and write the input's own dtype (the storage type S) and compute in T:
// T = S for float32 and float64; T = float for bfloat16 and float16, as torch computes
// them. ld converts a stored value to T, st<S> rounds a T to S (to nearest even, as
// torch's .to() does). Both are integer and float arithmetic with selects, no branches and
// no intrinsics, so that they vectorise inside the kernels' loops on every architecture
// (GCC 12 does not vectorise _Float16 conversions: a scalar vcvtph2ps per value ran the
// float16 kernels at a sixth of bfloat16's speed). So a half-precision tensor is read and
// written once at two bytes a value, never staged through float32 copies.
struct BF16 {
  uint16_t bits;
};
struct F16 {
  uint16_t bits;
};
static_assert(sizeof(BF16) == 2 && sizeof(F16) == 2, "bnkit: 16-bit storage types");

inline uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

inline float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// c ? a : b as masks (no branch for the vectoriser to give up on)
inline uint32_t pick(bool c, uint32_t a, uint32_t b) {
  const uint32_t m = 0u - static_cast<uint32_t>(c);
  return (a & m) | (b & ~m);
}

// IEEE binary16 -> float, exact: normals by rebiasing the exponent, subnormals as
// m * 2^-24 (an exact float subtraction, no float subnormal involved), inf and NaN (payload
// kept, as vcvtph2ps does) by setting the whole exponent.
inline float float_from_f16(uint16_t h) {
  const uint32_t em = h & 0x7fffu;
  const uint32_t normal = (em << 13) + ((127u - 15u) << 23);
  const uint32_t special = (em << 13) | 0x7f800000u;
  const uint32_t sub = bits_of(float_of((em << 13) + (113u << 23)) - float_of(113u << 23));
  const uint32_t o = pick(em >= 0x7c00u, special, pick(em < 0x400u, sub, normal));
  return float_of(o | (static_cast<uint32_t>(h & 0x8000u) << 16));
}

// float -> IEEE binary16, rounding to nearest even (F. Giesen's float_to_half_fast3_rtne):
// overflow to inf, NaN stays NaN (quiet, payload's top bits kept, as vcvtps2ph does),
// subnormal results rounded by a float addition of a magic constant.
inline uint16_t f16_from_float(float f) {
  const uint32_t u = bits_of(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  const uint32_t nan = 0x7e00u | ((a >> 13) & 0x3ffu);
  const uint32_t big = pick(a > 0x7f800000u, nan, 0x7c00u);  // at or above 65520: inf
  constexpr uint32_t kMagic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
  const uint32_t sub = bits_of(float_of(a) + float_of(kMagic)) - kMagic;
  const uint32_t normal = (a + ((15u - 127u) << 23) + 0xfffu + ((a >> 13) & 1u)) >> 13;
  const uint32_t o = pick(a >= ((127u + 16u) << 23), big, pick(a < (113u << 23), sub, normal));
  return static_cast<uint16_t>(o | sign);
}

inline uint16_t bf16_from_float(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const bool nan = (u & 0x7fffffffu) > 0x7f800000u;  // NaN -> 0x7fc0, as c10::BFloat16
  return static_cast<uint16_t>(nan ? 0x7fc0u : rounded);  // a select: the loop vectorises
}

inline float float_from_bf16(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline float ld(float v) { return v; }
inline double ld(double v) { return v; }
inline float ld(BF16 v) { return float_from_bf16(v.bits); }
inline float ld(F16 v) { return float_from_f16(v.bits); }

template <typename S, typename T>
inline S st(T v) {
  if constexpr (std::is_same_v<S, BF16>) return BF16{bf16_from_float(v)};
  else if constexpr (std::is_same_v<S, F16>) return F16{f16_from_float(v)};
  else return static_cast<S>(v);
}

// The compute type of a storage type.
template <typename S>
using compute_t = std::conditional_t<std::is_same_v<S, double>, double, float>;

// The streaming copy of 16-bit values: ordinary stores (the kernels stream only float32
// and float64 outputs, see Op::streams; the Writer needs this to compile for every S).
template <typename S>
inline int64_t stream_copy(S* dst, const S* src, int64_t n, bool all) {
  (void)all;
  std::memcpy(static_cast<void*>(dst), static_cast<const void*>(src),
              static_cast<size_t>(n) * sizeof(S));
  return n;
}

// float16 in the loops: converting value by value in integer arithmetic (ld/st above) costs
// ~30 vector operations per eight values, and made float16 2-6x torch's time where
// bfloat16 (a shift) ran at torch's. So the loops convert float16 in L1 blocks of kBlk
// values instead (vcvtph2ps/vcvtps2ph, eight values an instruction, where the build has
// F16C; ld/st elsewhere), and run their float code on the blocks.
constexpr int64_t kBlk = 512;  // a multiple of LaneSums' chunk (kLaneChunk * 32 floats)

inline void widen_f16(const F16* s, float* d, int64_t n) {
  int64_t i = 0;
#if defined(BNKIT_X86) && defined(__F16C__) && defined(__AVX__)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(d + i, _mm256_cvtph_ps(_mm_loadu_si128(
                                reinterpret_cast<const __m128i*>(s + i))));
#endif
  for (; i < n; ++i) d[i] = ld(s[i]);
}

inline void narrow_f16(const float* s, F16* d, int64_t n) {
  int64_t i = 0;
#if defined(BNKIT_X86) && defined(__F16C__) && defined(__AVX__)
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(s + i), _MM_FROUND_TO_NEAREST_INT));
#endif
  for (; i < n; ++i) d[i] = st<F16>(s[i]);
}

// The float copy of up to kBlk values of a float16 operand (none: null).
struct F16Block {
  alignas(64) float v[kBlk];
  const float* from(const F16* s, int64_t n) {
    if (s == nullptr) return nullptr;
    widen_f16(s, v, n);
    return v;
  }
};

// Writes a contiguous output region front to back. put(n) hands out room for the next n
// values (n <= kRun): directly in the output when not streaming, else in an L1 buffer
// that is written out with aligned non-temporal stores (only the region's first and last
// few values take normal stores). finish() must be called once at the end.
template <typename T>
class Writer {
 public:
  static constexpr int64_t kRun = 1024;  // most values asked for at once
  Writer(T* dst, bool stream) : dst_(dst), stream_(stream) {}
  bool streams() const { return stream_; }
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

// An output pass after a statistics pass goes through each thread's range in blocks of
// about this many bytes, last block first (what the thread read last is still in cache);
// an output pass alone writes each thread's range as one block (docs/performance.md,
// "Kernel choices", has the A/B figures).
constexpr int64_t kBackBlock = 256 * 1024;

// Threads for an NCHW pass over `runs` runs (n, c): the same split in the statistics pass
// and the output pass.
int run_threads(int64_t runs) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), runs)));
}

// Items [0, n) (NCHW runs or channels-fastest rows, item_bytes each) split in nt
// contiguous ranges, one per thread (the split of the statistics pass); each range goes
// to body(begin, end) in blocks: after a statistics pass (reverse) blocks of kBackBlock
// bytes, last first, so that a thread finds what it read last still in cache; else the
// whole range as one block.
template <typename F>
void blocked_ranges(int64_t n, int nt, int64_t item_bytes, int64_t numel, bool reverse,
                    const F& body) {
  const int64_t per_block = std::max<int64_t>(1, kBackBlock / std::max<int64_t>(item_bytes, 1));
  parallel(nt, numel, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i0 = n * t / nt, i1 = n * (t + 1) / nt;
      const int64_t blk = reverse ? per_block : std::max<int64_t>(1, i1 - i0);
      const int64_t nb = (i1 - i0 + blk - 1) / blk;
      for (int64_t k = 0; k < nb; ++k) {
        const int64_t b = reverse ? nb - 1 - k : k;
        const int64_t rb = i0 + b * blk;
        body(rb, std::min(i1, rb + blk));
      }
    }
  });
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
  // One value per sample and channel (L = 1: (N, C, 1), (N, C, 1, 1), ...): contiguous
  // memory is then (N, C) rows, which the channels-fastest loops read in long runs; the
  // NCHW loops would take runs of one value.
  lo.fastest = x.dim() == 2 || lo.L == 1 || !x.is_contiguous();
  return lo;
}

// The memory order the kernels read: contiguous NCHW, or channels-fastest.
at::Tensor as_layout(const at::Tensor& t, bool fastest) {
  if (!fastest) return t.contiguous();
  if (t.dim() <= 3) return t.contiguous();  // 2-D, or 3-D with L = 1: rows as they are
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

// Per-channel shift: the mean of the sampled values, rounded to the compute type T so that
// x - s is small and exact (or nearly: for 16-bit storage, far below its own rounding).
// Only finite samples count (0 when there is none): an inf or NaN then reaches the sums
// as itself, and the statistics come out as torch's (mean inf/-inf/NaN, variance NaN).
template <typename S, typename T = compute_t<S>>
double channel_shift(const S* x, const Layout& lo, const std::vector<int64_t>& off, int64_t c) {
  const int64_t base = lo.fastest ? c : c * std::max<int64_t>(lo.L, 1);
  double acc = 0;
  int64_t k = 0;
  for (const int64_t o : off) {
    const double v = static_cast<double>(ld(x[o + base]));
    if (std::isfinite(v)) {
      acc += v;
      ++k;
    }
  }
  return k ? static_cast<double>(static_cast<T>(acc / static_cast<double>(k))) : 0.0;
}

// Per-channel shifts of the input: NCHW channel by channel; channels-fastest (R, C) with
// the samples as whole rows, summed vectorised over the channels.
template <typename S, typename T = compute_t<S>>
void shifts(const S* x, const Layout& lo, double* s) {
  if (!lo.fastest) {
    const std::vector<int64_t> off = sample_offsets(lo);
    for (int64_t c = 0; c < lo.C; ++c) s[c] = channel_shift(x, lo, off, c);
    return;
  }
  const std::vector<int64_t> off = sample_offsets(lo);
  std::vector<double> acc(lo.C, 0.0), cnt(lo.C, 0.0);
  double* a = acc.data();
  double* k = cnt.data();
  for (const int64_t o : off) {  // finite samples only, as in channel_shift
    const S* xp = x + o;
#pragma omp simd
    for (int64_t c = 0; c < lo.C; ++c) {
      const double v = static_cast<double>(ld(xp[c]));
      const bool ok = std::isfinite(v);
      a[c] += ok ? v : 0.0;
      k[c] += ok ? 1.0 : 0.0;
    }
  }
  for (int64_t c = 0; c < lo.C; ++c)
    s[c] = k[c] > 0 ? static_cast<double>(static_cast<T>(a[c] / k[c])) : 0.0;
}

// ---------------------------------------------------------------- what the loops compute
// Every kernel is one or two of four loops (sums and output, over NCHW runs or over
// channels-fastest rows), written once and told by the Op below what to compute per value:
//   kStats  sums of d = x - s and d^2 (the training forward's statistics);
//   kFwd    output act(pre), pre = (x - s) * kx + k0 [+ r] (training and eval forward,
//           with the activation A and the residual r fused in);
//   kBwd    sums of g and g * (x - s), and output (x - s) * kx + g * ko + k0, where g is
//           the incoming gradient gated by the activation's derivative at the forward's
//           own pre-activation (recomputed from x [and r] with the forward's coefficients
//           fs, fa, fk: the same expression, so the same bits), and g itself into a
//           second output for the residual when it is gated.
enum : int { kNoAct = 0, kRelu = 1, kRelu6 = 2 };
enum : int { kStats = 0, kFwd = 1, kBwd = 2 };

// torch's relu (clamp_min: NaN and -0 kept) and relu6 (hardtanh(0, 6)).
template <int A, typename T>
inline T act_f(T v) {
  if constexpr (A == kRelu) return v < T(0) ? T(0) : v;
  else if constexpr (A == kRelu6) return v < T(0) ? T(0) : (v > T(6) ? T(6) : v);
  else return v;
}

// torch's threshold_backward / hardtanh_backward: the gradient passes unless the
// pre-activation is at or beyond a bound (a NaN passes).
template <int A, typename T>
inline T act_grad(T g, T v) {
  if constexpr (A == kRelu) return v <= T(0) ? T(0) : g;
  else if constexpr (A == kRelu6) return (v <= T(0) || v >= T(6)) ? T(0) : g;
  else return g;
}

template <typename T>
inline T pre_act(T x, T s, T a, T k) {
  return (x - s) * a + k;
}

// One channel's scalars: s the shift of x in sums and output; kx, ko, k0 the output's
// coefficients; fs, fa, fk the forward's (kBwd with an activation).
template <typename T>
struct K {
  T s, kx, ko, k0, fs, fa, fk;
};

// The tensors of a kernel (in its layout): x always; go for kBwd; r when RES; out (may be
// null: statistics only); out2 the gated gradient for the residual.
template <typename T>
struct Ptrs {
  const T* x = nullptr;
  const T* go = nullptr;
  const T* r = nullptr;
  T* out = nullptr;
  T* out2 = nullptr;
};

// T the compute type, S the storage type of the tensors (see ld/st).
template <typename T, typename S, int M, int A, bool RES>
struct Op {
  using Store = S;
  using Wide = Op<T, T, M, A, RES>;  // the same op over values already converted to T
  static constexpr bool kGated = M == kBwd && A != kNoAct;
  static constexpr bool kSecond = kGated && RES;  // writes the residual's gradient
  static constexpr bool kReadsGo = M == kBwd;
  static constexpr bool kReadsR = RES && (M == kFwd || kGated);
  static constexpr int inputs = 1 + (kReadsGo ? 1 : 0) + (kReadsR ? 1 : 0);
  static constexpr int outputs = 1 + (kSecond ? 1 : 0);

  static inline T gate(T x, T go, T r, const K<T>& k) {
    if constexpr (kGated) {
      T v = pre_act(x, k.fs, k.fa, k.fk);
      if constexpr (RES) v = v + r;
      return act_grad<A>(go, v);
    } else {
      return go;
    }
  }
  // the two summands of one value (kFwd sums the statistics too)
  static inline void sum(T x, T go, T r, const K<T>& k, T& u, T& v) {
    if constexpr (M != kBwd) {
      u = x - k.s;
      v = u * u;
    } else {
      const T g = gate(x, go, r, k);
      u = g;
      v = g * (x - k.s);
    }
  }
  // the output value (and the second one)
  static inline T out(T x, T go, T r, const K<T>& k, T& second) {
    if constexpr (M == kFwd) {
      (void)go;
      (void)second;
      T v = pre_act(x, k.s, k.kx, k.k0);
      if constexpr (RES) v = v + r;
      return act_f<A>(v);
    } else {
      const T g = gate(x, go, r, k);
      second = g;
      return (x - k.s) * k.kx + g * k.ko + k.k0;
    }
  }
  // non-temporal stores for large float32/float64 outputs (16-bit ones: ordinary stores)
  static bool streams(int64_t numel) {
    if constexpr (sizeof(S) < 4) return false;
    return numel * static_cast<int64_t>(sizeof(S)) * (inputs + outputs) > stream_bytes();
  }
};

// Per-channel scalars as arrays of T (the channels-fastest loops index them by channel),
// in one 64-byte-aligned block. Each array starts one cache line further into the cache's
// sets than a whole number of lines: arrays C * sizeof(T) apart (C = 1024: 4 KiB) would
// all map to the same L1 sets as each other and as the rows of x and y, and evict each
// other every row (docs/performance.md, "Kernel choices").
template <typename T>
struct KArrays {
  explicit KArrays(int64_t C_)
      : C(C_), stride((C_ + 15) / 16 * 16 + 64 / static_cast<int64_t>(sizeof(T))),
        buf(static_cast<size_t>(kArrays * stride + 64 / static_cast<int64_t>(sizeof(T))),
            T(0)) {}
  int64_t C, stride;
  T* s() { return arr(0); }
  T* kx() { return arr(1); }
  T* ko() { return arr(2); }
  T* k0() { return arr(3); }
  T* fs() { return arr(4); }
  T* fa() { return arr(5); }
  T* fk() { return arr(6); }
  const T* s() const { return arr(0); }
  const T* kx() const { return arr(1); }
  const T* ko() const { return arr(2); }
  const T* k0() const { return arr(3); }
  const T* fs() const { return arr(4); }
  const T* fa() const { return arr(5); }
  const T* fk() const { return arr(6); }
  K<T> at(int64_t c) const {
    return {s()[c], kx()[c], ko()[c], k0()[c], fs()[c], fa()[c], fk()[c]};
  }
  static constexpr int kArrays = 7;  // s, kx, ko, k0, fs, fa, fk: arr(0..6)
  T* arr(int j) const {
    auto a = reinterpret_cast<std::uintptr_t>(buf.data());
    a = (a + 63) & ~std::uintptr_t(63);
    return reinterpret_cast<T*>(a) + j * stride;
  }

 private:
  mutable std::vector<T> buf;
};

// Few channels (channels_last with C <= 128): the vector loops of a row would run over a
// handful of values and pay their per-row cost (loop set-up, a Writer call, the
// accumulators' read-modify-write) every few values. So f consecutive rows are taken as
// one row of W = f * C values with the per-channel scalars repeated f times (value j is
// channel j % C), W about 256; the rows left over (fewer than f) go as they are. Measured
// (benchmarks/bench_kernels_ab.py): 1.2-2x for C <= 32, 0.81-0.94 of the plain rows' time
// for C = 64 and 128; rows of 512 (C = 256 tiled too) bought nothing.
int64_t tile_rows(const Layout& lo) {
  if (!lo.fastest || lo.C <= 0 || lo.C > 128) return 1;
  const int64_t f = std::max<int64_t>(1, 256 / lo.C);
  return lo.R >= 2 * f ? f : 1;
}

// The layout of R rows of C values (channels-fastest).
Layout rows_layout(int64_t R, int64_t C) {
  Layout l{};
  l.fastest = true;
  l.N = R;
  l.L = 1;
  l.R = R;
  l.C = C;
  return l;
}

template <typename T>
KArrays<T> tiled(const KArrays<T>& ka, int64_t f) {
  const int64_t C = ka.C;
  KArrays<T> t(C * f);
  for (int j = 0; j < KArrays<T>::kArrays; ++j) {
    const T* a = ka.arr(j);
    for (int64_t r = 0; r < f; ++r) std::copy(a, a + C, t.arr(j) + r * C);
  }
  return t;
}

template <typename S>
Ptrs<S> rows_from(const Ptrs<S>& p, int64_t offset) {
  Ptrs<S> q = p;
  q.x += offset;
  if (q.go) q.go += offset;
  if (q.r) q.r += offset;
  if (q.out) q.out += offset;
  if (q.out2) q.out2 += offset;
  return q;
}

// Per-thread partial sums (nt blocks of (sum1[C], sum2[C])) merged in thread order.
void merge_partials(const std::vector<double>& part, int nt, int64_t C, double* sum1,
                    double* sum2) {
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

// Per-channel (sum u, sum v) of the Op over a channels-fastest (R, C) input.
template <typename T, typename O>
void row_sums_rows(const Ptrs<typename O::Store>& p, const Layout& lo, const KArrays<T>& ka, double* sum1,
                   double* sum2) {
  const int64_t C = lo.C;
  // Rows split across threads, each streaming its rows once with per-channel
  // accumulators in the input type (L1-resident, vectorised over C), flushed to
  // per-thread float64 partials every kChunk rows at most; partials merged at the end.
  const int64_t R = lo.R;
  const int nt = row_threads(R);
  std::vector<double> part(static_cast<size_t>(nt) * 2 * C, 0.0);
  // Accumulators 64-byte aligned and padded, so that each vector store forwards cleanly
  // to the next row's load (a store split across cache lines does not, and costs ~10
  // cycles a vector); four rows per sweep so that the read-modify-write of the
  // accumulators is paid once per four rows.
  const int64_t Cp = (C + 15) / 16 * 16;
  using St = typename O::Store;  // (S below is the stream spacing)
  const T *ps = ka.s(), *pfs = ka.fs(), *pfa = ka.fa(), *pfk = ka.fk();
  parallel(nt, lo.R * C, [&](int64_t t0, int64_t t1) {
    std::vector<T> store(2 * Cp + 64 / sizeof(T));
    T* b1 = store.data();
    while (reinterpret_cast<std::uintptr_t>(b1) % 64 != 0) ++b1;
    T* b2 = b1 + Cp;
    // float16: the float copies of four rows' kBlk-channel pieces (see over_channels)
    std::vector<float> fx, fg, fr;
    if constexpr (std::is_same_v<St, F16>) {
      fx.resize(4 * kBlk);
      if (O::kReadsGo) fg.resize(4 * kBlk);
      if (O::kReadsR) fr.resize(4 * kBlk);
    }
    auto flush = [C, Cp](double* p1, double* p2, T* b1, T* b2) {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        p1[c] += static_cast<double>(b1[c]);
        p2[c] += static_cast<double>(b2[c]);
      }
      std::fill(b1, b1 + 2 * Cp, T(0));
    };
    // channels [c0, c0 + n) of one row (x, go, r at channel c0) into the accumulators
    auto row1 = [&](const auto* x, const auto* go, const auto* r, int64_t, int64_t c0,
                    int64_t n) {
      T* a1 = static_cast<T*>(__builtin_assume_aligned(b1 + c0, 64));  // (c0: 0 or kBlk's)
      T* a2 = static_cast<T*>(__builtin_assume_aligned(b2 + c0, 64));
#pragma omp simd
      for (int64_t c = 0; c < n; ++c) {
        const int64_t cc = c0 + c;
        const K<T> kc{ps[cc], T(0), T(0), T(0), pfs[cc], pfa[cc], pfk[cc]};
        T u, v;
        O::sum(ld(x[c]), ld(go[c]), ld(r[c]), kc, u, v);
        a1[c] += u;
        a2[c] += v;
      }
    };
    // ... of four rows d values apart
    auto rows4 = [&](const auto* x, const auto* go, const auto* r, int64_t d, int64_t c0,
                     int64_t n) {
      T* a1 = static_cast<T*>(__builtin_assume_aligned(b1 + c0, 64));  // (c0: 0 or kBlk's)
      T* a2 = static_cast<T*>(__builtin_assume_aligned(b2 + c0, 64));
#pragma omp simd
      for (int64_t c = 0; c < n; ++c) {
        const int64_t cc = c0 + c;
        const K<T> kc{ps[cc], T(0), T(0), T(0), pfs[cc], pfa[cc], pfk[cc]};
        T u0, v0, u1, v1, u2, v2, u3, v3;
        O::sum(ld(x[c]), ld(go[c]), ld(r[c]), kc, u0, v0);
        O::sum(ld(x[c + d]), ld(go[c + d]), ld(r[c + d]), kc, u1, v1);
        O::sum(ld(x[c + 2 * d]), ld(go[c + 2 * d]), ld(r[c + 2 * d]), kc, u2, v2);
        O::sum(ld(x[c + 3 * d]), ld(go[c + 3 * d]), ld(r[c + 3 * d]), kc, u3, v3);
        a1[c] += (u0 + u1) + (u2 + u3);
        a2[c] += (v0 + v1) + (v2 + v3);
      }
    };
    // every channel of the rows at value i0 (four rows d apart, or one): float16 in float
    // blocks (see kBlk), each of the rows' kBlk-channel pieces widened into its buffer
    auto over_channels = [&](int64_t i0, int64_t d, const auto& body) {
      const int rows = d > 0 ? 4 : 1;
      if constexpr (std::is_same_v<St, F16>) {
        for (int64_t c0 = 0; c0 < C; c0 += kBlk) {
          const int64_t n = std::min(kBlk, C - c0);
          for (int j = 0; j < rows; ++j) {
            widen_f16(p.x + i0 + j * d + c0, fx.data() + j * kBlk, n);
            if (O::kReadsGo) widen_f16(p.go + i0 + j * d + c0, fg.data() + j * kBlk, n);
            if (O::kReadsR) widen_f16(p.r + i0 + j * d + c0, fr.data() + j * kBlk, n);
          }
          const float* x = fx.data();
          body(x, O::kReadsGo ? fg.data() : x, O::kReadsR ? fr.data() : x, kBlk, c0, n);
        }
      } else {
        const St* x = p.x + i0;
        body(x, O::kReadsGo ? p.go + i0 : x, O::kReadsR ? p.r + i0 : x, d, 0, C);
      }
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
      const int64_t row_bytes = C * static_cast<int64_t>(sizeof(St)) * O::inputs;
      const int64_t S = std::max<int64_t>(kChunk / 4, (16 * 1024 + row_bytes - 1) / row_bytes);
      for (int64_t rb = r0; rb < r1; rb += 4 * S) {
        const int64_t m = std::min(r1 - rb, 4 * S), q = m / 4;  // b1, b2 are zero here
        for (int64_t k = 0; k < q; ++k) {
          if (k > 0 && k % (kChunk / 4) == 0) flush(p1, p2, b1, b2);
          const int64_t i0 = (rb + k) * C, d = q * C;  // value (row, channel 0) of stream 0
          over_channels(i0, d, rows4);
        }
        for (int64_t row = rb + 4 * q; row < rb + m; ++row)  // at most three rows left over
          over_channels(row * C, 0, row1);
        flush(p1, p2, b1, b2);
      }
    }
  });
  merge_partials(part, nt, C, sum1, sum2);
}

template <typename T, typename O>
__attribute__((noinline)) void row_sums_tiled(const Ptrs<typename O::Store>& p, const Layout& lo,
                                              const KArrays<T>& ka, double* sum1, double* sum2,
                                              int64_t f) {
  const int64_t C = lo.C;
  const int64_t Rt = lo.R / f, W = f * C, done = Rt * f;
  std::vector<double> t1(W), t2(W), r1(C, 0.0), r2(C, 0.0);
  row_sums_rows<T, O>(p, rows_layout(Rt, W), tiled(ka, f), t1.data(), t2.data());
  if (done < lo.R)
    row_sums_rows<T, O>(rows_from(p, done * C), rows_layout(lo.R - done, C), ka, r1.data(),
                        r2.data());
  for (int64_t c = 0; c < C; ++c) {
    double a1 = r1[c], a2 = r2[c];
    for (int64_t j = 0; j < f; ++j) {
      a1 += t1[j * C + c];
      a2 += t2[j * C + c];
    }
    sum1[c] = a1;
    sum2[c] = a2;
  }
}

template <typename T, typename O>
void nchw_sums(const Ptrs<typename O::Store>& p, const Layout& lo, const KArrays<T>& ka, double* sum1,
               double* sum2);

template <typename T, typename O>
void row_sums(const Ptrs<typename O::Store>& p, const Layout& lo, const KArrays<T>& ka, double* sum1,
              double* sum2) {
  if (!lo.fastest) {
    nchw_sums<T, O>(p, lo, ka, sum1, sum2);
    return;
  }
  if (const int64_t f = tile_rows(lo); f > 1) {
    row_sums_tiled<T, O>(p, lo, ka, sum1, sum2, f);
    return;
  }
  row_sums_rows<T, O>(p, lo, ka, sum1, sum2);
}

// The output loops: n values of the Op at y (and y2), with one channel's scalars for the
// whole run (NCHW) ...
template <typename T, typename O, typename S = typename O::Store>
inline void out_span(S* y, S* y2, const Ptrs<S>& p, int64_t off, int64_t n, const K<T>& k) {
  if constexpr (std::is_same_v<S, F16>) {  // in float blocks (see kBlk)
    F16Block bx, bg, br, by, by2;
    for (int64_t j = 0; j < n; j += kBlk) {
      const int64_t m = std::min(kBlk, n - j);
      Ptrs<float> q;
      q.x = bx.from(p.x + off + j, m);
      q.go = O::kReadsGo ? bg.from(p.go + off + j, m) : nullptr;
      q.r = O::kReadsR ? br.from(p.r + off + j, m) : nullptr;
      out_span<T, typename O::Wide>(by.v, by2.v, q, 0, m, k);
      narrow_f16(by.v, y + j, m);
      if constexpr (O::kSecond) narrow_f16(by2.v, y2 + j, m);
    }
    return;
  }
  const S* x = p.x + off;
  const S* go = O::kReadsGo ? p.go + off : x;
  const S* r = O::kReadsR ? p.r + off : x;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    T second = T(0);
    y[i] = st<S>(O::out(ld(x[i]), ld(go[i]), ld(r[i]), k, second));
    if constexpr (O::kSecond) y2[i] = st<S>(second);
  }
}

// ... appended to Writers (pieces of at most kRun values when streaming) ...
template <typename T, typename O, typename S = typename O::Store>
void out_run(Writer<S>& w, Writer<S>* w2, const Ptrs<S>& p, int64_t off, int64_t n,
             const K<T>& k) {
  const int64_t step = w.streams() ? Writer<S>::kRun : std::max<int64_t>(n, 1);
  for (int64_t i0 = 0; i0 < n; i0 += step) {
    const int64_t m = std::min(step, n - i0);
    S* yp = w.put(m);
    out_span<T, O>(yp, O::kSecond ? w2->put(m) : nullptr, p, off + i0, m, k);
  }
}

// ... or with per-value scalars, value i being channel c0 + i (part of a channels-fastest
// row) ...
template <typename T, typename O, typename S = typename O::Store>
inline void row_span(S* yp, S* y2, const Ptrs<S>& p, int64_t off, int64_t c0, int64_t m,
                     const KArrays<T>& ka) {
  if constexpr (std::is_same_v<S, F16>) {  // in float blocks (see kBlk)
    F16Block bx, bg, br, by, by2;
    for (int64_t j = 0; j < m; j += kBlk) {
      const int64_t n = std::min(kBlk, m - j);
      Ptrs<float> q;
      q.x = bx.from(p.x + off + j, n);
      q.go = O::kReadsGo ? bg.from(p.go + off + j, n) : nullptr;
      q.r = O::kReadsR ? br.from(p.r + off + j, n) : nullptr;
      row_span<T, typename O::Wide>(by.v, by2.v, q, 0, c0 + j, n, ka);
      narrow_f16(by.v, yp + j, n);
      if constexpr (O::kSecond) narrow_f16(by2.v, y2 + j, n);
    }
    return;
  }
  const T *s = ka.s(), *kx = ka.kx(), *ko = ka.ko(), *k0 = ka.k0();
  const T *fs = ka.fs(), *fa = ka.fa(), *fk = ka.fk();
  const S* x = p.x + off;
  const S* go = O::kReadsGo ? p.go + off : nullptr;
  const S* r = O::kReadsR ? p.r + off : nullptr;
#pragma omp simd
  for (int64_t i = 0; i < m; ++i) {
    const int64_t c = c0 + i;
    const K<T> k{s[c], kx[c], ko[c], k0[c], fs[c], fa[c], fk[c]};
    T second = T(0);
    yp[i] = st<S>(O::out(ld(x[i]), O::kReadsGo ? ld(go[i]) : T(0),
                         O::kReadsR ? ld(r[i]) : T(0), k, second));
    if constexpr (O::kSecond) y2[i] = st<S>(second);
  }
}

// ... a whole row, appended to Writers.
template <typename T, typename O, typename S = typename O::Store>
void out_row(Writer<S>& w, Writer<S>* w2, const Ptrs<S>& p, int64_t off, int64_t C,
             const KArrays<T>& ka) {
  const int64_t step = w.streams() ? Writer<S>::kRun : std::max<int64_t>(C, 1);
  for (int64_t c0 = 0; c0 < C; c0 += step) {
    const int64_t m = std::min(step, C - c0);
    S* yp = w.put(m);
    S* y2 = O::kSecond ? w2->put(m) : nullptr;
    row_span<T, O>(yp, y2, p, off + c0, c0, m, ka);
  }
}

// Four channels-fastest rows written directly (no streaming), each channel's scalars
// loaded once for the four: out_row loads them for every row, three to six loads a
// vector of output besides x's, and over cached data the load ports, not memory, bound
// the pass (docs/performance.md, "Kernel choices"); large (streamed) tensors do not
// take this path.
template <typename T, typename O>
inline void out_rows4(const Ptrs<typename O::Store>& p, int64_t off, int64_t C, const KArrays<T>& ka) {
  const T *s = ka.s(), *kx = ka.kx(), *ko = ka.ko(), *k0 = ka.k0();
  const T *fs = ka.fs(), *fa = ka.fa(), *fk = ka.fk();
  using S = typename O::Store;
  const S* x = p.x + off;
  const S* go = O::kReadsGo ? p.go + off : x;
  const S* r = O::kReadsR ? p.r + off : x;
  S* y = p.out + off;
  S* y2 = O::kSecond ? p.out2 + off : y;
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    const K<T> k{s[c], kx[c], ko[c], k0[c], fs[c], fa[c], fk[c]};
    // the four rows computed before any is stored: a store to y may not be moved past a
    // load of x that it could alias, so this keeps the compiler free to order them
    T s0 = T(0), s1 = T(0), s2 = T(0), s3 = T(0);
    const T v0 = O::out(ld(x[c]), ld(go[c]), ld(r[c]), k, s0);
    const T v1 = O::out(ld(x[C + c]), ld(go[C + c]), ld(r[C + c]), k, s1);
    const T v2 = O::out(ld(x[2 * C + c]), ld(go[2 * C + c]), ld(r[2 * C + c]), k, s2);
    const T v3 = O::out(ld(x[3 * C + c]), ld(go[3 * C + c]), ld(r[3 * C + c]), k, s3);
    y[c] = st<S>(v0);
    y[C + c] = st<S>(v1);
    y[2 * C + c] = st<S>(v2);
    y[3 * C + c] = st<S>(v3);
    if constexpr (O::kSecond) {
      y2[c] = st<S>(s0);
      y2[C + c] = st<S>(s1);
      y2[2 * C + c] = st<S>(s2);
      y2[3 * C + c] = st<S>(s3);
    }
  }
}

// The Op's output over the whole tensor with given per-channel scalars.
template <typename T, typename O>
void map_rows(const Ptrs<typename O::Store>& p, const Layout& lo, const KArrays<T>& ka, bool reverse);
template <typename T, typename O>
void map_rows_tiled(const Ptrs<typename O::Store>& p, const Layout& lo, const KArrays<T>& ka, bool reverse,
                    int64_t f);

template <typename T, typename O>
void channel_map(const Ptrs<typename O::Store>& p, const Layout& lo, const KArrays<T>& ka, bool reverse) {
  const int64_t C = lo.C;
  const bool stream = O::streams(lo.R * C);
  if (!lo.fastest) {
    // runs (n, c) in order, split as in nchw_sums; blocks of runs (kBackBlock) last to
    // first after a statistics pass (reverse), each written front to back
    using S = typename O::Store;
    const int64_t L = lo.L, runs = lo.N * C;
    blocked_ranges(runs, run_threads(runs), L * static_cast<int64_t>(sizeof(S)), runs * L,
                   reverse, [&](int64_t rb, int64_t re) {
      int64_t c = rb % C;
      if (!stream) {  // plain stores: straight loops, no Writer bookkeeping per short run
        for (int64_t i = rb; i < re; ++i) {
          out_span<T, O>(p.out + i * L, O::kSecond ? p.out2 + i * L : nullptr, p, i * L, L,
                         ka.at(c));
          if (++c == C) c = 0;
        }
        return;
      }
      Writer<S> w(p.out + rb * L, stream);
      Writer<S> w2(O::kSecond ? p.out2 + rb * L : nullptr, stream);
      for (int64_t i = rb; i < re; ++i) {
        out_run<T, O>(w, &w2, p, i * L, L, ka.at(c));
        if (++c == C) c = 0;
      }
      w.finish();
      if (O::kSecond) w2.finish();
    });
    return;
  }
  if (const int64_t f = tile_rows(lo); f > 1) {  // as in row_sums
    map_rows_tiled<T, O>(p, lo, ka, reverse, f);
    return;
  }
  map_rows<T, O>(p, lo, ka, reverse);
}

template <typename T, typename O>
__attribute__((noinline)) void map_rows_tiled(const Ptrs<typename O::Store>& p, const Layout& lo,
                                              const KArrays<T>& ka, bool reverse, int64_t f) {
  const int64_t C = lo.C, Rt = lo.R / f, done = Rt * f;
  map_rows<T, O>(p, rows_layout(Rt, f * C), tiled(ka, f), reverse);
  if (done < lo.R)
    map_rows<T, O>(rows_from(p, done * C), rows_layout(lo.R - done, C), ka, reverse);
}

// The Op's output over a channels-fastest (R, C) tensor.
template <typename T, typename O>
void map_rows(const Ptrs<typename O::Store>& p, const Layout& lo, const KArrays<T>& ka, bool reverse) {
  const int64_t C = lo.C;
  const bool stream = O::streams(lo.R * C);
  // four rows at a time where the output stays in cache, unless rows are a multiple of
  // 4 KiB: then the four rows of x and y fall in the same L1 sets and evict each other
  // (C = 1024: 1.2-1.5x the time)
  using S = typename O::Store;
  // (float16 converts in blocks row by row: no rows4)
  const bool rows4 = !stream && !std::is_same_v<S, F16> &&
                     (C * static_cast<int64_t>(sizeof(S))) % 4096 != 0;
  // Same row split as row_sums. After a statistics pass (reverse = true) the blocks of
  // rows (kBackBlock) are taken last to first, so that the rows a thread read last are
  // still in cache; each block is written front to back.
  blocked_ranges(lo.R, row_threads(lo.R), C * static_cast<int64_t>(sizeof(S)), lo.R * C,
                 reverse, [&](int64_t rb, int64_t re) {
    int64_t r = rb;
    if (rows4)
      for (; r + 4 <= re; r += 4) out_rows4<T, O>(p, r * C, C, ka);
    Writer<S> w(p.out + r * C, stream);
    Writer<S> w2(O::kSecond ? p.out2 + r * C : nullptr, stream);
    for (; r < re; ++r) out_row<T, O>(w, &w2, p, r * C, C, ka);
    w.finish();
    if (O::kSecond) w2.finish();
  });
}

// One channel's NCHW sums, kept in kLanes independent lanes (four AVX vectors of T): with
// the single vector accumulator of a plain reduction every add waits for the previous
// one. Each lane sums at most kLaneChunk values in T, then the lanes are added, eight at
// a time, to eight double lanes (flush). The chunk is short because the error of a sum
// in T grows with the number of terms, and on data with many equal values (the zeros
// after a ReLU, each giving the same (x - s)^2) the rounding errors of the terms do not
// cancel: 256 terms a lane made the NCHW statistics ~20x less accurate than torch's on
// ReLU output; 8 terms make them as accurate (tests/nn/test_accuracy.py). 384 bytes a
// channel (float), so that a thread can keep one for every channel of a long stream of
// short runs.
template <typename T>
struct LaneSums {
  static constexpr int64_t kLanes = 128 / static_cast<int64_t>(sizeof(T));
  static constexpr int64_t kWide = 8;  // double lanes
  alignas(64) T q1[kLanes] = {};
  alignas(64) T q2[kLanes] = {};
  alignas(64) double e1[kWide] = {};
  alignas(64) double e2[kWide] = {};
  int64_t count = 0;  // values per lane in q1, q2 (at most kLaneChunk)

  // w += the lanes a, eight at a time
  static inline void widen(double* w1, double* w2, const T* a1, const T* a2) {
    for (int64_t j = 0; j < kLanes; j += kWide) {
#pragma omp simd
      for (int64_t i = 0; i < kWide; ++i) {
        w1[i] += static_cast<double>(a1[j + i]);
        w2[i] += static_cast<double>(a2[j + i]);
      }
    }
  }
  void flush() {
    widen(e1, e2, q1, q2);
    std::fill(q1, q1 + kLanes, T(0));
    std::fill(q2, q2 + kLanes, T(0));
    count = 0;
  }
  void totals(double& a1, double& a2) {
    flush();
    a1 = ((e1[0] + e1[1]) + (e1[2] + e1[3])) + ((e1[4] + e1[5]) + (e1[6] + e1[7]));
    a2 = ((e2[0] + e2[1]) + (e2[2] + e2[3])) + ((e2[4] + e2[5]) + (e2[6] + e2[7]));
  }

  // The Op's sums over n contiguous values (scalars k) added to lanes a1, a2.
  template <typename O, typename S = typename O::Store>
  static inline void sweep(T* a1_, T* a2_, const S* xp, const S* gp, const S* rp, int64_t n,
                           const K<T>& k) {
    T* a1 = static_cast<T*>(__builtin_assume_aligned(a1_, 64));
    T* a2 = static_cast<T*>(__builtin_assume_aligned(a2_, 64));
    const int64_t full = n / kLanes * kLanes;
    int64_t l = 0;
    for (; l < full; l += kLanes) {
#pragma omp simd
      for (int64_t j = 0; j < kLanes; ++j) {
        T u, v;
        O::sum(ld(xp[l + j]), O::kReadsGo ? ld(gp[l + j]) : T(0),
               O::kReadsR ? ld(rp[l + j]) : T(0), k, u, v);
        a1[j] += u;
        a2[j] += v;
      }
    }
#pragma omp simd
    for (int64_t j = 0; j < n - full; ++j) {
      T u, v;
      O::sum(ld(xp[l + j]), O::kReadsGo ? ld(gp[l + j]) : T(0),
             O::kReadsR ? ld(rp[l + j]) : T(0), k, u, v);
      a1[j] += u;
      a2[j] += v;
    }
  }

  // The Op's sums over 2 * kLaneChunk lane steps added to lanes a1, a2 as kLaneChunk
  // sums of two values each (the error of kLaneChunk terms, at half the widening).
  template <typename O, typename S = typename O::Store>
  static inline void pairs(T* a1_, T* a2_, const S* xp, const S* gp, const S* rp,
                           const K<T>& k) {
    T* a1 = static_cast<T*>(__builtin_assume_aligned(a1_, 64));
    T* a2 = static_cast<T*>(__builtin_assume_aligned(a2_, 64));
    for (int64_t l = 0; l < 2 * kLaneChunk * kLanes; l += 2 * kLanes) {
#pragma omp simd
      for (int64_t j = 0; j < kLanes; ++j) {
        T u, v, u2, v2;
        const int64_t i = l + j, i2 = l + kLanes + j;
        O::sum(ld(xp[i]), O::kReadsGo ? ld(gp[i]) : T(0), O::kReadsR ? ld(rp[i]) : T(0), k, u,
               v);
        O::sum(ld(xp[i2]), O::kReadsGo ? ld(gp[i2]) : T(0), O::kReadsR ? ld(rp[i2]) : T(0), k,
               u2, v2);
        a1[j] += u + u2;
        a2[j] += v + v2;
      }
    }
  }

  // Adds the Op's sums over one contiguous run of n values (scalars k). A long run goes
  // in whole chunks, each summed in fresh local lanes and widened into local copies of
  // the double lanes: through the members the compiler must assume that they may alias
  // the input, and stores and reloads them every step (a store-to-load chain as slow as
  // a single accumulator). What is left (a short run: 14x14 and less, or a run's tail)
  // goes to the member lanes, which carry a chunk over from run to run.
  template <typename O, typename S = typename O::Store>
  inline void add(const S* xp, const S* gp, const S* rp, int64_t n, const K<T>& k) {
    if constexpr (std::is_same_v<S, F16>) {  // in float blocks (see kBlk)
      F16Block bx, bg, br;
      for (int64_t j = 0; j < n; j += kBlk) {
        const int64_t m = std::min(kBlk, n - j);
        add<typename O::Wide>(bx.from(xp + j, m), O::kReadsGo ? bg.from(gp + j, m) : nullptr,
                              O::kReadsR ? br.from(rp + j, m) : nullptr, m, k);
      }
      return;
    }
    constexpr int64_t kStep = kLaneChunk * kLanes;
    int64_t l = 0;
    if (n >= kStep) {
      alignas(64) double w1[kWide], w2[kWide];
      std::memcpy(w1, e1, sizeof(w1));
      std::memcpy(w2, e2, sizeof(w2));
      for (; l + 2 * kStep <= n; l += 2 * kStep) {
        alignas(64) T a1[kLanes] = {}, a2[kLanes] = {};
        pairs<O>(a1, a2, xp + l, O::kReadsGo ? gp + l : nullptr, O::kReadsR ? rp + l : nullptr,
                 k);
        widen(w1, w2, a1, a2);
      }
      for (; l + kStep <= n; l += kStep) {
        alignas(64) T a1[kLanes] = {}, a2[kLanes] = {};
        sweep<O>(a1, a2, xp + l, O::kReadsGo ? gp + l : nullptr, O::kReadsR ? rp + l : nullptr,
                 kStep, k);
        widen(w1, w2, a1, a2);
      }
      std::memcpy(e1, w1, sizeof(w1));
      std::memcpy(e2, w2, sizeof(w2));
    }
    while (l < n) {
      if (count == kLaneChunk) flush();
      const int64_t m = std::min(n - l, (kLaneChunk - count) * kLanes);  // whole lanes but the tail
      sweep<O>(q1, q2, xp + l, O::kReadsGo ? gp + l : nullptr, O::kReadsR ? rp + l : nullptr, m,
               k);
      l += m;
      count += (m + kLanes - 1) / kLanes;
    }
  }
};

// Per-channel (sum u, sum v) of the Op over an NCHW input, read front to back as one
// sequential stream per thread (runs (n, c) in order; each thread keeps every channel's
// lanes), merged in thread order at the end.
template <typename T, typename O>
void nchw_sums(const Ptrs<typename O::Store>& p, const Layout& lo, const KArrays<T>& ka, double* sum1,
               double* sum2) {
  const int64_t C = lo.C, L = lo.L, runs = lo.N * lo.C;
  const int nt = run_threads(runs);
  std::vector<double> part(static_cast<size_t>(nt) * 2 * C, 0.0);
  parallel(nt, runs * L, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i0 = runs * t / nt, i1 = runs * (t + 1) / nt;
      const int64_t cfirst = i1 - i0 >= C ? 0 : i0 % C;
      const int64_t ncov = std::min(C, i1 - i0);  // channels this range touches
      std::vector<LaneSums<T>> acc(static_cast<size_t>(ncov));  // channel cfirst + j at j
      int64_t c = i0 % C;
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t base = i * L;
        const auto* go = O::kReadsGo ? p.go + base : nullptr;
        const auto* r = O::kReadsR ? p.r + base : nullptr;
        const int64_t j = c >= cfirst ? c - cfirst : c - cfirst + C;
        acc[static_cast<size_t>(j)].template add<O>(p.x + base, go, r, L, ka.at(c));
        if (++c == C) c = 0;
      }
      double* p1 = part.data() + t * 2 * C;
      for (int64_t j = 0; j < ncov; ++j) {
        int64_t cc = cfirst + j;
        if (cc >= C) cc -= C;
        acc[static_cast<size_t>(j)].totals(p1[cc], p1[C + cc]);
      }
    }
  });
  merge_partials(part, nt, C, sum1, sum2);
}

// NCHW with long runs: statistics and output in one sweep per block of channels. For
// each block, its sums over every sample (OS), its coefficients (fin(c, sum1, sum2) sets
// channel c's output scalars in ka), then its output (OO) while the block is still in
// cache, samples last to first. The two-pass kernel reads the tensors twice from memory
// wherever they do not stay in cache between its passes (in a network, always: the
// layers before and after evict them); this reads them once. Each channel is summed by
// one thread in sample order (LaneSums). Only for long runs (see fuse_block): short runs
// far apart are read at a fraction of a sequential stream's speed.
template <typename T, typename OS, typename OO, typename Fin>
void nchw_fused(const Ptrs<typename OS::Store>& p, const Layout& lo, const KArrays<T>& ka,
                int64_t B, const Fin& fin) {
  const int64_t C = lo.C, L = lo.L, N = lo.N;
  const int64_t nb = (C + B - 1) / B;
  const bool stream = OO::streams(N * C * L);
  parallel(nb, N * C * L, [&](int64_t b0, int64_t b1) {
    std::vector<LaneSums<T>> acc(static_cast<size_t>(B));
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t c0 = b * B, c1 = std::min(C, c0 + B);
      for (int64_t c = c0; c < c1; ++c) acc[static_cast<size_t>(c - c0)] = LaneSums<T>{};
      for (int64_t n = 0; n < N; ++n) {
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t base = (n * C + c) * L;
          acc[static_cast<size_t>(c - c0)].template add<OS>(
              p.x + base, OS::kReadsGo ? p.go + base : nullptr,
              OS::kReadsR ? p.r + base : nullptr, L, ka.at(c));
        }
      }
      for (int64_t c = c0; c < c1; ++c) {
        double a1 = 0, a2 = 0;
        acc[static_cast<size_t>(c - c0)].totals(a1, a2);
        fin(c, a1, a2);
      }
      if (!p.out) continue;
      for (int64_t n = N - 1; n >= 0; --n) {
        const int64_t off = (n * C + c0) * L;
        using S = typename OO::Store;
        Writer<S> w(p.out + off, stream);
        Writer<S> w2(OO::kSecond ? p.out2 + off : nullptr, stream);
        for (int64_t c = c0; c < c1; ++c) out_run<T, OO>(w, &w2, p, (n * C + c) * L, L, ka.at(c));
        w.finish();
        if (OO::kSecond) w2.finish();
      }
    }
  });
}

// Channels per block of nchw_fused, or 0 for the two-pass kernel. Fused where a run (one
// sample's channel) spans at least kFuseRun bytes over the tensors read, and every thread
// gets a channel: shorter runs are slower fused than in two passes (docs/performance.md,
// "Kernel choices"). Blocks of about
// kFuseBytes over the tensors read (the second pass finds them in L2 or L3), as many as
// a multiple of the threads where the channels allow.
constexpr int64_t kFuseRun = 24 * 1024;
constexpr int64_t kFuseBytes = 512 * 1024;
int64_t fuse_block(const Layout& lo, int64_t item_bytes, int inputs) {
  const int64_t nt = at::get_num_threads();
  if (lo.fastest || lo.C < nt || lo.L * item_bytes * inputs < kFuseRun) return 0;
  const int64_t per_channel = lo.N * lo.L * item_bytes * inputs;
  const int64_t k =
      std::max<int64_t>(1, (lo.C * per_channel + nt * kFuseBytes - 1) / (nt * kFuseBytes));
  return std::max<int64_t>(1, (lo.C + nt * k - 1) / (nt * k));
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
// var * n / (n - 1); in double (bnkit/nn/_running.py: update_running_stats).
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
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble ||
                  x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              fn, ": expected a float32, float64, bfloat16 or float16 input, got ",
              x.scalar_type());
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

// The activation code of the Python side: 0 none, 1 relu, 2 relu6.
void check_act(int64_t act, const char* fn) {
  TORCH_CHECK(act == kNoAct || act == kRelu || act == kRelu6, fn, ": activation code ", act,
              " (expected 0 none, 1 relu, 2 relu6)");
}

bool has(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// A residual (input-shaped, any float dtype and layout) in the kernel's layout and dtype.
at::Tensor residual_like(const c10::optional<at::Tensor>& r, const at::Tensor& x_in,
                         const at::Tensor& x, bool fastest, const char* fn) {
  if (!has(r)) return at::Tensor();
  check_like(*r, x_in, fn, "residual");
  return as_layout(r->scalar_type() == x.scalar_type() ? *r : r->to(x.scalar_type()), fastest);
}

// Calls f with the Op type for (M, act, residual): the one place the codes become types.
template <typename T, typename S, int M, typename F>
void with_op(int64_t act, bool res, const F& f) {
  auto pick = [&](auto a) {
    constexpr int A = decltype(a)::value;
    if (res) f(Op<T, S, M, A, true>{});
    else f(Op<T, S, M, A, false>{});
  };
  if (act == kRelu) pick(std::integral_constant<int, kRelu>{});
  else if (act == kRelu6) pick(std::integral_constant<int, kRelu6>{});
  else pick(std::integral_constant<int, kNoAct>{});
}

// Calls f(T{}, S{}) with the compute and storage types of a tensor of dtype st: the one
// place the dtypes become types (float32 and float64 as themselves; bfloat16 and float16
// stored as themselves, computed in float).
template <typename F>
void dispatch(at::ScalarType st, const char* fn, const F& f) {
  auto run = [&](auto s) { f(compute_t<decltype(s)>(), s); };
  switch (st) {
    case at::kFloat: run(float()); break;
    case at::kDouble: run(double()); break;
    case at::kBFloat16: run(BF16{}); break;
    case at::kHalf: run(F16{}); break;
    default: TORCH_CHECK(false, fn, ": unsupported dtype ", st);
  }
}

// A tensor's data as S (the dtype was checked by dispatch's caller).
template <typename S>
S* data_as(const at::Tensor& t) {
  return static_cast<S*>(t.data_ptr());
}

std::vector<at::Tensor> train_impl(const at::Tensor& x_in, const c10::optional<at::Tensor>& w,
                                   const c10::optional<at::Tensor>& b, double eps, bool want_y,
                                   const c10::optional<at::Tensor>& residual, int64_t act,
                                   const char* fn);

}  // namespace

// Returns (y, mean, biased var, coef); mean/var float64 of shape (C,). y = act(bn(x) [+
// residual]) (act: check_act's code). With running buffers (contiguous, one float dtype),
// also updates them in place with factor f (update_running_impl). coef (float64 (3, C):
// the shift, scale and offset of the pre-activation, values of x's dtype) is what the
// gated backward needs; undefined without an activation.
std::vector<at::Tensor> forward_train(const at::Tensor& x_in, const c10::optional<at::Tensor>& w,
                                      const c10::optional<at::Tensor>& b, double eps,
                                      c10::optional<at::Tensor> running_mean,
                                      c10::optional<at::Tensor> running_var, double f,
                                      const c10::optional<at::Tensor>& residual, int64_t act) {
  const char* fn = "bnkit forward_train";
  check_input(x_in, fn);
  check_act(act, fn);
  const int64_t C = x_in.size(1);
  check_channel(w, C, fn, "weight");
  check_channel(b, C, fn, "bias");
  TORCH_CHECK(eps >= 0, fn, ": eps must be >= 0, got ", eps);
  const bool has_rm = has(running_mean);
  TORCH_CHECK(has_rm == has(running_var), fn, ": give both running buffers or neither");
  if (has_rm) check_running(*running_mean, *running_var, C, fn);
  auto r = train_impl(x_in, w, b, eps, true, residual, act, fn);
  if (has_rm) {
    update_running_impl(*running_mean, *running_var, r[1].data_ptr<double>(),
                        r[2].data_ptr<double>(), x_in.numel() / x_in.size(1), f);
  }
  return r;
}

// Returns (mean, biased var), float64 (C,): the statistics pass alone.
std::vector<at::Tensor> stats(const at::Tensor& x_in) {
  const char* fn = "bnkit stats";
  check_input(x_in, fn);
  auto r = train_impl(x_in, c10::nullopt, c10::nullopt, 1.0, false, c10::nullopt, kNoAct, fn);
  return {r[1], r[2]};
}

namespace {
std::vector<at::Tensor> train_impl(const at::Tensor& x_in, const c10::optional<at::Tensor>& w,
                                   const c10::optional<at::Tensor>& b, double eps, bool want_y,
                                   const c10::optional<at::Tensor>& residual, int64_t act,
                                   const char* fn) {
  const Layout lo = layout_of(x_in);
  at::Tensor x = as_layout(x_in, lo.fastest);
  const at::Tensor r = residual_like(residual, x_in, x, lo.fastest, fn);
  // The output first, before any small allocation: where the previous call's output was
  // freed, glibc's malloc then hands back the same (already mapped) memory; allocated
  // after the small ones it often got fresh pages, and paid a page fault per 4 KiB
  // (default allocator, (32, 64, 56, 56) channels_last training forward 1.3-3.4x torch's
  // time in bench_batchnorm's order of calls; 0.65-0.68x with this order).
  at::Tensor y = want_y ? new_output(x) : at::Tensor();
  const int64_t C = lo.C;
  const double n = static_cast<double>(lo.N * lo.L);
  auto dopt = at::TensorOptions().dtype(at::kDouble);
  at::Tensor mean = at::empty({C}, dopt), var = at::empty({C}, dopt);
  at::Tensor fcoef = act != kNoAct ? at::empty({3, C}, dopt) : at::Tensor();
  std::vector<double> s(C), s1(C), s2(C);
  const std::vector<double> wd = want_y ? doubles(w, C, 1.0) : std::vector<double>(C, 1.0);
  const std::vector<double> bd = want_y ? doubles(b, C, 0.0) : std::vector<double>(C, 0.0);
  dispatch(x.scalar_type(), fn, [&](auto t_, auto s_) {
    using T = decltype(t_);
    using S = decltype(s_);
    Ptrs<S> p;
    p.x = data_as<S>(x);
    p.r = r.defined() ? data_as<S>(r) : nullptr;
    p.out = want_y ? data_as<S>(y) : nullptr;
    double* mp = mean.data_ptr<double>();
    double* vp = var.data_ptr<double>();
    double* fc = fcoef.defined() ? fcoef.data_ptr<double>() : nullptr;
    const double* wp = wd.data();
    const double* bp = bd.data();
    shifts(p.x, lo, s.data());
    KArrays<T> ka(C);
    for (int64_t c = 0; c < C; ++c) ka.s()[c] = static_cast<T>(s[c]);
    auto fin = [&](int64_t c, double a1, double a2) {  // statistics and coefficients
      const double lo_mean = a1 / n;
      const double v0 = a2 / n - lo_mean * lo_mean;
      const double v = v0 < 0.0 ? 0.0 : v0;  // keeps NaN (std::max(0.0, NaN) is 0)
      mp[c] = s[c] + lo_mean;
      vp[c] = v;
      const double a = wp[c] / std::sqrt(v + eps);
      ka.kx()[c] = static_cast<T>(a);
      ka.k0()[c] = static_cast<T>(bp[c] - lo_mean * a);
      if (fc) {  // exactly what the output loop uses: values of T
        fc[c] = static_cast<double>(ka.s()[c]);
        fc[C + c] = static_cast<double>(ka.kx()[c]);
        fc[2 * C + c] = static_cast<double>(ka.k0()[c]);
      }
    };
    using OS = Op<T, S, kStats, kNoAct, false>;
    with_op<T, S, kFwd>(act, p.r != nullptr, [&](auto op) {
      using OO = decltype(op);
      if (const int64_t B = fuse_block(lo, sizeof(S), 1); B > 0) {
        nchw_fused<T, OS, OO>(p, lo, ka, B, fin);
        return;
      }
      row_sums<T, OS>(p, lo, ka, s1.data(), s2.data());
      for (int64_t c = 0; c < C; ++c) fin(c, s1[c], s2[c]);
      if (p.out) channel_map<T, OO>(p, lo, ka, true);
    });
  });
  return {y, mean, var, fcoef};
}
}  // namespace

// sum(g * xhat) from the kernels' sums sum(g) and sum(g * (x - s)), s the mean rounded to
// the input type (lo_c = mean - s, what the rounding missed): sum(g * (x - mean)) * invstd.
namespace {
// The weight and bias gradients from sum(g * xhat) and sum(g), in the weight's dtype (x's
// without weight; no weight gradient then).
std::pair<at::Tensor, at::Tensor> param_grads(const c10::optional<at::Tensor>& w,
                                              const at::Tensor& x,
                                              const std::vector<double>& gxhat,
                                              const std::vector<double>& gsum) {
  const bool has_w = has(w);
  const at::ScalarType pdt = has_w ? w->scalar_type() : x.scalar_type();
  return {has_w ? tensor_of(gxhat, pdt) : at::Tensor(), tensor_of(gsum, pdt)};
}

inline double sum_g_xhat(double sum_g, double sum_gd, double lo_c, double invstd) {
  return (sum_gd - lo_c * sum_g) * invstd;
}
}  // namespace

// Closed-form training backward (bnkit/nn/_backward.py: train_backward). `stat` is the biased
// batch variance (invstd = 1 / sqrt(var + eps)), or invstd itself when `is_invstd`.
// With an activation (act, with fcoef from forward_train, and the residual when the
// forward had one), grad_out is first gated by the activation's derivative.
// Returns (grad_x or undefined, sum(g * xhat), sum(g), grad_residual or undefined): the
// sums as float64 when `raw_sums`, else as the weight and bias gradients (weight's dtype;
// x's without weight); grad_residual is the gated gradient, only with an activation and a
// residual (else it is grad_out itself, which the caller has).
std::vector<at::Tensor> backward_train(const at::Tensor& go_in, const at::Tensor& x_in,
                                       const c10::optional<at::Tensor>& w, const at::Tensor& mean,
                                       const at::Tensor& stat, double eps, bool is_invstd,
                                       bool need_gx, bool raw_sums,
                                       const c10::optional<at::Tensor>& residual, int64_t act,
                                       const c10::optional<at::Tensor>& fcoef) {
  const char* fn = "bnkit backward_train";
  check_input(x_in, fn);
  check_like(go_in, x_in, fn, "grad_output");
  check_act(act, fn);
  const int64_t C_in = x_in.size(1);
  check_channel(w, C_in, fn, "weight");
  check_channel(mean, C_in, fn, "mean");
  check_channel(stat, C_in, fn, is_invstd ? "invstd" : "var");
  const bool gated = act != kNoAct;
  if (gated) {
    TORCH_CHECK(has(fcoef) && fcoef->scalar_type() == at::kDouble && fcoef->is_contiguous() &&
                    fcoef->dim() == 2 && fcoef->size(0) == 3 && fcoef->size(1) == C_in,
                fn, ": an activation needs the forward's coefficients, a contiguous float64 (3, ",
                C_in, ") tensor");
  }
  const Layout lo = layout_of(x_in);
  at::Tensor x = as_layout(x_in, lo.fastest);
  at::Tensor go = as_layout(go_in.scalar_type() == x.scalar_type() ? go_in
                                                                     : go_in.to(x.scalar_type()),
                            lo.fastest);
  const at::Tensor r = gated ? residual_like(residual, x_in, x, lo.fastest, fn) : at::Tensor();
  at::Tensor gx, gr;  // the outputs before any small allocation (see train_impl)
  if (need_gx) gx = new_output(x);
  if (gated && r.defined()) gr = new_output(x);
  const int64_t C = lo.C;
  const double n = static_cast<double>(lo.N * lo.L);
  std::vector<double> gsum(C), gxhat(C);
  const std::vector<double> md = doubles(mean, C, 0.0), wd = doubles(w, C, 1.0);
  std::vector<double> id = doubles(stat, C, 1.0);
  if (!is_invstd)
    for (int64_t c = 0; c < C; ++c) id[c] = 1.0 / std::sqrt(id[c] + eps);
  dispatch(x.scalar_type(), fn, [&](auto t_, auto s_) {
    using T = decltype(t_);
    using S = decltype(s_);
    const double* mp = md.data();
    const double* ip = id.data();
    const double* wp = wd.data();
    double* gs = gsum.data();
    double* gh = gxhat.data();
    Ptrs<S> p;
    p.x = data_as<S>(x);
    p.go = data_as<S>(go);
    p.r = r.defined() ? data_as<S>(r) : nullptr;
    // without grad_x, the gated gradient of the residual is still wanted
    p.out = need_gx ? data_as<S>(gx) : nullptr;
    p.out2 = gr.defined() ? data_as<S>(gr) : nullptr;
    at::Tensor scratch;
    if (!p.out && p.out2) {
      scratch = new_output(x);
      p.out = data_as<S>(scratch);
    }
    KArrays<T> ka(C);
    std::vector<double> s(C), sg(C), sgd(C);
    // the forward's (3, C) coefficients: shift, scale, offset of pre, values of T
    const double* fp = gated ? fcoef->data_ptr<double>() : nullptr;
    for (int64_t c = 0; c < C; ++c) {
      s[c] = static_cast<double>(static_cast<T>(mp[c]));
      ka.s()[c] = static_cast<T>(s[c]);
      if (fp) {
        ka.fs()[c] = static_cast<T>(fp[c]);
        ka.fa()[c] = static_cast<T>(fp[C + c]);
        ka.fk()[c] = static_cast<T>(fp[2 * C + c]);
      }
    }
    with_op<T, S, kBwd>(act, p.r != nullptr, [&](auto op) {
      using O = decltype(op);
      auto fin = [&](int64_t c, double sgc, double sgdc) {  // grad_x's coefficients
        const double lo_c = mp[c] - s[c];  // what the rounded shift missed
        gs[c] = sgc;
        gh[c] = sum_g_xhat(sgc, sgdc, lo_c, ip[c]);
        const double a = wp[c] * ip[c];
        const double kd = -a * ip[c] * gh[c] / n;
        ka.kx()[c] = static_cast<T>(kd);
        ka.ko()[c] = static_cast<T>(a);
        ka.k0()[c] = static_cast<T>(-a * sgc / n - kd * lo_c);
      };
      if (const int64_t B = fuse_block(lo, sizeof(S), O::inputs); B > 0) {
        nchw_fused<T, O, O>(p, lo, ka, B, fin);
        return;
      }
      row_sums<T, O>(p, lo, ka, sg.data(), sgd.data());
      for (int64_t c = 0; c < C; ++c) fin(c, sg[c], sgd[c]);
      if (p.out) channel_map<T, O>(p, lo, ka, true);
    });
  });
  std::vector<at::Tensor> out;
  if (raw_sums) {
    out = {gx, tensor_of(gxhat, at::kDouble), tensor_of(gsum, at::kDouble)};
  } else {
    const auto [gw, gb] = param_grads(w, x, gxhat, gsum);
    out = {gx, gw, gb};
  }
  out.push_back(gr);
  return out;
}

// Eval: y = act((x - running_mean) * scale + shift [+ residual]) per channel, with scale =
// weight / sqrt(running_var + eps) and shift = bias computed here in double.
at::Tensor forward_eval(const at::Tensor& x_in, const at::Tensor& running_mean,
                        const at::Tensor& running_var, const c10::optional<at::Tensor>& w,
                        const c10::optional<at::Tensor>& b, double eps,
                        const c10::optional<at::Tensor>& residual, int64_t act) {
  const char* fn = "bnkit forward_eval";
  check_input(x_in, fn);
  check_act(act, fn);
  const int64_t C_in = x_in.size(1);
  check_channel(running_mean, C_in, fn, "running_mean");
  check_channel(running_var, C_in, fn, "running_var");
  check_channel(w, C_in, fn, "weight");
  check_channel(b, C_in, fn, "bias");
  TORCH_CHECK(eps >= 0, fn, ": eps must be >= 0, got ", eps);
  const Layout lo = layout_of(x_in);
  at::Tensor x = as_layout(x_in, lo.fastest);
  const at::Tensor r = residual_like(residual, x_in, x, lo.fastest, fn);
  at::Tensor y = new_output(x);
  const int64_t C = lo.C;
  const std::vector<double> md = doubles(running_mean, C, 0.0), hd = doubles(b, C, 0.0);
  std::vector<double> sd = doubles(running_var, C, 1.0);
  const std::vector<double> wd = doubles(w, C, 1.0);
  for (int64_t c = 0; c < C; ++c) sd[c] = wd[c] / std::sqrt(sd[c] + eps);
  dispatch(x.scalar_type(), fn, [&](auto t_, auto s_) {
    using T = decltype(t_);
    using S = decltype(s_);
    KArrays<T> ka(C);
    for (int64_t c = 0; c < C; ++c) {
      ka.s()[c] = static_cast<T>(md[c]);
      ka.kx()[c] = static_cast<T>(sd[c]);
      ka.k0()[c] = static_cast<T>(hd[c]);
    }
    Ptrs<S> p;
    p.x = data_as<S>(x);
    p.r = r.defined() ? data_as<S>(r) : nullptr;
    p.out = data_as<S>(y);
    with_op<T, S, kFwd>(act, p.r != nullptr,
                     [&](auto op) { channel_map<T, decltype(op)>(p, lo, ka, false); });
  });
  return y;
}

// The eval-mode backward: grad_x = grad_out * weight / sqrt(running_var + eps) (when
// need_gx), and, when need_sums, the weight and bias gradients sum(g * (x - running_mean))
// * invstd and sum(g) (weight's dtype; x's without weight) in one pass over x and
// grad_out before it. grad_x does not depend on x (an inf in x leaves it finite, as in
// torch). Returns (grad_x or undefined, grad_weight or undefined, grad_bias or undefined).
std::vector<at::Tensor> backward_eval(const at::Tensor& go_in, const at::Tensor& x_in,
                                      const c10::optional<at::Tensor>& w,
                                      const at::Tensor& running_mean,
                                      const at::Tensor& running_var, double eps, bool need_gx,
                                      bool need_sums) {
  const char* fn = "bnkit backward_eval";
  check_input(x_in, fn);
  check_like(go_in, x_in, fn, "grad_output");
  const int64_t C_in = x_in.size(1);
  check_channel(w, C_in, fn, "weight");
  check_channel(running_mean, C_in, fn, "running_mean");
  check_channel(running_var, C_in, fn, "running_var");
  TORCH_CHECK(eps >= 0, fn, ": eps must be >= 0, got ", eps);
  const Layout lo = layout_of(x_in);
  at::Tensor x = as_layout(x_in, lo.fastest);
  at::Tensor go = as_layout(go_in.scalar_type() == x.scalar_type() ? go_in
                                                                     : go_in.to(x.scalar_type()),
                            lo.fastest);
  at::Tensor gx = need_gx ? new_output(x) : at::Tensor();  // first (see train_impl)
  const int64_t C = lo.C;
  const std::vector<double> md = doubles(running_mean, C, 0.0), wd = doubles(w, C, 1.0);
  std::vector<double> id = doubles(running_var, C, 1.0);
  for (int64_t c = 0; c < C; ++c) id[c] = 1.0 / std::sqrt(id[c] + eps);
  std::vector<double> gsum(C, 0.0), gxhat(C, 0.0);
  dispatch(x.scalar_type(), fn, [&](auto t_, auto s_) {
    using T = decltype(t_);
    using S = decltype(s_);
    if (need_sums) {
      KArrays<T> ka(C);
      std::vector<double> sg(C), sgd(C);
      for (int64_t c = 0; c < C; ++c) ka.s()[c] = static_cast<T>(md[c]);
      Ptrs<S> p;
      p.x = data_as<S>(x);
      p.go = data_as<S>(go);
      row_sums<T, Op<T, S, kBwd, kNoAct, false>>(p, lo, ka, sg.data(), sgd.data());
      for (int64_t c = 0; c < C; ++c) {
        gsum[c] = sg[c];
        gxhat[c] = sum_g_xhat(sg[c], sgd[c], md[c] - static_cast<double>(ka.s()[c]), id[c]);
      }
    }
    if (need_gx) {  // go * a as the forward's output loop: (go - 0) * a + 0
      KArrays<T> ka(C);
      for (int64_t c = 0; c < C; ++c) ka.kx()[c] = static_cast<T>(wd[c] * id[c]);
      Ptrs<S> p;
      p.x = data_as<S>(go);
      p.out = data_as<S>(gx);
      channel_map<T, Op<T, S, kFwd, kNoAct, false>>(p, lo, ka, need_sums);
    }
  });
  if (!need_sums) return {gx, at::Tensor(), at::Tensor()};
  const auto [gw, gb] = param_grads(w, x, gxhat, gsum);
  return {gx, gw, gb};
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
  dispatch(x.scalar_type(), fn, [&](auto t_, auto s_) {
    using T = decltype(t_);
    using S = decltype(s_);
    KArrays<T> ka(C);
    for (int64_t c = 0; c < C; ++c) {
      ka.s()[c] = static_cast<T>(md[c]);
      ka.kx()[c] = static_cast<T>(xd[c]);
      ka.ko()[c] = static_cast<T>(od[c]);
      ka.k0()[c] = static_cast<T>(zd[c]);
    }
    Ptrs<S> p;
    p.x = data_as<S>(x);
    p.go = data_as<S>(go);
    p.out = data_as<S>(gx);
    channel_map<T, Op<T, S, kBwd, kNoAct, false>>(p, lo, ka, false);
  });
  return gx;
}

// ------------------------------------------------------------------ autograd nodes
//
// The layers' autograd Functions, as C++ nodes: a Python autograd.Function costs a few
// microseconds per call forward and backward (the ctx object, the engine's round trip
// through Python), most of a small layer's time. Under a double backward (grad mode on in
// the backward) the gradient must be built from differentiable ops, and a gradient
// without storage (a vmap's batched tensor: autograd.grad(is_grads_batched=True),
// jacobian(vectorize=True)) cannot go to a kernel: there the nodes hand over to bnkit's
// Python closed form (torch ops), registered by set_graph_backward.

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// (train, eval) Python callables: never freed (they may be called until the interpreter
// exits, and a static py::object would be destroyed after it)
py::object* g_graph_train = nullptr;
py::object* g_graph_eval = nullptr;

using OptTensor = c10::optional<at::Tensor>;

OptTensor opt(const at::Tensor& t) { return t.defined() ? OptTensor(t) : c10::nullopt; }

at::Tensor tensor_or_undefined(const OptTensor& t) { return has(t) ? *t : at::Tensor(); }

py::object py_tensor(const at::Tensor& t) { return t.defined() ? py::cast(t) : py::none(); }

// The Python backward's result: a tuple of tensors or None.
variable_list from_python(const py::object& r, size_t n) {
  const auto seq = r.cast<py::sequence>();
  TORCH_CHECK(seq.size() == n, "bnkit: the Python backward returned ", seq.size(),
              " gradients, expected ", n);
  variable_list out;
  for (size_t i = 0; i < n; ++i) {
    const py::object o = seq[i];
    out.push_back(o.is_none() ? at::Tensor() : o.cast<at::Tensor>());
  }
  return out;
}

// Inputs: x, weight, bias, residual (undefined = absent), running_mean, running_var
// (updated in place with factor f; not graph inputs in any useful sense: they never
// require grad on this path), then f, eps, act. Outputs: y, mean, var (float64; not
// differentiable).
struct TrainFn : public torch::autograd::Function<TrainFn> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const OptTensor& w,
                               const OptTensor& b, const OptTensor& residual,
                               const OptTensor& rm, const OptTensor& rv, double f, double eps,
                               int64_t act) {
    auto r = forward_train(x, w, b, eps, rm, rv, f, residual, act);
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["act"] = act;
    ctx->saved_data["has_bias"] = has(b);
    ctx->saved_data["has_residual"] = has(residual);
    // the activation's gate needs the residual (and the double backward the bias)
    ctx->save_for_backward({x, tensor_or_undefined(w), r[1], r[2],
                            act ? tensor_or_undefined(residual) : at::Tensor(), r[3],
                            act ? tensor_or_undefined(b) : at::Tensor()});
    ctx->mark_non_differentiable({r[1], r[2]});
    ctx->set_materialize_grads(false);  // no zero gradients made for mean and var
    return {r[0], r[1], r[2]};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(9);
    const at::Tensor& go = grads[0];
    if (!go.defined()) return out;
    const auto s = ctx->get_saved_variables();
    const double eps = ctx->saved_data["eps"].toDouble();
    const int64_t act = ctx->saved_data["act"].toInt();
    // needs_input_grad counts the tensors given (absent optional ones have no edge)
    const bool hw = s[1].defined(), hb = ctx->saved_data["has_bias"].toBool();
    const bool nx = ctx->needs_input_grad(0), nw = hw && ctx->needs_input_grad(1);
    const bool nb = hb && ctx->needs_input_grad(1 + hw);
    const bool nr = ctx->saved_data["has_residual"].toBool() && ctx->needs_input_grad(1 + hw + hb);
    if (at::GradMode::is_enabled() || !go.has_storage()) {
      TORCH_CHECK(g_graph_train != nullptr, "bnkit: no Python backward registered");
      py::gil_scoped_acquire gil;
      const auto r = from_python(
          (*g_graph_train)(go, s[0], py_tensor(s[1]), py_tensor(s[6]), s[2], s[3],
                           py_tensor(s[4]), eps, act, py::make_tuple(nx, nw, nb), nr),
          4);
      std::copy(r.begin(), r.end(), out.begin());
      return out;
    }
    auto r = backward_train(go, s[0], opt(s[1]), s[2], s[3], eps, false, nx, false,
                            act ? opt(s[4]) : c10::nullopt, act, opt(s[5]));
    if (nx) out[0] = r[0];
    if (nw) out[1] = r[1];
    if (nb) out[2] = r[2];
    // without an activation the add passes the gradient on unchanged
    if (nr) out[3] = r[3].defined() ? r[3] : go;
    return out;
  }
};

// Inputs: x, weight, bias (undefined = absent), running_mean, running_var, then eps.
struct EvalFn : public torch::autograd::Function<EvalFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const OptTensor& w,
                            const OptTensor& b, const at::Tensor& rm, const at::Tensor& rv,
                            double eps) {
    at::Tensor y = forward_eval(x, rm, rv, w, b, eps, c10::nullopt, kNoAct);
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["has_bias"] = has(b);
    ctx->save_for_backward({x, tensor_or_undefined(w), rm, rv});
    ctx->set_materialize_grads(false);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(6);
    const at::Tensor& go = grads[0];
    if (!go.defined()) return out;
    const auto s = ctx->get_saved_variables();
    const double eps = ctx->saved_data["eps"].toDouble();
    const bool hw = s[1].defined();
    const bool nx = ctx->needs_input_grad(0), nw = hw && ctx->needs_input_grad(1);
    const bool nb = ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(1 + hw);
    if (at::GradMode::is_enabled() || !go.has_storage()) {
      TORCH_CHECK(g_graph_eval != nullptr, "bnkit: no Python backward registered");
      py::gil_scoped_acquire gil;
      const auto r = from_python((*g_graph_eval)(go, s[0], py_tensor(s[1]), s[2], s[3], eps,
                                                 py::make_tuple(nx, nw, nb)),
                                 3);
      std::copy(r.begin(), r.end(), out.begin());
      return out;
    }
    auto r = backward_eval(go, s[0], opt(s[1]), s[2], s[3], eps, nx, nw || nb);
    if (nx) out[0] = r[0];
    if (nw) out[1] = r[1];
    if (nb) out[2] = r[2];
    return out;
  }
};

}  // namespace

// The Python closed forms the nodes call under a double backward or for a gradient
// without storage (see above): train(grad_out, x, weight, bias, mean, var, residual, eps,
// act, (need_x, need_w, need_b), need_residual) -> (gx, gw, gb, g_residual);
// eval(grad_out, x, weight, running_mean, running_var, eps, needs) -> (gx, gw, gb).
void set_graph_backward(py::object train, py::object eval) {
  if (g_graph_train == nullptr) {
    g_graph_train = new py::object(std::move(train));
    g_graph_eval = new py::object(std::move(eval));
  } else {
    *g_graph_train = std::move(train);
    *g_graph_eval = std::move(eval);
  }
}

// forward_train (running buffers updated in place) as an autograd node: (y, mean, var).
std::vector<at::Tensor> train_fn(const at::Tensor& x, const c10::optional<at::Tensor>& w,
                                 const c10::optional<at::Tensor>& b,
                                 const c10::optional<at::Tensor>& residual,
                                 const c10::optional<at::Tensor>& running_mean,
                                 const c10::optional<at::Tensor>& running_var, double f,
                                 double eps, int64_t act) {
  return TrainFn::apply(x, w, b, residual, running_mean, running_var, f, eps, act);
}

// forward_eval as an autograd node.
at::Tensor eval_fn(const at::Tensor& x, const c10::optional<at::Tensor>& w,
                   const c10::optional<at::Tensor>& b, const at::Tensor& running_mean,
                   const at::Tensor& running_var, double eps) {
  return EvalFn::apply(x, w, b, running_mean, running_var, eps);
}

// ------------------------------------------------------------------- the layer's call
//
// A bnkit BatchNorm module's whole forward in one call from Python, for the router's
// module case (bnkit/nn/_router.py): the checks of _validate.validate's fast guard, the
// router's RULES and BUFFER_RULES, the count in num_batches_tracked,
// the kernel and, where autograd records the call, its node. A small layer's cost is
// mostly its Python (each function a cold cache line or several when the layer runs
// between others in a network); this leaves one Python frame between the module and the
// kernel. Anything off the common case (a Tensor subclass, a capture, forward-mode AD, a
// pruned weight, an int momentum, a bad shape, ...) returns None before anything is
// changed, and the Python path runs: it handles the case, or words the error.
namespace {

// The Python object as a tensor (an exact Tensor or a Parameter, nothing else), or null.
const at::Tensor* tensor_arg(PyObject* o) {
  if (!THPVariable_CheckExact(o)) return nullptr;
  return &THPVariable_Unpack(o);
}

// A tensor the kernels may take as the input's partner: plain data on the CPU, no
// Python-level or functorch dispatch (FakeTensor, a vmap's or grad's wrapper).
bool plain(const at::Tensor& t) {
  constexpr auto kOff = c10::DispatchKeySet({c10::DispatchKey::Python,
                                             c10::DispatchKey::PythonTLSSnapshot,
                                             c10::DispatchKey::FuncTorchBatched,
                                             c10::DispatchKey::FuncTorchGradWrapper,
                                             c10::DispatchKey::Functionalize});
  return t.defined() && t.is_cpu() && t.layout() == at::kStrided && t.has_storage() &&
         (t.key_set() & kOff).empty();
}

// A graph is captured or a transform is active: the ops must be torch's (_kernels.capturing).
bool capturing_now() {
  return c10::impl::TorchDispatchModeTLS::stack_len() > 0 || torch::jit::tracer::isTracing() ||
         // a torch.func transform (vmap, grad, ...) is active: its layer keys are on
         c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerFrontMode) ||
         torch::autograd::ForwardADLevel::try_get_by_idx(0) != nullptr;
}

bool low_precision(at::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf; }

// The dtype the kernels compute x in (and the running buffers they update must have).
at::ScalarType compute_type(const at::Tensor& x) {
  return low_precision(x.scalar_type()) ? at::kFloat : x.scalar_type();
}

// A per-channel tensor of the layer: absent (None), or C values on the CPU of x's dtype
// or, for bfloat16/float16 x, float32 (autocast's case; what validate accepts).
// false: the common path cannot take it.
bool channel_arg(PyObject* o, const at::Tensor& x, c10::optional<at::Tensor>& out) {
  if (o == Py_None) return true;
  const at::Tensor* t = o ? tensor_arg(o) : nullptr;
  if (t == nullptr || !plain(*t) || t->dim() != 1 || t->size(0) != x.size(1) ||
      (t->scalar_type() != x.scalar_type() && t->scalar_type() != compute_type(x)))
    return false;
  out = *t;
  return true;
}

// A buffer this call writes in place through a raw pointer: what an in-place op would
// accept (contiguous, no autograd history, not an inference tensor outside inference mode).
bool writable(const at::Tensor& t) {
  return t.is_contiguous() && !t.requires_grad() &&
         (!t.is_inference() || c10::InferenceMode::is_enabled());
}

PyObject* dict_item(PyObject* d, const char* key) {
  return PyDict_Check(d) ? PyDict_GetItemString(d, key) : nullptr;  // borrowed, or null
}

}  // namespace

// params / buffers: the module's _parameters and _buffers dicts; training and track: its
// flags; eps and momentum: its attributes (floats, or momentum None); ranks: the input
// ranks the class takes. residual (None or a tensor of the input's shape and dtype) and
// act (check_act's code): act(bn(x) [+ residual]), as fused.batch_norm_act asks. Returns
// the output, or None (see above).
py::object layer_forward(py::handle input, py::handle params, py::handle buffers,
                         py::handle training, py::handle track, py::handle eps_obj,
                         py::handle momentum, py::handle ranks, int64_t num_features,
                         py::handle residual, int64_t act) {
  const py::object decline = py::none();
  const at::Tensor* xp = tensor_arg(input.ptr());
  if (xp == nullptr || !PyBool_Check(training.ptr()) || !PyBool_Check(track.ptr()) ||
      !PyFloat_CheckExact(eps_obj.ptr()) || !PyTuple_Check(ranks.ptr()))
    return decline;
  const at::Tensor& x = *xp;
  if (!plain(x) ||
      !(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble ||
        low_precision(x.scalar_type())) ||
      x.dim() < 2 || x.size(1) != num_features || x.numel() == 0 || !usable(x))
    return decline;
  check_act(act, "bnkit layer_forward");  // a code only bnkit's Python passes: a bug if bad
  c10::optional<at::Tensor> res;
  if (residual.ptr() != Py_None) {
    const at::Tensor* r = tensor_arg(residual.ptr());
    if (r == nullptr || !plain(*r) || r->sizes() != x.sizes() ||
        r->scalar_type() != x.scalar_type())
      return decline;
    res = *r;
  }
  bool rank_ok = false;  // (an empty tuple: the class names no rank, the Python path checks)
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(ranks.ptr()) && !rank_ok; ++i) {
    PyObject* r = PyTuple_GET_ITEM(ranks.ptr(), i);
    if (!PyLong_CheckExact(r)) continue;
    const long long v = PyLong_AsLongLong(r);
    if (v == -1 && PyErr_Occurred()) {  // beyond long long: never a rank
      PyErr_Clear();
      continue;
    }
    rank_ok = v == x.dim();
  }
  if (!rank_ok) return decline;
  double mom = -1.0;  // -1: momentum=None, the cumulative average
  if (momentum.ptr() != Py_None) {
    if (!PyFloat_CheckExact(momentum.ptr())) return decline;
    mom = PyFloat_AS_DOUBLE(momentum.ptr());
    if (!(mom >= 0.0 && mom <= 1.0)) return decline;
  }
  c10::optional<at::Tensor> w, b, rm, rv;
  if (!channel_arg(dict_item(params.ptr(), "weight"), x, w) ||
      !channel_arg(dict_item(params.ptr(), "bias"), x, b) ||
      !channel_arg(dict_item(buffers.ptr(), "running_mean"), x, rm) ||
      !channel_arg(dict_item(buffers.ptr(), "running_var"), x, rv))
    return decline;
  PyObject* nbt_obj = dict_item(buffers.ptr(), "num_batches_tracked");
  if (nbt_obj == nullptr || capturing_now()) return decline;
  const double eps = PyFloat_AS_DOUBLE(eps_obj.ptr());
  const at::ScalarType ct = compute_type(x);
  const bool is_training = training.ptr() == Py_True, tracks = track.ptr() == Py_True;
  const bool batch_stats = is_training || (!rm && !rv);
  const bool grad = at::GradMode::is_enabled() &&
                    (x.requires_grad() || (w && w->requires_grad()) ||
                     (b && b->requires_grad()) || (res && res->requires_grad()));
  if (!batch_stats) {
    // eval with the running statistics (both there: one alone is the Python path's error;
    // its node has no activation, which the Python path adds with torch's ops)
    if (!(eps >= 0.0) || !rm || !rv || rm->requires_grad() || rv->requires_grad() ||
        (grad && (res || act != kNoAct)))
      return decline;
    if (grad) return py::cast(EvalFn::apply(x, w, b, *rm, *rv, eps));
    return py::cast(forward_eval(x, *rm, *rv, w, b, eps, res, act));
  }
  // training (or no running statistics): batch statistics, more than one value a channel
  if (!(eps > 0.0) || x.numel() == x.size(1)) return decline;
  const bool update = is_training && tracks;  // else the buffers are neither used nor updated
  if (!update) rm = rv = c10::nullopt;
  double f = 0.0;
  if (update) {
    const at::Tensor* n = nbt_obj == Py_None ? nullptr : tensor_arg(nbt_obj);
    if (n == nullptr || !plain(*n) || n->scalar_type() != at::kLong || n->numel() != 1 ||
        !writable(*n) || (rm.has_value() != rv.has_value()) ||
        (rm && !(writable(*rm) && writable(*rv) && rm->scalar_type() == ct &&
                 rv->scalar_type() == ct)))
      return decline;
    // the last check passed: count the batch, as count_batch does
    int64_t* count = n->data_ptr<int64_t>();
    *count += 1;
    n->unsafeGetTensorImpl()->bump_version();
    f = mom >= 0.0 ? mom : 1.0 / static_cast<double>(*count);
  }
  if (grad) return py::cast(TrainFn::apply(x, w, b, res, rm, rv, f, eps, act)[0]);
  return py::cast(forward_train(x, w, b, eps, rm, rv, f, res, act)[0]);
}

// The activation codes the kernels know, by name: bnkit.nn._activations.TABLE must agree
// (a test compares them), so a row added on one side only fails a test.
py::dict activation_codes() {
  py::dict codes;
  codes["relu"] = static_cast<int>(kRelu);
  codes["relu6"] = static_cast<int>(kRelu6);
  return codes;
}
