/* Standalone check of lattice/cuda/gemm.cuh (k_gemm, launch_gemm) on a GPU: every supported weight
 * format and epilogue flag against a float64 CPU reference, odd sizes, poisoned outputs; then
 * timings at the prefill shapes of Qwen3.5-0.8B and SmolLM2-135M (T = 256 and 512), launch_gemm's pick
 * and every block shape. Independent of k_gemv.
 * Build and run: tests/gpu/gemm_check.sh. Compiled with -DGEMM_BASELINE='"<path>"': the timings
 * alone, of another gemm.cuh (an earlier version, for an old-vs-new comparison on one card); with
 * -DGEMM_HEADER='"<path>"': the whole check of another gemm.cuh (a variant under study). */
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#if defined(GEMM_BASELINE)
#include GEMM_BASELINE
#elif defined(GEMM_HEADER)
#include GEMM_HEADER
#else
#include "../../lattice/cuda/gemm.cuh"
#endif

#define CUDA_OK(call)                                                                             \
    do {                                                                                          \
        cudaError_t e_ = (call);                                                                  \
        if (e_ != cudaSuccess) {                                                                  \
            fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_)); \
            exit(2);                                                                              \
        }                                                                                         \
    } while (0)

static const char *FMT_NAME[] = {"f32", "f16", "q8", "q4"};
static std::mt19937 rng(1234);

static float randn() { return std::normal_distribution<float>(0.0f, 1.0f)(rng); }
static float uniform(float lo, float hi) { return std::uniform_real_distribution<float>(lo, hi)(rng); }

/* A weight matrix in the runtime's planes, and its values as doubles [rows][cols]. */
struct weights {
    uint32_t fmt, rows, cols;
    std::vector<uint8_t> wq;
    std::vector<__half> ws, wm;
    std::vector<double> deq;
};

static weights make_weights(uint32_t fmt, uint32_t rows, uint32_t cols) {
    weights w{fmt, rows, cols};
    uint32_t nb = (cols + LT_QK - 1) / LT_QK, kp = nb * LT_QK;
    w.deq.assign((size_t)rows * cols, 0.0);
    if (fmt == LT_WF_F16) {
        w.wq.resize((size_t)rows * cols * 2);
        __half *h = (__half *)w.wq.data();
        for (size_t i = 0; i < (size_t)rows * cols; i++) {
            h[i] = __float2half(0.05f * randn());
            w.deq[i] = __half2float(h[i]);
        }
        return w;
    }
    w.ws.resize((size_t)rows * nb);
    if (fmt == LT_WF_Q4)
        w.wm.resize((size_t)rows * nb);
    for (size_t i = 0; i < w.ws.size(); i++) {
        w.ws[i] = __float2half(uniform(0.002f, 0.02f));
        if (fmt == LT_WF_Q4)
            w.wm[i] = __float2half(-8.0f * __half2float(w.ws[i]) + uniform(-0.01f, 0.01f));
    }
    if (fmt == LT_WF_Q8) {
        w.wq.assign((size_t)rows * kp, 0);
        for (uint32_t r = 0; r < rows; r++)
            for (uint32_t k = 0; k < cols; k++) {
                int8_t q = (int8_t)std::uniform_int_distribution<int>(-127, 127)(rng);
                w.wq[(size_t)r * kp + k] = (uint8_t)q;
                w.deq[(size_t)r * cols + k] = (double)q * __half2float(w.ws[(size_t)r * nb + k / LT_QK]);
            }
    } else {
        w.wq.assign((size_t)rows * kp / 2, 0);
        for (uint32_t r = 0; r < rows; r++)
            for (uint32_t k = 0; k < cols; k++) {
                uint32_t q = std::uniform_int_distribution<int>(0, 15)(rng);
                uint32_t blk = k / LT_QK, j = k % LT_QK;
                uint8_t &byte = w.wq[(size_t)r * kp / 2 + blk * 16 + j % 16];
                byte |= j < 16 ? q : q << 4;
                size_t si = (size_t)r * nb + blk;
                w.deq[(size_t)r * cols + k] = (double)q * __half2float(w.ws[si]) + __half2float(w.wm[si]);
            }
    }
    return w;
}

