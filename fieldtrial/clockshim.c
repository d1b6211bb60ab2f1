/* Wall-clock jumps for one process, for the field trial: LD_PRELOAD this and write an offset in
 * seconds (e.g. "3600" or "-600") to the file named by EDGEAGENT_CLOCK_OFFSET_FILE. Only the
 * realtime clock moves; CLOCK_MONOTONIC and sleeps are untouched (libfaketime breaks Python's
 * time.sleep, hence this). The file is re-read at most every 100 ms. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/time.h>
#include <time.h>

static int (*real_clock_gettime)(clockid_t, struct timespec *);
static volatile long long offset_ns;
static volatile long long last_read_ns = -1000000000LL;

static void refresh(void) {
    struct timespec now;
    real_clock_gettime(CLOCK_MONOTONIC, &now);
    long long t = (long long)now.tv_sec * 1000000000LL + now.tv_nsec;
    if (t - last_read_ns < 100000000LL) return;
    last_read_ns = t;
    const char *path = getenv("EDGEAGENT_CLOCK_OFFSET_FILE");
    if (!path) return;
    FILE *f = fopen(path, "r");
    if (!f) return;
    double v;
    if (fscanf(f, "%lf", &v) == 1) offset_ns = (long long)(v * 1e9);
    fclose(f);
}

int clock_gettime(clockid_t clk, struct timespec *ts) {
    if (!real_clock_gettime) real_clock_gettime = dlsym(RTLD_NEXT, "clock_gettime");
    int r = real_clock_gettime(clk, ts);
    if (r == 0 && (clk == CLOCK_REALTIME || clk == CLOCK_REALTIME_COARSE)) {
        refresh();
        long long t = (long long)ts->tv_sec * 1000000000LL + ts->tv_nsec + offset_ns;
        ts->tv_sec = t / 1000000000LL;
        ts->tv_nsec = t % 1000000000LL;
    }
    return r;
}

int gettimeofday(struct timeval *tv, void *tz) {
    struct timespec ts;
    (void)tz;
    if (clock_gettime(CLOCK_REALTIME, &ts) != 0) return -1;
    if (tv) { tv->tv_sec = ts.tv_sec; tv->tv_usec = ts.tv_nsec / 1000; }
    return 0;
}

time_t time(time_t *out) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    if (out) *out = ts.tv_sec;
    return ts.tv_sec;
}
