/* Bitmask expansion for fxprune.checkpoints.codec: the loop that loading a compact file spends its time in.
 *
 * Why C: the expansion (every kept value to its position, zero elsewhere) is one pass over the output, but in
 * torch or numpy it takes at least three (a running count, a gather, a multiply), each slower than the memcpy
 * torch.load does for a dense file. Here it is one pass: on x86-64 CPUs with AVX-512 an expand instruction
 * places 8, 16, 32 or 64 values at once, with AVX2 a table-driven shuffle 8 (2- and 4-byte elements), elsewhere
 * a branch-free scalar loop. The extension is optional: where it was not built, codec.py decodes with torch ops
 * to the same bits.
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

/* Per mask byte m: perm32[m][j] is the rank of element j (how many set bits precede bit j), count8[m] its set
 * bits, shuf16[m] the pshufb bytes that move 2-byte values by those ranks (0x80 where bit j is clear: a zero). */
static int32_t perm32[256][8];
static uint8_t count8[256];
static uint8_t shuf16[256][16];

static void build_tables(void) {
    for (int m = 0; m < 256; m++) {
        int r = 0;
        for (int j = 0; j < 8; j++) {
            if ((m >> j) & 1) {
                perm32[m][j] = r;
                shuf16[m][2 * j] = (uint8_t)(2 * r);
                shuf16[m][2 * j + 1] = (uint8_t)(2 * r + 1);
                r++;
            } else {
                perm32[m][j] = 0;
                shuf16[m][2 * j] = shuf16[m][2 * j + 1] = 0x80;
            }
        }
        count8[m] = (uint8_t)r;
    }
}

/* Scalar expansion of elements [c0, c1) of one row (c0 a multiple of 8) from the `avail` (> 0) values they mark.
 * Whole mask bytes while 8 values are left: each element reads the value of its rank, so no element waits for
 * the count of the one before it. Then element by element, branch-free: every element reads a value (clamped to
 * the last one, so never past the row's values) and keeps it or zero. */
