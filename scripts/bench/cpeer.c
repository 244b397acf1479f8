/* cpeer: a fast loopback peer for ccpd's benchmarks, so that neither the upstream nor the load
 * generator is ever the bottleneck. One single-threaded epoll loop, libc only.
 *
 *   cpeer serve PORT_FILE
 *       HTTP/1.1 keep-alive upstream on 127.0.0.1 (an ephemeral port, written to PORT_FILE).
 *       POST .../v1/messages: the Python fake's (ccpd/testing/fakeupstream.py) canned answer,
 *       JSON, or an SSE stream (chunked, all events at once) when the body has "stream":true.
 *       POST .../count_tokens: {"input_tokens":12}. GET of any path: the fake's /v1/models JSON.
 *       Requests need Content-Length framing (no chunked bodies); pipelining is fine.
 *   cpeer load PORT CONNECTIONS SECONDS REQUEST_FILE
 *       Closed loop: CONNECTIONS keep-alive connections each send REQUEST_FILE's bytes back to
 *       back for SECONDS (requests in flight then are finished and counted). Prints one JSON line.
 *   cpeer burst PORT CONNECTIONS WAVES REQUEST_FILE
 *       CONNECTIONS keep-alive connections send one (streaming) request each at the same moment,
 *       WAVES times after one warm-up wave; per request, the time to the first complete
 *       content_block_delta event (TTFT) and to the end of the answer. Prints one JSON line.
 *
 * Build: gcc -O2 -o cpeer cpeer.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_EVENTS 256
#define OUT_HIGH (1 << 20)   /* stop reading a connection while this much output is queued */
#define IN_MAX (64 << 20)    /* a request or response larger than this closes the connection */

static void die(const char *what) { perror(what); exit(2); }

static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

/* -- growable byte buffer ------------------------------------------------------------------ */

typedef struct { char *p; size_t len, cap, off; } buf_t;  /* data is p[off..len) */

static void buf_room(buf_t *b, size_t n) {  /* room for n more bytes after len */
    if (b->len + n <= b->cap) return;
    if (b->off) {  /* slide the unconsumed bytes to the front first */
        memmove(b->p, b->p + b->off, b->len - b->off);
        b->len -= b->off;
        b->off = 0;
    }
    while (b->len + n > b->cap) b->cap = b->cap ? b->cap * 2 : 4096;
    if (!(b->p = realloc(b->p, b->cap))) die("realloc");
}

static void buf_add(buf_t *b, const void *data, size_t n) {
    buf_room(b, n);
    memcpy(b->p + b->len, data, n);
    b->len += n;
}

static void buf_printf(buf_t *b, const char *fmt, ...) {
    char tmp[2048];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    buf_add(b, tmp, (size_t)n < sizeof tmp ? (size_t)n : sizeof tmp - 1);
}

static void buf_consume(buf_t *b, size_t n) {
    b->off += n;
    if (b->off == b->len) b->off = b->len = 0;
}

static size_t buf_size(const buf_t *b) { return b->len - b->off; }

/* Read what the socket has (until EAGAIN). Returns 0 on EOF or error, 1 otherwise. */
static int read_into(int fd, buf_t *b) {
    for (;;) {
        buf_room(b, 16384);
        ssize_t n = read(fd, b->p + b->len, b->cap - b->len);
        if (n > 0) { b->len += (size_t)n; if (buf_size(b) > IN_MAX) return 0; continue; }
        if (n == 0) return 0;
        return errno == EAGAIN || errno == EINTR;
    }
}

/* Write what is queued. Returns 0 on error, 1 otherwise (possibly with bytes still queued). */
static int flush_out(int fd, buf_t *b) {
    while (buf_size(b)) {
        ssize_t n = write(fd, b->p + b->off, buf_size(b));
        if (n > 0) { buf_consume(b, (size_t)n); continue; }
        return n < 0 && (errno == EAGAIN || errno == EINTR);
    }
    return 1;
}

static void nodelay_nonblock(int fd) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
}

/* Case-insensitive header value of NAME in the header block [h, end), or NULL. */
static const char *header(const char *h, const char *end, const char *name, size_t *vlen) {
    size_t nlen = strlen(name);
    for (const char *line = h; line < end;) {
        const char *eol = memmem(line, (size_t)(end - line), "\r\n", 2);
        if (!eol) eol = end;
        if ((size_t)(eol - line) > nlen && line[nlen] == ':' && !strncasecmp(line, name, nlen)) {
            const char *v = line + nlen + 1;
            while (v < eol && (*v == ' ' || *v == '\t')) v++;
            *vlen = (size_t)(eol - v);
            return v;
        }
        line = eol + 2;
    }
    return NULL;
}

