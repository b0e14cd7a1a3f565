/* GDN prefill on one GPU: the decode kernels run over T tokens, one launch per token (the
 * pre-prefill-path baseline) against the prefill path (k_gdn_prep, k_gdn_scan<R, G>, k_gdn_out) for several lane
 * group sizes G; same inputs, outputs compared, times from CUDA events.
 *   nvcc -O3 -arch=sm_90 -std=c++17 tests/gpu/gdn_prefill_bench.cu -o /tmp/gdn_bench && /tmp/gdn_bench */
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "../../lattice/cuda/kernels.cuh"

#define CK(x)                                                                         \
    do {                                                                              \
        cudaError_t e_ = (x);                                                         \
        if (e_ != cudaSuccess) {                                                      \
            printf("%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
            exit(1);                                                                  \
        }                                                                             \
    } while (0)

static float *upload(const std::vector<float> &h) {
    float *d;
    CK(cudaMalloc(&d, h.size() * 4));
    CK(cudaMemcpy(d, h.data(), h.size() * 4, cudaMemcpyHostToDevice));
    return d;
}
static std::vector<float> rnd(size_t n, float scale, unsigned &seed) {
    std::vector<float> v(n);
    for (auto &x : v) {
        seed = seed * 1664525u + 1013904223u;
        x = ((seed >> 8) / 16777216.0f * 2 - 1) * scale;
    }
    return v;
}
static std::vector<float> download(const float *d, size_t n) {
    std::vector<float> h(n);
    CK(cudaMemcpy(h.data(), d, n * 4, cudaMemcpyDeviceToHost));
    return h;
}
static double rel_err(const std::vector<float> &a, const std::vector<float> &b) {
    double m = 0, e = 0;
    for (size_t i = 0; i < a.size(); i++) {
        m = fmax(m, fabs(a[i]));
        e = fmax(e, fabs(a[i] - b[i]));
    }
    return e / m;
}

struct Case {
    uint32_t Hk, Hv, Dk, Dv, T;
};

template <int R, int G>
static void run_new(lt_gdn_args a, lt_binds b, lt_step_args *st, uint32_t T, float *ws) {
    k_gdn_prep<<<dim3(2 * a.n_k_heads + a.n_v_heads, T), GDN_PREP_THREADS>>>(a, b, st, T, ws);
    k_gdn_scan<R, G><<<dim3((a.v_dim + GDN_SCAN_COLS - 1) / GDN_SCAN_COLS, a.n_v_heads), GDN_SCAN_COLS * G>>>(
        a, b, st, T, ws);
    k_gdn_out<<<dim3(a.n_v_heads, T), GDN_OUT_THREADS>>>(a, b, st, T, ws);
}
/* the decode kernels, one token at a time (their binds moved to token t's rows), as backend.cu
 * launches them without the GEMV fusions: conv, recurrence, gated norm */
template <int R>
static void run_decode(lt_gdn_args a, lt_binds bt, lt_step_args *st, const float *conv) {
    k_gdn_decode<R, true><<<dim3(a.n_v_heads, gdn_col_blocks(a)), GDN_WARPS * 32>>>(a, bt, st, conv, 0, nullptr);
}
static void run_old(lt_gdn_args a, lt_binds b, lt_step_args *st, uint32_t T, float *conv) {
    const uint32_t R = (a.k_dim + gdn_row_lanes(a.k_dim) - 1) / gdn_row_lanes(a.k_dim);
    for (uint32_t t = 0; t < T; t++) {
        lt_binds bt = b;
        bt.p[LT_GDN_B_X] = (float *)b.p[LT_GDN_B_X] + (size_t)t * a.x_stride;
        bt.p[LT_GDN_B_Z] = (float *)b.p[LT_GDN_B_Z] + (size_t)t * a.z_stride;
        bt.p[LT_GDN_B_A] = (float *)b.p[LT_GDN_B_A] + (size_t)t * a.a_stride;
        bt.p[LT_GDN_B_B] = (float *)b.p[LT_GDN_B_B] + (size_t)t * a.b_stride;
        bt.p[LT_GDN_B_OUT] = (float *)b.p[LT_GDN_B_OUT] + (size_t)t * a.out_stride;
        k_gdn_conv<<<(a.channels + 255) / 256, 256>>>(a, bt, st, 1, conv);
        if (R <= 2)
            run_decode<2>(a, bt, st, conv);
        else if (R <= 4)
            run_decode<4>(a, bt, st, conv);
        else if (R <= 8)
            run_decode<8>(a, bt, st, conv);
        else
            run_decode<16>(a, bt, st, conv);
        k_gdn_norm<<<a.n_v_heads, 128>>>(a, bt, st);
    }
}

int main() {
    Case cases[] = {{16, 16, 128, 128, 64}, {16, 32, 128, 128, 64}, {16, 16, 128, 128, 512}, {4, 8, 256, 128, 64}};
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    for (Case cs : cases) {
        unsigned seed = 1234;
        uint32_t K = 4, C = 2 * cs.Hk * cs.Dk + cs.Hv * cs.Dv, T = cs.T;
        lt_gdn_args a = {cs.Hk, cs.Hv, cs.Dk, cs.Dv, K, C, 0, cs.Hk * cs.Dk, 2 * cs.Hk * cs.Dk, C, cs.Hv * cs.Dv,
                         cs.Hv, cs.Hv, cs.Hv * cs.Dv, 1e-6f, 0};
        auto S0 = rnd((size_t)cs.Hv * cs.Dk * cs.Dv, 0.1f, seed), cs0 = rnd((size_t)(K - 1) * C, 1, seed);
        lt_binds b = {};
        b.p[LT_GDN_B_X] = upload(rnd((size_t)T * C, 1, seed));
        b.p[LT_GDN_B_Z] = upload(rnd((size_t)T * cs.Hv * cs.Dv, 1, seed));
        b.p[LT_GDN_B_A] = upload(rnd((size_t)T * cs.Hv, 1, seed));
        b.p[LT_GDN_B_B] = upload(rnd((size_t)T * cs.Hv, 1, seed));
        float *out = upload(std::vector<float>((size_t)T * cs.Hv * cs.Dv));
        b.p[LT_GDN_B_OUT] = out;
        b.p[LT_GDN_B_CONV_W] = upload(rnd((size_t)C * K, 0.5f, seed));
        float *cstate = upload(cs0), *S = upload(S0);
        b.p[LT_GDN_B_CONV_STATE] = cstate;
        b.p[LT_GDN_B_A_LOG] = upload(rnd(cs.Hv, 0.5f, seed));
        b.p[LT_GDN_B_DT_BIAS] = upload(rnd(cs.Hv, 1, seed));
        b.p[LT_GDN_B_S] = S;
        b.p[LT_GDN_B_NORM_W] = upload(rnd(cs.Dv, 1, seed));
        lt_step_args *st;
        CK(cudaMalloc(&st, sizeof(lt_step_args)));
        CK(cudaMemset(st, 0, sizeof(lt_step_args)));
        float *ws;
        size_t wsf = gdn_prefill_floats(a, T);
        CK(cudaMalloc(&ws, wsf * 4));
        auto reset = [&] {
            CK(cudaMemcpy(S, S0.data(), S0.size() * 4, cudaMemcpyHostToDevice));
            CK(cudaMemcpy(cstate, cs0.data(), cs0.size() * 4, cudaMemcpyHostToDevice));
        };
        auto timed = [&](auto f) {
            f();
            CK(cudaDeviceSynchronize());
            const int n = 20;
            CK(cudaEventRecord(e0));
            for (int i = 0; i < n; i++)
                f();
            CK(cudaEventRecord(e1));
            CK(cudaEventSynchronize(e1));
            float ms;
            CK(cudaEventElapsedTime(&ms, e0, e1));
            return ms * 1000 / n;
        };
        printf("Hk=%u Hv=%u Dk=%u Dv=%u T=%u\n", cs.Hk, cs.Hv, cs.Dk, cs.Dv, T);
        reset();
        run_old(a, b, st, T, ws);
        CK(cudaDeviceSynchronize());
        auto o_ref = download(out, (size_t)T * cs.Hv * cs.Dv), S_ref = download(S, S0.size()),
             c_ref = download(cstate, cs0.size());
        printf("  old (decode kernels over T)  %9.1f us\n", timed([&] { run_old(a, b, st, T, ws); }));
        auto check = [&](const char *name, auto f) {
            reset();
            CK(cudaMemset(out, 0, (size_t)T * cs.Hv * cs.Dv * 4));
            f();
            CK(cudaGetLastError());
            CK(cudaDeviceSynchronize());
            double eo = rel_err(o_ref, download(out, o_ref.size())), es = rel_err(S_ref, download(S, S_ref.size())),
                   ec = rel_err(c_ref, download(cstate, c_ref.size()));
            printf("  %-28s %9.1f us   err out %.1e S %.1e conv %.1e\n", name, timed(f), eo, es, ec);
        };
        if (cs.Dk == 128) {
            check("new G=32 R=4", [&] { run_new<4, 32>(a, b, st, T, ws); });
            check("new G=16 R=8", [&] { run_new<8, 16>(a, b, st, T, ws); });
            check("new G=8 R=16", [&] { run_new<16, 8>(a, b, st, T, ws); });
            dim3 grid((a.v_dim + GDN_SCAN_COLS - 1) / GDN_SCAN_COLS, a.n_v_heads);
            printf("  prep only                    %9.1f us\n", timed([&] {
                k_gdn_prep<<<dim3(2 * a.n_k_heads + a.n_v_heads, T), GDN_PREP_THREADS>>>(a, b, st, T, ws); }));
            printf("  scan only G=32               %9.1f us\n", timed([&] {
                k_gdn_scan<4, 32><<<grid, GDN_SCAN_COLS * 32>>>(a, b, st, T, ws); }));
            printf("  scan only G=16               %9.1f us\n", timed([&] {
                k_gdn_scan<8, 16><<<grid, GDN_SCAN_COLS * 16>>>(a, b, st, T, ws); }));
            printf("  scan only G=8                %9.1f us\n", timed([&] {
                k_gdn_scan<16, 8><<<grid, GDN_SCAN_COLS * 8>>>(a, b, st, T, ws); }));
            printf("  out only                     %9.1f us\n", timed([&] {
                k_gdn_out<<<dim3(a.n_v_heads, T), GDN_OUT_THREADS>>>(a, b, st, T, ws); }));
        } else {
            check("new G=32 R=8", [&] { run_new<8, 32>(a, b, st, T, ws); });
            check("new G=16 R=16", [&] { run_new<16, 16>(a, b, st, T, ws); });
        }
    }
    return 0;
}
