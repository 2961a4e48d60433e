/*
 * The probe's hot path in C: a forward wrapper per recorded module and the columns it
 * appends to. probe/recording/hotpath.py holds the Python reference of the same work (used where this
 * extension is not built, or with PROBE_PURE_PYTHON=1); a test checks that both record
 * identical frames.
 *
 * Why a forward wrapper and not hooks: as soon as a module has any forward hook,
 * nn.Module._call_impl leaves its fast path (one call of self.forward) for the slow one
 * (hook dicts walked, kwargs copied, results checked), and that slow path alone costs more per
 * call than everything the probe records. A wrapper stored as the instance's `forward` keeps
 * the fast path: _call_impl calls it, it reads the clock, calls the original forward, reads
 * the clock again and appends (start, end, signature id, calls inside) to four columns.
 *
 * Columns(): growable int64/int32 columns; `recording` False skips a whole step.
 * Wrapper(fn, columns, intern, slow_key, tensor, now=None, interned=None, index=None): callable like `fn`; a
 *   functools.partial of `fn` to everything else (torch.compile traces `fn`, not the probe).
 *   - key of a call: (input shapes, output shapes) built here for exact torch.Tensor
 *     arguments/outputs (one tensor in, one out: a pair of torch.Size); anything else
 *     (tensor subclasses such as DTensor, dict outputs) asks `slow_key(args, kwargs, out)`.
 *   - a key seen for the first time by this module asks `intern(args, kwargs, out)` for its
 *     (module, signature) id; where the key was built here from exact tensors with positional
 *     inputs and the list `interned` is given, the signature is built here too — ((input
 *     shapes), ((output shapes), dtype, device)) of the first output tensor, what the Python
 *     side's in_key/out_key give — and (index, signature) appended to `interned`, the id being
 *     its position (the recorder's own list, which `intern` appends to as well): no Python call
 *     on a miss (the attention function misses at every decode step of a generate longer than
 *     any before it, its key and value growing, and a miss's cost lands in the caller's time).
 *   - one tensor in, one out: the two torch.Size are read through the tensor type's `shape`
 *     getter directly and compared with the last pair this module saw (the same shapes call
 *     after call: every decode step's); only a change builds the key and looks it up.
 *   - `now=None` reads CLOCK_MONOTONIC, the clock of time.perf_counter_ns on Linux; any other
 *     platform, or an injected clock, calls `now()`.
 *   - a call that raises records nothing (its recorded children stay).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

/* ------------------------------------------------------------------ Columns */

typedef struct {
    PyObject_HEAD
    int64_t *t0;
    int64_t *t1;
    int32_t *sig;
    int32_t *inner; /* calls recorded while this one ran (its recorded descendants) */
    int32_t *post;  /* ns the wrapper spent recording the call after its window closed (0: not read) */
    Py_ssize_t n;
    Py_ssize_t cap;
    int recording;
    Py_ssize_t dropped; /* calls left out because the probe's own work failed while recording them */
} Columns;

static int
Columns_grow(Columns *c)
{
    Py_ssize_t cap = c->cap ? c->cap * 2 : 4096;
    int64_t *t0 = PyMem_Realloc(c->t0, cap * sizeof(int64_t));
    if (t0 == NULL)
        goto nomem;
    c->t0 = t0;
    int64_t *t1 = PyMem_Realloc(c->t1, cap * sizeof(int64_t));
    if (t1 == NULL)
        goto nomem;
    c->t1 = t1;
    int32_t *sig = PyMem_Realloc(c->sig, cap * sizeof(int32_t));
    if (sig == NULL)
        goto nomem;
    c->sig = sig;
    int32_t *inner = PyMem_Realloc(c->inner, cap * sizeof(int32_t));
    if (inner == NULL)
        goto nomem;
    c->inner = inner;
    int32_t *post = PyMem_Realloc(c->post, cap * sizeof(int32_t));
    if (post == NULL)
        goto nomem;
    c->post = post;
    c->cap = cap;
    return 0;
nomem:
    PyErr_NoMemory();
    return -1;
}

static inline int
Columns_push(Columns *c, int64_t t0, int64_t t1, int32_t sig, int32_t inner, int32_t post)
{
    if (c->n == c->cap && Columns_grow(c) < 0)
        return -1;
    c->t0[c->n] = t0;
    c->t1[c->n] = t1;
    c->sig[c->n] = sig;
    c->inner[c->n] = inner;
    c->post[c->n] = post;
    c->n++;
    return 0;
}

