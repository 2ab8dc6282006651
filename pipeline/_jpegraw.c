/* Downscale a YCbCr JPEG and re-encode it without ever leaving YCbCr planes.
 *
 * Why: re-encoding through Pillow decodes to RGB (chroma upsampled to full
 * size, colour-converted, unpacked to 4-byte pixels), resizes all three
 * channels at full size, then converts back and downsamples chroma again.
 * libjpeg can hand out and take in the planes as they are stored ("raw data",
 * libjpeg.txt), so here luma is resized at its own size and each chroma plane
 * straight from its stored size to the 4:2:0 output grid: about half the
 * filter work, and no colour conversion or chroma up/down-sampling at all.
 *
 * The filter is Lanczos (a = 3), the same kernel, support and pixel-centre
 * geometry as Pillow's LANCZOS, with 14-bit fixed-point taps: down the
 * columns first, then along the rows, each pass in AVX2 where the CPU has it
 * (16-bit multiply-adds, 32-bit sums) and in plain C otherwise; both give the
 * same bytes.
 *
 * reencode() returns None for anything it does not handle (not 3-component
 * YCbCr, 12-bit, any libjpeg error or warning such as corrupt data): the
 * caller then takes the Pillow path, which decides whether and why the file is
 * rejected. It raises ValueError, naming the problem, for what no path should
 * decode: a frame over MAX_PIXELS (or the caller's lower max_pixels), checked
 * right after the header, before libjpeg allocates anything for the image; a
 * progressive file over MAX_SCANS scans; and bad arguments (issue #20). Build: setuptools ext-modules in pyproject.toml, against
 * the system libjpeg(-turbo); optional, as Pillow's path does the same work.
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

#if JPEG_LIB_VERSION >= 70
#define COMP_DCT_V(c) ((c)->DCT_v_scaled_size)
#define COMP_DCT_H(c) ((c)->DCT_h_scaled_size)
#define MIN_DCT_V(d) ((d)->min_DCT_v_scaled_size)
#else
#define COMP_DCT_V(c) ((c)->DCT_scaled_size)
#define COMP_DCT_H(c) ((c)->DCT_scaled_size)
#define MIN_DCT_V(d) ((d)->min_DCT_scaled_size)
#endif

#define LANCZOS_A 3.0
#define COEF_BITS 14 /* tap precision: |sum| <= ~1.3 * 255 << 14 fits int32 */

typedef struct {
    uint8_t *px;
    int w, h;          /* samples */
    int stride;        /* bytes from one row to the next (>= w) */
    double ew, eh;     /* the picture's true extent in this plane's samples (the
                          last row/column of a scaled decode may be part padding) */
} plane_t;

/* Hard ceiling on a frame's height x width, px: twice Pillow's MAX_IMAGE_PIXELS (89,478,485), the size
 * at which Pillow raises DecompressionBombError instead of warning. A caller's max_pixels only lowers it. */
#define MAX_PIXELS 178956970ULL
/* Progressive scans per file: libjpeg-turbo's advice for untrusted input (libjpeg.txt, "progress monitor";
 * djpeg -maxscans) and the limit its own fuzzers set (TJPARAM_SCANLIMIT 500). Encoders write ~10. */
#define MAX_SCANS 500
/* Largest output side, px: a JPEG's own limit (JPEG_MAX_DIMENSION); with it, 4:2:0 MCU counts and
 * padded plane sizes below stay far inside int */
#define MAX_SIDE 65500

struct err_mgr {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
    int refused;                    /* a limit stopped the decode (not a libjpeg error) */
    char message[JMSG_LENGTH_MAX];  /* why, when refused */
};

static void on_error(j_common_ptr cinfo) { longjmp(((struct err_mgr *)cinfo->err)->jump, 1); }

/* Encoding: warnings counted, printed nowhere. */
static void on_message(j_common_ptr cinfo, int level) {
    if (level < 0) cinfo->err->num_warnings++;
}

/* Decoding: a warning (corrupt data, premature end) means None anyway: stop at the first one rather than
 * decode on through filler (libjpeg-turbo's TJPARAM_STOPONWARNING, for the same reason). */
static void on_warning(j_common_ptr cinfo, int level) {
    if (level < 0) {
        cinfo->err->num_warnings++;
        on_error(cinfo);
    }
}

