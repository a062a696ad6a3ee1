/* Bitmask expansion for fxprune.checkpoints.codec: the loop that loading a compact file spends its time in.
 *
 * Why C: the expansion (every kept value to its position, zero elsewhere) is one pass over the output, but in
 * torch or numpy it takes at least three (a running count, a gather, a multiply), each slower than the memcpy
 * torch.load does for a dense file. Here it is one pass: on x86-64 CPUs with AVX-512 an expand-load instruction
 * places 8, 16, 32 or 64 values at once, elsewhere a branch-free scalar loop. The extension is optional: where
 * it was not built, codec.py decodes with torch ops to the same bits.
 *
 * Layout (compressed-tensors' sparse-bitmask): per row of `cols` elements, ceil(cols / 8) bytes, bit j of byte
 * b (least significant first) marking element 8 b + j; the kept values of all rows in order, in `src`.
 * Elements are copied as integers of their size, so every payload (NaN bits included) survives.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define FXP_X86 1
#endif

/* Scalar expansion of elements [c0, c1) of one row from the `avail` (> 0) values they mark.
 * Branch-free: every element reads a value (clamped to the last one, so never past the row's values) and
 * keeps it or zero. */
#define SCALAR_ROW(T)                                                                               \
    static void scalar_##T(T *dst, const T *src, Py_ssize_t avail, const uint8_t *bits,         \
                                 Py_ssize_t c0, Py_ssize_t c1) {                                    \
        Py_ssize_t k = 0;                                                                           \
        for (Py_ssize_t c = c0; c < c1; c++) {                                                      \
            T bit = (T)((bits[c >> 3] >> (c & 7)) & 1);                                             \
            dst[c] = src[k < avail ? k : avail - 1] & ((T)0 - bit);                                 \
            k += bit;                                                                               \
        }                                                                                           \
    }
SCALAR_ROW(uint8_t)
SCALAR_ROW(uint16_t)
SCALAR_ROW(uint32_t)
SCALAR_ROW(uint64_t)

#ifdef FXP_X86
/* AVX-512 expansion of whole chunks of a row from c = 0; returns the columns done (a multiple of the chunk) and
 * adds the values used to *k. A chunk's values are read with one full-width load where `limit` (the values left
 * in the whole buffer from src) allows, else a masked load of just them, and spread by the register form of the
 * expand instruction: the memory form is several times slower on Intel cores. A chunk is 64 bytes, so where dst
 * is 64-byte aligned every store is, and goes to memory as a streaming store: a loaded model is far larger than
 * the caches, and a normal store would first read each destination line (a third of the memory traffic). */
#define AVX_ROW(NAME, T, W, MASK_T, LOAD_MASK, POPCNT, TARGET, EXPAND, MASKZ_LOAD)                            \
    __attribute__((target(TARGET))) static Py_ssize_t NAME(T *dst, const T *src, const uint8_t *bits,          \
                                                           Py_ssize_t cols, Py_ssize_t limit, Py_ssize_t *k) { \
        Py_ssize_t c = 0;                                                                                     \
        int stream = ((uintptr_t)dst & 63) == 0;                                                              \
        for (; c + W <= cols; c += W) {                                                                       \
            MASK_T m;                                                                                         \
            memcpy(&m, bits + (c >> 3), sizeof m);                                                            \
            Py_ssize_t n = POPCNT(m);                                                                         \
            __m512i v = *k + W <= limit ? _mm512_loadu_si512((const void *)(src + *k))                        \
                                        : MASKZ_LOAD(LOAD_MASK(n), (const void *)(src + *k));                 \
            v = EXPAND(m, v);                                                                                 \
            if (stream) _mm512_stream_si512((void *)(dst + c), v);                                            \
            else _mm512_storeu_si512((void *)(dst + c), v);                                                   \
            *k += n;                                                                                          \
        }                                                                                                     \
        return c;                                                                                             \
    }
#define LOW_BITS_64(n) ((n) >= 64 ? ~(uint64_t)0 : (((uint64_t)1 << (n)) - 1))
AVX_ROW(avx_u64, uint64_t, 8, uint8_t, (__mmask8)LOW_BITS_64, __builtin_popcount, "avx512f,popcnt",
        _mm512_maskz_expand_epi64, _mm512_maskz_loadu_epi64)