/* -- serve ----------------------------------------------------------------------------------- */

typedef struct { int fd; uint32_t events; int closing; buf_t in, out; } conn_t;

static unsigned long request_seq;

static const char MODELS[] =
    "{\"data\":[{\"type\":\"model\",\"id\":\"fake-model\",\"display_name\":\"Fake model\","
    "\"created_at\":\"2026-01-01T00:00:00Z\"}],\"has_more\":false,\"first_id\":\"fake-model\","
    "\"last_id\":\"fake-model\"}";
#define USAGE "\"input_tokens\":12,\"cache_creation_input_tokens\":0,\"cache_read_input_tokens\":0"
#define DELTAS 5

static void answer_json(conn_t *c, int status, const char *reason, const char *body, size_t n) {
    buf_printf(&c->out, "HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %zu"
               "\r\nrequest-id: req_cpeer_%012lx\r\n\r\n", status, reason, n, ++request_seq);
    buf_add(&c->out, body, n);
}

static void chunk(buf_t *out, const char *fmt, ...) {  /* one SSE event as one chunk */
    char tmp[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    buf_printf(out, "%x\r\n", n);
    buf_add(out, tmp, (size_t)n);
    buf_add(out, "\r\n", 2);
}

static void answer_messages(conn_t *c, const char *body, size_t blen) {
    /* the model asked for, as the fake answers (copied as JSON string content) */
    char model[256] = "fake-model";
    const char *m = memmem(body, blen, "\"model\"", 7);
    if (m) {
        const char *end = body + blen, *p = m + 7;
        while (p < end && (*p == ' ' || *p == ':')) p++;
        if (p < end && *p == '"') {
            size_t i = 0;
            for (p++; p < end && *p != '"' && i < sizeof model - 2; p++) {
                model[i++] = *p;
                if (*p == '\\' && p + 1 < end) model[i++] = *++p;
            }
            model[i] = 0;
        }
    }
    if (!memmem(body, blen, "\"stream\":true", 13) && !memmem(body, blen, "\"stream\": true", 14)) {
        char json[1024];
        int n = snprintf(json, sizeof json, "{\"id\":\"msg_fake\",\"type\":\"message\",\"role\":"
                         "\"assistant\",\"model\":\"%s\",\"content\":[{\"type\":\"text\",\"text\":"
                         "\"tok0 tok1 tok2 tok3 tok4 \"}],\"stop_reason\":\"end_turn\","
                         "\"stop_sequence\":null,\"usage\":{" USAGE ",\"output_tokens\":%d}}",
                         model, DELTAS);
        answer_json(c, 200, "OK", json, (size_t)n);
        return;
    }
    buf_t *o = &c->out;
    buf_printf(o, "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache"
               "\r\ntransfer-encoding: chunked\r\nrequest-id: req_cpeer_%012lx\r\n\r\n",
               ++request_seq);
    chunk(o, "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":"
          "\"msg_fake\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"%s\",\"content\":"
          "[],\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{" USAGE
          ",\"output_tokens\":1}}}\n\n", model);
    chunk(o, "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,"
          "\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n");
    chunk(o, "event: ping\ndata: {\"type\":\"ping\"}\n\n");
    for (int i = 0; i < DELTAS; i++)
        chunk(o, "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,"
              "\"delta\":{\"type\":\"text_delta\",\"text\":\"tok%d \"}}\n\n", i);
    chunk(o, "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n");
    chunk(o, "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":"
          "\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":%d}}\n\n", DELTAS);
    chunk(o, "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n");
    buf_add(o, "0\r\n\r\n", 5);
}