/* Called by libjpeg between iMCU rows and scans: stops a progressive file past MAX_SCANS scans. */
static void on_progress(j_common_ptr cinfo) {
    if (((j_decompress_ptr)cinfo)->input_scan_number > MAX_SCANS) {
        struct err_mgr *err = (struct err_mgr *)cinfo->err;
        err->refused = 1;
        snprintf(err->message, JMSG_LENGTH_MAX, "more than %d progressive scans", MAX_SCANS);
        longjmp(err->jump, 1);
    }
}

/* ---- Lanczos taps -------------------------------------------------------- */

/* The kernel sampled every 1/LUT_RES, filled once at import: sin() per tap
 * cost more than the filtering itself. Linear interpolation errs < 1e-6,
 * far below a 14-bit tap's step (6e-5). */
#define LUT_RES 1024
static float lanczos_lut[(int)LANCZOS_A * LUT_RES + 2];

static void fill_lut(void) {
    lanczos_lut[0] = 1.0f;
    for (int i = 1; i < (int)LANCZOS_A * LUT_RES + 2; i++) {
        double x = (double)i / LUT_RES, px = M_PI * x;
        lanczos_lut[i] = x >= LANCZOS_A ? 0.0f : (float)(LANCZOS_A * sin(px) * sin(px / LANCZOS_A) / (px * px));
    }
}

static double lanczos(double x) {
    double f = fabs(x) * LUT_RES;
    int i = (int)f;
    if (i >= (int)LANCZOS_A * LUT_RES) return 0.0;
    return lanczos_lut[i] + (f - i) * (lanczos_lut[i + 1] - lanczos_lut[i]);
}

typedef struct {
    int in_len, out_len, rowwise;  /* what the taps were made for (a cache key) */
    double in_extent, out_extent;
    int n;           /* output samples */
    int width;       /* room for taps per output sample: a multiple of 16 */
    int *first;      /* first input sample of each output */
    int *count;      /* taps of each output */
    int16_t *coef;   /* n x width, scaled by 1 << COEF_BITS, zero past count */
} taps_t;

static void free_taps(taps_t *t) {
    free(t->first);
    free(t->count);
    free(t->coef);
    memset(t, 0, sizeof *t);
}

/* Output sample i (centre i + 0.5 of out_extent) reads input around
 * (i + 0.5) * in_extent / out_extent; when shrinking, the kernel is widened by
 * the ratio so it low-passes first. Taps outside [0, in_len) are dropped and
 * the rest renormalised, which extends the edge, as Pillow does.
 * `rowwise` taps run along a row 16 at a time: each window is moved left,
 * with leading zero taps, so that all `width` of them lie inside the row. */
static int make_taps(taps_t *t, int in_len, double in_extent, int out_len, double out_extent, int rowwise) {
    double scale = in_extent / out_extent;
    double fscale = scale > 1.0 ? scale : 1.0;
    double support = LANCZOS_A * fscale;
    int span = (int)ceil(support) * 2 + 1, width = (span + 15) / 16 * 16;
    double *w = malloc(sizeof(double) * span);
    *t = (taps_t){in_len, out_len, rowwise, in_extent, out_extent, out_len, width, NULL, NULL, NULL};
    t->first = malloc(sizeof(int) * out_len);
    t->count = malloc(sizeof(int) * out_len);
    t->coef = calloc((size_t)out_len * width, sizeof(int16_t));
    if (!w || !t->first || !t->count || !t->coef) {
        free(w);
        free_taps(t);
        return -1;
    }
    for (int i = 0; i < out_len; i++) {
        double centre = (i + 0.5) * scale;
        int lo = (int)floor(centre - support + 0.5);
        int hi = (int)floor(centre + support + 0.5); /* exclusive */
        if (lo < 0) lo = 0;
        if (hi > in_len) hi = in_len;
        if (hi <= lo) { /* picture narrower than a sample: take the nearest */
            lo = centre < in_len ? (int)centre : in_len - 1;
            hi = lo + 1;
        }
        if (hi - lo > span) hi = lo + span;
        double sum = 0.0;
        for (int j = lo; j < hi; j++) sum += (w[j - lo] = lanczos((j + 0.5 - centre) / fscale));
        if (sum == 0.0) { /* every tap on a zero of the kernel: take the nearest */
            for (int j = lo; j < hi; j++) w[j - lo] = 0.0;
            w[(int)centre < hi ? (int)centre - lo : 0] = sum = 1.0;
        }
        int shift = rowwise && lo + width > in_len && in_len >= width ? lo + width - in_len : 0;
        t->first[i] = lo - shift;
        t->count[i] = hi - lo + shift;
        for (int j = lo; j < hi; j++) {
            long c = lrint(w[j - lo] / sum * (1 << COEF_BITS));
            t->coef[(size_t)i * width + shift + (j - lo)] =
                (int16_t)(c > INT16_MAX ? INT16_MAX : c < INT16_MIN ? INT16_MIN : c);
        }
    }
    free(w);
    return 0;
}