AVX_ROW(avx_u32, uint32_t, 16, uint16_t, (__mmask16)LOW_BITS_64, __builtin_popcount, "avx512f,popcnt",
        _mm512_maskz_expand_epi32, _mm512_maskz_loadu_epi32)
AVX_ROW(avx_u16, uint16_t, 32, uint32_t, (__mmask32)LOW_BITS_64, __builtin_popcount,
        "avx512f,avx512bw,avx512vbmi2,popcnt", _mm512_maskz_expand_epi16, _mm512_maskz_loadu_epi16)
AVX_ROW(avx_u8, uint8_t, 64, uint64_t, (__mmask64)LOW_BITS_64, __builtin_popcountll,
        "avx512f,avx512bw,avx512vbmi2,popcnt", _mm512_maskz_expand_epi8, _mm512_maskz_loadu_epi8)
#endif

static int use_avx512f = 0, use_vbmi2 = 0;

/* Values the bits of one row mark (the padding bits of its last byte aside). Built twice: with the popcnt
 * instruction, and without it (a few bit operations a word, several times slower) for CPUs that lack it. */
#define ROW_COUNT(NAME, ATTR)                                                                                 \
    ATTR static Py_ssize_t NAME(const uint8_t *bits, Py_ssize_t cols) {                                      \
        Py_ssize_t n = 0, full = cols >> 3, b = 0;                                                            \
        for (; b + 8 <= full; b += 8) {                                                                       \
            uint64_t w;                                                                                       \
            memcpy(&w, bits + b, sizeof w);                                                                   \
            n += __builtin_popcountll(w);                                                                     \
        }                                                                                                     \
        for (; b < full; b++) n += __builtin_popcount(bits[b]);                                               \
        if (cols & 7) n += __builtin_popcount(bits[full] & ((1u << (cols & 7)) - 1));                         \
        return n;                                                                                             \
    }
ROW_COUNT(row_count_plain, )
#ifdef FXP_X86
ROW_COUNT(row_count_popcnt, __attribute__((target("popcnt"))))
#endif

static int use_popcnt = 0;

static Py_ssize_t row_count(const uint8_t *bits, Py_ssize_t cols) {
#ifdef FXP_X86
    if (use_popcnt) return row_count_popcnt(bits, cols);
#endif
    return row_count_plain(bits, cols);
}

/* Rows of `cols` elements whose bits are one unbroken stream (no padding bits between rows) are one row of
 * rows * cols elements to both functions below: fewer, longer rows. */
static void merge_rows(Py_ssize_t *rows, Py_ssize_t *cols) {
    if (*cols % 8 == 0 && *rows > 1) {
        *cols *= *rows;
        *rows = 1;
    }
}

/* count(bits, rows, cols) -> the values a [rows, cols] bitmask marks: what its values part must hold. */
static PyObject *count(PyObject *self, PyObject *args) {
    Py_buffer bits;
    Py_ssize_t rows, cols, total = 0;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*nn", &bits, &rows, &cols)) return NULL;
    Py_ssize_t bpr = (cols + 7) / 8;
    if (rows < 0 || cols < 0 || bits.len != rows * bpr) {
        PyErr_Format(PyExc_ValueError, "bitmask has %zd bytes; a [%zd, %zd] tensor needs %zd", bits.len, rows, cols,
                     rows * bpr);
        PyBuffer_Release(&bits);
        return NULL;
    }
    merge_rows(&rows, &cols);
    bpr = (cols + 7) / 8;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t r = 0; r < rows; r++) total += row_count((const uint8_t *)bits.buf + r * bpr, cols);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&bits);
    return PyLong_FromSsize_t(total);
}

/* expand(dst, src, bits, rows, cols) -> values consumed. dst: rows * cols elements, src: the values, bits:
 * rows * ceil(cols / 8) bytes; dst and src of one item size (1, 2, 4 or 8 bytes). Checks, before writing a
 * row, that src holds its values, so a short src raises instead of reading past its end. */
