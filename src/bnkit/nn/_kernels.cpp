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
#include <vector>

namespace {

constexpr int64_t kChunk = 256;      // values summed in the input type before a flush
constexpr int64_t kShiftSamples = 64;

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
template <typename T>
double channel_shift(const T* x, const Layout& lo, const std::vector<int64_t>& off, int64_t c) {
  const int64_t base = lo.fastest ? c : c * std::max<int64_t>(lo.L, 1);
  double acc = 0;
  for (const int64_t o : off) acc += static_cast<double>(x[o + base]);
  return static_cast<double>(static_cast<T>(acc / static_cast<double>(off.size())));
}

template <typename T>
void shifts(const T* x, const Layout& lo, double* s) {
  const std::vector<int64_t> off = sample_offsets(lo);
  for (int64_t c = 0; c < lo.C; ++c) s[c] = channel_shift(x, lo, off, c);
}

// sum over a channel of f(x) or f(x) * g: (sum d, sum d*e) with d = x - s, e = other or d.
template <typename T>
void channel_sums(const T* x, const T* other, const Layout& lo, const double* s, double* sum1,
                  double* sum2) {
  const int64_t C = lo.C;
  if (!lo.fastest) {
    at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const T sc = static_cast<T>(s[c]);
        double a1 = 0, a2 = 0;
        for (int64_t n = 0; n < lo.N; ++n) {
          const T* xp = x + (n * C + c) * lo.L;
          const T* op = other ? other + (n * C + c) * lo.L : nullptr;
          for (int64_t l0 = 0; l0 < lo.L; l0 += kChunk) {
            const int64_t l1 = std::min(lo.L, l0 + kChunk);
            T b1 = 0, b2 = 0;
            if (op) {
#pragma omp simd reduction(+ : b1, b2)
              for (int64_t l = l0; l < l1; ++l) {
                b1 += op[l];
                b2 += op[l] * (xp[l] - sc);
              }
            } else {
#pragma omp simd reduction(+ : b1, b2)
              for (int64_t l = l0; l < l1; ++l) {
                const T d = xp[l] - sc;
                b1 += d;
                b2 += d * d;
              }
            }
            a1 += b1;
            a2 += b2;
          }
        }
        sum1[c] = a1;
        sum2[c] = a2;
      }
    });
    return;
  }
  // channels fastest: rows split across threads, per-thread partials merged at the end.
  // Within a thread: blocks of rows that fit in L1/L2, and within a block, 16 channels at
  // a time with their accumulators in registers while the rows stream past.
  const int64_t R = lo.R;
  const int nt = std::max<int>(1, std::min<int64_t>(at::get_num_threads(), (R + 255) / 256));
  std::vector<double> part(static_cast<size_t>(nt) * 2 * C, 0.0);
  std::vector<T> sc(C);
  for (int64_t c = 0; c < C; ++c) sc[c] = static_cast<T>(s[c]);
  constexpr int64_t kV = 16;
  const int64_t rows_blk = std::max<int64_t>(
      16, std::min<int64_t>(kChunk, (32 * 1024) / std::max<int64_t>(1, C * sizeof(T))));
  at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = R * t / nt, r1 = R * (t + 1) / nt;
      double* p1 = part.data() + t * 2 * C;
      double* p2 = p1 + C;
      for (int64_t rb = r0; rb < r1; rb += rows_blk) {
        const int64_t re = std::min(r1, rb + rows_blk);
        int64_t c0 = 0;
        for (; c0 + kV <= C; c0 += kV) {
          T a1[kV], a2[kV], sh[kV];
          for (int64_t j = 0; j < kV; ++j) {
            a1[j] = 0;
            a2[j] = 0;
            sh[j] = sc[c0 + j];
          }
          for (int64_t r = rb; r < re; ++r) {
            const T* xp = x + r * C + c0;
            if (other) {
              const T* op = other + r * C + c0;
#pragma omp simd
              for (int64_t j = 0; j < kV; ++j) {
                a1[j] += op[j];
                a2[j] += op[j] * (xp[j] - sh[j]);
              }
            } else {
#pragma omp simd
              for (int64_t j = 0; j < kV; ++j) {
                const T d = xp[j] - sh[j];
                a1[j] += d;
                a2[j] += d * d;
              }
            }
          }
          for (int64_t j = 0; j < kV; ++j) {
            p1[c0 + j] += a1[j];
            p2[c0 + j] += a2[j];
          }
        }
        for (; c0 < C; ++c0) {  // the last C % 16 channels
          T b1 = 0, b2 = 0;
          const T shc = sc[c0];
          for (int64_t r = rb; r < re; ++r) {
            const T v = x[r * C + c0];
            if (other) {
              const T o = other[r * C + c0];
              b1 += o;
              b2 += o * (v - shc);
            } else {
              b1 += v - shc;
              b2 += (v - shc) * (v - shc);
            }
          }
          p1[c0] += b1;
          p2[c0] += b2;
        }
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

// out = k_x * (x - s) + k_o * other + k_0, per channel (other may be null).
template <typename T>
void channel_affine(const T* x, const T* other, T* out, const Layout& lo, const double* s,
                    const double* kx, const double* ko, const double* k0, bool reverse) {
  const int64_t C = lo.C;
  std::vector<T> vs(C), vx(C), vo(C), v0(C);
  for (int64_t c = 0; c < C; ++c) {
    vs[c] = static_cast<T>(s[c]);
    vx[c] = static_cast<T>(kx[c]);
    vo[c] = ko ? static_cast<T>(ko[c]) : T(0);
    v0[c] = static_cast<T>(k0[c]);
  }
  if (!lo.fastest) {
    at::parallel_for(0, lo.N * C, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t c = i % C;
        const T a = vx[c], b = vo[c], z = v0[c], sh = vs[c];
        const T* xp = x + i * lo.L;
        T* yp = out + i * lo.L;
        if (other) {
          const T* op = other + i * lo.L;
#pragma omp simd
          for (int64_t l = 0; l < lo.L; ++l) yp[l] = (xp[l] - sh) * a + op[l] * b + z;
        } else {
#pragma omp simd
          for (int64_t l = 0; l < lo.L; ++l) yp[l] = (xp[l] - sh) * a + z;
        }
      }
    });
    return;
  }
  const T* ps = vs.data();
  const T* px = vx.data();
  const T* po = vo.data();
  const T* p0 = v0.data();
  // Same row split as channel_sums; after a statistics pass (reverse = true) it is walked
  // backwards, so that the rows a thread read last are still in cache.
  const int nt = std::max<int>(1, std::min<int64_t>(at::get_num_threads(), (lo.R + 255) / 256));
  at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
   for (int64_t t = t0; t < t1; ++t) {
    const int64_t r0 = lo.R * t / nt, r1 = lo.R * (t + 1) / nt;
    for (int64_t i = r0; i < r1; ++i) {
      const int64_t r = reverse ? r1 - 1 - (i - r0) : i;
      const T* xp = x + r * C;
      T* yp = out + r * C;
      if (other) {
        const T* op = other + r * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) yp[c] = (xp[c] - ps[c]) * px[c] + op[c] * po[c] + p0[c];
      } else {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) yp[c] = (xp[c] - ps[c]) * px[c] + p0[c];
      }
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
  int64_t cb = std::max<int64_t>(1, (256 * 1024) / std::max<int64_t>(per_channel, 1));
  cb = std::min<int64_t>(cb, std::max<int64_t>(1, (C + nt - 1) / nt));
  const int64_t nblocks = (C + cb - 1) / cb;
  const std::vector<int64_t> off = shift_in ? std::vector<int64_t>() : sample_offsets(lo);
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
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
        for (int64_t j = 0; j < m; ++j) {
          const int64_t off = (nn * C + c0 + j) * L;
          const T* xp = x + off;
          T* yp = out + off;
          const T sc = tsh[j], a = static_cast<T>(kx[j]), z = static_cast<T>(k0[j]);
          if (other) {
            const T* op = other + off;
            const T bo = static_cast<T>(ko[j]);
#pragma omp simd
            for (int64_t l = 0; l < L; ++l) yp[l] = (xp[l] - sc) * a + op[l] * bo + z;
          } else {
#pragma omp simd
            for (int64_t l = 0; l < L; ++l) yp[l] = (xp[l] - sc) * a + z;
          }
        }
      }
    }
  });
}