#define SCALAR_ROW(T)                                                                                         \
    static void scalar_##T(T *dst, const T *src, Py_ssize_t avail, const uint8_t *bits, Py_ssize_t c0,       \
                           Py_ssize_t c1) {                                                                   \
        Py_ssize_t k = 0, c = c0;                                                                             \
        for (; c + 8 <= c1 && k + 8 <= avail; c += 8) {                                                       \
            unsigned m = bits[c >> 3];                                                                        \
            const int32_t *rank = perm32[m];                                                                  \
            for (int j = 0; j < 8; j++) dst[c + j] = src[k + rank[j]] & ((T)0 - (T)((m >> j) & 1));           \
            k += count8[m];                                                                                   \
        }                                                                                                     \
        for (; c < c1; c++) {                                                                                 \
            T bit = (T)((bits[c >> 3] >> (c & 7)) & 1);                                                       \
            dst[c] = src[k < avail ? k : avail - 1] & ((T)0 - bit);                                           \
            k += bit;                                                                                         \
        }                                                                                                     \
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

/* AVX2 (no expand instruction): per byte of the mask, 8 elements. Lane j of the chunk takes value rank(j), its
 * index among the set bits before it, by a shuffle from a table indexed by the mask byte: vpermd for 4-byte
 * elements (then zeroed where the bit is clear), pshufb for 2-byte ones (the table's 0x80 bytes give the zeros).
 * Streaming stores where dst is aligned to the store's width, as above. */
__attribute__((target("avx2,popcnt"))) static Py_ssize_t avx2_u32(uint32_t *dst, const uint32_t *src,
                                                                   const uint8_t *bits, Py_ssize_t cols,
                                                                   Py_ssize_t limit, Py_ssize_t *k) {
    const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    int stream = ((uintptr_t)dst & 31) == 0;
    Py_ssize_t c = 0;
    for (; c + 8 <= cols; c += 8) {
        int m = bits[c >> 3], n = __builtin_popcount((unsigned)m);
        __m256i v = *k + 8 <= limit ? _mm256_loadu_si256((const __m256i *)(src + *k))
                                    : _mm256_maskload_epi32((const int *)(src + *k),
                                                            _mm256_cmpgt_epi32(_mm256_set1_epi32(n), lane));
        v = _mm256_permutevar8x32_epi32(v, _mm256_loadu_si256((const __m256i *)perm32[m]));
        __m256i bit = _mm256_and_si256(_mm256_set1_epi32(m), lane_bit);
        v = _mm256_and_si256(v, _mm256_cmpeq_epi32(bit, lane_bit));
        if (stream) _mm256_stream_si256((__m256i *)(dst + c), v);
        else _mm256_storeu_si256((__m256i *)(dst + c), v);
        *k += n;
    }
    return c;
}

__attribute__((target("avx2,popcnt"))) static Py_ssize_t avx2_u16(uint16_t *dst, const uint16_t *src,
                                                                   const uint8_t *bits, Py_ssize_t cols,
                                                                   Py_ssize_t limit, Py_ssize_t *k) {
    int stream = ((uintptr_t)dst & 15) == 0;
    Py_ssize_t c = 0;
    for (; c + 8 <= cols; c += 8) {
        int m = bits[c >> 3], n = __builtin_popcount((unsigned)m);
        __m128i v;
        if (*k + 8 <= limit) {
            v = _mm_loadu_si128((const __m128i *)(src + *k));
        } else { /* near the end of the values: copy just the chunk's, never read past them */
            uint16_t tail[8] = {0};
            memcpy(tail, src + *k, (size_t)n * sizeof *tail);
            v = _mm_loadu_si128((const __m128i *)tail);
        }
        v = _mm_shuffle_epi8(v, _mm_loadu_si128((const __m128i *)shuf16[m]));
        if (stream) _mm_stream_si128((__m128i *)(dst + c), v);
        else _mm_storeu_si128((__m128i *)(dst + c), v);
        *k += n;
    }
    return c;
}
#endif

/* Instruction sets, best last; `supported` is the best this CPU has. */
enum { ISA_SCALAR, ISA_AVX2, ISA_AVX512 };
static const char *const isa_names[] = {"scalar", "avx2", "avx512"};
static int supported = ISA_SCALAR, use_vbmi2 = 0;

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
    const char *isa_name = NULL;
    (void)self;
    if (!PyArg_ParseTuple(args, "w*y*y*nn|s", &dst, &src, &bits, &rows, &cols, &isa_name)) return NULL;
    PyObject *result = NULL;
    int isa = supported;
    if (isa_name != NULL) { /* by name; -1 where no name matches */
        for (isa = ISA_AVX512; isa >= 0 && strcmp(isa_name, isa_names[isa]) != 0; isa--) {
        }
    }
    Py_ssize_t size = dst.itemsize, bpr = (cols + 7) / 8;
    if (isa < 0 || isa > supported) {
        PyErr_Format(PyExc_ValueError, "expand: instruction set %R is not one this CPU has (it has up to %s)",
                     PyTuple_GET_ITEM(args, 5), isa_names[supported]);
    } else if (size != src.itemsize || (size != 1 && size != 2 && size != 4 && size != 8)) {
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
            if (isa == ISA_AVX512 && size == 4)
                done = avx_u32((uint32_t *)d, (const uint32_t *)s, b, cols, limit, &used);
            else if (isa == ISA_AVX512 && size == 8)
                done = avx_u64((uint64_t *)d, (const uint64_t *)s, b, cols, limit, &used);
            else if (isa == ISA_AVX512 && size == 2 && use_vbmi2)
                done = avx_u16((uint16_t *)d, (const uint16_t *)s, b, cols, limit, &used);
            else if (isa == ISA_AVX512 && size == 1 && use_vbmi2)
                done = avx_u8((uint8_t *)d, (const uint8_t *)s, b, cols, limit, &used);
            else if (isa >= ISA_AVX2 && size == 4)
                done = avx2_u32((uint32_t *)d, (const uint32_t *)s, b, cols, limit, &used);
            else if (isa >= ISA_AVX2 && size == 2)
                done = avx2_u16((uint16_t *)d, (const uint16_t *)s, b, cols, limit, &used);
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

static PyObject *isas(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    PyObject *names = PyTuple_New(supported + 1);
    if (names == NULL) return NULL;
    for (int i = 0; i <= supported; i++) {
        PyObject *name = PyUnicode_FromString(isa_names[i]);
        if (name == NULL) {
            Py_DECREF(names);
            return NULL;
        }
        PyTuple_SET_ITEM(names, i, name);
    }
    return names;
}

static PyMethodDef methods[] = {
    {"expand", expand, METH_VARARGS,
     "expand(dst, src, bits, rows, cols[, isa]) -> values consumed; isa: one of isas() (default: the best)"},
    {"isas", isas, METH_NOARGS, "isas() -> the instruction sets expand can use on this CPU, best last"},
    {"count", count, METH_VARARGS, "count(bits, rows, cols) -> values the bitmask marks"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_expand", NULL, -1, methods};

PyMODINIT_FUNC PyInit__expand(void) {
#ifdef FXP_X86
    __builtin_cpu_init();
    use_popcnt = !!__builtin_cpu_supports("popcnt");
    if (use_popcnt && __builtin_cpu_supports("avx2")) supported = ISA_AVX2;
    if (supported == ISA_AVX2 && __builtin_cpu_supports("avx512f")) supported = ISA_AVX512;
    use_vbmi2 = supported == ISA_AVX512 && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vbmi2");
#endif
    build_tables();
    return PyModule_Create(&module);
}