static int
Columns_init(Columns *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "", kwlist))
        return -1;
    self->recording = 1;
    return 0;
}

static void
Columns_dealloc(Columns *self)
{
    PyMem_Free(self->t0);
    PyMem_Free(self->t1);
    PyMem_Free(self->sig);
    PyMem_Free(self->inner);
    PyMem_Free(self->post);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static Py_ssize_t
Columns_len(Columns *self)
{
    return self->n;
}

static PyObject *
Columns_append(Columns *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 && nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "append(t0, t1, sig, inner, post=0)");
        return NULL;
    }
    long long t0 = PyLong_AsLongLong(args[0]);
    long long t1 = PyLong_AsLongLong(args[1]);
    long sig = PyLong_AsLong(args[2]);
    long inner = PyLong_AsLong(args[3]);
    long post = nargs == 5 ? PyLong_AsLong(args[4]) : 0;
    if (PyErr_Occurred())
        return NULL;
    if (Columns_push(self, t0, t1, (int32_t)sig, (int32_t)inner, (int32_t)post) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
Columns_truncate(Columns *self, PyObject *arg)
{
    Py_ssize_t n = PyLong_AsSsize_t(arg);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    if (n < 0) {
        PyErr_SetString(PyExc_ValueError, "truncate(n) needs n >= 0");
        return NULL;
    }
    if (n < self->n)
        self->n = n;
    Py_RETURN_NONE;
}

/* columns() -> (t0 bytes, t1 bytes, sig bytes, inner bytes, post bytes): copies for the frame builder */
static PyObject *
Columns_columns(Columns *self, PyObject *Py_UNUSED(ignored))
{
    Py_ssize_t n = self->n;
    if (n == 0 || self->t0 == NULL)
        return Py_BuildValue("(y#y#y#y#y#)", "", (Py_ssize_t)0, "", (Py_ssize_t)0, "", (Py_ssize_t)0, "",
                             (Py_ssize_t)0, "", (Py_ssize_t)0);
    return Py_BuildValue("(y#y#y#y#y#)", (const char *)self->t0, n * (Py_ssize_t)sizeof(int64_t),
                         (const char *)self->t1, n * (Py_ssize_t)sizeof(int64_t), (const char *)self->sig,
                         n * (Py_ssize_t)sizeof(int32_t), (const char *)self->inner,
                         n * (Py_ssize_t)sizeof(int32_t), (const char *)self->post,
                         n * (Py_ssize_t)sizeof(int32_t));
}

static PyObject *
Columns_get_recording(Columns *self, void *closure)
{
    return PyBool_FromLong(self->recording);
}

static int
Columns_set_recording(Columns *self, PyObject *value, void *closure)
{
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "cannot delete recording");
        return -1;
    }
    int v = PyObject_IsTrue(value);
    if (v < 0)
        return -1;
    self->recording = v;
    return 0;
}

static PyMethodDef Columns_methods[] = {
    {"append", (PyCFunction)(void (*)(void))Columns_append, METH_FASTCALL, "append(t0, t1, sig, inner)"},
    {"truncate", (PyCFunction)Columns_truncate, METH_O, "truncate(n): keep the first n rows"},
    {"columns", (PyCFunction)Columns_columns, METH_NOARGS,
     "(t0, t1, sig, inner) as bytes: int64, int64, int32, int32"},
    {NULL},
};

static PyMemberDef Columns_members[] = {
    {"dropped", T_PYSSIZET, offsetof(Columns, dropped), 0,
     "calls left out of the columns because recording them raised (the forward itself ran)"},
    {NULL},
};

static PyGetSetDef Columns_getset[] = {
    {"recording", (getter)Columns_get_recording, (setter)Columns_set_recording,
     "False while a step whose block records are dropped runs", NULL},
    {NULL},
};

static PySequenceMethods Columns_as_sequence = {
    .sq_length = (lenfunc)Columns_len,
};