at::Tensor dbl(const c10::optional<at::Tensor>& t, int64_t C, double fill) {
  if (t.has_value() && t->defined()) return t->to(at::kDouble).contiguous();
  return at::full({C}, fill, at::TensorOptions().dtype(at::kDouble));
}

}  // namespace

bool eligible(const at::Tensor& x) {
  return x.device().is_cpu() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble) &&
         x.dim() >= 2 && x.numel() > 0 && usable(x);
}

namespace {
std::vector<at::Tensor> train_impl(const at::Tensor& x_in, const c10::optional<at::Tensor>& w,
                                   const c10::optional<at::Tensor>& b, double eps, bool want_y);
}

// Returns (y, mean, biased var); mean/var float64 of shape (C,).
std::vector<at::Tensor> forward_train(const at::Tensor& x_in, const c10::optional<at::Tensor>& w,
                                      const c10::optional<at::Tensor>& b, double eps) {
  return train_impl(x_in, w, b, eps, true);
}

// Returns (mean, biased var), float64 (C,): the statistics pass alone.
std::vector<at::Tensor> stats(const at::Tensor& x_in) {
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
  at::Tensor wd = dbl(w, C, 1.0), bd = dbl(b, C, 0.0);
  at::Tensor y = want_y ? at::empty_like(x) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bnkit_forward_train", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    double* mp = mean.data_ptr<double>();
    double* vp = var.data_ptr<double>();
    const double* wp = wd.data_ptr<double>();
    const double* bp = bd.data_ptr<double>();
    auto coef = [&](int64_t c, double a1, double a2, double sh, double* ka, double* ko,
                    double* kz) {
      const double lo_mean = a1 / n;
      const double v = std::max(0.0, a2 / n - lo_mean * lo_mean);
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
    shifts(xp, lo, s.data());
    channel_sums<scalar_t>(xp, nullptr, lo, s.data(), s1.data(), s2.data());
    double unused = 0;
    for (int64_t c = 0; c < C; ++c) coef(c, s1[c], s2[c], s[c], &kx[c], &unused, &k0[c]);
    if (!want_y) return;
    channel_affine<scalar_t>(xp, nullptr, y.data_ptr<scalar_t>(), lo, s.data(), kx.data(),
                             nullptr, k0.data(), false);
  });
  return {y, mean, var};
}
}  // namespace

