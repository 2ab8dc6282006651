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
 * as build-shards' decode check does; a JPEG this code does not take (CMYK, 12-bit) is
 * reported as unsupported, and the caller decodes it another way.
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

enum { OK = 0, FAILED = 1, UNSUPPORTED = 2 };

struct err_mgr {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
    char message[JMSG_LENGTH_MAX];
};

static void on_error(j_common_ptr cinfo) {
    struct err_mgr *err = (struct err_mgr *)cinfo->err;
    cinfo->err->format_message(cinfo, err->message);
    longjmp(err->jump, 1);
}

static void on_message(j_common_ptr cinfo, int level) {
    struct err_mgr *err = (struct err_mgr *)cinfo->err;
    if (level < 0 && cinfo->err->num_warnings++ == 0) cinfo->err->format_message(cinfo, err->message);
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

static int use_avx2; /* set at import from the CPU */

static void filter_down(const uint8_t *src, size_t stride, int row_len, const taps_t *tv, uint8_t *dst, int32_t *acc) {
#ifdef HAVE_AVX2_PATH
    if (use_avx2) {
        filter_down_avx2(src, stride, row_len, tv, dst, acc);
        return;
    }
#endif
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

/* One image. region: (y0, x0, y1, x1) in source pixels, x1 < x0 mirrors, then (top, left, bottom, right), the
 * part of the image the filter may read: the crop window itself for a crop-then-resize (torchvision's
 * RandomResizedCrop, whose resize sees only the crop), the whole image for a resize-then-crop (its eval
 * Resize + CenterCrop). out: out_h x out_w x 3. */
static int crop_decode(const uint8_t *data, size_t len, const double *region, int out_h, int out_w, uint8_t *out,
                       char *message) {
    struct jpeg_decompress_struct d;
    struct err_mgr err;
    uint8_t *volatile win = NULL, *volatile mid = NULL;
    int32_t *volatile acc = NULL;
    taps_t tv = {0}, th = {0};
    volatile int status = FAILED;
    d.err = jpeg_std_error(&err.pub);
    err.pub.error_exit = on_error;
    err.pub.emit_message = on_message;
    err.message[0] = 0;
    jpeg_create_decompress(&d);
    if (setjmp(err.jump)) {
        snprintf(message, JMSG_LENGTH_MAX, "%s", err.message);
        goto done;
    }
    jpeg_mem_src(&d, (unsigned char *)data, (unsigned long)len);
    jpeg_read_header(&d, TRUE);
    if (d.data_precision != 8 || !(d.jpeg_color_space == JCS_YCbCr || d.jpeg_color_space == JCS_GRAYSCALE ||
                                   d.jpeg_color_space == JCS_RGB)) {
        snprintf(message, JMSG_LENGTH_MAX, "colour space %d, %d-bit", (int)d.jpeg_color_space, d.data_precision);
        status = UNSUPPORTED;
        goto done;
    }
    int mirror = region[3] < region[1];
    double y0 = region[0], y1 = region[2], x0 = mirror ? region[3] : region[1], x1 = mirror ? region[1] : region[3];
    int denom = 1;
    while (denom < 8 && (y1 - y0) / (2 * denom) >= REDUCING_GAP * out_h && (x1 - x0) / (2 * denom) >= REDUCING_GAP * out_w)
        denom *= 2;
    d.out_color_space = JCS_RGB;
    d.scale_num = 1;
    d.scale_denom = denom;
    d.dct_method = JDCT_ISLOW;
    jpeg_start_decompress(&d);
    int full_w = (int)d.output_width, full_h = (int)d.output_height;
    /* the region in decoded samples; the rows and columns its filters reach (ry, rx) inside the bounds
     * (btop..bright) are what they read, and those plus DECODE_MARGIN what is decoded: at the edge of a
     * cropped decode libjpeg's chroma upsampling lacks its neighbours, and its pixels differ there */
    y0 /= denom, y1 /= denom, x0 /= denom, x1 /= denom;
    double ry = fmax((y1 - y0) / out_h, 1.0) + 1.0, rx = fmax((x1 - x0) / out_w, 1.0) + 1.0;
    int btop = (int)fmax(floor(region[4] / denom), 0), bbottom = (int)fmin(ceil(region[6] / denom), full_h);
    int bleft = (int)fmax(floor(region[5] / denom), 0), bright = (int)fmin(ceil(region[7] / denom), full_w);
    int top = (int)fmax(floor(y0 - ry), btop), bottom = (int)fmin(ceil(y1 + ry), bbottom);
    int left = (int)fmax(floor(x0 - rx), bleft), right = (int)fmin(ceil(x1 + rx), bright);
    if (bottom <= top || right <= left) {
        snprintf(message, JMSG_LENGTH_MAX, "crop region outside the %dx%d image", full_w, full_h);
        goto done;
    }
    int read_top = top, read_left = left, read_bottom = bottom, read_right = right; /* what the filter reads */
    top = top - DECODE_MARGIN > 0 ? top - DECODE_MARGIN : 0;
    left = left - DECODE_MARGIN > 0 ? left - DECODE_MARGIN : 0;
    bottom = bottom + DECODE_MARGIN < full_h ? bottom + DECODE_MARGIN : full_h;
    right = right + DECODE_MARGIN < full_w ? right + DECODE_MARGIN : full_w;
    JDIMENSION xoff = (JDIMENSION)left, width = (JDIMENSION)(right - left);
    jpeg_crop_scanline(&d, &xoff, &width); /* widened to whole iMCUs */
    int rows = bottom - top, w = (int)width;
    win = malloc((size_t)rows * w * 3);
    mid = malloc((size_t)out_h * w * 3 * 2 + (size_t)out_h * out_w * 3); /* mid, its transpose, the result's */
    acc = malloc(sizeof(int32_t) * (size_t)(w > out_h ? w : out_h) * 3);
    if (!win || !mid || !acc) {
        snprintf(message, JMSG_LENGTH_MAX, "out of memory");
        goto done;
    }
    if (top > 0 && jpeg_skip_scanlines(&d, (JDIMENSION)top) != (JDIMENSION)top) {
        snprintf(message, JMSG_LENGTH_MAX, "data ends before row %d", top);
        goto done;
    }
    for (int y = 0; y < rows;) {
        JSAMPROW at[16]; /* several rows a call: libjpeg then writes 4:2:0 row pairs in place, not through a spare row */
        int want = rows - y < 16 ? rows - y : 16;
        for (int k = 0; k < want; k++) at[k] = win + (size_t)(y + k) * w * 3;
        JDIMENSION got = jpeg_read_scanlines(&d, at, (JDIMENSION)want);
        if (got == 0) {
            snprintf(message, JMSG_LENGTH_MAX, "data ends at row %d", top + y);
            goto done;
        }
        y += (int)got;
    }
    if (err.pub.num_warnings) {
        snprintf(message, JMSG_LENGTH_MAX, "%s", err.message);
        goto done;
    }
    if (make_taps(&tv, read_top - top, read_bottom - top, y0 - top, y1 - y0, out_h) ||
        make_taps(&th, read_left - (int)xoff, read_right - (int)xoff, x0 - (double)xoff, x1 - x0, out_w)) {
        snprintf(message, JMSG_LENGTH_MAX, "out of memory");
        goto done;
    }
    uint8_t *mid_t = mid + (size_t)out_h * w * 3, *out_t = mid_t + (size_t)out_h * w * 3;
    filter_down(win, (size_t)w * 3, w * 3, &tv, mid, acc);             /* out_h x w */
    transpose_rgb(mid, out_h, w, 0, mid_t);                            /* w x out_h */
    filter_down(mid_t, (size_t)out_h * 3, out_h * 3, &th, out_t, acc); /* out_w x out_h */
    transpose_rgb(out_t, out_w, out_h, mirror, out);                   /* out_h x out_w */
    status = OK;
done:
    jpeg_destroy_decompress(&d); /* also ends a decode stopped below the crop */
    free_taps(&tv);
    free_taps(&th);
    free(win);
    free(mid);
    free(acc);
    return status;
}

/* ---- Python entry point ---------------------------------------------------- */

static PyObject *decode_batch(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *jpgs, *out_obj;
    Py_buffer regions, out;
    Py_ssize_t start, stop;
    if (!PyArg_ParseTuple(args, "Oy*Onn", &jpgs, &regions, &out_obj, &start, &stop)) return NULL;
    if (PyObject_GetBuffer(out_obj, &out, PyBUF_CONTIG) < 0) { /* writable, C-contiguous, with its shape */
        PyBuffer_Release(&regions);
        return NULL;
    }
    PyObject *seq = PySequence_Fast(jpgs, "decode_batch: jpgs must be a sequence of buffers");
    PyObject *result = NULL;
    Py_buffer *views = NULL;
    int *status = NULL;
    char (*messages)[JMSG_LENGTH_MAX] = NULL;
    Py_ssize_t n = seq ? PySequence_Fast_GET_SIZE(seq) : 0, held = 0;
    if (!seq) goto end;
    if (out.ndim != 4 || out.shape[0] != n || out.shape[3] != 3 || !PyBuffer_IsContiguous(&out, 'C') ||
        out.itemsize != 1 || regions.len != (Py_ssize_t)(n * 8 * sizeof(double)) || start < 0 || stop > n || start > stop) {
        PyErr_Format(PyExc_ValueError, "decode_batch: need out uint8 [N, H, W, 3] (C order), regions float64 [N, 8], "
                                       "0 <= start <= stop <= N (N=%zd)", n);
        goto end;
    }
    views = calloc((size_t)(stop - start) + 1, sizeof(Py_buffer));
    status = calloc((size_t)(stop - start) + 1, sizeof(int));
    messages = calloc((size_t)(stop - start) + 1, JMSG_LENGTH_MAX);
    if (!views || !status || !messages) {
        PyErr_NoMemory();
        goto end;
    }
    for (Py_ssize_t i = start; i < stop; i++, held++)
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(seq, i), &views[i - start], PyBUF_SIMPLE) < 0) goto end;
    int out_h = (int)out.shape[1], out_w = (int)out.shape[2];
    size_t per = (size_t)out_h * out_w * 3;
    const double *reg = regions.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = start; i < stop; i++)
        status[i - start] = crop_decode(views[i - start].buf, (size_t)views[i - start].len, reg + 8 * i, out_h, out_w,
                                        (uint8_t *)out.buf + per * i, messages[i - start]);
    Py_END_ALLOW_THREADS
    result = PyList_New(0);
    for (Py_ssize_t i = start; result && i < stop; i++) {
        if (status[i - start] == OK) continue;
        PyObject *entry = Py_BuildValue("(nsO)", i, messages[i - start], status[i - start] == UNSUPPORTED ? Py_True : Py_False);
        if (!entry || PyList_Append(result, entry) < 0) Py_CLEAR(result);
        Py_XDECREF(entry);
    }
