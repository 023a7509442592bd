/* Read-only memory bandwidth: OpenMP threads sum a 1 GiB buffer (huge pages advised) with AVX-512
 * loads, six passes; an optional argument prefetches that many bytes ahead (T0). The ceiling the
 * decode layer streams against, apart from moe-bench's own GEMV and copy ceilings.
 *   gcc -O3 -march=native -fopenmp scripts/read_bandwidth.c -o /tmp/rd && OMP_NUM_THREADS=2 /tmp/rd [AHEAD] */
#define _GNU_SOURCE
#include <time.h>
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
int main(int argc,char**argv){
  size_t n=(size_t)1<<30; /* 1 GiB per pass total */
  char*a=(char*)aligned_alloc(2<<20,n); madvise(a,n,MADV_HUGEPAGE); memset(a,1,n);
  int pf=argc>1?atoi(argv[1]):0;
  for(int rep=0;rep<6;rep++){
    double t0=now(); float tot=0;
    #pragma omp parallel reduction(+:tot)
    { int id=omp_get_thread_num(),nt=omp_get_num_threads();
      size_t chunk=n/nt; const char*p=a+id*chunk;
      __m512 s0=_mm512_setzero_ps(),s1=s0,s2=s0,s3=s0;
      for(size_t i=0;i<chunk;i+=256){
        if(pf) _mm_prefetch(p+i+pf,_MM_HINT_T0), _mm_prefetch(p+i+pf+64,_MM_HINT_T0),_mm_prefetch(p+i+pf+128,_MM_HINT_T0),_mm_prefetch(p+i+pf+192,_MM_HINT_T0);
        s0=_mm512_add_ps(s0,_mm512_load_ps((const float*)(p+i)));
        s1=_mm512_add_ps(s1,_mm512_load_ps((const float*)(p+i+64)));
        s2=_mm512_add_ps(s2,_mm512_load_ps((const float*)(p+i+128)));
        s3=_mm512_add_ps(s3,_mm512_load_ps((const float*)(p+i+192)));
      }
      tot+=_mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0,s1),_mm512_add_ps(s2,s3)));
    }
    double t=now()-t0; printf("pf=%d read %.1f GB/s (%g)\n",pf,n/t/1e9,tot);
  }
}
