/* EvoNorm-B0, EvoNorm-S0 and FRN + TLU on the CPU, float32, each pass over a sample fused into
 * one loop.
 *
 * Built and loaded by normlab/ops/cpu_kernels.py, which documents why these exist. A tensor is
 * N samples of C channels at P positions, laid out NCHW (x[n][c][p], channels_last = 0) or
 * channels last (x[n][p][c], channels_last = 1). Every function takes the sample count, runs
 * whole samples on `threads` threads and writes per sample (and channel or group) results only,
 * so what it returns does not depend on the thread count. Sums are kept in double.
 *
 * Compiled with -fno-math-errno -fno-trapping-math -fassociative-math -fno-signed-zeros (so that
 * the compiler may vectorise the reductions) but without -ffinite-math-only: NaN and inf pass
 * through as the ATen ops would pass them.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

typedef int64_t i64;

/* e^x to about 2 ulp, written so that the compiler vectorises it (libm's expf is a call it
 * cannot vectorise without -ffast-math): x = k·ln 2 + r, |r| <= ln 2 / 2, e^r by a minimax
 * polynomial (Cephes' expf coefficients), 2^k built in the exponent bits. */
static inline float exp_approx(float x) {
    x = x > 88.0f ? 88.0f : x;
    x = x < -87.0f ? -87.0f : x;
    float k = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - k * 0.693359375f;
    r = r + k * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { int32_t bits; float value; } scale;
    scale.bits = ((int32_t)k + 127) << 23;
    return p * scale.value;
}

static inline float sigmoid_approx(float t) { return 1.0f / (1.0f + exp_approx(-t)); }

/* -- threads: each runs a contiguous range of samples ------------------------------------------ */

/* A range of samples; returns 0, or 1 where its scratch memory could not be allocated. */
typedef int (*SampleRange)(const void *args, i64 begin, i64 end);

/* OpenMP, so that the threads are torch's own: the library links libgomp.so.1, which is the copy
 * torch has already loaded into the process, and its workers are the ones spinning after torch's
 * last op (threads of our own would compete with them for the cores). Returns 0, or 1 where a
 * range failed: the caller then takes ATen's ops (and every output is written again). */
static int over_samples(SampleRange run, const void *args, i64 samples, int threads) {
    if (threads > samples) threads = (int)samples;
    if (threads <= 1) return run(args, 0, samples);
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        const i64 t = omp_get_thread_num(), count = omp_get_num_threads();
        failed |= run(args, samples * t / count, samples * (t + 1) / count);
    }
    return failed;
}

/* A range's scratch memory in one block: `doubles` doubles, then `floats` floats (NULL where it
 * cannot be had; the range then returns 1). */
static double *scratch(i64 doubles, i64 floats) {
    return malloc(sizeof(double) * doubles + sizeof(float) * floats);
}

/* -- per-channel sums of one sample ------------------------------------------------------------ */

/* sums[c] = Σ_p x[c, p] */
static void channel_sums(const float *x, i64 C, i64 P, int channels_last, double *sums) {
    for (i64 c = 0; c < C; ++c) sums[c] = 0.0;
    if (!channels_last) {
        for (i64 c = 0; c < C; ++c) {
            const float *row = x + c * P;
            double total = 0.0;
            for (i64 p = 0; p < P; ++p) total += row[p];
            sums[c] = total;
        }
    } else {
        for (i64 p = 0; p < P; ++p) {
            const float *column = x + p * C;
            for (i64 c = 0; c < C; ++c) sums[c] += column[c];
        }
    }
}

/* squares[c] = Σ_p (x[c, p] − centre[c])² */
static void channel_squares(
    const float *x, const float *centre, i64 C, i64 P, int channels_last, double *squares
) {
    for (i64 c = 0; c < C; ++c) squares[c] = 0.0;
    if (!channels_last) {
        for (i64 c = 0; c < C; ++c) {
            const float *row = x + c * P;
            const float m = centre[c];
            double total = 0.0;
            for (i64 p = 0; p < P; ++p) {
                const float d = row[p] - m;
                total += d * d;
            }
            squares[c] = total;
        }
    } else {
        for (i64 p = 0; p < P; ++p) {
            const float *column = x + p * C;
            for (i64 c = 0; c < C; ++c) {
                const float d = column[c] - centre[c];
                squares[c] += d * d;
            }
        }
    }
}

