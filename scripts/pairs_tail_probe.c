/* Pair-packed f32 weights with a half block for the rows past the whole blocks of 8: is the
 * padding of `bcast_pairs` (crates/cpu/src/avx512.rs) worth a new weight layout on this CPU?
 * 1 GiB of weights (DRAM), split between the OpenMP threads, rows of K 2048, 8 weight rows at a
 * time. Variants, alternated in turn REPS rounds (default 9); `L2=1` reads the same 8 rows every
 * time (from L2: the loop without DRAM):
 *   pad  weights as stored, 3 blocks of 8 input rows (the third padded when an expert has 17-20
 *        rows), the kernel's prefetch (each row 512 bytes ahead into L2): 24 FMAs a step
 *   pk3  weights pair-packed [cols/8][k/2][8][2] (one line a step, prefetched 8 KiB ahead), 3 blocks
 *   pkt  pair-packed, 2 blocks and a half block of 4 rows: per 2 weight rows one 16-byte broadcast
 *        [pair of row c, pair of row c+1] x 4 against inputs [r0 r0 r1 r1 r2 r2 r3 r3] (pairs),
 *        the same summation order as the blocks: 20 FMAs a step instead of 24
 *   pk2  pair-packed, 2 blocks only (16 rows: the floor)
 * Prints ms per pass over the weights, then the medians of the per-round time ratios against pad.
 *   gcc -O3 -march=native -fopenmp scripts/pairs_tail_probe.c -o /tmp/pt && REPS=15 /tmp/pt */
#define _GNU_SOURCE
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#define C 8
#define K 2048
#define ST (K / 2)
enum { PAD, PK3, PKT, PK2, NV };
static const char *names[] = {"pad", "pk3", "pkt", "pk2"};
static int l2only;
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
static inline __m512 pair(const float *p) { return _mm512_castpd_ps(_mm512_set1_pd(*(const double *)p)); }
static inline __m512 quad(const float *p) { return _mm512_broadcast_f32x4(_mm_loadu_ps(p)); }
#define FIN(NBX) { __m512 sum = _mm512_setzero_ps(); for (int n = 0; n < NBX; n++) for (int b = 0; b < C; b++) sum = _mm512_add_ps(sum, acc[n][b]); tot += _mm512_reduce_add_ps(sum); }
__attribute__((noinline)) static float run_pad(const float *w, size_t rows, const float *xt) {
  float tot = 0;
  for (size_t c = 0; c < rows; c += C) {
    const float *w0 = w + (l2only ? 0 : c * K); __m512 acc[3][C];
    for (int n = 0; n < 3; n++) for (int b = 0; b < C; b++) acc[n][b] = _mm512_setzero_ps();
    for (size_t s = 0; s < ST; s++) {
      __m512 xv[3]; for (int n = 0; n < 3; n++) xv[n] = _mm512_loadu_ps(xt + (n * ST + s) * 16);
      if (s % 8 == 0) { size_t at = 2 * s + 128, skip = at < K ? 0 : (C - 1) * K;
        for (int b = 0; b < C; b++) _mm_prefetch((const char *)(w0 + b * K + at + skip), _MM_HINT_T1); }
#pragma GCC unroll 8
      for (int b = 0; b < C; b++) { __m512 wv = pair(w0 + b * K + 2 * s);
        for (int n = 0; n < 3; n++) acc[n][b] = _mm512_fmadd_ps(xv[n], wv, acc[n][b]); }
    }
    FIN(3)
  }
  return tot;
}
#define PKN(NAME, NBX) __attribute__((noinline)) static float NAME(const float *w, size_t rows, const float *xt) { \
  float tot = 0; \
  for (size_t c = 0; c < rows; c += C) { \
    const float *w0 = w + (l2only ? 0 : c * K); __m512 acc[NBX][C]; \
    for (int n = 0; n < NBX; n++) for (int b = 0; b < C; b++) acc[n][b] = _mm512_setzero_ps(); \
    for (size_t s = 0; s < ST; s++) { \
      __m512 xv[NBX]; for (int n = 0; n < NBX; n++) xv[n] = _mm512_loadu_ps(xt + (n * ST + s) * 16); \
      _mm_prefetch((const char *)(w0 + s * C * 2) + 8192, _MM_HINT_T1); \
      _Pragma("GCC unroll 8") for (int b = 0; b < C; b++) { __m512 wv = pair(w0 + s * C * 2 + 2 * b); \
        for (int n = 0; n < NBX; n++) acc[n][b] = _mm512_fmadd_ps(xv[n], wv, acc[n][b]); } \
    } \
    FIN(NBX) \
  } \
  return tot; }