template <typename V>
static V *upload(const std::vector<V> &v) {
    if (v.empty())
        return nullptr;
    V *d;
    CUDA_OK(cudaMalloc(&d, v.size() * sizeof(V)));
    CUDA_OK(cudaMemcpy(d, v.data(), v.size() * sizeof(V), cudaMemcpyHostToDevice));
    return d;
}

struct dev_weights {
    uint8_t *wq;
    __half *ws, *wm;
    explicit dev_weights(const weights &w) : wq(upload(w.wq)), ws(upload(w.ws)), wm(upload(w.wm)) {}
    ~dev_weights() {
        cudaFree(wq);
        cudaFree(ws);
        cudaFree(wm);
    }
};

static double silu(double v) { return v / (1.0 + std::exp(-v)); }

static lt_step_args *d_step;
static int sms;  /* multiprocessors: launch_gemm picks the row tile */
static int n_fail = 0, n_cases = 0;
static double worst_all = 0.0;  /* largest |err| / bound over all cases */

/* One dispatch: launches k_gemm (directly: T below GEMM_MIN_TOKENS included), checks every output
 * against float64 and that nothing outside the outputs was written. */
#ifndef GEMM_BASELINE
/* Every block shape launch_gemm may pick (GEMM_SHAPES): warps along rows and along tokens (32 rows
 * / tokens each), chunk groups, chunks per group and stage. */
#define LT_WM(WM, WN, KS, CPS) WM,
#define LT_WN(WM, WN, KS, CPS) WN,
#define LT_KS(WM, WN, KS, CPS) KS,
#define LT_CPS(WM, WN, KS, CPS) CPS,
static const int SHAPE_WM[] = {GEMM_SHAPES(LT_WM)}, SHAPE_WN[] = {GEMM_SHAPES(LT_WN)},
                 SHAPE_KS[] = {GEMM_SHAPES(LT_KS)}, SHAPE_CPS[] = {GEMM_SHAPES(LT_CPS)};
static const int N_SHAPES = sizeof SHAPE_WM / sizeof SHAPE_WM[0];

template <int FMT>
static void launch_fmt(int shape, const lt_gemv_args &a, const lt_binds &b, uint32_t T) {
    int i = 0;
#define LT_TRY(WM, WN, KS, CPS)                                                                   \
    if (i++ == shape)                                                                             \
        gemm_launch_fmt<FMT, WM, WN, KS, CPS>(a, b, d_step, T, true, 0);
    GEMM_SHAPES(LT_TRY)
#undef LT_TRY
}

static void launch_shape(uint32_t fmt, int shape, const lt_gemv_args &a, const lt_binds &b, uint32_t T) {
    if (fmt == LT_WF_F16)
        launch_fmt<LT_WF_F16>(shape, a, b, T);
    else if (fmt == LT_WF_Q8)
        launch_fmt<LT_WF_Q8>(shape, a, b, T);
    else
        launch_fmt<LT_WF_Q4>(shape, a, b, T);
}