/* -- statistics per sample and channel (EvoNorm-B0's instance statistics) ---------------------- */

typedef struct {
    const float *x;
    float *mean, *var; /* N×C */
    i64 C, P;
    int channels_last;
} InstanceStatistics;

static int instance_statistics_range(const void *args, i64 begin, i64 end) {
    const InstanceStatistics *a = (const InstanceStatistics *)args;
    const i64 C = a->C, P = a->P;
    double *sums = scratch(C, C);
    if (!sums) return 1;
    float *centre = (float *)(sums + C);
    for (i64 n = begin; n < end; ++n) {
        const float *x = a->x + n * C * P;
        channel_sums(x, C, P, a->channels_last, sums);
        for (i64 c = 0; c < C; ++c) centre[c] = (float)(sums[c] / P);
        channel_squares(x, centre, C, P, a->channels_last, sums);
        for (i64 c = 0; c < C; ++c) {
            a->mean[n * C + c] = centre[c];
            a->var[n * C + c] = (float)(sums[c] / P);
        }
    }
    free(sums);
    return 0;
}

int instance_statistics(
    const float *x, float *mean, float *var, i64 N, i64 C, i64 P, int channels_last, int threads
) {
    InstanceStatistics args = {x, mean, var, C, P, channels_last};
    return over_samples(instance_statistics_range, &args, N, threads);
}

/* -- EvoNorm-B0: y = x·γ / max(σ_B, v·x + σ_I) + β --------------------------------------------- */

typedef struct {
    const float *x, *v, *gamma, *beta, *instance_std /* N×C */, *batch_std /* C */;
    float *y;
    i64 C, P;
    int channels_last;
} EvoNormB0Forward;

static inline float b0_denominator(float x, float v, float instance_std, float batch_std) {
    const float d = v * x + instance_std;
    /* NaN on either side gives NaN, as torch.maximum (and ATen's clamp) */
    return isnan(batch_std) ? batch_std : d < batch_std ? batch_std : d;
}

static int evonorm_b0_forward_range(const void *args, i64 begin, i64 end) {
    const EvoNormB0Forward *a = (const EvoNormB0Forward *)args;
    const i64 C = a->C, P = a->P;
    for (i64 n = begin; n < end; ++n) {
        const float *x = a->x + n * C * P, *si = a->instance_std + n * C;
        float *y = a->y + n * C * P;
        if (!a->channels_last) {
            for (i64 c = 0; c < C; ++c) {
                const float v = a->v[c], g = a->gamma[c], b = a->beta[c];
                const float s = si[c], sb = a->batch_std[c];
                for (i64 p = 0; p < P; ++p) {
                    const float xv = x[c * P + p];
                    y[c * P + p] = xv * g / b0_denominator(xv, v, s, sb) + b;
                }
            }
        } else {
            for (i64 p = 0; p < P; ++p) {
                for (i64 c = 0; c < C; ++c) {
                    const float xv = x[p * C + c];
                    const float d = b0_denominator(xv, a->v[c], si[c], a->batch_std[c]);
                    y[p * C + c] = xv * a->gamma[c] / d + a->beta[c];
                }
            }
        }
    }    return 0;
}

int evonorm_b0_forward(
    const float *x, float *y, const float *v, const float *gamma, const float *beta,
    const float *instance_std, const float *batch_std, i64 N, i64 C, i64 P, int channels_last,
    int threads
) {
    EvoNormB0Forward args = {x, v, gamma, beta, instance_std, batch_std, y, C, P, channels_last};
    return over_samples(evonorm_b0_forward_range, &args, N, threads);
}

/* EvoNorm-B0's backward, first pass: per sample and channel, with D the denominator, q = g·x/D²
 * and i = 1 where v·x + σ_I won the max: Σ g·x/D, Σ g, Σ q, Σ q·i and Σ q·i·x. */
typedef struct {
    const float *x, *grad, *v, *instance_std, *batch_std;
    float *weight_sums, *grad_sums, *q_sums, *instance_sums, *v_sums; /* N×C each */
    i64 C, P;
    int channels_last;
} EvoNormB0Sums;