/* Most inputs of a dataset share a few sizes: keep the last few tap sets,
 * per thread (reencode runs without the GIL). */
#define TAP_CACHE 8
static _Thread_local taps_t tap_cache[TAP_CACHE];
static _Thread_local int tap_cache_next;

/* `keep`: taps the caller still holds (the other pass of the same resize), never evicted here.
 * Evicting it once made a resize's column taps depend on which images came before. */
static const taps_t *get_taps(int in_len, double in_extent, int out_len, double out_extent, int rowwise,
                              const taps_t *keep) {
    for (int k = 0; k < TAP_CACHE; k++) {
        taps_t *t = &tap_cache[k];
        if (t->coef && t->in_len == in_len && t->out_len == out_len && t->rowwise == rowwise &&
            t->in_extent == in_extent && t->out_extent == out_extent)
            return t;
    }
    if (&tap_cache[tap_cache_next] == keep) tap_cache_next = (tap_cache_next + 1) % TAP_CACHE;
    taps_t *t = &tap_cache[tap_cache_next];
    tap_cache_next = (tap_cache_next + 1) % TAP_CACHE;
    free_taps(t);
    return make_taps(t, in_len, in_extent, out_len, out_extent, rowwise) ? NULL : t;
}

static inline uint8_t clamp_u8(int32_t v) { return (uint8_t)(v < 0 ? 0 : v > 255 ? 255 : v); }

/* Vertical pass: dst (t->n rows x w, contiguous) = taps down the columns of src. */
static void filter_down_generic(const uint8_t *src, int stride, int w, const taps_t *t, uint8_t *dst) {
    for (int i = 0; i < t->n; i++) {
        const int16_t *c = t->coef + (size_t)i * t->width;
        const uint8_t *base = src + (size_t)t->first[i] * stride;
        uint8_t *d = dst + (size_t)i * w;
        for (int x = 0; x < w; x++) {
            int32_t acc = 1 << (COEF_BITS - 1);
            for (int k = 0; k < t->count[i]; k++) acc += c[k] * base[(size_t)k * stride + x];
            d[x] = clamp_u8(acc >> COEF_BITS);
        }
    }
}

/* Horizontal pass: dst (rows x t->n, contiguous) = taps along each row of src (w wide). */
static void filter_across_generic(const uint8_t *src, int w, int rows, const taps_t *t, uint8_t *dst) {
    (void)w;
    for (int y = 0; y < rows; y++) {
        const uint8_t *row = src + (size_t)y * w;
        uint8_t *d = dst + (size_t)y * t->n;
        for (int i = 0; i < t->n; i++) {
            const int16_t *c = t->coef + (size_t)i * t->width;
            const uint8_t *s = row + t->first[i];
            int32_t acc = 1 << (COEF_BITS - 1);
            for (int k = 0; k < t->count[i]; k++) acc += c[k] * s[k];
            d[i] = clamp_u8(acc >> COEF_BITS);
        }
    }
}

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

/* Vertical, 16 columns at a time: pairs of rows interleaved to 16-bit and
 * multiplied by pairs of taps with vpmaddwd (16 multiply-adds an instruction),
 * the sums kept in registers across all taps. */