/* Answer every complete request in c->in. Returns 0 when the connection must close now. */
static int serve_requests(conn_t *c) {
    while (!c->closing && buf_size(&c->out) < OUT_HIGH) {
        const char *req = c->in.p + c->in.off, *in_end = c->in.p + c->in.len;
        const char *hend = memmem(req, buf_size(&c->in), "\r\n\r\n", 4);
        if (!hend) return buf_size(&c->in) < 65536;  /* headers larger than 64 KB: refuse */
        const char *line_end = memmem(req, (size_t)(hend + 2 - req), "\r\n", 2);
        size_t vlen = 0, clen = 0;
        const char *v = header(line_end + 2, hend + 2, "content-length", &vlen);
        if (v) clen = strtoul(v, NULL, 10);
        if (header(line_end + 2, hend + 2, "transfer-encoding", &vlen)) return 0;  /* unsupported */
        if ((size_t)(in_end - (hend + 4)) < clen) return 1;  /* body still coming */
        const char *body = hend + 4;
        v = header(line_end + 2, hend + 2, "connection", &vlen);
        if (v && memmem(v, vlen, "close", 5)) c->closing = 1;
        const char *sp = memchr(req, ' ', (size_t)(line_end - req));
        const char *path = sp ? sp + 1 : line_end;
        const char *pend = memchr(path, ' ', (size_t)(line_end - path));
        if (!pend) pend = line_end;
        const char *q = memchr(path, '?', (size_t)(pend - path));
        if (q) pend = q;
        size_t plen = (size_t)(pend - path);
#define ENDS(s) (plen >= sizeof s - 1 && !memcmp(pend - (sizeof s - 1), s, sizeof s - 1))
        if (!strncmp(req, "GET ", 4))
            answer_json(c, 200, "OK", MODELS, sizeof MODELS - 1);
        else if (!strncmp(req, "POST ", 5) && ENDS("/v1/messages"))
            answer_messages(c, body, clen);
        else if (!strncmp(req, "POST ", 5) && ENDS("/v1/messages/count_tokens"))
            answer_json(c, 200, "OK", "{\"input_tokens\":12}", 19);
        else {
            static const char nf[] = "{\"type\":\"error\",\"error\":{\"type\":\"not_found_error\","
                                     "\"message\":\"cpeer: no route\"}}";
            answer_json(c, 404, "Not Found", nf, sizeof nf - 1);
        }
        buf_consume(&c->in, (size_t)(body + clen - req));
    }
    return 1;
}

static void close_conn(int ep, conn_t *c) {
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c->in.p);
    free(c->out.p);
    free(c);
}

static _Noreturn void serve(const char *port_file) {
    int ls = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t alen = sizeof a;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(ls, (struct sockaddr *)&a, sizeof a) || listen(ls, 4096)) die("bind/listen");
    getsockname(ls, (struct sockaddr *)&a, &alen);
    fcntl(ls, F_SETFL, O_NONBLOCK);
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp", port_file);
    FILE *f = fopen(tmp, "w");
    if (!f || fprintf(f, "%d\n", ntohs(a.sin_port)) < 0 || fclose(f) || rename(tmp, port_file))
        die(port_file);
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL}, evs[MAX_EVENTS];
    epoll_ctl(ep, EPOLL_CTL_ADD, ls, &ev);
    for (;;) {
        int n = epoll_wait(ep, evs, MAX_EVENTS, -1);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        for (int i = 0; i < n; i++) {
            conn_t *c = evs[i].data.ptr;
            if (!c) {  /* the listening socket */
                int fd;
                while ((fd = accept4(ls, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    nodelay_nonblock(fd);
                    c = calloc(1, sizeof *c);
                    c->fd = fd;
                    c->events = EPOLLIN;
                    ev.events = EPOLLIN;
                    ev.data.ptr = c;
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
                }
                continue;
            }
            int alive = 1;
            if (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR))
                alive = read_into(c->fd, &c->in);
            /* a client that half-closed after sending still gets its answers */
            int ok = serve_requests(c) && flush_out(c->fd, &c->out);
            if (!ok || (!alive && !buf_size(&c->out)) || (c->closing && !buf_size(&c->out))) {
                close_conn(ep, c);
                continue;
            }
            if (!alive) { shutdown(c->fd, SHUT_RD); c->closing = 1; }
            uint32_t want = (buf_size(&c->out) ? EPOLLOUT : 0)
                            | (buf_size(&c->out) < OUT_HIGH && !c->closing ? EPOLLIN : 0);
            if (want != c->events) {
                c->events = ev.events = want;
                ev.data.ptr = c;
                epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
            }
        }
    }
}

/* -- clients (load, burst) ------------------------------------------------------------------ */

/* One response at the start of [b, b+n): its length when complete, 0 when incomplete, -1 when
 * malformed. With dec, the body decoded so far (chunked or not) is put there. */
