/* Selected-entry gradient of a Linear whose rows carry K trainable entries, in one pass:
 *
 *     out[k, r] += sum_{m0 <= m < m1} x[m, idx[k, r]] * g[m, r]
 *
 * x: (M, C) saved input rows (row stride ldx), g: (M, R) output gradient (row stride ldg),
 * idx: (K, R) int32 columns of x, out: (K, R) accumulator, tmp: (K, R) scratch; when bias is
 * not NULL it also accumulates the column sums of g (the bias gradient) with scratch btmp (R).
 * Each position row m streams g once while x's row stays in L1; positions are summed in
 * blocks of BLOCK into tmp and then into out (two-level summation keeps fp32 error at about
 * (BLOCK + M / BLOCK) ulps instead of M). Compiled and loaded by gps_ds/sparse/native.py.
 */
#include <stdint.h>
#include <string.h>

#define BLOCK 128

#define FUSED_GATHER(NAME, T)                                                                  \
    void NAME(const T *restrict x, int64_t ldx, const T *restrict g, int64_t ldg,             \
              const int32_t *restrict idx, int64_t R, int64_t K, int64_t m0, int64_t m1,      \
              T *restrict out, T *restrict tmp, T *restrict bias, T *restrict btmp) {         \
        for (int64_t b0 = m0; b0 < m1; b0 += BLOCK) {                                         \
            int64_t b1 = b0 + BLOCK < m1 ? b0 + BLOCK : m1;                                   \
            memset(tmp, 0, sizeof(T) * (size_t)(R * K));                                      \
            if (bias) memset(btmp, 0, sizeof(T) * (size_t)R);                                 \
            for (int64_t m = b0; m < b1; ++m) {                                               \
                const T *restrict xr = x + m * ldx;                                           \
                const T *restrict gr = g + m * ldg;                                           \
                for (int64_t k = 0; k < K; ++k) {                                             \
                    const int32_t *restrict ik = idx + k * R;                                 \
                    T *restrict tk = tmp + k * R;                                             \
                    for (int64_t r = 0; r < R; ++r) tk[r] += xr[ik[r]] * gr[r];               \
                }                                                                             \
                if (bias)                                                                     \
                    for (int64_t r = 0; r < R; ++r) btmp[r] += gr[r];                         \
            }                                                                                 \
            for (int64_t i = 0; i < R * K; ++i) out[i] += tmp[i];                             \
            if (bias)                                                                         \
                for (int64_t r = 0; r < R; ++r) bias[r] += btmp[r];                           \
        }                                                                                     \
    }

FUSED_GATHER(gps_fused_gather_f32, float)
FUSED_GATHER(gps_fused_gather_f64, double)

int gps_fused_gather_abi(void) { return 2; }