__attribute__((target("avx2")))
static void filter_down_avx2(const uint8_t *src, int stride, int w, const taps_t *t, uint8_t *dst) {
    for (int i = 0; i < t->n; i++) {
        const int16_t *c = t->coef + (size_t)i * t->width;
        const uint8_t *base = src + (size_t)t->first[i] * stride;
        int count = t->count[i];
        uint8_t *d = dst + (size_t)i * w;
        int x = 0;
        for (; x + 16 <= w; x += 16) {
            __m256i acc0 = _mm256_set1_epi32(1 << (COEF_BITS - 1)), acc1 = acc0;
            for (int k = 0; k < count; k += 2) {
                __m128i r0 = _mm_loadu_si128((const __m128i *)(base + (size_t)k * stride + x));
                __m128i r1 = k + 1 < count ? _mm_loadu_si128((const __m128i *)(base + (size_t)(k + 1) * stride + x))
                                           : _mm_setzero_si128();
                __m256i cc = _mm256_set1_epi32((int32_t)((uint32_t)(uint16_t)c[k] | ((uint32_t)(uint16_t)c[k + 1] << 16)));
                acc0 = _mm256_add_epi32(acc0, _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm_unpacklo_epi8(r0, r1)), cc));
                acc1 = _mm256_add_epi32(acc1, _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm_unpackhi_epi8(r0, r1)), cc));
            }
            __m256i p16 = _mm256_packs_epi32(_mm256_srai_epi32(acc0, COEF_BITS), _mm256_srai_epi32(acc1, COEF_BITS));
            p16 = _mm256_permute4x64_epi64(p16, 0xD8); /* packs works per 128-bit lane: restore column order */
            __m128i p8 = _mm_packus_epi16(_mm256_castsi256_si128(p16), _mm256_extracti128_si256(p16, 1));
            _mm_storeu_si128((__m128i *)(d + x), p8);
        }
        for (; x < w; x++) {
            int32_t acc = 1 << (COEF_BITS - 1);
            for (int k = 0; k < count; k++) acc += c[k] * base[(size_t)k * stride + x];
            d[x] = clamp_u8(acc >> COEF_BITS);
        }
    }
}

/* Dot product of 16 x (width / 16) taps with the row at `s`: 8 partial sums. */
__attribute__((target("avx2")))
static inline __m256i dot_taps(const uint8_t *s, const int16_t *c, int width) {
    __m256i acc = _mm256_setzero_si256();
    for (int k = 0; k < width; k += 16)
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(s + k))),
                                                      _mm256_loadu_si256((const __m256i *)(c + k))));
    return acc;
}

/* Horizontal, 8 outputs at a time: each a 16-wide vpmaddwd, the 8 partial-sum
 * vectors then folded together with vphaddd. Needs rows >= t->width wide. */
__attribute__((target("avx2")))
static void filter_across_avx2(const uint8_t *src, int w, int rows, const taps_t *t, uint8_t *dst) {
    const __m256i half = _mm256_set1_epi32(1 << (COEF_BITS - 1));
    for (int y = 0; y < rows; y++) {
        const uint8_t *row = src + (size_t)y * w;
        uint8_t *d = dst + (size_t)y * t->n;
        int i = 0;
        for (; i + 8 <= t->n; i += 8) {
            __m256i v[8];
            for (int j = 0; j < 8; j++) v[j] = dot_taps(row + t->first[i + j], t->coef + (size_t)(i + j) * t->width, t->width);
            __m256i h01 = _mm256_hadd_epi32(v[0], v[1]), h23 = _mm256_hadd_epi32(v[2], v[3]);
            __m256i h45 = _mm256_hadd_epi32(v[4], v[5]), h67 = _mm256_hadd_epi32(v[6], v[7]);
            __m256i h03 = _mm256_hadd_epi32(h01, h23), h47 = _mm256_hadd_epi32(h45, h67);
            /* h03 = sums 0..3 from the low 128 bits | sums 0..3 from the high 128 bits; h47 likewise */
            __m256i sums = _mm256_add_epi32(_mm256_permute2x128_si256(h03, h47, 0x20),
                                            _mm256_permute2x128_si256(h03, h47, 0x31));
            sums = _mm256_srai_epi32(_mm256_add_epi32(sums, half), COEF_BITS);
            __m128i p16 = _mm_packs_epi32(_mm256_castsi256_si128(sums), _mm256_extracti128_si256(sums, 1));
            _mm_storel_epi64((__m128i *)(d + i), _mm_packus_epi16(p16, p16));
        }
        for (; i < t->n; i++) {
            const int16_t *c = t->coef + (size_t)i * t->width;
            const uint8_t *s = row + t->first[i];
            int32_t acc = 1 << (COEF_BITS - 1);
            for (int k = 0; k < t->count[i]; k++) acc += c[k] * s[k];
            d[i] = clamp_u8(acc >> COEF_BITS);
        }
    }
}
#endif