// Closed-form training backward (see functional._train_backward). Returns
// (grad_x or undefined, sum(go * xhat) [C, double], sum(go) [C, double]).
std::vector<at::Tensor> backward_train(const at::Tensor& go_in, const at::Tensor& x_in,
                                       const c10::optional<at::Tensor>& w, const at::Tensor& mean,
                                       const at::Tensor& invstd, bool need_gx) {
  const Layout lo = layout_of(x_in);
  at::Tensor x = as_layout(x_in, lo.fastest);
  at::Tensor go = as_layout(go_in.to(x.scalar_type()), lo.fastest);
  const int64_t C = lo.C;
  const double n = static_cast<double>(lo.N * lo.L);
  auto dopt = at::TensorOptions().dtype(at::kDouble);
  at::Tensor gsum = at::empty({C}, dopt), gxhat = at::empty({C}, dopt);
  at::Tensor md = mean.to(at::kDouble).contiguous(), id = invstd.to(at::kDouble).contiguous();
  at::Tensor wd = dbl(w, C, 1.0);
  at::Tensor gx;
  if (need_gx) gx = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bnkit_backward_train", [&] {
    std::vector<double> s(C), sg(C), sgd(C), kx(C), ko(C), k0(C);
    const double* mp = md.data_ptr<double>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = go.data_ptr<scalar_t>();
    const double* ip = id.data_ptr<double>();
    const double* wp = wd.data_ptr<double>();
    double* gs = gsum.data_ptr<double>();
    double* gh = gxhat.data_ptr<double>();
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
    channel_sums<scalar_t>(xp, gp, lo, s.data(), sg.data(), sgd.data());
    for (int64_t c = 0; c < C; ++c) coef(c, sg[c], sgd[c], s[c], &kx[c], &ko[c], &k0[c]);
    if (outp) {
      channel_affine<scalar_t>(xp, gp, outp, lo, s.data(), kx.data(), ko.data(), k0.data(),
                               true);
    }
  });
  return {gx, gxhat, gsum};
}