static void check_case(uint32_t fmt, uint32_t T, uint32_t rows, uint32_t cols, uint32_t flags, bool alias) {
    weights w = make_weights(fmt, rows, cols);
    dev_weights dw(w);
    const bool silu_mul = flags & LT_GEMV_SILU_MUL;
    const uint32_t outs = silu_mul ? rows / 2 : rows;
    lt_gemv_args a = {};
    a.wformat = fmt;
    a.rows = rows;
    a.cols = cols;
    a.flags = flags;
    a.x_stride = (cols + 3) / 4 * 4 + 4;  /* rows of x with a gap, 16-byte aligned */
    a.y_stride = outs + 3;                /* a gap that must stay untouched */
    a.resid_stride = alias ? a.y_stride : outs + 1;
    a.eps = 1e-6f;
    std::vector<float> x((size_t)T * a.x_stride, 1e30f), nw(cols), bias(rows),
        resid((size_t)T * a.resid_stride);
    float xscale = uniform(0.1f, 3.0f);
    for (uint32_t t = 0; t < T; t++)
        for (uint32_t k = 0; k < cols; k++)
            x[(size_t)t * a.x_stride + k] = xscale * randn();
    for (auto &v : nw)
        v = (flags & LT_GEMV_NORM_ADD_ONE) ? 0.1f * randn() : 1.0f + 0.2f * randn();
    for (auto &v : bias)
        v = 0.5f * randn();
    for (auto &v : resid)
        v = randn();
    std::vector<float> y((size_t)T * a.y_stride);
    uint32_t poison;
    memcpy(&poison, "\xff\xff\xc0\x7f", 4);  /* a NaN */
    if (alias)
        y = resid;
    else
        for (auto &v : y)
            memcpy(&v, &poison, 4);

    float *dx = upload(x), *dnw = upload(nw), *dbias = upload(bias), *dy = upload(y);
    float *dres = alias ? dy : upload(resid);
    lt_binds b = {};
    b.p[LT_GEMV_B_X] = dx;
    b.p[LT_GEMV_B_Y] = dy;
    b.p[LT_GEMV_B_WQ] = dw.wq;
    b.p[LT_GEMV_B_WS] = dw.ws;
    b.p[LT_GEMV_B_WM] = dw.wm;
    b.p[LT_GEMV_B_NORM] = (flags & LT_GEMV_NORM) ? dnw : nullptr;
    b.p[LT_GEMV_B_BIAS] = (flags & LT_GEMV_BIAS) ? dbias : nullptr;
    b.p[LT_GEMV_B_RESID] = (flags & LT_GEMV_RESID) ? dres : nullptr;
    /* reference: dot products and their bound 3e-5 * sum |w x'| + 1e-6 in float64 */
    std::vector<double> dot((size_t)T * rows), bound((size_t)T * rows);
#pragma omp parallel for schedule(dynamic)
    for (uint32_t t = 0; t < T; t++) {
        const float *xr = &x[(size_t)t * a.x_stride];
        std::vector<double> xp(cols);
        double ssq = 0.0;
        for (uint32_t k = 0; k < cols; k++)
            ssq += (double)xr[k] * xr[k];
        double rn = (flags & LT_GEMV_NORM) ? 1.0 / std::sqrt(ssq / cols + a.eps) : 1.0;
        for (uint32_t k = 0; k < cols; k++)
            xp[k] = (double)xr[k] * rn
                    * ((flags & LT_GEMV_NORM) ? ((flags & LT_GEMV_NORM_ADD_ONE) ? 1.0 + nw[k] : nw[k]) : 1.0);
        for (uint32_t n = 0; n < rows; n++) {
            const double *wr = &w.deq[(size_t)n * cols];
            double s = 0.0, sa = 0.0;
            for (uint32_t k = 0; k < cols; k++) {
                s += wr[k] * xp[k];
                sa += std::fabs(wr[k] * xp[k]);
            }
            dot[(size_t)t * rows + n] = s + ((flags & LT_GEMV_BIAS) ? bias[n] : 0.0);
            bound[(size_t)t * rows + n] = 3e-5 * sa + 1e-6;
        }
    }
    for (int shape = 0; shape < N_SHAPES; shape++) {  /* every block shape launch_gemm may pick */
        CUDA_OK(cudaMemcpy(dy, y.data(), y.size() * 4, cudaMemcpyHostToDevice));
        launch_shape(fmt, shape, a, b, T);
        CUDA_OK(cudaGetLastError());
        std::vector<float> got(y.size());
        CUDA_OK(cudaMemcpy(got.data(), dy, got.size() * 4, cudaMemcpyDeviceToHost));
        double worst = 0.0;  /* largest |err| / bound */
        long bad = 0, stray = 0;
        for (uint32_t t = 0; t < T; t++) {
            for (uint32_t o = 0; o < outs; o++) {
                double want, lim;
                if (silu_mul) {  /* |silu'| <= 1.1 */
                    double gv = dot[(size_t)t * rows + 2 * o], uv = dot[(size_t)t * rows + 2 * o + 1];
                    want = silu(gv) * uv;
                    lim = 1.1 * std::fabs(uv) * bound[(size_t)t * rows + 2 * o]
                          + std::fabs(silu(gv)) * bound[(size_t)t * rows + 2 * o + 1];
                } else {
                    want = dot[(size_t)t * rows + o];
                    lim = bound[(size_t)t * rows + o];
                }
                if (flags & LT_GEMV_RESID)
                    want += resid[(size_t)t * a.resid_stride + o];
                lim += 1e-6 * std::fabs(want);  /* the f32 rounding of the output itself */
                double g = got[(size_t)t * a.y_stride + o], err = std::fabs(g - want);
                if (!(err <= lim)) {
                    if (bad < 3)
                        fprintf(stderr, "    t=%u o=%u got %.9g want %.9g (bound %.3g)\n", t, o, g, want, lim);
                    bad++;
                }
                worst = std::max(worst, err / lim);
            }
            for (uint32_t o = outs; o < a.y_stride; o++) {  /* the gap: untouched */
                float g = got[(size_t)t * a.y_stride + o];
                if (alias ? g != resid[(size_t)t * a.resid_stride + o] : memcmp(&g, &poison, 4) != 0)
                    stray++;
            }
        }
        bool ok = bad == 0 && stray == 0;
        n_cases++;
        if (!ok)
            n_fail++;
        worst_all = std::max(worst_all, worst);
        if (!ok)  /* passes are counted, failures named */
            printf("FAIL %-3s T=%-3u rows=%-5u cols=%-5u flags=%2u block %d rows x %d tokens x %d groups x %d "
                   "chunks%s  max err/bound %.3f%s\n", FMT_NAME[fmt], T, rows, cols, flags, 32 * SHAPE_WM[shape],
                   32 * SHAPE_WN[shape], SHAPE_KS[shape], SHAPE_CPS[shape],
                   alias ? " (resid = y)" : "", worst,
                   stray ? "  (wrote outside the outputs)" : "  (over the bound)");
    }
    cudaFree(dx);
    cudaFree(dnw);
    cudaFree(dbias);
    cudaFree(dy);
    if (!alias)
        cudaFree(dres);
}

