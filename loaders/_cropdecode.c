/* Random-resized-crop on the host in one pass per image: decode only the rows and
 * columns the crop needs, then resize them to the stage size, all without the GIL.
 *
 * Why: in DALI's CPU mode the crop's resize costs as much as the decode (measured
 * on 500x375 photos: decode 0.62 ms, linear antialiased resize to 128 px 0.55 ms,
 * the same with antialiasing off 0.51 ms; docs/benchmarks.md), so the resize, not the
 * pixels it writes, dominates at 128 px. Here:
 *
 * - libjpeg(-turbo) skips the rows above the crop (jpeg_skip_scanlines), decodes only
 *   the iMCU columns that hold it (jpeg_crop_scanline) and stops below it; when the
 *   crop is at least twice the output size it also decodes at 1/2, 1/4 or 1/8 scale in
 *   the DCT domain (PIL's draft with reducing_gap=2: never closer than 2x, so the
 *   resize still low-passes);
 * - the resize is torchvision's antialiased bilinear (a triangle kernel widened by the
 *   scale when shrinking, taps outside the image dropped and the rest renormalised, as
 *   Pillow's BILINEAR) in 14-bit fixed point: down the columns first, then along the rows
 *   of the already shortened image as down the columns of its transpose, so that one
 *   kernel does both passes (AVX2 multiply-adds where the CPU has them, plain C otherwise:
 *   the same bytes; measured 0.50 vs 0.59 ms per image at 128 px, 0.69 vs 0.95 at 300);
 * - a crop whose x runs backwards (x1 < x0) is mirrored as it is written.
 *
 * Any libjpeg error or warning (corrupt entropy data, a truncated file) fails the sample,
 * as build-shards' decode check does, and stops the decode at once; a JPEG this code does
 * not take (CMYK, 12-bit) is reported as unsupported, and the caller decodes it another way.
 *
 * The bytes may come from anyone's shards, so the limits are checked here, whatever the
 * caller passed (issue #20): a frame over MAX_PIXELS (or the caller's lower max_pixels) is
 * refused right after the header, before libjpeg allocates anything for it; a progressive
 * file over MAX_SCANS scans is stopped; regions must be finite and of bounded size; output
 * sizes >= 1 and bounded; and no two calls may write overlapping parts of one output.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jpeglib.h>

#define COEF_BITS 14
#define REDUCING_GAP 2.0 /* DCT-domain scaling only while the crop stays >= 2x the output */
#define DECODE_MARGIN 4  /* px decoded beyond what the filter reads (4:2:0 upsampling reaches 2) */
/* Hard ceiling on a frame's height x width, px: twice Pillow's MAX_IMAGE_PIXELS (89,478,485), the size
 * at which Pillow raises DecompressionBombError instead of warning. A caller's max_pixels only lowers it. */
#define MAX_PIXELS 178956970ULL
/* Progressive scans per file: libjpeg-turbo's advice for untrusted input (libjpeg.txt, "progress monitor";
 * djpeg -maxscans) and the limit its own fuzzers set (TJPARAM_SCANLIMIT 500). Encoders write ~10. */
#define MAX_SCANS 500
/* |region value| bound, px: 16x the largest JPEG side (65535), so that every (int) cast below is defined */
#define MAX_COORD 1048576.0
/* Largest output side, px: a JPEG's own limit (JPEG_MAX_DIMENSION) */
#define MAX_SIDE 65500

enum { OK = 0, FAILED = 1, UNSUPPORTED = 2 };

struct err_mgr {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
    char message[JMSG_LENGTH_MAX];
};

/* The decompressor and its error manager live in the caller of the function that calls setjmp, so
 * that nothing libjpeg changes between setjmp and longjmp is an automatic local of that function
 * (C11 7.13.2.1: such locals are indeterminate after the longjmp unless volatile). */
typedef struct {
    struct jpeg_decompress_struct d;
    struct err_mgr err;
    struct jpeg_progress_mgr progress;
} decoder_t;

