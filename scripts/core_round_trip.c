/* Core-to-core round trip: two threads pinned to CPUs 0 and 1 pass a cache line back and forth.
 * On the 2-vCPU AMD EPYC VM it tells the bandwidth modes apart: about 80-130 ns in the slow mode
 * (read_bandwidth.c 40-50 GB/s: both vCPUs near each other, sharing one path to memory), about
 * 400-500 ns in the fast one (75-85 GB/s: each vCPU with its own path, and every cache line that
 * crosses between them costs that much).
 *   gcc -O2 -pthread scripts/core_round_trip.c -o /tmp/rt && /tmp/rt */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <time.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
static _Alignas(64) atomic_int flag;
#define N 200000
static void pin(int cpu){cpu_set_t s;CPU_ZERO(&s);CPU_SET(cpu,&s);pthread_setaffinity_np(pthread_self(),sizeof s,&s);}
static void*other(void*a){(void)a;pin(1);
  for(int i=0;i<N;i++){while(atomic_load_explicit(&flag,memory_order_acquire)!=2*i+1);atomic_store_explicit(&flag,2*i+2,memory_order_release);}
  return 0;}
int main(void){pin(0);pthread_t t;pthread_create(&t,0,other,0);double t0=now();
  for(int i=0;i<N;i++){atomic_store_explicit(&flag,2*i+1,memory_order_release);while(atomic_load_explicit(&flag,memory_order_acquire)!=2*i+2);}
  double dt=now()-t0;pthread_join(t,0);printf("round trip %.0f ns\n",dt/N*1e9);return 0;}