/* A raised error (step.error != 0) leaves y alone; launch_gemm declines what k_gemv must run. */
static void check_error_and_declines() {
    weights w = make_weights(LT_WF_Q8, 64, 64);
    dev_weights dw(w);
    lt_gemv_args a = {LT_WF_Q8, 64, 64, 0, 64, 64, 64, 1e-6f};
    std::vector<float> x(32 * 64, 1.0f), y(32 * 64, 7.0f);
    float *dx = upload(x), *dy = upload(y);
    lt_binds b = {};
    b.p[LT_GEMV_B_X] = dx;
    b.p[LT_GEMV_B_Y] = dy;
    b.p[LT_GEMV_B_WQ] = dw.wq;
    b.p[LT_GEMV_B_WS] = dw.ws;
    uint32_t err = LT_ERR_ARGS;
    CUDA_OK(cudaMemcpy(&d_step->error, &err, 4, cudaMemcpyHostToDevice));
    bool launched = launch_gemm(a, b, d_step, 32, false, sms, true, 0);
    CUDA_OK(cudaDeviceSynchronize());
    std::vector<float> got(y.size());
    CUDA_OK(cudaMemcpy(got.data(), dy, got.size() * 4, cudaMemcpyDeviceToHost));
    err = 0;
    CUDA_OK(cudaMemcpy(&d_step->error, &err, 4, cudaMemcpyHostToDevice));
    bool untouched = got == y;
    lt_gemv_args f32 = a, lm = a;
    f32.wformat = LT_WF_F32;
    bool declines = !launch_gemm(f32, b, d_step, 32, false, sms, true, 0)           /* F32 weights */
                    && !launch_gemm(lm, b, d_step, 32, true, sms, true, 0)          /* last-token LM head */
                    && !launch_gemm(a, b, d_step, GEMM_MIN_TOKENS - 1, false, sms, true, 0);
    lm.flags = LT_GEMV_ALL_TOKENS;
    declines = declines && launch_gemm(lm, b, d_step, 32, true, sms, true, 0);
    CUDA_OK(cudaDeviceSynchronize());
    bool ok = launched && untouched && declines;
    n_cases++;
    n_fail += !ok;
    printf("%s step.error set: y untouched (%s); declines F32 / last-token LM head / T < %d (%s)\n",
           ok ? "ok  " : "FAIL", untouched ? "yes" : "no", GEMM_MIN_TOKENS, declines ? "yes" : "no");
    cudaFree(dx);
    cudaFree(dy);
}

