/*
 * A timestamp tap for the overhead benchmark, preloaded into the worker (LD_PRELOAD).
 *
 * It wraps read(2) on fd 0 and write(2)/writev(2) on fd 1, the worker's protocol pipes, and
 * records CLOCK_MONOTONIC (the clock every process on the host shares):
 *   - for a write, just before the system call: the moment the line leaves the worker;
 *   - for a read, just after the system call returns: the moment the line reaches the worker.
 * The data path is untouched: no extra process, no extra copy, no extra system call between
 * the two timestamps and the pipe. Records go to an in-memory buffer and are written to the
 * file named by OVH_TAP_LOG after the write of a final event, when the buffer fills, and at
 * exit, so that file I/O never sits between a timestamp and its system call.
 *
 * One record per call, one line each:
 *   R <ns> <generate requests> <newlines> <bytes>
 *   W <ns> <token events> <final events> <bytes>
 * counted by substring: the worker writes `"type":"token"` and `"type":"final"` in its events,
 * and a generate request carries `"method":"generate",`.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

static ssize_t (*real_read)(int, void *, size_t);
static ssize_t (*real_write)(int, const void *, size_t);
static ssize_t (*real_writev)(int, const struct iovec *, int);

static int log_fd = -1;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static char records[256 * 1024];
static size_t used;

static unsigned long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (unsigned long long)ts.tv_sec * 1000000000ull + (unsigned long long)ts.tv_nsec;
}

static size_t count(const char *buf, size_t len, const char *needle) {
    size_t n = 0, k = strlen(needle);
    const char *p = buf, *end = buf + len;
    while (p < end) {
        const char *hit = memmem(p, (size_t)(end - p), needle, k);
        if (!hit) break;
        n++;
        p = hit + k;
    }
    return n;
}

static size_t count_byte(const char *buf, size_t len, char c) {
    size_t n = 0;
    for (size_t i = 0; i < len; i++) n += buf[i] == c;
    return n;
}

/* Writes the buffered records out; the caller holds the lock. */
static void flush_locked(void) {
    size_t off = 0;
    while (log_fd >= 0 && off < used) {
        ssize_t w = real_write(log_fd, records + off, used - off);
        if (w <= 0) break;
        off += (size_t)w;
    }
    used = 0;
}

static void record(char kind, unsigned long long t, size_t a, size_t b, size_t bytes, int flush) {
    if (log_fd < 0) return;
    pthread_mutex_lock(&lock);
    if (used + 96 > sizeof records) flush_locked();
    used += (size_t)snprintf(records + used, sizeof records - used, "%c %llu %zu %zu %zu\n", kind, t, a, b, bytes);
    if (flush) flush_locked();
    pthread_mutex_unlock(&lock);
}

__attribute__((constructor)) static void tap_init(void) {
    real_read = (ssize_t (*)(int, void *, size_t))dlsym(RTLD_NEXT, "read");
    real_write = (ssize_t (*)(int, const void *, size_t))dlsym(RTLD_NEXT, "write");
    real_writev = (ssize_t (*)(int, const struct iovec *, int))dlsym(RTLD_NEXT, "writev");
    const char *path = getenv("OVH_TAP_LOG");
    if (path && *path) log_fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
}

__attribute__((destructor)) static void tap_fini(void) {
    pthread_mutex_lock(&lock);
    flush_locked();
    pthread_mutex_unlock(&lock);
}

ssize_t read(int fd, void *buf, size_t len) {
    ssize_t n = real_read(fd, buf, len);
    if (fd == 0 && n > 0) {
        unsigned long long t = now_ns();
        record('R', t, count(buf, (size_t)n, "\"method\":\"generate\","), count_byte(buf, (size_t)n, '\n'), (size_t)n, 0);
    }
    return n;
}

ssize_t write(int fd, const void *buf, size_t len) {
    if (fd != 1) return real_write(fd, buf, len);
    unsigned long long t = now_ns();
    ssize_t n = real_write(fd, buf, len);
    if (n > 0) {
        size_t finals = count(buf, (size_t)n, "\"type\":\"final\"");
        record('W', t, count(buf, (size_t)n, "\"type\":\"token\""), finals, (size_t)n, finals > 0);
    }
    return n;
}

ssize_t writev(int fd, const struct iovec *iov, int iovcnt) {
    if (fd != 1) return real_writev(fd, iov, iovcnt);
    unsigned long long t = now_ns();
    ssize_t n = real_writev(fd, iov, iovcnt);
    if (n > 0) {
        size_t tokens = 0, finals = 0, left = (size_t)n;
        for (int i = 0; i < iovcnt && left > 0; i++) {
            size_t len = iov[i].iov_len < left ? iov[i].iov_len : left;
            tokens += count(iov[i].iov_base, len, "\"type\":\"token\"");
            finals += count(iov[i].iov_base, len, "\"type\":\"final\"");
            left -= len;
        }
        record('W', t, tokens, finals, (size_t)n, finals > 0);
    }
    return n;
}