static PyTypeObject ColumnsType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "probe.recording._hooks.Columns",
    .tp_doc = "The call columns the wrappers append to (start ns, end ns, signature id, inner calls).",
    .tp_basicsize = sizeof(Columns),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Columns_init,
    .tp_dealloc = (destructor)Columns_dealloc,
    .tp_methods = Columns_methods,
    .tp_getset = Columns_getset,
    .tp_members = Columns_members,
    .tp_as_sequence = &Columns_as_sequence,
};

/* ------------------------------------------------------------------ Wrapper */

/* A Wrapper is a functools.partial of the original forward with no bound arguments, whose call
   is replaced by the recording one. Being a partial is what keeps it out of compiled code:
   torch.compile traces a functools.partial as a call of its .func, so a compiled graph holds the
   module's own forward and nothing of the probe. The type is built at import as a heap subclass
   of functools.partial; its own fields live after the partial's. */
typedef struct {
    PyObject *fn;       /* the wrapped forward (exposed as __wrapped__, and as .func by partial) */
    Columns *cols;
    PyObject *intern;   /* callable(args, kwargs, out) -> int */
    PyObject *slow_key; /* callable(args, kwargs, out) -> hashable */
    PyObject *interned; /* list of (module index, signature): the (module, signature) ids, or None */
    PyObject *index;    /* this module's index (an int), appended with each signature */
    PyTypeObject *tensor;
    PyObject *now;      /* None: native clock */
    PyObject *local;    /* dict: key -> id */
    PyObject *shape;    /* the tensor type's `shape` getset descriptor, or NULL: getattr */
    getter shape_get;   /* its getter, called directly */
    PyObject *last_in;  /* the last one-in-one-out call's input and output torch.Size, or NULL */
    PyObject *last_out;
    int32_t last_id;    /* ... and its (module, signature) id */
} Extra;

static PyTypeObject *PartialType = NULL;
static PyTypeObject *WrapperType = NULL;
static Py_ssize_t extra_offset = 0;
static Py_ssize_t vc_offset = 0;
#define EXTRA(o) ((Extra *)((char *)(o) + extra_offset))

static PyObject *shape_str = NULL;
static PyObject *dtype_str = NULL;
static PyObject *device_str = NULL;

static inline int
read_now(Extra *self, int64_t *t)
{
#if defined(__linux__)
    if (self->now == Py_None) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        *t = (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
        return 0;
    }
#endif
    PyObject *v = PyObject_CallNoArgs(self->now);
    if (v == NULL)
        return -1;
    *t = PyLong_AsLongLong(v);
    Py_DECREF(v);
    return (*t == -1 && PyErr_Occurred()) ? -1 : 0;
}

/* An exact tensor's torch.Size (new reference), without the attribute lookup when the getter is known. */
static inline PyObject *
shape_of(Extra *self, PyObject *t)
{
    if (self->shape_get != NULL)
        return self->shape_get(t, ((PyGetSetDescrObject *)self->shape)->d_getset->closure);
    return PyObject_GetAttr(t, shape_str);
}

/* Whether two torch.Size hold the same dims (plain ints compared by value); anything else: no. */
static inline int
same_dims(PyObject *a, PyObject *b)
{
    if (!PyTuple_Check(a) || !PyTuple_Check(b) || PyTuple_GET_SIZE(a) != PyTuple_GET_SIZE(b))
        return 0;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(a); i++) {
        PyObject *x = PyTuple_GET_ITEM(a, i), *y = PyTuple_GET_ITEM(b, i);
        if (x == y)
            continue; /* small ints are shared */
        if (!PyLong_CheckExact(x) || !PyLong_CheckExact(y))
            return 0; /* symbolic sizes: the dict decides */
        int overflow_x, overflow_y;
        long long vx = PyLong_AsLongLongAndOverflow(x, &overflow_x);
        long long vy = PyLong_AsLongLongAndOverflow(y, &overflow_y);
        if (overflow_x || overflow_y || vx != vy)
            return 0;
    }
    return 1;
}

/* 1: exact tensor, 0: not a tensor, -1: a tensor subclass (slow path) */
static inline int
tensor_kind(Extra *self, PyObject *o)
{
    if (Py_TYPE(o) == self->tensor)
        return 1;
    if (o == Py_None || PyLong_CheckExact(o) || PyFloat_CheckExact(o) || PyBool_Check(o))
        return 0;
    return PyObject_TypeCheck(o, self->tensor) ? -1 : 0;
}