static void on_error(j_common_ptr cinfo) {
    struct err_mgr *err = (struct err_mgr *)cinfo->err;
    cinfo->err->format_message(cinfo, err->message);
    longjmp(err->jump, 1);
}

/* A warning (corrupt data, premature end) fails the sample anyway: stop at the first one rather than
 * decode on through filler (libjpeg-turbo's TJPARAM_STOPONWARNING, for the same reason). */
static void on_message(j_common_ptr cinfo, int level) {
    if (level < 0) {
        cinfo->err->num_warnings++;
        on_error(cinfo);
    }
}

/* Called by libjpeg between iMCU rows and scans: stops a progressive file past MAX_SCANS scans. */
static void on_progress(j_common_ptr cinfo) {
    j_decompress_ptr d = (j_decompress_ptr)cinfo;
    if (d->input_scan_number > MAX_SCANS) {
        struct err_mgr *err = (struct err_mgr *)cinfo->err;
        snprintf(err->message, JMSG_LENGTH_MAX, "more than %d progressive scans", MAX_SCANS);
        longjmp(err->jump, 1);
    }
}

typedef struct {
    int n, width;   /* outputs; taps stored per output */
    int *first;     /* first input sample of each output */
    int *count;     /* taps of each output */
    int16_t *coef;  /* n x width */
} taps_t;

static void free_taps(taps_t *t) {
    free(t->first);
    free(t->count);
    free(t->coef);
}

/* Output i of n covers [start + i * step, start + (i + 1) * step) of the input's
 * continuous coordinate (sample j covers [j, j + 1)); samples [lo_in, hi_in) may be read. */
static int make_taps(taps_t *t, int lo_in, int hi_in, double start, double extent, int n) {
    double step = extent / n, fscale = step > 1.0 ? step : 1.0, support = fscale; /* triangle: radius 1 */
    int span = (int)ceil(support) * 2 + 2;
    t->n = n;
    t->width = span;
    t->first = malloc(sizeof(int) * n);
    t->count = malloc(sizeof(int) * n);
    t->coef = calloc((size_t)n * span, sizeof(int16_t));
    double *w = malloc(sizeof(double) * span);
    if (!t->first || !t->count || !t->coef || !w) {
        free(w);
        free_taps(t);
        return -1;
    }
    for (int i = 0; i < n; i++) {
        double centre = start + (i + 0.5) * step;
        int lo = (int)floor(centre - support + 0.5), hi = (int)floor(centre + support + 0.5);
        if (lo < lo_in) lo = lo_in;
        if (hi > hi_in) hi = hi_in;
        if (hi - lo > span) hi = lo + span;
        double sum = 0.0;
        for (int j = lo; j < hi; j++) {
            double x = fabs((j + 0.5 - centre) / fscale);
            sum += (w[j - lo] = x < 1.0 ? 1.0 - x : 0.0);
        }
        if (hi <= lo || sum == 0.0) { /* no tap inside: take the nearest sample */
            lo = centre < lo_in ? lo_in : centre >= hi_in ? hi_in - 1 : (int)centre;
            hi = lo + 1;
            w[0] = sum = 1.0;
        }
        t->first[i] = lo;
        t->count[i] = hi - lo;
        for (int j = lo; j < hi; j++) t->coef[(size_t)i * span + (j - lo)] = (int16_t)lrint(w[j - lo] / sum * (1 << COEF_BITS));
    }
    free(w);
    return 0;
}

static inline uint8_t clamp_u8(int32_t v) { return (uint8_t)(v < 0 ? 0 : v > 255 ? 255 : v); }

/* Down the columns: dst (tv->n rows x row_len) from src rows (row_len bytes, stride apart).
 * Both passes run through here (the second on a transposed image). */