static long parse_response(const char *b, size_t n, int *status, buf_t *dec) {
    const char *end = b + n, *hend = memmem(b, n, "\r\n\r\n", 4);
    if (dec) dec->len = dec->off = 0;
    if (!hend) return 0;
    if (n < 12 || strncmp(b, "HTTP/1.", 7)) return -1;
    *status = atoi(b + 9);
    const char *p = hend + 4, *line = memmem(b, n, "\r\n", 2) + 2, *v;
    size_t vlen;
    if ((v = header(line, hend + 2, "transfer-encoding", &vlen)) && memmem(v, vlen, "chunked", 7)) {
        for (;;) {  /* chunks, up to the 0-chunk and the empty line after (no trailers) */
            const char *eol = memmem(p, (size_t)(end - p), "\r\n", 2);
            if (!eol) return 0;
            char *after;
            unsigned long size = strtoul(p, &after, 16);
            if (after == p) return -1;
            if (size == 0) return eol + 4 <= end ? (long)(eol + 4 - b) : 0;
            if ((size_t)(end - (eol + 2)) < size + 2) {
                if (dec) buf_add(dec, eol + 2, (size_t)(end - (eol + 2)));  /* partial chunk */
                return 0;
            }
            if (dec) buf_add(dec, eol + 2, size);
            p = eol + 2 + size + 2;
        }
    }
    size_t clen = (v = header(line, hend + 2, "content-length", &vlen)) ? strtoul(v, NULL, 10) : 0;
    if (dec) buf_add(dec, p, (size_t)(end - p) < clen ? (size_t)(end - p) : clen);
    return (size_t)(end - p) >= clen ? (long)(p + clen - b) : 0;
}

typedef struct {
    int fd, busy;
    uint64_t sent, ttft;
    buf_t in;
} client_t;

static struct sockaddr_in target;
static char *request;
static size_t request_len;
static uint64_t *lat, *lat2;  /* latencies (ns): load: per request; burst: TTFT and completion */
static size_t nlat, caplat;

static void record(uint64_t a, uint64_t b) {
    if (nlat == caplat) {
        caplat = caplat ? caplat * 2 : 65536;
        if (!(lat = realloc(lat, caplat * 8)) || !(lat2 = realloc(lat2, caplat * 8))) die("realloc");
    }
    lat[nlat] = a;
    lat2[nlat++] = b;
}

static void client_connect(int ep, client_t *c) {
    if ((c->fd = socket(AF_INET, SOCK_STREAM, 0)) < 0) die("socket");
    if (connect(c->fd, (struct sockaddr *)&target, sizeof target)) die("connect");
    nodelay_nonblock(c->fd);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
    c->in.len = c->in.off = 0;
    c->busy = 0;
}

/* The request is small: an empty socket buffer takes it whole. A failed write shows up as a
 * broken connection when it is read. */