/* Shapes of the exact tensors among items into a new tuple; NULL with *slow = 1 for a subclass. */
static PyObject *
shapes_of(Extra *self, PyObject *const *items, Py_ssize_t n, int *slow)
{
    PyObject *shapes[16];
    Py_ssize_t k = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        int kind = tensor_kind(self, items[i]);
        if (kind < 0 || (kind == 1 && k == 16)) {
            *slow = 1;
            goto fail;
        }
        if (kind == 1) {
            PyObject *s = shape_of(self, items[i]);
            if (s == NULL)
                goto fail;
            shapes[k++] = s;
        }
    }
    PyObject *t = PyTuple_New(k);
    if (t == NULL)
        goto fail;
    for (Py_ssize_t i = 0; i < k; i++)
        PyTuple_SET_ITEM(t, i, shapes[i]);
    return t;
fail:
    for (Py_ssize_t i = 0; i < k; i++)
        Py_DECREF(shapes[i]);
    return NULL;
}

static PyObject *
call_args_tuple(PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *t = PyTuple_New(nargs);
    if (t == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < nargs; i++)
        PyTuple_SET_ITEM(t, i, Py_NewRef(args[i]));
    return t;
}

static PyObject *
call_kwargs_dict(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *d = PyDict_New();
    if (d == NULL || kwnames == NULL)
        return d;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(kwnames); i++) {
        if (PyDict_SetItem(d, PyTuple_GET_ITEM(kwnames, i), args[nargs + i]) < 0) {
            Py_DECREF(d);
            return NULL;
        }
    }
    return d;
}

/* fn(args, kwargs, out) for a vectorcall's arguments (the Python side's slow_key and intern). */
static PyObject *
call_py(PyObject *fn, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, PyObject *out)
{
    PyObject *targs = call_args_tuple(args, nargs);
    PyObject *tkw = targs ? call_kwargs_dict(args, nargs, kwnames) : NULL;
    PyObject *res = NULL;
    if (tkw != NULL) {
        PyObject *a[3] = {targs, tkw, out};
        res = PyObject_Vectorcall(fn, a, 3, NULL);
    }
    Py_XDECREF(targs);
    Py_XDECREF(tkw);
    return res;
}

/* The module-local cache key of a call that is not one tensor in, one out; NULL on error. */
static PyObject *
call_key(Extra *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, PyObject *out, int *exact)
{
    int slow = 0;
    PyObject *ins = NULL, *outs = NULL;
    ins = shapes_of(self, args, nargs, &slow);
    *exact = 1; /* the key's input shapes are what in_key gives: positional ones (or none at all) */
    if (ins != NULL && PyTuple_GET_SIZE(ins) == 0 && kwnames != NULL) {
        *exact = 0;
        /* keyword-only inputs (attention called with hidden_states=...) */
        Py_DECREF(ins);
        ins = shapes_of(self, args + nargs, PyTuple_GET_SIZE(kwnames), &slow);
    }
    if (ins == NULL)
        goto slow_or_fail;
    if (Py_TYPE(out) == self->tensor) {
        PyObject *s = shape_of(self, out);
        if (s == NULL)
            goto slow_or_fail;
        outs = PyTuple_Pack(1, s);
        Py_DECREF(s);
    }
    else if (PyTuple_CheckExact(out)) {
        outs = shapes_of(self, &PyTuple_GET_ITEM(out, 0), PyTuple_GET_SIZE(out), &slow);
    }
    else if (out == Py_None) {
        outs = PyTuple_New(0);
    }
    else {
        slow = 1;
    }
    if (outs == NULL)
        goto slow_or_fail;
    PyObject *pair = PyTuple_Pack(2, ins, outs);
    Py_DECREF(ins);
    Py_DECREF(outs);
    return pair;
slow_or_fail:
    Py_XDECREF(ins);
    Py_XDECREF(outs);
    *exact = 0;
    if (!slow)
        return NULL;
    PyErr_Clear();
    return call_py(self->slow_key, args, nargs, kwnames, out);
}

/* ((ins), ((outs), dtype, device)): a call's signature, dtype and device of its first output
   tensor (None without one), from shapes already read here (`single`: `ins` and `outs` are the
   one input's and the one output's torch.Size); NULL on error. */