end:
    for (Py_ssize_t k = 0; k < held; k++) PyBuffer_Release(&views[k]);
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
     "decode_batch(jpgs, regions, out, start, stop) -> [(index, message, unsupported), ...]\n\n"
     "For i in [start, stop): decode the part of JPEG jpgs[i] that region i (float64 y0, x0, y1, x1\n"
     "in source pixels, x1 < x0 mirrors; then top, left, bottom, right: what the filter may read) needs\n"
     "and resize that region into out[i] (uint8 H x W x 3, antialiased bilinear), without the GIL. Returns the samples that failed: any libjpeg error\n"
     "or warning, or (unsupported=True) a JPEG this decoder does not take (CMYK, 12-bit)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cropdecode", "Crop-decode-resize JPEGs on the host.", -1,
                                    methods};

static PyObject *set_avx2(PyObject *self, PyObject *arg) {
    (void)self;
    int want = PyObject_IsTrue(arg), before = use_avx2;
    if (want < 0) return NULL;
#ifdef HAVE_AVX2_PATH
    use_avx2 = want && __builtin_cpu_supports("avx2");
#endif
    return PyBool_FromLong(before);
}

PyMODINIT_FUNC PyInit__cropdecode(void) {
#ifdef HAVE_AVX2_PATH
    use_avx2 = __builtin_cpu_supports("avx2");
#endif
    return PyModule_Create(&module);
}