// y = (x - running_mean) * scale + shift per channel; scale/shift float64 (C,).
at::Tensor forward_eval(const at::Tensor& x_in, const at::Tensor& running_mean,
                        const at::Tensor& scale, const at::Tensor& shift) {
  const Layout lo = layout_of(x_in);
  at::Tensor x = as_layout(x_in, lo.fastest);
  at::Tensor y = at::empty_like(x);
  at::Tensor md = running_mean.to(at::kDouble).contiguous();
  at::Tensor sd = scale.to(at::kDouble).contiguous(), hd = shift.to(at::kDouble).contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bnkit_forward_eval", [&] {
    channel_affine<scalar_t>(x.data_ptr<scalar_t>(), nullptr, y.data_ptr<scalar_t>(), lo,
                             md.data_ptr<double>(), sd.data_ptr<double>(), nullptr,
                             hd.data_ptr<double>(), false);
  });
  return y;
}

// In place: running = (1 - f) * running + f * batch, with the unbiased batch variance
// var * n / (n - 1); computed in double (functional.update_running_stats, fused).
void update_running(at::Tensor running_mean, at::Tensor running_var, const at::Tensor& mean,
                    const at::Tensor& var, int64_t n, double f) {
  at::Tensor md = mean.to(at::kDouble).contiguous(), vd = var.to(at::kDouble).contiguous();
  const double* mp = md.data_ptr<double>();
  const double* vp = vd.data_ptr<double>();
  const double corr = n > 1 ? static_cast<double>(n) / static_cast<double>(n - 1) : 1.0;
  const int64_t C = running_mean.numel();
  AT_DISPATCH_FLOATING_TYPES(running_mean.scalar_type(), "bnkit_update_running", [&] {
    scalar_t* rm = running_mean.data_ptr<scalar_t>();
    scalar_t* rv = running_var.data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) {
      rm[c] = static_cast<scalar_t>((1 - f) * static_cast<double>(rm[c]) + f * mp[c]);
      rv[c] = static_cast<scalar_t>((1 - f) * static_cast<double>(rv[c]) + f * vp[c] * corr);
    }
  });
}

// grad_x = ko * go + kx * (x - s) + k0 per channel, s = mean rounded to the input type
// (the apply step of the training backward when the sums come from elsewhere, e.g. an
// all_reduce across ranks).
at::Tensor grad_apply(const at::Tensor& go_in, const at::Tensor& x_in, const at::Tensor& mean,
                      const at::Tensor& kx, const at::Tensor& ko, const at::Tensor& k0) {
  const Layout lo = layout_of(x_in);
  at::Tensor x = as_layout(x_in, lo.fastest);
  at::Tensor go = as_layout(go_in.to(x.scalar_type()), lo.fastest);
  at::Tensor gx = at::empty_like(x);
  at::Tensor md = mean.to(at::kDouble).contiguous();
  at::Tensor xd = kx.to(at::kDouble).contiguous(), od = ko.to(at::kDouble).contiguous();
  at::Tensor zd = k0.to(at::kDouble).contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bnkit_grad_apply", [&] {
    std::vector<double> s(lo.C);
    const double* mp = md.data_ptr<double>();
    for (int64_t c = 0; c < lo.C; ++c) s[c] = static_cast<double>(static_cast<scalar_t>(mp[c]));
    channel_affine<scalar_t>(x.data_ptr<scalar_t>(), go.data_ptr<scalar_t>(),
                             gx.data_ptr<scalar_t>(), lo, s.data(), xd.data_ptr<double>(),
                             od.data_ptr<double>(), zd.data_ptr<double>(), false);
  });
  return gx;
}