static PyObject *
exact_sig(Extra *self, PyObject *ins, PyObject *outs, int single, PyObject *out)
{
    if (single) {
        PyObject *i1 = PyTuple_Pack(1, ins), *o1 = i1 ? PyTuple_Pack(1, outs) : NULL;
        PyObject *sig = o1 ? exact_sig(self, i1, o1, 0, out) : NULL;
        Py_XDECREF(i1);
        Py_XDECREF(o1);
        return sig;
    }
    PyObject *first = NULL;
    if (Py_TYPE(out) == self->tensor)
        first = out;
    else if (PyTuple_CheckExact(out))
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(out) && first == NULL; i++)
            if (Py_TYPE(PyTuple_GET_ITEM(out, i)) == self->tensor)
                first = PyTuple_GET_ITEM(out, i);
    PyObject *dtype = first ? PyObject_GetAttr(first, dtype_str) : Py_NewRef(Py_None);
    PyObject *device = first && dtype ? PyObject_GetAttr(first, device_str) : (first ? NULL : Py_NewRef(Py_None));
    PyObject *o = dtype && device ? PyTuple_Pack(3, outs, dtype, device) : NULL;
    PyObject *sig = o ? PyTuple_Pack(2, ins, o) : NULL;
    Py_XDECREF(dtype);
    Py_XDECREF(device);
    Py_XDECREF(o);
    return sig;
}

/* The (module, signature) id of `key` (borrowed from the module's dict), interned on a miss:
   appended to `interned` where `ins`/`outs` (borrowed) are given and the wrapper has that list, else
   through `intern`. */
static PyObject *
id_of(Extra *self, PyObject *key, PyObject *ins, PyObject *outs, int single, PyObject *const *args,
      Py_ssize_t nargs, PyObject *kwnames, PyObject *out)
{
    PyObject *sid = PyDict_GetItemWithError(self->local, key);
    if (sid != NULL || PyErr_Occurred())
        return sid;
    PyObject *new_sid = NULL;
    if (ins != NULL && self->interned != Py_None) {
        PyObject *sig = exact_sig(self, ins, outs, single, out);
        PyObject *entry = sig ? PyTuple_Pack(2, self->index, sig) : NULL;
        if (entry != NULL && PyList_Append(self->interned, entry) == 0)
            new_sid = PyLong_FromSsize_t(PyList_GET_SIZE(self->interned) - 1);
        Py_XDECREF(sig);
        Py_XDECREF(entry);
    }
    else
        new_sid = call_py(self->intern, args, nargs, kwnames, out);
    if (new_sid == NULL || PyDict_SetItem(self->local, key, new_sid) < 0) {
        Py_XDECREF(new_sid);
        return NULL;
    }
    Py_DECREF(new_sid); /* the dict holds it */
    return new_sid;
}

static inline int
id_value(PyObject *sid, int32_t *v)
{
    long x = PyLong_AsLong(sid);
    if (x == -1 && PyErr_Occurred())
        return -1;
    *v = (int32_t)x;
    return 0;
}

static int
record(Extra *self, int64_t t0, int64_t t1, Py_ssize_t n0, PyObject *const *args, Py_ssize_t nargs,
       PyObject *kwnames, PyObject *out)
{
    int32_t v;
    if (nargs == 1 && Py_TYPE(out) == self->tensor && Py_TYPE(args[0]) == self->tensor) {
        /* one tensor in, one tensor out: every block of a decoder */
        PyObject *s_in = shape_of(self, args[0]);
        if (s_in == NULL)
            return -1;
        PyObject *s_out = out == args[0] ? Py_NewRef(s_in) : shape_of(self, out); /* dropout, identity */
        if (s_out == NULL) {
            Py_DECREF(s_in);
            return -1;
        }
        if (self->last_in != NULL && same_dims(s_in, self->last_in) && same_dims(s_out, self->last_out)) {
            Py_DECREF(s_in);
            Py_DECREF(s_out);
            v = self->last_id;
        }
        else {
            PyObject *key = PyTuple_Pack(2, s_in, s_out);
            PyObject *sid = key ? id_of(self, key, s_in, s_out, 1, args, nargs, kwnames, out) : NULL;
            Py_XDECREF(key);
            if (sid == NULL || id_value(sid, &v) < 0) {
                Py_DECREF(s_in);
                Py_DECREF(s_out);
                return -1;
            }
            Py_XSETREF(self->last_in, s_in); /* the memo takes both references */
            Py_XSETREF(self->last_out, s_out);
            self->last_id = v;
        }
    }
    else {
        int exact = 0;
        PyObject *key = call_key(self, args, nargs, kwnames, out, &exact);
        if (key == NULL)
            return -1;
        PyObject *sid = exact ? id_of(self, key, PyTuple_GET_ITEM(key, 0), PyTuple_GET_ITEM(key, 1), 0, args,
                                      nargs, kwnames, out)
                              : id_of(self, key, NULL, NULL, 0, args, nargs, kwnames, out);
        Py_DECREF(key);
        if (sid == NULL || id_value(sid, &v) < 0)
            return -1;
    }
    Columns *c = self->cols;
    return Columns_push(c, t0, t1, v, (int32_t)(c->n - n0), 0);
}