static void filter_down_generic(const uint8_t *src, size_t stride, int row_len, const taps_t *tv, uint8_t *dst,
                                int32_t *acc) {
    for (int i = 0; i < tv->n; i++) {
        const int16_t *c = tv->coef + (size_t)i * tv->width;
        const uint8_t *base = src + (size_t)tv->first[i] * stride;
        for (int x = 0; x < row_len; x++) acc[x] = 1 << (COEF_BITS - 1);
        for (int k = 0; k < tv->count[i]; k++) {
            const int32_t ck = c[k];
            const uint8_t *row = base + (size_t)k * stride;
            for (int x = 0; x < row_len; x++) acc[x] += ck * row[x];
        }
        uint8_t *d = dst + (size_t)i * row_len;
        for (int x = 0; x < row_len; x++) d[x] = clamp_u8(acc[x] >> COEF_BITS);
    }
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define HAVE_AVX2_PATH 1

/* The same sums, 16 columns at a time: two rows' bytes interleaved to 16 bits and multiplied by
 * a pair of taps with vpmaddwd (16 multiply-adds an instruction; int32 sums, so the same bytes as
 * the generic loop). An odd last tap pairs with a zero tap on the same row. */
__attribute__((target("avx2")))
static void filter_down_avx2(const uint8_t *src, size_t stride, int row_len, const taps_t *tv, uint8_t *dst,
                             int32_t *acc) {
    for (int i = 0; i < tv->n; i++) {
        const int16_t *c = tv->coef + (size_t)i * tv->width;
        const uint8_t *base = src + (size_t)tv->first[i] * stride;
        int count = tv->count[i], x = 0;
        uint8_t *d = dst + (size_t)i * row_len;
        for (; x + 16 <= row_len; x += 16) {
            __m256i lo = _mm256_set1_epi32(1 << (COEF_BITS - 1)), hi = lo;
            for (int k = 0; k < count; k += 2) {
                const uint8_t *r0 = base + (size_t)k * stride + x;
                const uint8_t *r1 = k + 1 < count ? r0 + stride : r0;
                int16_t c1 = k + 1 < count ? c[k + 1] : 0;
                __m128i a = _mm_loadu_si128((const __m128i *)r0), b = _mm_loadu_si128((const __m128i *)r1);
                __m256i pairs_lo = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(a, b)); /* a0 b0 a1 b1 ... */
                __m256i pairs_hi = _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(a, b));
                __m256i taps = _mm256_set1_epi32((int32_t)(((uint32_t)(uint16_t)c1 << 16) | (uint16_t)c[k]));
                lo = _mm256_add_epi32(lo, _mm256_madd_epi16(pairs_lo, taps));
                hi = _mm256_add_epi32(hi, _mm256_madd_epi16(pairs_hi, taps));
            }
            lo = _mm256_srai_epi32(lo, COEF_BITS);
            hi = _mm256_srai_epi32(hi, COEF_BITS);
            __m256i words = _mm256_packs_epi32(lo, hi); /* lanes: lo0-3 hi0-3 | lo4-7 hi4-7 */
            __m128i bytes = _mm_packus_epi16(_mm256_castsi256_si128(words), _mm256_extracti128_si256(words, 1));
            /* bytes: lo0-3 hi0-3 lo4-7 hi4-7; put them back in column order */
            bytes = _mm_shuffle_epi32(bytes, _MM_SHUFFLE(3, 1, 2, 0));
            _mm_storeu_si128((__m128i *)(d + x), bytes);
        }
        for (; x < row_len; x++) { /* the last columns */
            int32_t sum = 1 << (COEF_BITS - 1);
            for (int k = 0; k < count; k++) sum += c[k] * base[(size_t)k * stride + x];
            d[x] = clamp_u8(sum >> COEF_BITS);
        }
    }
    (void)acc;
}
#endif

/* Which filter kernel runs: set at import from the CPU, changed by use_avx2() (tests) while other threads may
 * be decoding, so read and written atomically; each decode_batch call reads it once. */
static int use_avx2;

static void filter_down(const uint8_t *src, size_t stride, int row_len, const taps_t *tv, uint8_t *dst, int32_t *acc,
                        int avx2) {
#ifdef HAVE_AVX2_PATH
    if (avx2) {
        filter_down_avx2(src, stride, row_len, tv, dst, acc);
        return;
    }
#endif
    (void)avx2;
    filter_down_generic(src, stride, row_len, tv, dst, acc);
}

