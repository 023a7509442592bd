/* What widening bf16 weights to f32 costs the packed kernel's loop on a CPU without AVX512-BF16
 * (crates/cpu/src/avx512.rs, `Wide32 for bf16`: an AND and a shift per 32 weights). One thread,
 * weights and inputs in L1 (K 128), register blocks of R rows by 32 weight rows, alternated in
 * turn 41 rounds: "widen" loads 32 bf16 and widens them, "f32" loads 32 f32 (no integer op);
 * prints the median GFLOP/s and quartiles of each.
 *   gcc -O3 -march=native scripts/widen_probe.c -o /tmp/wp && /tmp/wp */
#include <immintrin.h>
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
#define DEF(R,M) __attribute__((target("avx512f,avx512bw"),noinline)) \
double run##R##_##M(const uint16_t*w,const float*x,int K,int reps){ \
  __m512 acc[R][2]; for(int r=0;r<R;r++)acc[r][0]=acc[r][1]=_mm512_setzero_ps(); \
  for(int rep=0;rep<reps;rep++){ const uint16_t*p=w; const float*xp=x; \
    for(int k=0;k<K;k++,p+=32,xp+=R){ __m512 lo,hi; if(M==0){__m512i raw=_mm512_loadu_si512(p); \
      hi=_mm512_castsi512_ps(_mm512_and_si512(raw,_mm512_set1_epi32(0xffff0000))); \
      lo=_mm512_castsi512_ps(_mm512_slli_epi32(raw,16));} else {lo=_mm512_loadu_ps((const float*)p); hi=_mm512_loadu_ps((const float*)p+16);} \
      for(int r=0;r<R;r++){ __m512 b=_mm512_set1_ps(xp[r]); \
        acc[r][0]=_mm512_fmadd_ps(b,lo,acc[r][0]); acc[r][1]=_mm512_fmadd_ps(b,hi,acc[r][1]);}}} \
  float s=0; for(int r=0;r<R;r++)s+=_mm512_reduce_add_ps(_mm512_add_ps(acc[r][0],acc[r][1])); return s;}
DEF(4,0) DEF(4,1) DEF(8,0) DEF(8,1) DEF(12,0) DEF(12,1)
int cmp(const void*a,const void*b){double x=*(double*)a,y=*(double*)b;return x<y?-1:x>y;}
int main(){
  int K=128; long tot=4000000;
  uint16_t*w=aligned_alloc(64,K*128+128); for(int i=0;i<K*64;i++)w[i]=0x3f80;
  float*x=aligned_alloc(64,K*16*4); for(int i=0;i<K*16;i++)x[i]=1e-4f;
  typedef double(*F)(const uint16_t*,const float*,int,int);
  F f[]={run4_0,run4_1,run8_0,run8_1,run12_0,run12_1}; int rr[]={4,4,8,8,12,12};
  enum{N=41}; double g[6][N];
  for(int round=0;round<N;round++){ for(int i=0;i<6;i++){ int reps=tot/(K*rr[i]);
    double t=now(); volatile double s=f[i](w,x,K,reps); t=now()-t; (void)s; g[i][round]=2.0*rr[i]*32*K*(double)reps/t*1e-9;}}
  for(int i=0;i<6;i++){qsort(g[i],N,8,cmp); printf("R%-2d %s: median %.1f  (q1 %.1f q3 %.1f)\n",rr[i],i%2?"f32 ":"widen",g[i][N/2],g[i][N/4],g[i][3*N/4]);}
}