static int evonorm_b0_sums_range(const void *args, i64 begin, i64 end) {
    const EvoNormB0Sums *a = (const EvoNormB0Sums *)args;
    const i64 C = a->C, P = a->P;
    double *acc = scratch(5 * C, 0);
    if (!acc) return 1;
    double *w = acc, *gs = acc + C, *qs = acc + 2 * C, *is = acc + 3 * C, *vs = acc + 4 * C;
    for (i64 n = begin; n < end; ++n) {
        const float *x = a->x + n * C * P, *g = a->grad + n * C * P, *si = a->instance_std + n * C;
        for (i64 k = 0; k < 5 * C; ++k) acc[k] = 0.0;
        if (!a->channels_last) {
            for (i64 c = 0; c < C; ++c) {
                const float v = a->v[c], s = si[c], sb = a->batch_std[c];
                double tw = 0, tg = 0, tq = 0, ti = 0, tv = 0;
                for (i64 p = 0; p < P; ++p) {
                    const float xv = x[c * P + p], gv = g[c * P + p];
                    const float d = b0_denominator(xv, v, s, sb);
                    const float direct = gv / d, q = direct * xv / d;
                    const float qi = d > sb ? q : 0.0f;
                    tw += direct * xv;
                    tg += gv;
                    tq += q;
                    ti += qi;
                    tv += qi * xv;
                }
                w[c] = tw, gs[c] = tg, qs[c] = tq, is[c] = ti, vs[c] = tv;
            }
        } else {
            for (i64 p = 0; p < P; ++p) {
                for (i64 c = 0; c < C; ++c) {
                    const float xv = x[p * C + c], gv = g[p * C + c], sb = a->batch_std[c];
                    const float d = b0_denominator(xv, a->v[c], si[c], sb);
                    const float direct = gv / d, q = direct * xv / d;
                    const float qi = d > sb ? q : 0.0f;
                    w[c] += direct * xv;
                    gs[c] += gv;
                    qs[c] += q;
                    is[c] += qi;
                    vs[c] += qi * xv;
                }
            }
        }
        for (i64 c = 0; c < C; ++c) {
            a->weight_sums[n * C + c] = (float)w[c];
            a->grad_sums[n * C + c] = (float)gs[c];
            a->q_sums[n * C + c] = (float)qs[c];
            a->instance_sums[n * C + c] = (float)is[c];
            a->v_sums[n * C + c] = (float)vs[c];
        }
    }
    free(acc);
    return 0;
}

int evonorm_b0_backward_sums(
    const float *x, const float *grad, const float *v, const float *instance_std,
    const float *batch_std, float *weight_sums, float *grad_sums, float *q_sums,
    float *instance_sums, float *v_sums, i64 N, i64 C, i64 P, int channels_last, int threads
) {
    EvoNormB0Sums args = {
        x, grad, v, instance_std, batch_std, weight_sums, grad_sums, q_sums, instance_sums, v_sums,
        C, P, channels_last,
    };
    return over_samples(evonorm_b0_sums_range, &args, N, threads);
}

/* Second pass: dx = γ·g/D − γ·v·q·i + slope·x + offset, slope and offset per sample and channel
 * (the terms through σ_I and σ_B, made from the first pass's sums by the caller). */
typedef struct {
    const float *x, *grad, *v, *gamma, *instance_std, *batch_std, *slope, *offset;
    float *x_grad;
    i64 C, P;
    int channels_last;
} EvoNormB0Input;

static inline float b0_input_grad(
    float xv, float gv, float v, float gamma, float s, float sb, float slope, float offset
) {
    const float d = b0_denominator(xv, v, s, sb);
    const float direct = gv / d;
    const float qi = d > sb ? direct * xv / d : 0.0f;
    return gamma * direct - gamma * v * qi + slope * xv + offset;
}