/* dst (w x h RGB pixels) = src (h x w) transposed; mirror: src row y lands in dst column h - 1 - y. */
static void transpose_rgb(const uint8_t *src, int h, int w, int mirror, uint8_t *dst) {
    enum { TILE = 16 }; /* in tiles, so that the writes stay in a few cache lines (measured: 2x faster) */
    for (int y0 = 0; y0 < h; y0 += TILE)
        for (int x0 = 0; x0 < w; x0 += TILE)
            for (int y = y0; y < y0 + TILE && y < h; y++) {
                const uint8_t *s = src + (size_t)y * w * 3;
                size_t col = (size_t)(mirror ? h - 1 - y : y) * 3;
                for (int x = x0; x < x0 + TILE && x < w; x++) {
                    uint8_t *d = dst + (size_t)x * h * 3 + col;
                    d[0] = s[3 * x], d[1] = s[3 * x + 1], d[2] = s[3 * x + 2];
                }
            }
}

/* The decoded window of one image: what read_window hands the filter. */
typedef struct {
    uint8_t *px;                  /* rows x w RGB pixels, malloc'd */
    int rows, w;                  /* decoded rows from `top`, columns from `xoff` */
    int top, xoff;                /* its place in the (DCT-scaled) image, px */
    int read_top, read_bottom;    /* the rows the filter may read, image px */
    int read_left, read_right;    /* the columns */
    double y0, y1, x0, x1;        /* the region in decoded px, x0 < x1 */
    int mirror;
} window_t;

/* Decode the rows and columns of the image that `region` needs (see crop_decode) into win->px. The only
 * function here that calls setjmp, and after a longjmp it reads no local: what libjpeg changes lies behind
 * the pointers dec and win. OK, FAILED or UNSUPPORTED; message says why when not OK. */