#endif /* GEMM_BASELINE */

/* Median time of 20 launches after warm-up, by launch_gemm (shape -1) or one block shape. */
static double time_launches(const lt_gemv_args &a, const lt_binds &b, uint32_t T, int shape) {
    bool lm = a.flags & LT_GEMV_ALL_TOKENS;
    auto launch = [&]() {
#ifndef GEMM_BASELINE
        if (shape >= 0) {
            launch_shape(a.wformat, shape, a, b, T);
            return true;
        }
#endif
        return launch_gemm(a, b, d_step, T, lm, sms, true, 0);
    };
    cudaEvent_t e0, e1;
    cudaEventCreate(&e0);
    cudaEventCreate(&e1);
    for (int i = 0; i < 3; i++)
        launch();
    std::vector<float> ms;
    for (int i = 0; i < 20; i++) {
        cudaEventRecord(e0);
        bool ok = launch();
        cudaEventRecord(e1);
        CUDA_OK(cudaEventSynchronize(e1));
        if (!ok) {
            fprintf(stderr, "launch_gemm declined rows=%u cols=%u T=%u\n", a.rows, a.cols, T);
            exit(2);
        }
        float m;
        cudaEventElapsedTime(&m, e0, e1);
        ms.push_back(m);
    }
    CUDA_OK(cudaGetLastError());
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    std::sort(ms.begin(), ms.end());
    return (ms[9] + ms[10]) / 2;
}

/* One shape's timings: launch_gemm's pick (ms, TFLOP/s over 2 T rows cols) and, unless
 * GEMM_BASELINE, every block shape's ms. */