static int evonorm_b0_input_range(const void *args, i64 begin, i64 end) {
    const EvoNormB0Input *a = (const EvoNormB0Input *)args;
    const i64 C = a->C, P = a->P;
    for (i64 n = begin; n < end; ++n) {
        const float *x = a->x + n * C * P, *g = a->grad + n * C * P;
        const float *si = a->instance_std + n * C, *sl = a->slope + n * C, *of = a->offset + n * C;
        float *dx = a->x_grad + n * C * P;
        if (!a->channels_last) {
            for (i64 c = 0; c < C; ++c) {
                const float v = a->v[c], gm = a->gamma[c], s = si[c], sb = a->batch_std[c];
                const float k = sl[c], o = of[c];
                for (i64 p = 0; p < P; ++p) {
                    dx[c * P + p] = b0_input_grad(x[c * P + p], g[c * P + p], v, gm, s, sb, k, o);
                }
            }
        } else {
            for (i64 p = 0; p < P; ++p) {
                for (i64 c = 0; c < C; ++c) {
                    dx[p * C + c] = b0_input_grad(
                        x[p * C + c], g[p * C + c], a->v[c], a->gamma[c], si[c], a->batch_std[c],
                        sl[c], of[c]
                    );
                }
            }
        }
    }    return 0;
}

int evonorm_b0_backward_input(
    const float *x, const float *grad, float *x_grad, const float *v, const float *gamma,
    const float *instance_std, const float *batch_std, const float *slope, const float *offset,
    i64 N, i64 C, i64 P, int channels_last, int threads
) {
    EvoNormB0Input args = {
        x, grad, v, gamma, instance_std, batch_std, slope, offset, x_grad, C, P, channels_last,
    };
    return over_samples(evonorm_b0_input_range, &args, N, threads);
}

/* -- EvoNorm-S0: y = x·sigmoid(v·x)·r·γ + β, r per sample and group ---------------------------- */

typedef struct {
    const float *x, *v, *gamma, *beta;
    float *y, *mean, *invstd; /* mean, invstd: N×G */
    i64 C, P, G;
    int channels_last;
    float eps;
} EvoNormS0Forward;

/* The statistics of each group of one sample, two passes (the group's mean, then the mean
 * squared deviation from it); centre[c] gets its group's mean. */
static void group_statistics(
    const float *x, i64 C, i64 P, i64 G, int channels_last, float eps, double *sums,
    float *centre, float *mean, float *invstd
) {
    const i64 width = C / G;
    const double values = (double)width * P;
    channel_sums(x, C, P, channels_last, sums);
    for (i64 group = 0; group < G; ++group) {
        double total = 0.0;
        for (i64 c = group * width; c < (group + 1) * width; ++c) total += sums[c];
        mean[group] = (float)(total / values);
        for (i64 c = group * width; c < (group + 1) * width; ++c) centre[c] = mean[group];
    }
    channel_squares(x, centre, C, P, channels_last, sums);
    for (i64 group = 0; group < G; ++group) {
        double total = 0.0;
        for (i64 c = group * width; c < (group + 1) * width; ++c) total += sums[c];
        invstd[group] = (float)(1.0 / sqrt(total / values + eps));
    }
}

static int evonorm_s0_forward_range(const void *args, i64 begin, i64 end) {
    const EvoNormS0Forward *a = (const EvoNormS0Forward *)args;
    const i64 C = a->C, P = a->P, G = a->G, width = C / G;
    double *sums = scratch(C, 2 * C);
    if (!sums) return 1;
    float *centre = (float *)(sums + C), *scale = centre + C;
    for (i64 n = begin; n < end; ++n) {
        const float *x = a->x + n * C * P;
        float *y = a->y + n * C * P, *invstd = a->invstd + n * G;
        group_statistics(x, C, P, G, a->channels_last, a->eps, sums, centre, a->mean + n * G,
                         invstd);
        for (i64 c = 0; c < C; ++c) scale[c] = invstd[c / width] * a->gamma[c];
        if (!a->channels_last) {
            for (i64 c = 0; c < C; ++c) {
                const float v = a->v[c], s = scale[c], b = a->beta[c];
                for (i64 p = 0; p < P; ++p) {
                    const float xv = x[c * P + p];
                    y[c * P + p] = xv * sigmoid_approx(v * xv) * s + b;
                }
            }
        } else {
            for (i64 p = 0; p < P; ++p) {
                for (i64 c = 0; c < C; ++c) {
                    const float xv = x[p * C + c];
                    y[p * C + c] = xv * sigmoid_approx(a->v[c] * xv) * scale[c] + a->beta[c];
                }
            }
        }
    }
    free(sums);
    return 0;
}