static int read_window(decoder_t *dec, const uint8_t *data, size_t len, const double *region, int out_h, int out_w,
                       unsigned long long max_pixels, window_t *win, char *message) {
    struct jpeg_decompress_struct *d = &dec->d;
    if (setjmp(dec->err.jump)) {
        snprintf(message, JMSG_LENGTH_MAX, "%s", dec->err.message);
        return FAILED;
    }
    jpeg_mem_src(d, (unsigned char *)data, (unsigned long)len);
    jpeg_read_header(d, TRUE);
    /* before jpeg_start_decompress, which allocates the whole image's coefficients for a progressive file */
    if ((unsigned long long)d->image_width * d->image_height > max_pixels) {
        snprintf(message, JMSG_LENGTH_MAX, "frame %ux%u is over the decoder's limit of %llu pixels",
                 (unsigned)d->image_width, (unsigned)d->image_height, max_pixels);
        return FAILED;
    }
    if (d->data_precision != 8 || !(d->jpeg_color_space == JCS_YCbCr || d->jpeg_color_space == JCS_GRAYSCALE ||
                                    d->jpeg_color_space == JCS_RGB)) {
        snprintf(message, JMSG_LENGTH_MAX, "colour space %d, %d-bit", (int)d->jpeg_color_space, d->data_precision);
        return UNSUPPORTED;
    }
    int mirror = region[3] < region[1];
    double y0 = region[0], y1 = region[2], x0 = mirror ? region[3] : region[1], x1 = mirror ? region[1] : region[3];
    int denom = 1;
    while (denom < 8 && (y1 - y0) / (2 * denom) >= REDUCING_GAP * out_h && (x1 - x0) / (2 * denom) >= REDUCING_GAP * out_w)
        denom *= 2;
    d->out_color_space = JCS_RGB;
    d->scale_num = 1;
    d->scale_denom = denom;
    d->dct_method = JDCT_ISLOW;
    dec->progress.progress_monitor = on_progress;
    d->progress = &dec->progress;
    jpeg_start_decompress(d);
    int full_w = (int)d->output_width, full_h = (int)d->output_height;
    /* the region in decoded samples; the rows and columns its filters reach (ry, rx) inside the bounds
     * (btop..bright) are what they read, and those plus DECODE_MARGIN what is decoded: at the edge of a
     * cropped decode libjpeg's chroma upsampling lacks its neighbours, and its pixels differ there.
     * decode_batch bounded the region by MAX_COORD, so every value cast to int here is within +-(3 MAX_COORD + 2). */
    y0 /= denom, y1 /= denom, x0 /= denom, x1 /= denom;
    double ry = fmax((y1 - y0) / out_h, 1.0) + 1.0, rx = fmax((x1 - x0) / out_w, 1.0) + 1.0;
    int btop = (int)fmax(floor(region[4] / denom), 0), bbottom = (int)fmin(ceil(region[6] / denom), full_h);
    int bleft = (int)fmax(floor(region[5] / denom), 0), bright = (int)fmin(ceil(region[7] / denom), full_w);
    int top = (int)fmax(floor(y0 - ry), btop), bottom = (int)fmin(ceil(y1 + ry), bbottom);
    int left = (int)fmax(floor(x0 - rx), bleft), right = (int)fmin(ceil(x1 + rx), bright);
    if (bottom <= top || right <= left) {
        snprintf(message, JMSG_LENGTH_MAX, "crop region outside the %dx%d image", full_w, full_h);
        return FAILED;
    }
    *win = (window_t){.read_top = top, .read_bottom = bottom, .read_left = left, .read_right = right,
                      .y0 = y0, .y1 = y1, .x0 = x0, .x1 = x1, .mirror = mirror};
    top = top - DECODE_MARGIN > 0 ? top - DECODE_MARGIN : 0;
    left = left - DECODE_MARGIN > 0 ? left - DECODE_MARGIN : 0;
    bottom = bottom + DECODE_MARGIN < full_h ? bottom + DECODE_MARGIN : full_h;
    right = right + DECODE_MARGIN < full_w ? right + DECODE_MARGIN : full_w;
    JDIMENSION xoff = (JDIMENSION)left, width = (JDIMENSION)(right - left);
    jpeg_crop_scanline(d, &xoff, &width); /* widened to whole iMCUs */
    win->top = top, win->xoff = (int)xoff, win->rows = bottom - top, win->w = (int)width;
    win->px = malloc((size_t)win->rows * win->w * 3);
    if (!win->px) {
        snprintf(message, JMSG_LENGTH_MAX, "out of memory");
        return FAILED;
    }
    if (top > 0 && jpeg_skip_scanlines(d, (JDIMENSION)top) != (JDIMENSION)top) {
        snprintf(message, JMSG_LENGTH_MAX, "data ends before row %d", top);
        return FAILED;
    }
    for (int y = 0; y < win->rows;) {
        JSAMPROW at[16]; /* several rows a call: libjpeg then writes 4:2:0 row pairs in place, not through a spare row */
        int want = win->rows - y < 16 ? win->rows - y : 16;
        for (int k = 0; k < want; k++) at[k] = win->px + (size_t)(y + k) * win->w * 3;
        JDIMENSION got = jpeg_read_scanlines(d, at, (JDIMENSION)want);
        if (got == 0) {
            snprintf(message, JMSG_LENGTH_MAX, "data ends at row %d", top + y);
            return FAILED;
        }
        y += (int)got;
    }
    return OK;
}

/* One image. region: (y0, x0, y1, x1) in source pixels, x1 < x0 mirrors, then (top, left, bottom, right), the
 * part of the image the filter may read: the crop window itself for a crop-then-resize (torchvision's
 * RandomResizedCrop, whose resize sees only the crop), the whole image for a resize-then-crop (its eval
 * Resize + CenterCrop). out: out_h x out_w x 3. */