static void time_case(const char *name, uint32_t fmt, uint32_t T, uint32_t rows, uint32_t cols, uint32_t flags) {
    uint32_t nb = (cols + 31) / 32, kp = nb * 32;
    size_t wbytes = fmt == LT_WF_F16 ? (size_t)rows * cols * 2 : fmt == LT_WF_Q8 ? (size_t)rows * kp : (size_t)rows * kp / 2;
    size_t sbytes = fmt == LT_WF_F16 ? 0 : (size_t)rows * nb * 2;
    uint32_t outs = (flags & LT_GEMV_SILU_MUL) ? rows / 2 : rows;
    uint8_t *wq;
    __half *ws = nullptr, *wm = nullptr;
    float *x, *y, *nw, *bias;
    CUDA_OK(cudaMalloc(&wq, wbytes));
    CUDA_OK(cudaMemset(wq, 0x11, wbytes));
    if (sbytes) {
        std::vector<__half> s((size_t)rows * nb, __float2half(0.01f));
        ws = upload(s);
        wm = upload(s);
    }
    std::vector<float> hx((size_t)T * cols), hn(cols, 1.0f), hb(rows, 0.0f);
    for (auto &v : hx)
        v = randn();
    x = upload(hx);
    nw = upload(hn);
    bias = upload(hb);
    CUDA_OK(cudaMalloc(&y, (size_t)T * outs * 4));
    CUDA_OK(cudaMemset(y, 0, (size_t)T * outs * 4));
    lt_gemv_args a = {fmt, rows, cols, flags, cols, outs, outs, 1e-6f};
    lt_binds b = {};
    b.p[LT_GEMV_B_X] = x;
    b.p[LT_GEMV_B_Y] = y;
    b.p[LT_GEMV_B_WQ] = wq;
    b.p[LT_GEMV_B_WS] = ws;
    b.p[LT_GEMV_B_WM] = wm;
    b.p[LT_GEMV_B_NORM] = nw;
    b.p[LT_GEMV_B_BIAS] = bias;
    b.p[LT_GEMV_B_RESID] = y;
    double ms = time_launches(a, b, T, -1);
    printf("%-20s %-4s %4u %7u %5u %9.4f %8.2f", name, FMT_NAME[fmt], T, rows, cols, ms, 2.0 * T * rows * cols / (ms * 1e9));
#ifndef GEMM_BASELINE
    for (int shape = 0; shape < N_SHAPES; shape++)
        printf(" %9.4f", time_launches(a, b, T, shape));
#endif
    printf("\n");
    fflush(stdout);
    cudaFree(wq);
    cudaFree(ws);
    cudaFree(wm);
    cudaFree(x);
    cudaFree(y);
    cudaFree(nw);
    cudaFree(bias);
}