/* The probe's own work failed while recording a call (a clock, the signature key, interning).
 * An Exception drops that one record and warns once per columns (the user's forward never fails
 * because of the probe): returns 0. KeyboardInterrupt, SystemExit and any other BaseException
 * propagate, as from the Python wrapper: returns -1 with the error still set. */
static int
absorb(Columns *c)
{
    if (!PyErr_ExceptionMatches(PyExc_Exception))
        return -1;
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (c->dropped++ == 0
        && PyErr_WarnFormat(PyExc_RuntimeWarning, 1,
                            "probe: a module call could not be recorded and is left out of the run "
                            "(%s: %S); the forward itself ran normally",
                            ((PyTypeObject *)type)->tp_name, value ? value : Py_None) < 0)
        PyErr_Clear(); /* warnings turned into errors: the forward still must not fail */
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
    return 0;
}

static PyObject *
Wrapper_vectorcall(PyObject *obj, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Extra *self = EXTRA(obj);
    Columns *c = self->cols;
    if (!c->recording)
        return PyObject_Vectorcall(self->fn, args, nargsf, kwnames);
    int64_t t0, t1;
    Py_ssize_t n0 = c->n;
    if (read_now(self, &t0) < 0) {
        if (absorb(c) < 0)
            return NULL;
        return PyObject_Vectorcall(self->fn, args, nargsf, kwnames); /* this call goes unrecorded */
    }
    PyObject *out = PyObject_Vectorcall(self->fn, args, nargsf, kwnames);
    if (out == NULL)
        return NULL;
    int failed = read_now(self, &t1) < 0;
    if (!failed && c->recording) {
        failed = record(self, t0, t1, n0, args, PyVectorcall_NARGS(nargsf), kwnames, out) < 0;
        /* the call's own record, made in its caller's window: read in place on the probe's own
         * clock (an injected one is not read again), not calibrated in a loop, where its memory is
         * warm (in a forward it was read 0.6-0.7 us a call against 0.1 us in the loop); > 0 marks
         * it read, as the Python wrappers mark it */
        int64_t t2;
        if (!failed && self->now == Py_None && read_now(self, &t2) == 0) {
            int64_t spent = t2 - t1;
            c->post[c->n - 1] = (int32_t)(spent < 1 ? 1 : (spent > INT32_MAX ? INT32_MAX : spent));
        }
    }
    if ((failed || PyErr_Occurred()) && absorb(c) < 0) {
        Py_DECREF(out);
        return NULL;
    }
    return out;
}