int evonorm_s0_forward(
    const float *x, float *y, const float *v, const float *gamma, const float *beta, float *mean,
    float *invstd, i64 N, i64 C, i64 P, i64 G, int channels_last, float eps, int threads
) {
    EvoNormS0Forward args = {x, v, gamma, beta, y, mean, invstd, C, P, G, channels_last, eps};
    return over_samples(evonorm_s0_forward_range, &args, N, threads);
}

/* The backward pass, per sample: a first loop keeps s = sigmoid(v·x) and sums, per channel,
 * Σ g·x·s (→ ∂L/∂r and γ's gradient), Σ g·x²·s·(1 − s) (→ v's) and Σ g (→ β's); a second writes
 * dx = r·γ·(g·s + v·g·x·s·(1 − s)) + c·(x − μ), with c = −r³/n · Σ_group γ·Σ g·x·s. */
typedef struct {
    const float *x, *grad, *v, *gamma, *mean, *invstd;
    float *x_grad, *products, *v_products, *grad_sums; /* the sums: N×C */
    i64 C, P, G;
    int channels_last;
} EvoNormS0Backward;

static int evonorm_s0_backward_range(const void *args, i64 begin, i64 end) {
    const EvoNormS0Backward *a = (const EvoNormS0Backward *)args;
    const i64 C = a->C, P = a->P, G = a->G, width = C / G;
    double *acc = scratch(3 * C, 3 * C + C * P);
    if (!acc) return 1;
    float *scale = (float *)(acc + 3 * C), *slope = scale + C, *offset = slope + C;
    float *gate = offset + C; /* sigmoid(v·x) of the sample, C × P */
    double *ps = acc, *vs = acc + C, *gs = acc + 2 * C;
    for (i64 n = begin; n < end; ++n) {
        const float *x = a->x + n * C * P, *g = a->grad + n * C * P;
        const float *mean = a->mean + n * G, *invstd = a->invstd + n * G;
        float *dx = a->x_grad + n * C * P;
        for (i64 k = 0; k < 3 * C; ++k) acc[k] = 0.0;
        if (!a->channels_last) {
            for (i64 c = 0; c < C; ++c) {
                const float v = a->v[c];
                double tp = 0, tv = 0, tg = 0;
                for (i64 p = 0; p < P; ++p) {
                    const float xv = x[c * P + p], gv = g[c * P + p];
                    const float s = sigmoid_approx(v * xv), gx = gv * xv * s;
                    gate[c * P + p] = s;
                    tp += gx;
                    tv += gx * xv * (1.0f - s);
                    tg += gv;
                }
                ps[c] = tp, vs[c] = tv, gs[c] = tg;
            }
        } else {
            for (i64 p = 0; p < P; ++p) {
                for (i64 c = 0; c < C; ++c) {
                    const float xv = x[p * C + c], gv = g[p * C + c];
                    const float s = sigmoid_approx(a->v[c] * xv), gx = gv * xv * s;
                    gate[p * C + c] = s;
                    ps[c] += gx;
                    vs[c] += gx * xv * (1.0f - s);
                    gs[c] += gv;
                }
            }
        }
        const double values = (double)width * P;
        for (i64 group = 0; group < G; ++group) {
            double r_grad = 0.0;
            for (i64 c = group * width; c < (group + 1) * width; ++c) r_grad += a->gamma[c] * ps[c];
            const double r = invstd[group];
            const float c_group = (float)(-r_grad * r * r * r / values);
            for (i64 c = group * width; c < (group + 1) * width; ++c) {
                scale[c] = (float)r * a->gamma[c];
                slope[c] = c_group;
                offset[c] = -c_group * mean[group];
            }
        }
        for (i64 c = 0; c < C; ++c) {
            a->products[n * C + c] = (float)ps[c];
            a->v_products[n * C + c] = (float)vs[c];
            a->grad_sums[n * C + c] = (float)gs[c];
        }
        if (!a->channels_last) {
            for (i64 c = 0; c < C; ++c) {
                const float v = a->v[c], k = scale[c], sl = slope[c], of = offset[c];
                for (i64 p = 0; p < P; ++p) {
                    const float xv = x[c * P + p], s = gate[c * P + p], gs_ = g[c * P + p] * s;
                    dx[c * P + p] = k * (gs_ + v * gs_ * xv * (1.0f - s)) + sl * xv + of;
                }
            }
        } else {
            for (i64 p = 0; p < P; ++p) {
                for (i64 c = 0; c < C; ++c) {
                    const float xv = x[p * C + c], s = gate[p * C + c], gs_ = g[p * C + c] * s;
                    dx[p * C + c] =
                        scale[c] * (gs_ + a->v[c] * gs_ * xv * (1.0f - s)) + slope[c] * xv +
                        offset[c];
                }
            }
        }
    }
    free(acc);
    return 0;
}