/* Which filter kernels run: set at import from the CPU, changed by use_avx2() (tests) while other threads may
 * be re-encoding, so read and written atomically; each reencode call reads it once. */
static int have_avx2;

/* out (contiguous) resampled from in: down the columns first (fewer rows for
 * the second pass), then along the rows. 0 on success. */
static int resize_plane(const plane_t *in, plane_t *out, int avx2) {
    if (in->w == out->w && in->h == out->h && in->ew == out->ew && in->eh == out->eh) {
        for (int y = 0; y < in->h; y++) memcpy(out->px + (size_t)y * out->w, in->px + (size_t)y * in->stride, in->w);
        return 0;
    }
    const taps_t *tv = get_taps(in->h, in->eh, out->h, out->eh, 0, NULL);
    const taps_t *th = get_taps(in->w, in->ew, out->w, out->ew, 1, tv);
    uint8_t *mid = malloc((size_t)out->h * in->w);
    if (!tv || !th || !mid) {
        free(mid);
        return -1;
    }
#if defined(__x86_64__) || defined(__i386__)
    if (avx2) {
        filter_down_avx2(in->px, in->stride, in->w, tv, mid);
        if (in->w >= th->width)
            filter_across_avx2(mid, in->w, out->h, th, out->px);
        else
            filter_across_generic(mid, in->w, out->h, th, out->px);
        free(mid);
        return 0;
    }
#endif
    (void)avx2;
    filter_down_generic(in->px, in->stride, in->w, tv, mid);
    filter_across_generic(mid, in->w, out->h, th, out->px);
    free(mid);
    return 0;
}

/* ---- decode to planes ------------------------------------------------------ */

enum { DECODED, DECLINED, REFUSED }; /* planes filled; not handled here (None); over a limit (ValueError) */

/* What libjpeg changes between setjmp and longjmp lives here, in the caller of the function that calls
 * setjmp, not in that function's locals (C11 7.13.2.1: those are indeterminate after the longjmp unless
 * volatile). */
typedef struct {
    struct jpeg_decompress_struct d;
    struct err_mgr err;
    struct jpeg_progress_mgr progress;
    JSAMPROW *rows[3];
} decoder_t;

/* The planes of the whole image at 1/denom scale: DECODED (caller frees px), DECLINED or REFUSED
 * (dec->err.message says why). Reads no local after a longjmp. */