static int crop_decode(const uint8_t *data, size_t len, const double *region, int out_h, int out_w,
                       unsigned long long max_pixels, int avx2, uint8_t *out, char *message) {
    decoder_t dec;
    window_t win = {0};
    taps_t tv = {0}, th = {0};
    uint8_t *mid = NULL;
    int32_t *acc = NULL;
    dec.d.err = jpeg_std_error(&dec.err.pub);
    dec.err.pub.error_exit = on_error;
    dec.err.pub.emit_message = on_message;
    dec.err.message[0] = 0;
    dec.progress = (struct jpeg_progress_mgr){0};
    jpeg_create_decompress(&dec.d);
    int status = read_window(&dec, data, len, region, out_h, out_w, max_pixels, &win, message);
    jpeg_destroy_decompress(&dec.d); /* also ends a decode stopped below the crop */
    if (status != OK) goto done;
    status = FAILED;
    int w = win.w;
    /* mid, its transpose, the result's transpose; out_h * w <= MAX_SIDE * MAX_SIDE: no size_t overflow */
    mid = malloc((size_t)out_h * w * 3 * 2 + (size_t)out_h * out_w * 3);
    acc = malloc(sizeof(int32_t) * (size_t)(w > out_h ? w : out_h) * 3);
    if (!mid || !acc || make_taps(&tv, win.read_top - win.top, win.read_bottom - win.top, win.y0 - win.top,
                                  win.y1 - win.y0, out_h) ||
        make_taps(&th, win.read_left - win.xoff, win.read_right - win.xoff, win.x0 - win.xoff, win.x1 - win.x0, out_w)) {
        snprintf(message, JMSG_LENGTH_MAX, "out of memory");
        goto done;
    }
    uint8_t *mid_t = mid + (size_t)out_h * w * 3, *out_t = mid_t + (size_t)out_h * w * 3;
    filter_down(win.px, (size_t)w * 3, w * 3, &tv, mid, acc, avx2);             /* out_h x w */
    transpose_rgb(mid, out_h, w, 0, mid_t);                                     /* w x out_h */
    filter_down(mid_t, (size_t)out_h * 3, out_h * 3, &th, out_t, acc, avx2);    /* out_w x out_h */
    transpose_rgb(out_t, out_w, out_h, win.mirror, out);                        /* out_h x out_w */
    status = OK;
done:
    free_taps(&tv);
    free_taps(&th);
    free(win.px);
    free(mid);
    free(acc);
    return status;
}

/* ---- Python entry point ---------------------------------------------------- */

/* The byte ranges of outputs that decode_batch calls are writing now, so that two calls (threads) never
 * write the same bytes: each call links a node on its own stack while it runs. Guarded by `writers_lock`,
 * not the GIL, which the calls release. */
typedef struct writer {
    const uint8_t *begin, *end;
    struct writer *next;
} writer_t;
static writer_t *writers;
static PyThread_type_lock writers_lock;

/* Link `self` unless its range overlaps a running call's; 0 on success. */
static int claim(writer_t *self) {
    int overlap = 0;
    PyThread_acquire_lock(writers_lock, WAIT_LOCK);
    for (writer_t *w = writers; w && !overlap; w = w->next) overlap = self->begin < w->end && w->begin < self->end;
    if (!overlap) {
        self->next = writers;
        writers = self;
    }
    PyThread_release_lock(writers_lock);
    return overlap ? -1 : 0;
}

static void release(writer_t *self) {
    PyThread_acquire_lock(writers_lock, WAIT_LOCK);
    for (writer_t **w = &writers; *w; w = &(*w)->next)
        if (*w == self) {
            *w = self->next;
            break;
        }
    PyThread_release_lock(writers_lock);
}

/* ValueError naming the first region of [start, stop) that is not finite, out of bounds or empty; 0 if none. */
static int check_regions(const double *reg, Py_ssize_t start, Py_ssize_t stop) {
    for (Py_ssize_t i = start; i < stop; i++) {
        const double *r = reg + 8 * (i - start);
        for (int k = 0; k < 8; k++)
            if (!isfinite(r[k]) || fabs(r[k]) > MAX_COORD) {
                PyErr_Format(PyExc_ValueError, "decode_batch: region %zd has a value that is not finite or beyond "
                             "+-%d px (column %d)", i, (int)MAX_COORD, k);
                return -1;
            }
        if (!(r[2] > r[0]) || r[3] == r[1] || !(r[6] > r[4]) || !(r[7] > r[5])) {
            PyErr_Format(PyExc_ValueError, "decode_batch: region %zd is empty (need y1 > y0, x1 != x0, "
                         "bottom > top, right > left)", i);
            return -1;
        }
    }
    return 0;
}

