/* The inner loop of the CPU backend's f32 k-pair broadcast kernel (crates/cpu/src/avx512.rs,
 * `pairs_block` at three blocks of 8 input rows against 8 weight rows, the shape most experts take
 * at 256 tokens of qwen3-30b-a3b), in C, over 1 GiB of weights split between the OpenMP threads:
 * per step the three interleaved input vectors (from L2, 192 KiB) and one broadcast pair of each
 * weight row, 24 FMAs. Variants, named on the command line and run in turn, REPS rounds:
 *   rows    weight rows as stored, 8 KiB apart (what the kernel reads), hardware prefetch only
 *   rowspf  the same with the kernel's prefetch: each row 512 bytes ahead into L2, once a line
 *   l2      rows as stored, but always the same 8 rows (64 KiB, from L2): the loop without DRAM
 *   packed  each block of 8 rows stored [k/2][8][2]: one cache line a step, one stream, each
 *           line prefetched into L2 8 KiB ahead
 * Prints GB/s of weights and GFLOP/s; compare variants within a round (the host drifts).
 *   gcc -O3 -march=native -fopenmp scripts/pairs_probe.c -o /tmp/pp && REPS=10 /tmp/pp rows packed l2 */
#define _GNU_SOURCE
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#define C 8
#define NB 3
#define K 2048
#define ST (K / 2)
enum { ROWS, ROWSPF, L2, PACKED };
static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}
static __m512 pair(const float *p) { return _mm512_castpd_ps(_mm512_set1_pd(*(const double *)p)); }
static float run(const float *w, size_t rows, int mode, const float *xt) {
  float tot = 0;
  for (size_t c = 0; c < rows; c += C) {
    const float *w0 = mode == L2 ? w : w + c * K;
    __m512 acc[NB][C];
    for (int n = 0; n < NB; n++)
      for (int b = 0; b < C; b++) acc[n][b] = _mm512_setzero_ps();
    for (size_t s = 0; s < ST; s++) {
      __m512 xv[NB];
      for (int n = 0; n < NB; n++) xv[n] = _mm512_loadu_ps(xt + (n * ST + s) * 16);
      if (mode == PACKED) {
        _mm_prefetch((const char *)(w0 + s * C * 2) + 8192, _MM_HINT_T1);
#pragma GCC unroll 8
        for (int b = 0; b < C; b++) {
          __m512 wv = pair(w0 + s * C * 2 + 2 * b);
          for (int n = 0; n < NB; n++) acc[n][b] = _mm512_fmadd_ps(xv[n], wv, acc[n][b]);
        }
      } else {
        if (mode == ROWSPF && s % 8 == 0) {
          size_t at = 2 * s + 128, skip = at < K ? 0 : (C - 1) * K;
          for (int b = 0; b < C; b++) _mm_prefetch((const char *)(w0 + b * K + at + skip), _MM_HINT_T1);
        }
#pragma GCC unroll 8
        for (int b = 0; b < C; b++) {
          __m512 wv = pair(w0 + b * K + 2 * s);
          for (int n = 0; n < NB; n++) acc[n][b] = _mm512_fmadd_ps(xv[n], wv, acc[n][b]);
        }
      }
    }
    __m512 sum = _mm512_setzero_ps();
    for (int n = 0; n < NB; n++)
      for (int b = 0; b < C; b++) sum = _mm512_add_ps(sum, acc[n][b]);
    tot += _mm512_reduce_add_ps(sum);
  }
  return tot;
}
int main(int argc, char **argv) {
  static const char *names[] = {"rows", "rowspf", "l2", "packed"};
  size_t n = (size_t)1 << 30;
  char *a = aligned_alloc(2 << 20, n);
  madvise(a, n, MADV_HUGEPAGE);
  memset(a, 0x3c, n); /* 0x3c3c3c3c: a normal float (denormals would time microcode assists) */
  int reps = getenv("REPS") ? atoi(getenv("REPS")) : 3;
  for (int rep = 0; rep < reps; rep++) {
    for (int m = 1; m < argc; m++) {
      int mode = -1;
      for (int i = 0; i < 4; i++)
        if (!strcmp(argv[m], names[i])) mode = i;
      if (mode < 0) {
        fprintf(stderr, "variant %s: expected rows, rowspf, l2 or packed\n", argv[m]);
        return 2;
      }
      double t0 = now();
      float tot = 0;
#pragma omp parallel reduction(+ : tot)
      {
        int id = omp_get_thread_num(), nt = omp_get_num_threads();
        float *xt = aligned_alloc(64, NB * ST * 16 * 4);
        for (int i = 0; i < NB * ST * 16; i++) xt[i] = 1e-3f;
        size_t chunk = n / nt;
        tot += run((const float *)(a + id * chunk), chunk / 4 / K, mode, xt);
        free(xt);
      }
      double t = now() - t0;
      printf("%-7s %5.1f GB/s %4.0f GFLOP/s  ", names[mode], n / t / 1e9, n / 4.0 * NB * 8 * 2 / t / 1e9);
      (void)tot;
    }
    printf("\n");
  }
}