static int read_planes(decoder_t *dec, const uint8_t *data, size_t len, int denom, unsigned long long max_pixels,
                       plane_t planes[3]) {
    struct jpeg_decompress_struct *d = &dec->d;
    if (setjmp(dec->err.jump)) return dec->err.refused ? REFUSED : DECLINED;
    jpeg_mem_src(d, (unsigned char *)data, (unsigned long)len);
    jpeg_read_header(d, TRUE);
    /* before jpeg_start_decompress, which allocates the whole image's coefficients for a progressive file */
    if ((unsigned long long)d->image_width * d->image_height > max_pixels) {
        snprintf(dec->err.message, JMSG_LENGTH_MAX, "frame %ux%u is over the re-encoder's limit of %llu pixels",
                 (unsigned)d->image_width, (unsigned)d->image_height, max_pixels);
        return REFUSED;
    }
    if (d->num_components != 3 || d->jpeg_color_space != JCS_YCbCr || d->data_precision != 8) return DECLINED;
    d->raw_data_out = TRUE;
    d->scale_num = 1;
    d->scale_denom = denom;
    d->dct_method = JDCT_ISLOW; /* Pillow's default: the accurate integer IDCT */
    dec->progress.progress_monitor = on_progress;
    d->progress = &dec->progress;
    jpeg_start_decompress(d);
    /* output sides <= 65535 px and sampling factors <= 4 (libjpeg checks both): every product below fits int */
    int per_call = d->max_v_samp_factor * MIN_DCT_V(d); /* luma rows per jpeg_read_raw_data */
    int calls = (int)((d->output_height + per_call - 1) / per_call);
    int rows_per_call[3];
    for (int ci = 0; ci < 3; ci++) {
        jpeg_component_info *comp = &d->comp_info[ci];
        int bw = COMP_DCT_H(comp), bh = COMP_DCT_V(comp);
        rows_per_call[ci] = comp->v_samp_factor * bh;
        /* libjpeg writes whole blocks: pad to full MCUs in both directions */
        int mcus = (int)((comp->width_in_blocks + comp->h_samp_factor - 1) / comp->h_samp_factor);
        int pw = mcus * comp->h_samp_factor * bw, ph = calls * rows_per_call[ci];
        planes[ci].w = planes[ci].stride = pw;
        planes[ci].h = ph;
        planes[ci].px = malloc((size_t)pw * ph);
        dec->rows[ci] = malloc(sizeof(JSAMPROW) * ph);
        if (!planes[ci].px || !dec->rows[ci]) return DECLINED;
        for (int y = 0; y < ph; y++) dec->rows[ci][y] = planes[ci].px + (size_t)y * pw;
        double fx = (double)comp->h_samp_factor * bw / (d->max_h_samp_factor * (double)DCTSIZE);
        double fy = (double)comp->v_samp_factor * bh / (d->max_v_samp_factor * (double)DCTSIZE);
        planes[ci].ew = d->image_width * fx;
        planes[ci].eh = d->image_height * fy;
    }
    for (int k = 0; k < calls; k++) {
        JSAMPARRAY img[3] = {dec->rows[0] + k * rows_per_call[0], dec->rows[1] + k * rows_per_call[1],
                             dec->rows[2] + k * rows_per_call[2]};
        if (jpeg_read_raw_data(d, img, per_call) == 0) return DECLINED; /* suspended: data ran out */
    }
    for (int ci = 0; ci < 3; ci++) { /* the samples that hold picture, not block padding */
        planes[ci].w = (int)d->comp_info[ci].downsampled_width; /* comp_info is freed by jpeg_finish_decompress */
        planes[ci].h = (int)d->comp_info[ci].downsampled_height;
    }
    jpeg_finish_decompress(d);
    return DECODED;
}

/* read_planes with its decoder made and freed; on anything but DECODED, no plane is left allocated. */
static int decode_planes(const uint8_t *data, size_t len, int denom, unsigned long long max_pixels, plane_t planes[3],
                         char *message) {
    decoder_t dec = {.rows = {NULL, NULL, NULL}};
    memset(planes, 0, sizeof(plane_t) * 3);
    dec.d.err = jpeg_std_error(&dec.err.pub);
    dec.err.pub.error_exit = on_error;
    dec.err.pub.emit_message = on_warning;
    jpeg_create_decompress(&dec.d);
    int status = read_planes(&dec, data, len, denom, max_pixels, planes);
    jpeg_destroy_decompress(&dec.d);
    if (status == REFUSED) snprintf(message, JMSG_LENGTH_MAX, "%s", dec.err.message);
    for (int ci = 0; ci < 3; ci++) {
        free(dec.rows[ci]);
        if (status != DECODED) {
            free(planes[ci].px);
            planes[ci].px = NULL;
        }
    }
    return status;
}

/* ---- encode 4:2:0 planes ---------------------------------------------------- */

/* A copy of p padded to pw x ph (>= its size) by repeating its last column and row, as
 * libjpeg's own downsampler pads the edge blocks. */
static uint8_t *padded(const plane_t *p, int pw, int ph) {
    if (p->w < 1 || p->h < 1 || pw < p->w || ph < p->h) return NULL;
    uint8_t *out = malloc((size_t)pw * ph);
    if (!out) return NULL;
    for (int y = 0; y < ph; y++) {
        uint8_t *row = out + (size_t)y * pw;
        memcpy(row, p->px + (size_t)(y < p->h ? y : p->h - 1) * p->stride, p->w);
        memset(row + p->w, row[p->w - 1], (size_t)(pw - p->w));
    }
    return out;
}