/* Wrapper(fn, columns, intern, slow_key, tensor, now=None, interned=None, index=None) */
static PyObject *
Wrapper_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"fn", "columns", "intern", "slow_key", "tensor", "now", "interned", "index", NULL};
    PyObject *fn, *intern, *slow_key, *tensor, *now = Py_None, *interned = Py_None, *index = Py_None;
    PyObject *cols;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO!OOO!|OOO", kwlist, &fn, &ColumnsType, &cols, &intern,
                                     &slow_key, &PyType_Type, &tensor, &now, &interned, &index))
        return NULL;
    if (interned != Py_None && !(PyList_CheckExact(interned) && PyLong_CheckExact(index))) {
        PyErr_SetString(PyExc_TypeError, "Wrapper: interned must be a list and index an int");
        return NULL;
    }
    PyObject *pargs = PyTuple_Pack(1, fn);
    if (pargs == NULL)
        return NULL;
    PyObject *obj = PartialType->tp_new(type, pargs, NULL); /* a partial of fn, no bound arguments */
    Py_DECREF(pargs);
    if (obj == NULL)
        return NULL;
    Extra *self = EXTRA(obj);
    self->fn = Py_NewRef(fn);
    self->cols = (Columns *)Py_NewRef(cols);
    self->intern = Py_NewRef(intern);
    self->slow_key = Py_NewRef(slow_key);
    self->interned = Py_NewRef(interned);
    self->index = Py_NewRef(index);
    self->tensor = (PyTypeObject *)Py_NewRef(tensor);
    self->now = Py_NewRef(now);
    self->local = PyDict_New();
    if (self->local == NULL) {
        Py_DECREF(obj);
        return NULL;
    }
    /* the `shape` attribute of an exact tensor is this getset descriptor (a data descriptor:
       nothing on the instance can shadow it), so its getter can be called directly */
    PyObject *d = PyObject_GetAttr(tensor, shape_str);
    if (d != NULL && Py_TYPE(d) == &PyGetSetDescr_Type && ((PyGetSetDescrObject *)d)->d_getset->get != NULL) {
        self->shape = d;
        self->shape_get = ((PyGetSetDescrObject *)d)->d_getset->get;
    }
    else {
        Py_XDECREF(d);
        PyErr_Clear();
    }
    *(vectorcallfunc *)((char *)obj + vc_offset) = Wrapper_vectorcall;
    return obj;
}

static int
Wrapper_traverse(PyObject *obj, visitproc visit, void *arg)
{
    Extra *self = EXTRA(obj);
    Py_VISIT(self->fn);
    Py_VISIT(self->cols);
    Py_VISIT(self->intern);
    Py_VISIT(self->slow_key);
    Py_VISIT(self->interned);
    Py_VISIT(self->index);
    Py_VISIT(self->tensor);
    Py_VISIT(self->now);
    Py_VISIT(self->local);
    Py_VISIT(self->shape);
    Py_VISIT(self->last_in);
    Py_VISIT(self->last_out);
    return PartialType->tp_traverse(obj, visit, arg);
}

static void
Extra_clear(Extra *self)
{
    Py_CLEAR(self->fn);
    Py_CLEAR(self->cols);
    Py_CLEAR(self->intern);
    Py_CLEAR(self->slow_key);
    Py_CLEAR(self->interned);
    Py_CLEAR(self->index);
    Py_CLEAR(self->tensor);
    Py_CLEAR(self->now);
    Py_CLEAR(self->local);
    self->shape_get = NULL;
    Py_CLEAR(self->shape);
    Py_CLEAR(self->last_in);
    Py_CLEAR(self->last_out);
}

static int
Wrapper_clear(PyObject *obj)
{
    Extra_clear(EXTRA(obj));
    return PartialType->tp_clear(obj);
}

static void
Wrapper_dealloc(PyObject *obj)
{
    PyObject_GC_UnTrack(obj);
    Extra_clear(EXTRA(obj));
    PartialType->tp_dealloc(obj); /* frees the object and drops its reference to this type */
}

/* Unknown attributes (__name__, __doc__, __func__, __self__, ...) are the wrapped forward's,
   so code that inspects `module.forward` sees what it would see without the probe. */
static PyObject *
Wrapper_getattro(PyObject *obj, PyObject *name)
{
    PyObject *v = PyObject_GenericGetAttr(obj, name);
    Extra *self = EXTRA(obj);
    if (v != NULL || !PyErr_ExceptionMatches(PyExc_AttributeError) || self->fn == NULL)
        return v;
    PyErr_Clear();
    return PyObject_GetAttr(self->fn, name);
}

static PyObject *
Wrapper_get_true(PyObject *self, void *closure)
{
    Py_RETURN_TRUE;
}

static PyObject *
Wrapper_get_wrapped(PyObject *obj, void *closure)
{
    Extra *self = EXTRA(obj);
    if (self->fn == NULL)
        Py_RETURN_NONE;
    return Py_NewRef(self->fn);
}

/* An attached model cannot be copied or pickled: its wrappers hold the live recording. Said
   plainly, with what to do (the Python wrappers say the same, see hotpath.ATTACHED). */