int main(int argc, char **argv) {
#ifdef GEMM_BASELINE
    const bool timings_only = true;
    printf("baseline: %s\n", GEMM_BASELINE);
#else
    const bool timings_only = argc > 1 && !strcmp(argv[1], "--time");
#endif
    cudaDeviceProp prop;
    CUDA_OK(cudaGetDeviceProperties(&prop, 0));
    printf("device: %s (sm_%d%d, %d SMs)\n", prop.name, prop.major, prop.minor, prop.multiProcessorCount);
    sms = prop.multiProcessorCount;
    gemm_set_smem();
    CUDA_OK(cudaMalloc(&d_step, sizeof(lt_step_args)));
    CUDA_OK(cudaMemset(d_step, 0, sizeof(lt_step_args)));

#ifndef GEMM_BASELINE
    if (!timings_only) {
        const uint32_t fmts[] = {LT_WF_F16, LT_WF_Q8, LT_WF_Q4};
        const uint32_t all_flags[] = {0,
                                      LT_GEMV_NORM,
                                      LT_GEMV_NORM | LT_GEMV_NORM_ADD_ONE,
                                      LT_GEMV_BIAS,
                                      LT_GEMV_SILU_MUL,
                                      LT_GEMV_BIAS | LT_GEMV_SILU_MUL,
                                      LT_GEMV_RESID,
                                      LT_GEMV_NORM | LT_GEMV_BIAS | LT_GEMV_RESID,
                                      LT_GEMV_NORM | LT_GEMV_NORM_ADD_ONE | LT_GEMV_BIAS | LT_GEMV_SILU_MUL | LT_GEMV_RESID,
                                      LT_GEMV_ALL_TOKENS};
        /* every flag combination at one odd size, resid aliasing y too */
        for (uint32_t fmt : fmts) {
            for (uint32_t fl : all_flags)
                check_case(fmt, 17, 300, 576, fl, false);
            check_case(fmt, 17, 300, 576, LT_GEMV_RESID, true);
            check_case(fmt, 70, 36, 1000, LT_GEMV_NORM | LT_GEMV_SILU_MUL | LT_GEMV_RESID, true);
        }
        /* the sizes, one flag combination each in turn */
        const uint32_t Ts[] = {5, 17, 64, 300}, rowss[] = {36, 300, 4096 + 7}, colss[] = {96, 576, 1000, 3584};
        int i = 0;
        for (uint32_t fmt : fmts)
            for (uint32_t T : Ts)
                for (uint32_t rows : rowss)
                    for (uint32_t cols : colss) {
                        uint32_t fl = all_flags[i++ % 10];
                        uint32_t even = (fl & LT_GEMV_SILU_MUL) ? rows & 1 : 0;  /* gate/up pairs */
                        check_case(fmt, T, rows + even, cols, fl, false);
                    }
        /* columns not a multiple of the quant block or of 4 */
        check_case(LT_WF_Q8, 33, 130, 37, LT_GEMV_NORM | LT_GEMV_BIAS, false);
        check_case(LT_WF_Q4, 33, 130, 37, LT_GEMV_NORM, false);
        check_case(LT_WF_Q8, 9, 64, 1, 0, false);
        check_case(LT_WF_F16, 65, 130, 40, LT_GEMV_NORM | LT_GEMV_NORM_ADD_ONE, false);
        check_error_and_declines();
        printf("\ncorrectness: %d of %d cases passed (formats f16 q8 q4 x flags x sizes x block "
               "shapes); largest |err| / bound %.4f\n\n", n_cases - n_fail, n_cases, worst_all);
    }
#endif

    /* Q8 unless named: Qwen3.5-0.8B (hidden 1024) and SmolLM2-135M (hidden 576) prefill shapes */
    const uint32_t NORM1 = LT_GEMV_NORM | LT_GEMV_NORM_ADD_ONE, GU = LT_GEMV_NORM | LT_GEMV_SILU_MUL;
    printf("%-20s %-4s %4s %7s %5s %9s %8s  (ms of each block shape, GEMM_SHAPES order)\n", "shape", "fmt", "T",
           "rows", "cols", "ms", "TFLOP/s");
    for (uint32_t T : {256u, 512u}) {
        time_case("qwen in_proj + norm", LT_WF_Q8, T, 8224, 1024, NORM1);
        time_case("qwen gate_up", LT_WF_Q8, T, 7168, 1024, GU);
        time_case("qwen qkv-like", LT_WF_Q8, T, 6144, 1024, NORM1);
        time_case("qwen out_proj + res", LT_WF_Q8, T, 1024, 2048, LT_GEMV_RESID);
        time_case("qwen down + res", LT_WF_Q8, T, 1024, 3584, LT_GEMV_RESID);
        time_case("smol qkv", LT_WF_Q8, T, 960, 576, LT_GEMV_NORM);
        time_case("smol o + res", LT_WF_Q8, T, 576, 576, LT_GEMV_RESID);
        time_case("smol gate_up", LT_WF_Q8, T, 3072, 576, GU);
        time_case("smol down + res", LT_WF_Q8, T, 576, 1536, LT_GEMV_RESID);
    }
    time_case("qwen in_proj q4", LT_WF_Q4, 256, 8224, 1024, LT_GEMV_NORM);
    time_case("qwen in_proj f16", LT_WF_F16, 256, 8224, 1024, LT_GEMV_NORM);
    time_case("smol gate_up q4", LT_WF_Q4, 256, 3072, 576, GU);
    time_case("qwen in_proj T=64", LT_WF_Q8, 64, 8224, 1024, NORM1);
    time_case("qwen down T=64", LT_WF_Q8, 64, 1024, 3584, LT_GEMV_RESID);
    time_case("qwen lm_head all", LT_WF_Q8, 256, 248320, 1024, LT_GEMV_NORM | LT_GEMV_ALL_TOKENS);
    return n_fail ? 1 : 0;
}