/* As decoder_t: what libjpeg changes, out of the locals of the function that calls setjmp. */
typedef struct {
    struct jpeg_compress_struct c;
    struct err_mgr err;
    unsigned char *out;       /* the JPEG, malloc'd by jpeg_mem_dest's manager */
    unsigned long out_len;    /* its bytes */
    uint8_t *pad[3];
    JSAMPROW *rows[3];
} encoder_t;

/* 0 when enc->out holds the JPEG, -1 when libjpeg failed. Reads no local after a longjmp. */
static int write_planes(encoder_t *enc, plane_t planes[3], int quality) {
    struct jpeg_compress_struct *c = &enc->c;
    int w = planes[0].w, h = planes[0].h; /* 1 .. MAX_SIDE (reencode checked): no overflow below */
    int mcu_cols = (w + 15) / 16, mcu_rows = (h + 15) / 16; /* 4:2:0 MCU: 16x16 luma */
    if (setjmp(enc->err.jump)) return -1;
    for (int ci = 0; ci < 3; ci++) {
        int f = ci == 0 ? 16 : 8, pw = mcu_cols * f, ph = mcu_rows * f;
        enc->pad[ci] = padded(&planes[ci], pw, ph);
        enc->rows[ci] = malloc(sizeof(JSAMPROW) * ph);
        if (!enc->pad[ci] || !enc->rows[ci]) return -1;
        for (int y = 0; y < ph; y++) enc->rows[ci][y] = enc->pad[ci] + (size_t)y * pw;
    }
    jpeg_mem_dest(c, &enc->out, &enc->out_len);
    c->image_width = (JDIMENSION)w;
    c->image_height = (JDIMENSION)h;
    c->input_components = 3;
    c->in_color_space = JCS_YCbCr;
    jpeg_set_defaults(c); /* YCbCr, 2x2 / 1x1 / 1x1 sampling: 4:2:0, as Pillow writes */
    jpeg_set_quality(c, quality, TRUE);
    c->raw_data_in = TRUE;
    c->dct_method = JDCT_ISLOW;
    c->optimize_coding = FALSE;
    jpeg_start_compress(c, TRUE);
    for (int k = 0; k < mcu_rows; k++) {
        JSAMPARRAY img[3] = {enc->rows[0] + k * 16, enc->rows[1] + k * 8, enc->rows[2] + k * 8};
        jpeg_write_raw_data(c, img, 16);
    }
    jpeg_finish_compress(c);
    return 0;
}

/* The JPEG (malloc'd, *out_len bytes), or NULL when libjpeg failed. */
static unsigned char *encode_planes(plane_t planes[3], int quality, unsigned long *out_len) {
    encoder_t enc = {.out = NULL, .out_len = 0};
    enc.c.err = jpeg_std_error(&enc.err.pub);
    enc.err.pub.error_exit = on_error;
    enc.err.pub.emit_message = on_message;
    jpeg_create_compress(&enc.c);
    int failed = write_planes(&enc, planes, quality);
    jpeg_destroy_compress(&enc.c);
    for (int ci = 0; ci < 3; ci++) {
        free(enc.pad[ci]);
        free(enc.rows[ci]);
    }
    if (failed) {
        free(enc.out);
        return NULL;
    }
    *out_len = enc.out_len;
    return enc.out;
}

/* ---- Python entry point ---------------------------------------------------- */