static PyObject *decode_batch(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *jpgs, *out_obj;
    Py_buffer regions, out;
    Py_ssize_t start, stop;
    long long max_pixels = 0;
    if (!PyArg_ParseTuple(args, "Oy*Onn|L", &jpgs, &regions, &out_obj, &start, &stop, &max_pixels)) return NULL;
    if (PyObject_GetBuffer(out_obj, &out, PyBUF_CONTIG) < 0) { /* writable, C-contiguous, with its shape */
        PyBuffer_Release(&regions);
        return NULL;
    }
    PyObject *seq = PySequence_Fast(jpgs, "decode_batch: jpgs must be a sequence of buffers");
    PyObject *result = NULL;
    Py_buffer *views = NULL;
    int *status = NULL;
    double *reg = NULL;
    char (*messages)[JMSG_LENGTH_MAX] = NULL;
    writer_t writer = {NULL, NULL, NULL};
    int claimed = 0;
    Py_ssize_t n = seq ? PySequence_Fast_GET_SIZE(seq) : 0, held = 0;
    if (!seq) goto end;
    if (out.ndim != 4 || out.shape[0] != n || out.shape[3] != 3 || !PyBuffer_IsContiguous(&out, 'C') ||
        out.itemsize != 1 || regions.len != (Py_ssize_t)(n * 8 * sizeof(double)) || start < 0 || stop > n || start > stop) {
        PyErr_Format(PyExc_ValueError, "decode_batch: need out uint8 [N, H, W, 3] (C order), regions float64 [N, 8], "
                                       "0 <= start <= stop <= N (N=%zd)", n);
        goto end;
    }
    if (out.shape[1] < 1 || out.shape[1] > MAX_SIDE || out.shape[2] < 1 || out.shape[2] > MAX_SIDE) {
        PyErr_Format(PyExc_ValueError, "decode_batch: output size %zdx%zd, need 1 to %d px a side", out.shape[2],
                     out.shape[1], MAX_SIDE);
        goto end;
    }
    if (max_pixels < 0) {
        PyErr_Format(PyExc_ValueError, "decode_batch: max_pixels %lld < 0", max_pixels);
        goto end;
    }
    unsigned long long limit = max_pixels == 0 || (unsigned long long)max_pixels > MAX_PIXELS
                                   ? MAX_PIXELS : (unsigned long long)max_pixels; /* the caller's only lowers it */
    /* a copy: aligned, and no other thread can change it while the GIL is released */
    reg = malloc(sizeof(double) * 8 * ((size_t)(stop - start) + 1));
    views = calloc((size_t)(stop - start) + 1, sizeof(Py_buffer));
    status = calloc((size_t)(stop - start) + 1, sizeof(int));
    messages = calloc((size_t)(stop - start) + 1, JMSG_LENGTH_MAX);
    if (!reg || !views || !status || !messages) {
        PyErr_NoMemory();
        goto end;
    }
    memcpy(reg, (const double *)regions.buf + 8 * start, sizeof(double) * 8 * (size_t)(stop - start));
    if (check_regions(reg, start, stop) < 0) goto end;
    int out_h = (int)out.shape[1], out_w = (int)out.shape[2];
    size_t per = (size_t)out_h * out_w * 3;
    writer.begin = (const uint8_t *)out.buf + per * start;
    writer.end = (const uint8_t *)out.buf + per * stop;
    if (stop > start && claim(&writer) < 0) {
        PyErr_Format(PyExc_ValueError, "decode_batch: out[%zd:%zd] overlaps the part another call is writing",
                     start, stop);
        goto end;
    }
    claimed = stop > start;
    for (Py_ssize_t i = start; i < stop; i++, held++)
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(seq, i), &views[i - start], PyBUF_SIMPLE) < 0) goto end;
    int avx2 = __atomic_load_n(&use_avx2, __ATOMIC_RELAXED);
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = start; i < stop; i++)
        status[i - start] = crop_decode(views[i - start].buf, (size_t)views[i - start].len, reg + 8 * (i - start),
                                        out_h, out_w, limit, avx2, (uint8_t *)out.buf + per * i,
                                        messages[i - start]);
    Py_END_ALLOW_THREADS
    result = PyList_New(0);
    for (Py_ssize_t i = start; result && i < stop; i++) {
        if (status[i - start] == OK) continue;
        PyObject *entry = Py_BuildValue("(nsO)", i, messages[i - start], status[i - start] == UNSUPPORTED ? Py_True : Py_False);
        if (!entry || PyList_Append(result, entry) < 0) Py_CLEAR(result);
        Py_XDECREF(entry);
    }