static PyObject *expand(PyObject *self, PyObject *args) {
    Py_buffer dst, src, bits;
    Py_ssize_t rows, cols;
    (void)self;
    if (!PyArg_ParseTuple(args, "w*y*y*nn", &dst, &src, &bits, &rows, &cols)) return NULL;
    PyObject *result = NULL;
    Py_ssize_t size = dst.itemsize, bpr = (cols + 7) / 8;
    if (size != src.itemsize || (size != 1 && size != 2 && size != 4 && size != 8)) {
        PyErr_SetString(PyExc_ValueError, "expand: dst and src must share an item size of 1, 2, 4 or 8 bytes");
    } else if (rows < 0 || cols < 0 || dst.len != rows * cols * size || src.len % size) {
        PyErr_SetString(PyExc_ValueError, "expand: buffer sizes do not match rows and cols");
    } else if (bits.len < rows * bpr) {
        PyErr_Format(PyExc_ValueError, "bitmask of %zd bytes is too short for a [%zd, %zd] tensor", bits.len, rows,
                     cols);
    } else {
        Py_ssize_t nsrc = src.len / size, k = 0, bad_row = -1;
        merge_rows(&rows, &cols);
        bpr = (cols + 7) / 8;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t r = 0; r < rows; r++) {
            const uint8_t *b = (const uint8_t *)bits.buf + r * bpr;
            Py_ssize_t need = row_count(b, cols);
            if (k + need > nsrc) {
                bad_row = r;
                break;
            }
            char *d = (char *)dst.buf + r * cols * size;
            const char *s = (const char *)src.buf + k * size;
            Py_ssize_t done = 0, used = 0;
#ifdef FXP_X86
            Py_ssize_t limit = nsrc - k;
            if (size == 4 && use_avx512f) done = avx_u32((uint32_t *)d, (const uint32_t *)s, b, cols, limit, &used);
            else if (size == 8 && use_avx512f) done = avx_u64((uint64_t *)d, (const uint64_t *)s, b, cols, limit, &used);
            else if (size == 2 && use_vbmi2) done = avx_u16((uint16_t *)d, (const uint16_t *)s, b, cols, limit, &used);
            else if (size == 1 && use_vbmi2) done = avx_u8((uint8_t *)d, (const uint8_t *)s, b, cols, limit, &used);
#endif
            if (done < cols) {
                Py_ssize_t avail = need - used;
                if (avail == 0) {
                    memset(d + done * size, 0, (size_t)((cols - done) * size));
                } else if (size == 1) {
                    scalar_uint8_t((uint8_t *)d, (const uint8_t *)s + used, avail, b, done, cols);
                } else if (size == 2) {
                    scalar_uint16_t((uint16_t *)d, (const uint16_t *)s + used, avail, b, done, cols);
                } else if (size == 4) {
                    scalar_uint32_t((uint32_t *)d, (const uint32_t *)s + used, avail, b, done, cols);
                } else {
                    scalar_uint64_t((uint64_t *)d, (const uint64_t *)s + used, avail, b, done, cols);
                }
            }
            k += need;
        }
#ifdef FXP_X86
        _mm_sfence(); /* the streaming stores are visible before the loader reads the tensor */
#endif
        Py_END_ALLOW_THREADS
        if (bad_row >= 0) {
            if (rows == 1)
                PyErr_Format(PyExc_ValueError, "bitmask marks more elements than the %zd values given", nsrc);
            else
                PyErr_Format(PyExc_ValueError, "bitmask marks more elements than the %zd values given (row %zd)",
                             nsrc, bad_row);
        } else {
            result = PyLong_FromSsize_t(k);
        }
    }
    PyBuffer_Release(&dst);
    PyBuffer_Release(&src);
    PyBuffer_Release(&bits);
    return result;
}

static PyMethodDef methods[] = {
    {"expand", expand, METH_VARARGS, "expand(dst, src, bits, rows, cols) -> values consumed"},
    {"count", count, METH_VARARGS, "count(bits, rows, cols) -> values the bitmask marks"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_expand", NULL, -1, methods};

PyMODINIT_FUNC PyInit__expand(void) {
#ifdef FXP_X86
    __builtin_cpu_init();
    use_popcnt = !!__builtin_cpu_supports("popcnt");
    use_avx512f = use_popcnt && __builtin_cpu_supports("avx512f");
    use_vbmi2 = use_avx512f && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vbmi2");
#endif
    return PyModule_Create(&module);
}
