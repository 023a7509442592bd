// AMX probe: permission, correctness of tdpbf16ps against scalar chains, and rate (1 and N threads).
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <stdlib.h>
#include <math.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <time.h>
#include <omp.h>
#define ARCH_GET_XCOMP_PERM 0x1022
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
typedef struct { uint8_t palette, start; uint8_t res[14]; uint16_t colsb[16]; uint8_t rows[16]; } __attribute__((packed)) cfg_t;
static float bf(uint16_t b) { uint32_t u = (uint32_t)b << 16; float f; memcpy(&f, &u, 4); if ((u & 0x7f800000) == 0) f = copysignf(0.f, f); return f; }
static uint16_t tobf(float f) { uint32_t u; memcpy(&u, &f, 4); u += 0x7fff + ((u >> 16) & 1); return u >> 16; }
static void config(void) {
  cfg_t c; memset(&c, 0, sizeof c); c.palette = 1;
  for (int t = 0; t < 8; t++) { c.rows[t] = 16; c.colsb[t] = 64; }
  _tile_loadconfig(&c);
}
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
int main(void) {
  unsigned long perm = 0;
  long r = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA);
  syscall(SYS_arch_prctl, ARCH_GET_XCOMP_PERM, &perm);
  printf("ARCH_REQ_XCOMP_PERM -> %ld, perm mask %#lx (bit 18: %s)\n", r, perm, (perm >> 18) & 1 ? "yes" : "no");
  if (r != 0) { printf("AMX: no permission\n"); return 0; }
  // A: 16 rows x 32 bf16 (K = 32); B: 16 k-pair rows x 16 cols x 2; C: 16 x 16 f32.
  static uint16_t A[16][32], B[16][32]; static float C[16][16];
  srand(1);
  for (int i = 0; i < 16; i++) for (int j = 0; j < 32; j++) { A[i][j] = tobf((rand() / (float)RAND_MAX - 0.5f) * 4); B[i][j] = tobf((rand() / (float)RAND_MAX - 0.5f) * 4); }
  for (int i = 0; i < 16; i++) for (int j = 0; j < 16; j++) C[i][j] = (rand() / (float)RAND_MAX - 0.5f);
  float C0[16][16]; memcpy(C0, C, sizeof C);
  config();
  _tile_loadd(0, C, 64); _tile_loadd(1, A, 64); _tile_loadd(2, B, 64);
  _tile_dpbf16ps(0, 1, 2);
  _tile_stored(0, C, 64);
  int odd_first = 0, even_first = 0, fused_pair = 0; double maxrel = 0;
  for (int m = 0; m < 16; m++) for (int n = 0; n < 16; n++) {
    float o = C0[m][n], e = C0[m][n], f = C0[m][n]; double d = C0[m][n];
    for (int k = 0; k < 16; k++) {
      float a0 = bf(A[m][2*k]), a1 = bf(A[m][2*k+1]), b0 = bf(B[k][2*n]), b1 = bf(B[k][2*n+1]);
      o = fmaf(a1, b1, o); o = fmaf(a0, b0, o);
      e = fmaf(a0, b0, e); e = fmaf(a1, b1, e);
      f = f + (float)((double)a0 * b0 + (double)a1 * b1);
      d += (double)a0 * b0 + (double)a1 * b1;
    }
    odd_first += o == C[m][n]; even_first += e == C[m][n]; fused_pair += f == C[m][n];
    double rel = fabs(C[m][n] - d) / (fabs(d) + 1e-30); if (rel > maxrel) maxrel = rel;
  }
  printf("tdpbf16ps vs chains (256 outputs): odd-first fma %d, even-first fma %d, pair summed then added %d; max rel vs f64 %.2e\n", odd_first, even_first, fused_pair, maxrel);
  // Rate: C0..C3 += A(4,5) x B(6,7), tiles resident.
  int threads[] = {1, 2, 4, 8, 16};
  for (int ti = 0; ti < 5; ti++) {
    int nt = threads[ti]; if (nt > omp_get_num_procs()) break;
    long iters = 2000000; double t0 = 0, t1 = 0;
    #pragma omp parallel num_threads(nt)
    {
      syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA);
      config();
      static float Cz[16][16];
      _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
      _tile_loadd(4, A, 64); _tile_loadd(5, A, 64); _tile_loadd(6, B, 64); _tile_loadd(7, B, 64);
      #pragma omp barrier
      #pragma omp master
      t0 = now();
      for (long i = 0; i < iters; i++) {
        _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7); _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
      }
      _tile_stored(0, Cz, 64);
      #pragma omp barrier
      #pragma omp master
      t1 = now();
      _tile_release();
    }
    double flops = (double)nt * iters * 4 * 16 * 16 * 32 * 2;
    printf("AMX tdpbf16ps rate, %2d threads: %.0f GFLOP/s (%.0f per thread)\n", nt, flops / (t1 - t0) / 1e9, flops / (t1 - t0) / 1e9 / nt);
  }
  return 0;
}