int evonorm_s0_backward(
    const float *x, const float *grad, float *x_grad, const float *v, const float *gamma,
    const float *mean, const float *invstd, float *products, float *v_products, float *grad_sums,
    i64 N, i64 C, i64 P, i64 G, int channels_last, int threads
) {
    EvoNormS0Backward args = {
        x, grad, v, gamma, mean, invstd, x_grad, products, v_products, grad_sums, C, P, G,
        channels_last,
    };
    return over_samples(evonorm_s0_backward_range, &args, N, threads);
}

/* -- FRN + TLU: y = max(γ·x·r + β, τ), r = (mean_p x² + eps)^−½ per sample and channel ------- */

static inline float tlu(float z, float tau) {
    /* NaN on either side gives NaN, as ATen's clamp */
    return isnan(tau) ? tau : z < tau ? tau : z;
}

typedef struct {
    const float *x, *gamma, *beta, *tau /* NULL: no TLU */;
    float *y, *invrms; /* invrms: N×C */
    i64 C, P;
    int channels_last;
    float eps;
} FilterResponseForward;

static int frn_forward_range(const void *args, i64 begin, i64 end) {
    const FilterResponseForward *a = (const FilterResponseForward *)args;
    const i64 C = a->C, P = a->P;
    double *squares = scratch(C, 3 * C);
    if (!squares) return 1;
    float *scale = (float *)(squares + C), *threshold = scale + C, *zeros = threshold + C;
    for (i64 c = 0; c < C; ++c) zeros[c] = 0.0f;
    for (i64 c = 0; c < C; ++c) threshold[c] = a->tau ? a->tau[c] : -INFINITY;
    for (i64 n = begin; n < end; ++n) {
        const float *x = a->x + n * C * P;
        float *y = a->y + n * C * P, *invrms = a->invrms + n * C;
        channel_squares(x, zeros, C, P, a->channels_last, squares);
        for (i64 c = 0; c < C; ++c) {
            invrms[c] = (float)(1.0 / sqrt(squares[c] / P + a->eps));
            scale[c] = invrms[c] * a->gamma[c];
        }
        if (!a->channels_last) {
            for (i64 c = 0; c < C; ++c) {
                const float s = scale[c], b = a->beta[c], t = threshold[c];
                for (i64 p = 0; p < P; ++p) y[c * P + p] = tlu(x[c * P + p] * s + b, t);
            }
        } else {
            for (i64 p = 0; p < P; ++p) {
                for (i64 c = 0; c < C; ++c) {
                    y[p * C + c] = tlu(x[p * C + c] * scale[c] + a->beta[c], threshold[c]);
                }
            }
        }
    }
    free(squares);
    return 0;
}

int frn_forward(
    const float *x, float *y, const float *gamma, const float *beta, const float *tau,
    float *invrms, i64 N, i64 C, i64 P, int channels_last, float eps, int threads
) {
    FilterResponseForward args = {x, gamma, beta, tau, y, invrms, C, P, channels_last, eps};
    return over_samples(frn_forward_range, &args, N, threads);
}

/* The backward pass, per sample: with g' = g where γ·x·r + β passed the TLU (> τ), else 0, a
 * first loop sums per channel Σ g'·x (→ ∂L/∂r), Σ g' (→ β's gradient) and Σ g (→ τ's); a second
 * writes dx = g'·r·γ + x·(−r³/n)·γ·Σ g'·x. */