static PyObject *reencode(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer data;
    int width, height, denom, quality;
    long long max_pixels = 0;
    if (!PyArg_ParseTuple(args, "y*iiii|L", &data, &width, &height, &denom, &quality, &max_pixels)) return NULL;
    unsigned long long limit = max_pixels <= 0 || (unsigned long long)max_pixels > MAX_PIXELS
                                   ? MAX_PIXELS : (unsigned long long)max_pixels; /* the caller's only lowers it */
    if (width < 1 || height < 1 || width > MAX_SIDE || height > MAX_SIDE || quality < 1 || quality > 100 ||
        (denom != 1 && denom != 2 && denom != 4 && denom != 8) || max_pixels < 0 ||
        (unsigned long long)width * height > limit) {
        PyBuffer_Release(&data);
        return PyErr_Format(PyExc_ValueError, "reencode: bad size %dx%d, denom %d, quality %d or max_pixels %lld "
                            "(need 1 to %d px a side and at most %llu pixels, denom 1, 2, 4 or 8, quality 1 to 100)",
                            width, height, denom, quality, max_pixels, MAX_SIDE, limit);
    }
    plane_t in[3], out[3];
    unsigned char *jpeg = NULL;
    unsigned long jpeg_len = 0;
    char message[JMSG_LENGTH_MAX] = "";
    int decoded, avx2 = __atomic_load_n(&have_avx2, __ATOMIC_RELAXED);
    memset(out, 0, sizeof out);
    Py_BEGIN_ALLOW_THREADS
    decoded = decode_planes(data.buf, (size_t)data.len, denom, limit, in, message);
    if (decoded == DECODED) {
        int ok = 1;
        for (int ci = 0; ci < 3 && ok; ci++) {
            /* output grid: 4:2:0, chroma sample k covering luma 2k .. 2k+2 */
            out[ci].w = ci == 0 ? width : (width + 1) / 2;
            out[ci].h = ci == 0 ? height : (height + 1) / 2;
            out[ci].ew = ci == 0 ? width : width / 2.0;
            out[ci].eh = ci == 0 ? height : height / 2.0;
            out[ci].stride = out[ci].w;
            out[ci].px = malloc((size_t)out[ci].w * out[ci].h);
            ok = out[ci].px != NULL && resize_plane(&in[ci], &out[ci], avx2) == 0;
        }
        if (ok) jpeg = encode_planes(out, quality, &jpeg_len);
        for (int ci = 0; ci < 3; ci++) {
            free(in[ci].px);
            free(out[ci].px);
        }
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    if (decoded == REFUSED) return PyErr_Format(PyExc_ValueError, "reencode: %s", message);
    if (jpeg == NULL) Py_RETURN_NONE;
    PyObject *result = PyBytes_FromStringAndSize((const char *)jpeg, (Py_ssize_t)jpeg_len);
    free(jpeg);
    return result;
}

static PyObject *use_avx2(PyObject *self, PyObject *arg) {
    (void)self;
    int want = PyObject_IsTrue(arg), before = __atomic_load_n(&have_avx2, __ATOMIC_RELAXED);
    if (want < 0) return NULL;
#if defined(__x86_64__) || defined(__i386__)
    __atomic_store_n(&have_avx2, want && __builtin_cpu_supports("avx2"), __ATOMIC_RELAXED);
#endif
    return PyBool_FromLong(before);
}

static PyMethodDef methods[] = {
    {"use_avx2", use_avx2, METH_O,
     "use_avx2(flag) -> bool: filter with the AVX2 kernels when flag is true and the\n"
     "CPU has AVX2, with the plain C ones otherwise; returns the previous setting."},
    {"reencode", reencode, METH_VARARGS,
     "reencode(jpeg, width, height, denom, quality, max_pixels=0) -> bytes | None\n\n"
     "The YCbCr JPEG decoded at 1/denom scale in the DCT domain, Lanczos-resized\n"
     "to width x height in YCbCr planes, encoded as baseline 4:2:0 at quality.\n"
     "None when the file is not an 8-bit 3-component YCbCr JPEG or libjpeg\n"
     "reports any error or warning: the caller's general path then decides.\n"
     "ValueError for a frame over max_pixels or MAX_PIXELS (whichever is lower;\n"
     "0: MAX_PIXELS), over MAX_SCANS progressive scans, or bad arguments."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_jpegraw", "Re-encode JPEGs in YCbCr planes.", -1, methods};

PyMODINIT_FUNC PyInit__jpegraw(void) {
    fill_lut();
#if defined(__x86_64__) || defined(__i386__)
    __atomic_store_n(&have_avx2, __builtin_cpu_supports("avx2"), __ATOMIC_RELAXED);
#endif
    PyObject *m = PyModule_Create(&module);
    if (m && (PyModule_AddIntConstant(m, "JPEG_LIB_VERSION", JPEG_LIB_VERSION) < 0 ||
              PyModule_AddIntConstant(m, "MAX_SCANS", MAX_SCANS) < 0 ||
              PyModule_AddIntConstant(m, "MAX_PIXELS", (long)MAX_PIXELS) < 0)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