static void client_send(client_t *c) {
    c->sent = now_ns();
    c->ttft = 0;
    c->busy = 1;
    if (write(c->fd, request, request_len) < 0 && errno != EPIPE && errno != ECONNRESET)
        die("write request");
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

/* Nearest rank of sorted v, as _harness.percentile: Python's round() there rounds half to even */
static double pct_ms(const uint64_t *v, size_t n, double q) {
    double x = q / 100 * (double)n + 0.5;
    long rank = (long)x;
    if (x - (double)rank > 0.5 || (x - (double)rank == 0.5 && rank % 2)) rank++;
    rank = rank < 1 ? 1 : rank > (long)n ? (long)n : rank;
    return (double)v[rank - 1] / 1e6;
}

static void print_stats(const char *prefix, uint64_t *v, size_t n) {
    if (!n) {
        printf("\"%sp50_ms\":null,\"%sp99_ms\":null,\"%smax_ms\":null", prefix, prefix, prefix);
        return;
    }
    qsort(v, n, sizeof *v, cmp_u64);
    printf("\"%sp50_ms\":%.3f,\"%sp99_ms\":%.3f,\"%smax_ms\":%.3f", prefix, pct_ms(v, n, 50),
           prefix, pct_ms(v, n, 99), prefix, (double)v[n - 1] / 1e6);
}

/* Handle readable client c. Returns 1 when its request in flight is over (a response, counted
 * in *errors when not 200, or a broken connection, counted and replaced by a fresh one). */
static int client_read(int ep, client_t *c, int want_ttft, long *errors) {
    static buf_t dec;
    int was_busy = c->busy, alive = read_into(c->fd, &c->in), status = 0;
    long len = parse_response(c->in.p + c->in.off, buf_size(&c->in), &status,
                              want_ttft && !c->ttft ? &dec : NULL);
    if (want_ttft && !c->ttft && len >= 0) {  /* first content_block_delta event complete? */
        const char *d = memmem(dec.p, dec.len, "event: content_block_delta", 26);
        if (d && memmem(d, (size_t)(dec.p + dec.len - d), "\n\n", 2)) c->ttft = now_ns();
    }
    if (len > 0) {
        buf_consume(&c->in, (size_t)len);
        if (status != 200 || (want_ttft && !c->ttft)) (*errors)++;
        else record(want_ttft ? c->ttft - c->sent : now_ns() - c->sent, now_ns() - c->sent);
        c->busy = 0;
    }
    if (len < 0 || !alive) {  /* broken: count what was in flight, then a fresh connection */
        if (c->busy || len < 0) (*errors)++;
        epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
        close(c->fd);
        client_connect(ep, c);
        return was_busy;
    }
    return len > 0 && was_busy;
}

static client_t *clients_open(int ep, int port, int n, const char *request_file) {
    FILE *f = fopen(request_file, "rb");
    if (!f) die(request_file);
    fseek(f, 0, SEEK_END);
    request_len = (size_t)ftell(f);
    rewind(f);
    request = malloc(request_len);
    if (fread(request, 1, request_len, f) != request_len) die("read request file");
    fclose(f);
    target = (struct sockaddr_in){.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                                  .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    client_t *cs = calloc((size_t)n, sizeof *cs);
    for (int i = 0; i < n; i++) client_connect(ep, &cs[i]);
    return cs;
}

static int load(int port, int n, double seconds, const char *request_file) {
    int ep = epoll_create1(0), busy = 0;
    client_t *cs = clients_open(ep, port, n, request_file);
    struct epoll_event evs[MAX_EVENTS];
    long errors = 0;
    uint64_t start = now_ns(), deadline = start + (uint64_t)(seconds * 1e9), stop = 0;
    for (int i = 0; i < n; i++, busy++) client_send(&cs[i]);
    while (busy > 0) {
        uint64_t t = now_ns();
        if (t > deadline + 30000000000u) { errors += busy; break; }  /* 30 s grace, then give up */
        int k = epoll_wait(ep, evs, MAX_EVENTS, 100);
        for (int i = 0; i < k; i++) {
            client_t *c = evs[i].data.ptr;
            if (!client_read(ep, c, 0, &errors)) continue;
            stop = now_ns();
            if (stop < deadline) client_send(c);
            else busy--;
        }
    }
    double elapsed = (double)((stop ? stop : now_ns()) - start) / 1e9;
    printf("{\"requests\":%zu,\"errors\":%ld,\"seconds\":%.3f,\"rps\":%.1f,", nlat, errors, elapsed,
           (double)nlat / elapsed);
    print_stats("", lat, nlat);
    printf("}\n");
    return 0;
}

static int burst(int port, int n, int waves, const char *request_file) {
    int ep = epoll_create1(0);
    client_t *cs = clients_open(ep, port, n, request_file);
    struct epoll_event evs[MAX_EVENTS];
    long errors = 0, warm_errors = 0;
    struct timespec pause = {0, 100000000};  /* let the peer accept and settle between waves */
    for (int w = 0; w <= waves; w++) {  /* wave 0 is the warm-up, not counted */
        nanosleep(&pause, NULL);
        if (w == 1) { nlat = 0; warm_errors = errors; errors = 0; }
        for (int i = 0; i < n; i++) client_send(&cs[i]);
        uint64_t give_up = now_ns() + 60000000000u;
        int busy = n;
        while (busy > 0 && now_ns() < give_up) {
            int k = epoll_wait(ep, evs, MAX_EVENTS, 100);
            for (int i = 0; i < k; i++) busy -= client_read(ep, evs[i].data.ptr, 1, &errors);
        }
        errors += busy;  /* unanswered after a minute */
    }
    printf("{\"streams\":%zu,\"errors\":%ld,\"warmup_errors\":%ld,", nlat, errors, warm_errors);
    print_stats("", lat, nlat);
    printf(",");
    print_stats("complete_", lat2, nlat);
    printf("}\n");
    return 0;
}

int main(int argc, char **argv) {
    signal(SIGPIPE, SIG_IGN);
    struct rlimit r;  /* 1000+ connections: raise the descriptor limit as far as allowed */
    if (!getrlimit(RLIMIT_NOFILE, &r)) { r.rlim_cur = r.rlim_max; setrlimit(RLIMIT_NOFILE, &r); }
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc == 3 && !strcmp(argv[1], "serve")) serve(argv[2]);
    if (argc == 6 && !strcmp(argv[1], "load"))
        return load(atoi(argv[2]), atoi(argv[3]), atof(argv[4]), argv[5]);
    if (argc == 6 && !strcmp(argv[1], "burst"))
        return burst(atoi(argv[2]), atoi(argv[3]), atoi(argv[4]), argv[5]);
    fprintf(stderr, "usage: cpeer serve PORT_FILE\n"
                    "       cpeer load PORT CONNECTIONS SECONDS REQUEST_FILE\n"
                    "       cpeer burst PORT CONNECTIONS WAVES REQUEST_FILE\n");
    return 2;
}