typedef struct {
    const float *x, *grad, *gamma, *beta, *tau, *invrms;
    float *x_grad, *products, *passed_sums, *grad_sums; /* the sums: N×C */
    i64 C, P;
    int channels_last;
} FilterResponseBackward;

/* g where the TLU passed x on (all of g without a TLU). Branch-free on purpose: a condition on
 * the tau pointer inside the loop made gcc gather the per-channel factors (5× slower). */
static inline float frn_passed(float x, float g, float scale, float beta, float tau, int gated) {
    return !gated || x * scale + beta > tau ? g : 0.0f;
}

static int frn_backward_range(const void *args, i64 begin, i64 end) {
    const FilterResponseBackward *a = (const FilterResponseBackward *)args;
    const i64 C = a->C, P = a->P;
    double *acc = scratch(3 * C, 3 * C);
    if (!acc) return 1;
    float *scale = (float *)(acc + 3 * C), *slope = scale + C, *threshold = slope + C;
    double *ps = acc, *bs = acc + C, *gs = acc + 2 * C;
    const int gated = a->tau != NULL;
    for (i64 c = 0; c < C; ++c) threshold[c] = gated ? a->tau[c] : 0.0f;
    for (i64 n = begin; n < end; ++n) {
        const float *x = a->x + n * C * P, *g = a->grad + n * C * P, *invrms = a->invrms + n * C;
        float *dx = a->x_grad + n * C * P;
        for (i64 c = 0; c < C; ++c) scale[c] = invrms[c] * a->gamma[c];
        for (i64 k = 0; k < 3 * C; ++k) acc[k] = 0.0;
        if (!a->channels_last) {
            for (i64 c = 0; c < C; ++c) {
                const float s = scale[c], b = a->beta[c], t = threshold[c];
                double tp = 0, tb = 0, tg = 0;
                for (i64 p = 0; p < P; ++p) {
                    const float xv = x[c * P + p], gv = g[c * P + p];
                    const float passed = frn_passed(xv, gv, s, b, t, gated);
                    tp += passed * xv;
                    tb += passed;
                    tg += gv;
                }
                ps[c] = tp, bs[c] = tb, gs[c] = tg;
            }
        } else {
            for (i64 p = 0; p < P; ++p) {
                for (i64 c = 0; c < C; ++c) {
                    const float xv = x[p * C + c], gv = g[p * C + c];
                    const float passed =
                        frn_passed(xv, gv, scale[c], a->beta[c], threshold[c], gated);
                    ps[c] += passed * xv;
                    bs[c] += passed;
                    gs[c] += gv;
                }
            }
        }
        for (i64 c = 0; c < C; ++c) {
            const double r = invrms[c];
            slope[c] = (float)(-r * r * r / P * a->gamma[c] * ps[c]);
            a->products[n * C + c] = (float)ps[c];
            a->passed_sums[n * C + c] = (float)bs[c];
            a->grad_sums[n * C + c] = (float)gs[c];
        }
        if (!a->channels_last) {
            for (i64 c = 0; c < C; ++c) {
                const float s = scale[c], b = a->beta[c], t = threshold[c], k = slope[c];
                for (i64 p = 0; p < P; ++p) {
                    const float xv = x[c * P + p], gv = g[c * P + p];
                    const float passed = frn_passed(xv, gv, s, b, t, gated);
                    dx[c * P + p] = passed * s + xv * k;
                }
            }
        } else {
            for (i64 p = 0; p < P; ++p) {
                for (i64 c = 0; c < C; ++c) {
                    const float xv = x[p * C + c], gv = g[p * C + c];
                    const float passed =
                        frn_passed(xv, gv, scale[c], a->beta[c], threshold[c], gated);
                    dx[p * C + c] = passed * scale[c] + xv * slope[c];
                }
            }
        }
    }
    free(acc);
    return 0;
}

int frn_backward(
    const float *x, const float *grad, float *x_grad, const float *gamma, const float *beta,
    const float *tau, const float *invrms, float *products, float *passed_sums, float *grad_sums,
    i64 N, i64 C, i64 P, int channels_last, int threads
) {
    FilterResponseBackward args = {
        x, grad, gamma, beta, tau, invrms, x_grad, products, passed_sums, grad_sums, C, P,
        channels_last,
    };
    return over_samples(frn_backward_range, &args, N, threads);
}