PKN(run_pk3, 3)
PKN(run_pk2, 2)
__attribute__((noinline)) static float run_pkt(const float *w, size_t rows, const float *xt) {
  float tot = 0;
  for (size_t c = 0; c < rows; c += C) {
    const float *w0 = w + (l2only ? 0 : c * K); __m512 acc[2][C], at[C / 2];
    for (int n = 0; n < 2; n++) for (int b = 0; b < C; b++) acc[n][b] = _mm512_setzero_ps();
    for (int b = 0; b < C / 2; b++) at[b] = _mm512_setzero_ps();
    for (size_t s = 0; s < ST; s++) {
      __m512 xv[2]; for (int n = 0; n < 2; n++) xv[n] = _mm512_loadu_ps(xt + (n * ST + s) * 16);
      __m512 xq = _mm512_loadu_ps(xt + (2 * ST + s) * 16);
      const float *ws = w0 + s * C * 2;
      _mm_prefetch((const char *)ws + 8192, _MM_HINT_T1);
#pragma GCC unroll 4
      for (int b = 0; b < C; b += 2) {
        __m512 w0v = pair(ws + 2 * b), w1v = pair(ws + 2 * b + 2), wq = quad(ws + 2 * b);
        for (int n = 0; n < 2; n++) { acc[n][b] = _mm512_fmadd_ps(xv[n], w0v, acc[n][b]); acc[n][b + 1] = _mm512_fmadd_ps(xv[n], w1v, acc[n][b + 1]); }
        at[b / 2] = _mm512_fmadd_ps(xq, wq, at[b / 2]);
      }
    }
    FIN(2)
    for (int b = 0; b < C / 2; b++) tot += _mm512_reduce_add_ps(at[b]);
  }
  return tot;
}
static int cmp(const void *a, const void *b) { double x = *(const double *)a, y = *(const double *)b; return x < y ? -1 : x > y; }
int main(void) {
  size_t n = (size_t)1 << 30;
  char *a = aligned_alloc(2 << 20, n);
  madvise(a, n, MADV_HUGEPAGE);
  memset(a, 0x3c, n);
  l2only = getenv("L2") != 0;
  int reps = getenv("REPS") ? atoi(getenv("REPS")) : 9;
  double *t = calloc(NV * reps, sizeof(double));
  for (int rep = 0; rep < reps; rep++) {
    for (int m = 0; m < NV; m++) {
      double t0 = now(); float tot = 0;
#pragma omp parallel reduction(+ : tot)
      {
        int id = omp_get_thread_num(), nt = omp_get_num_threads();
        float *xt = aligned_alloc(64, 3 * ST * 16 * 4);
        for (int i = 0; i < 3 * ST * 16; i++) xt[i] = 1e-3f;
        size_t chunk = n / nt; const float *w = (const float *)(a + id * chunk); size_t rows = chunk / 4 / K;
        tot += m == PAD ? run_pad(w, rows, xt) : m == PK3 ? run_pk3(w, rows, xt) : m == PKT ? run_pkt(w, rows, xt) : run_pk2(w, rows, xt);
        free(xt);
      }
      t[m * reps + rep] = (now() - t0) * 1e3;
      printf("%s %6.1f ms  ", names[m], t[m * reps + rep]); (void)tot;
    }
    printf("\n");
  }
  /* medians of the per-round ratios against pad */
  for (int m = 1; m < NV; m++) { double r[64]; for (int i = 0; i < reps; i++) r[i] = t[m * reps + i] / t[i]; qsort(r, reps, 8, cmp);
    printf("%s/pad median %.3f (q1 %.3f q3 %.3f)\n", names[m], r[reps / 2], r[reps / 4], r[3 * reps / 4]); }
}
