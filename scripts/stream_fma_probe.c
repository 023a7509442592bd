/* What a core pulls from memory while it computes: OpenMP threads stream 1 GiB (huge pages
 * advised), each 64-byte line loaded once and multiplied into F of 24 accumulators (F FMAs a line:
 * 16 is f32 gate/up at 16 rows an expert, 24 at 24 rows), optionally each line prefetched into L2
 * AHEAD bytes ahead. Prints GB/s and GFLOP/s for F in 8, 16, 24, 32, 48.
 *   gcc -O3 -march=native -fopenmp scripts/stream_fma_probe.c -o /tmp/sf && /tmp/sf F [AHEAD] */
#define _GNU_SOURCE
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}
#define KERNEL(F)                                                                      \
  for (size_t i = 0; i < chunk; i += 64) {                                             \
    if (pf) _mm_prefetch(p + i + pf, _MM_HINT_T1);                                     \
    __m512 w = _mm512_load_ps((const float *)(p + i));                                 \
    _Pragma("GCC unroll 64") for (int j = 0; j < F; j++) acc[j % 24] =                 \
        _mm512_fmadd_ps(w, x[j % 4], acc[j % 24]);                                     \
  }
int main(int argc, char **argv) {
  size_t n = (size_t)1 << 30;
  char *a = aligned_alloc(2 << 20, n);
  madvise(a, n, MADV_HUGEPAGE);
  memset(a, 0x3c, n); /* a normal float: denormals would time microcode assists */
  int F = argc > 1 ? atoi(argv[1]) : 24, pf = argc > 2 ? atoi(argv[2]) : 0;
  if (F != 8 && F != 16 && F != 24 && F != 32 && F != 48) {
    fprintf(stderr, "F %d: expected 8, 16, 24, 32 or 48\n", F);
    return 2;
  }
  for (int rep = 0; rep < 4; rep++) {
    double t0 = now();
    float tot = 0;
#pragma omp parallel reduction(+ : tot)
    {
      int id = omp_get_thread_num(), nt = omp_get_num_threads();
      size_t chunk = n / nt;
      const char *p = a + id * chunk;
      __m512 acc[24], x[4];
      for (int j = 0; j < 24; j++) acc[j] = _mm512_setzero_ps();
      for (int j = 0; j < 4; j++) x[j] = _mm512_set1_ps(1e-3f * (j + 1));
      switch (F) {
      case 8: KERNEL(8); break;
      case 16: KERNEL(16); break;
      case 24: KERNEL(24); break;
      case 32: KERNEL(32); break;
      default: KERNEL(48); break;
      }
      __m512 s = acc[0];
      for (int j = 1; j < 24; j++) s = _mm512_add_ps(s, acc[j]);
      tot += _mm512_reduce_add_ps(s);
    }
    double t = now() - t0;
    printf("F=%d ahead=%d: %.1f GB/s, %.0f GFLOP/s (%g)\n", F, pf, n / t / 1e9, n / 64.0 * F * 32 / t / 1e9, tot);
  }
}