#define ATTACHED_MSG                                                                               \
    "probe: a model cannot be copied or pickled while a probe is attached to it (its wrappers "   \
    "hold the live recording); detach first - probe.detach(model), or leave the "                 \
    "`with probe.attach(...)` block - then copy or pickle it"

static PyObject *
Wrapper_refuse(PyObject *self, PyObject *arg)
{
    PyErr_SetString(PyExc_TypeError, ATTACHED_MSG);
    return NULL;
}

static PyMethodDef Wrapper_methods[] = {
    {"__reduce__", (PyCFunction)Wrapper_refuse, METH_NOARGS, "refused while attached"},
    {"__reduce_ex__", (PyCFunction)Wrapper_refuse, METH_O, "refused while attached"},
    {"__deepcopy__", (PyCFunction)Wrapper_refuse, METH_O, "refused while attached"},
    {NULL},
};

static PyGetSetDef Wrapper_getset[] = {
    {"__wrapped__", (getter)Wrapper_get_wrapped, NULL, "the wrapped forward", NULL},
    {"__probe_wrapper__", (getter)Wrapper_get_true, NULL, "marks the probe's wrappers", NULL},
    {NULL},
};

static int
make_wrapper_type(void)
{
    PyObject *functools = PyImport_ImportModule("functools");
    if (functools == NULL)
        return -1;
    PyObject *partial = PyObject_GetAttrString(functools, "partial");
    Py_DECREF(functools);
    if (partial == NULL)
        return -1;
    if (!PyType_Check(partial) || ((PyTypeObject *)partial)->tp_vectorcall_offset <= 0
        || ((PyTypeObject *)partial)->tp_traverse == NULL || ((PyTypeObject *)partial)->tp_clear == NULL) {
        Py_DECREF(partial);
        PyErr_SetString(PyExc_ImportError, "functools.partial has an unexpected layout");
        return -1;
    }
    PartialType = (PyTypeObject *)partial; /* kept for the module's life */
    Py_ssize_t align = (Py_ssize_t)sizeof(void *);
    extra_offset = (PartialType->tp_basicsize + align - 1) / align * align;
    vc_offset = PartialType->tp_vectorcall_offset;
    static PyMemberDef members[] = {
        {"__vectorcalloffset__", T_PYSSIZET, 0, READONLY, NULL},
        {NULL},
    };
    members[0].offset = vc_offset;
    static PyType_Slot slots[] = {
        {Py_tp_doc, "A recorded module's forward: times the call and appends it to the columns."},
        {Py_tp_new, Wrapper_new},
        {Py_tp_call, PyVectorcall_Call},
        {Py_tp_traverse, Wrapper_traverse},
        {Py_tp_clear, Wrapper_clear},
        {Py_tp_dealloc, Wrapper_dealloc},
        {Py_tp_getattro, Wrapper_getattro},
        {Py_tp_getset, Wrapper_getset},
        {Py_tp_methods, Wrapper_methods},
        {Py_tp_members, members},
        {0, NULL},
    };
    static PyType_Spec spec = {
        .name = "probe.recording._hooks.Wrapper",
        .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
        .slots = slots,
    };
    spec.basicsize = (int)(extra_offset + sizeof(Extra));
    WrapperType = (PyTypeObject *)PyType_FromSpecWithBases(&spec, partial);
    return WrapperType == NULL ? -1 : 0;
}

static struct PyModuleDef hooksmodule = {
    PyModuleDef_HEAD_INIT,
    .m_name = "probe.recording._hooks",
    .m_doc = "C hot path of the probe's forward wrappers.",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__hooks(void)
{
    if (PyType_Ready(&ColumnsType) < 0 || make_wrapper_type() < 0)
        return NULL;
    shape_str = PyUnicode_InternFromString("shape");
    dtype_str = PyUnicode_InternFromString("dtype");
    device_str = PyUnicode_InternFromString("device");
    if (shape_str == NULL || dtype_str == NULL || device_str == NULL)
        return NULL;
    PyObject *m = PyModule_Create(&hooksmodule);
    if (m == NULL)
        return NULL;
    Py_INCREF(&ColumnsType);
    if (PyModule_AddObject(m, "Columns", (PyObject *)&ColumnsType) < 0) {
        Py_DECREF(&ColumnsType);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(WrapperType);
    if (PyModule_AddObject(m, "Wrapper", (PyObject *)WrapperType) < 0) {
        Py_DECREF(WrapperType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