end:
    if (claimed) release(&writer);
    for (Py_ssize_t k = 0; k < held; k++) PyBuffer_Release(&views[k]);
    free(reg);
    free(views);
    free(status);
    free(messages);
    Py_XDECREF(seq);
    PyBuffer_Release(&regions);
    PyBuffer_Release(&out);
    return result;
}

static PyObject *set_avx2(PyObject *self, PyObject *arg);

static PyMethodDef methods[] = {
    {"use_avx2", set_avx2, METH_O,
     "use_avx2(flag) -> bool: filter with the AVX2 kernel when flag is true and the CPU has AVX2,\n"
     "with the plain C one otherwise (the same bytes; tests); returns the previous setting."},
    {"decode_batch", decode_batch, METH_VARARGS,
     "decode_batch(jpgs, regions, out, start, stop, max_pixels=0) -> [(index, message, unsupported), ...]\n\n"
     "For i in [start, stop): decode the part of JPEG jpgs[i] that region i (float64 y0, x0, y1, x1\n"
     "in source pixels, x1 < x0 mirrors; then top, left, bottom, right: what the filter may read) needs\n"
     "and resize that region into out[i] (uint8 H x W x 3, antialiased bilinear), without the GIL. Returns the\n"
     "samples that failed: any libjpeg error or warning, a frame over max_pixels or MAX_PIXELS (whichever is\n"
     "lower; 0: MAX_PIXELS), over MAX_SCANS progressive scans, or (unsupported=True) a JPEG this decoder does\n"
     "not take (CMYK, 12-bit). ValueError for a region that is not finite or empty, an output side outside\n"
     "1..65500, or out[start:stop] overlapping the part a running call writes."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cropdecode", "Crop-decode-resize JPEGs on the host.", -1,
                                    methods};

static PyObject *set_avx2(PyObject *self, PyObject *arg) {
    (void)self;
    int want = PyObject_IsTrue(arg), before = __atomic_load_n(&use_avx2, __ATOMIC_RELAXED);
    if (want < 0) return NULL;
#ifdef HAVE_AVX2_PATH
    __atomic_store_n(&use_avx2, want && __builtin_cpu_supports("avx2"), __ATOMIC_RELAXED);
#endif
    return PyBool_FromLong(before);
}

PyMODINIT_FUNC PyInit__cropdecode(void) {
#ifdef HAVE_AVX2_PATH
    __atomic_store_n(&use_avx2, __builtin_cpu_supports("avx2"), __ATOMIC_RELAXED);
#endif
    if (!writers_lock && !(writers_lock = PyThread_allocate_lock())) return PyErr_NoMemory();
    PyObject *m = PyModule_Create(&module);
    if (m && (PyModule_AddIntConstant(m, "MAX_SCANS", MAX_SCANS) < 0 ||
              PyModule_AddIntConstant(m, "MAX_PIXELS", (long)MAX_PIXELS) < 0)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
