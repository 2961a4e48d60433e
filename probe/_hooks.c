/*
 * The probe's per-call hooks in C: the same work as probe.capture.Probe._make_cpu_hooks'
 * Python closures (read the clock, key the call by its input and output shapes, append three
 * columns), without the interpreter's cost per call. Optional: probe.capture falls back to
 * the Python hooks when this extension is not built.
 *
 * One Recorder per hooked module. `rec.pre(module, args)` stores the start time;
 * `rec.post(module, args, kwargs, out)` reads the end time, finds the call's signature id in
 * the module's own {(input shape, output shape): id} cache (asking `intern(args, kwargs, out)`
 * for a new one, and `slow_key(args, kwargs, out)` for the key of calls that are not one
 * tensor in, one tensor out), and appends start, end and id to three array.array columns.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

typedef struct {
    PyObject_HEAD
    PyObject *now;        /* time.perf_counter_ns */
    PyObject *tensor;     /* torch.Tensor (exact type for the fast path) */
    PyObject *intern;     /* callable(args, kwargs, out) -> id */
    PyObject *slow_key;   /* callable(args, kwargs, out) -> key */
    PyObject *local;      /* dict: key -> id */
    PyObject *t0_append;  /* bound array.append of the start column */
    PyObject *t1_append;
    PyObject *sig_append;
    PyObject *t0;         /* start time of the running call (an int) */
    PyObject *recording;  /* list [bool]: False during a step whose records are dropped */
} Recorder;

static PyObject *shape_str = NULL;

static int
Recorder_traverse(Recorder *self, visitproc visit, void *arg)
{
    Py_VISIT(self->now);
    Py_VISIT(self->tensor);
    Py_VISIT(self->intern);
    Py_VISIT(self->slow_key);
    Py_VISIT(self->local);
    Py_VISIT(self->t0_append);
    Py_VISIT(self->t1_append);
    Py_VISIT(self->sig_append);
    Py_VISIT(self->t0);
    Py_VISIT(self->recording);
    return 0;
}

static int
Recorder_clear(Recorder *self)
{
    Py_CLEAR(self->now);
    Py_CLEAR(self->tensor);
    Py_CLEAR(self->intern);
    Py_CLEAR(self->slow_key);
    Py_CLEAR(self->local);
    Py_CLEAR(self->t0_append);
    Py_CLEAR(self->t1_append);
    Py_CLEAR(self->sig_append);
    Py_CLEAR(self->t0);
    Py_CLEAR(self->recording);
    return 0;
}

static void
Recorder_dealloc(Recorder *self)
{
    PyObject_GC_UnTrack(self);
    Recorder_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
Recorder_init(Recorder *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"now", "tensor", "intern", "slow_key", "t0_append", "t1_append", "sig_append",
                             "recording", NULL};
    PyObject *now, *tensor, *intern, *slow_key, *a0, *a1, *a2, *recording;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOOOOO!", kwlist, &now, &tensor, &intern, &slow_key,
                                     &a0, &a1, &a2, &PyList_Type, &recording))
        return -1;
    if (PyList_GET_SIZE(recording) < 1) {
        PyErr_SetString(PyExc_ValueError, "recording must be a one-item list");
        return -1;
    }
    Py_XSETREF(self->recording, Py_NewRef(recording));
    Py_XSETREF(self->now, Py_NewRef(now));
    Py_XSETREF(self->tensor, Py_NewRef(tensor));
    Py_XSETREF(self->intern, Py_NewRef(intern));
    Py_XSETREF(self->slow_key, Py_NewRef(slow_key));
    Py_XSETREF(self->t0_append, Py_NewRef(a0));
    Py_XSETREF(self->t1_append, Py_NewRef(a1));
    Py_XSETREF(self->sig_append, Py_NewRef(a2));
    Py_XSETREF(self->local, PyDict_New());
    Py_XSETREF(self->t0, PyLong_FromLong(0));
    return self->local == NULL || self->t0 == NULL ? -1 : 0;
}

/* pre(module, args) */
static int
ready(Recorder *self)
{
    if (self->now == NULL || self->recording == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "probe._hooks.Recorder used before __init__");
        return 0;
    }
    return 1;
}

static PyObject *
Recorder_pre(Recorder *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (!ready(self))
        return NULL;
    PyObject *t = PyObject_CallNoArgs(self->now);
    if (t == NULL)
        return NULL;
    Py_SETREF(self->t0, t);
    Py_RETURN_NONE;
}

static int
append(PyObject *bound, PyObject *value)
{
    PyObject *r = PyObject_CallOneArg(bound, value);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* post(module, args, kwargs, out) */
static PyObject *
Recorder_post(Recorder *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (!ready(self))
        return NULL;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "post(module, args, kwargs, out)");
        return NULL;
    }
    if (PyList_GET_ITEM(self->recording, 0) != Py_True)
        Py_RETURN_NONE;  /* a step whose block records are dropped (decode_stride / max_steps) */
    PyObject *t1 = PyObject_CallNoArgs(self->now);
    if (t1 == NULL)
        return NULL;
    PyObject *call_args = args[1], *kwargs = args[2], *out = args[3];
    PyObject *key = NULL;
    if (PyTuple_Check(call_args) && PyTuple_GET_SIZE(call_args) == 1
        && (PyObject *)Py_TYPE(out) == self->tensor
        && (PyObject *)Py_TYPE(PyTuple_GET_ITEM(call_args, 0)) == self->tensor) {
        PyObject *s_in = PyObject_GetAttr(PyTuple_GET_ITEM(call_args, 0), shape_str);
        if (s_in == NULL)
            goto fail;
        PyObject *s_out = PyObject_GetAttr(out, shape_str);
        if (s_out == NULL) {
            Py_DECREF(s_in);
            goto fail;
        }
        key = PyTuple_Pack(2, s_in, s_out);
        Py_DECREF(s_in);
        Py_DECREF(s_out);
    }
    else {
        PyObject *a[3] = {call_args, kwargs, out};
        key = PyObject_Vectorcall(self->slow_key, a, 3, NULL);
    }
    if (key == NULL)
        goto fail;
    PyObject *sid = PyDict_GetItemWithError(self->local, key);  /* borrowed */
    if (sid == NULL) {
        if (PyErr_Occurred()) {
            Py_DECREF(key);
            goto fail;
        }
        PyObject *a[3] = {call_args, kwargs, out};
        PyObject *new_sid = PyObject_Vectorcall(self->intern, a, 3, NULL);
        if (new_sid == NULL || PyDict_SetItem(self->local, key, new_sid) < 0) {
            Py_XDECREF(new_sid);
            Py_DECREF(key);
            goto fail;
        }
        Py_DECREF(new_sid);
        sid = PyDict_GetItemWithError(self->local, key);
    }
    Py_INCREF(sid);
    Py_DECREF(key);
    if (append(self->t0_append, self->t0) < 0 || append(self->t1_append, t1) < 0
        || append(self->sig_append, sid) < 0) {
        Py_DECREF(sid);
        goto fail;
    }
    Py_DECREF(sid);
    Py_DECREF(t1);
    Py_RETURN_NONE;
fail:
    Py_DECREF(t1);
    return NULL;
}

static PyMethodDef Recorder_methods[] = {
    {"pre", (PyCFunction)(void (*)(void))Recorder_pre, METH_FASTCALL, "pre(module, args): store the start time"},
    {"post", (PyCFunction)(void (*)(void))Recorder_post, METH_FASTCALL,
     "post(module, args, kwargs, out): record start, end and signature id"},
    {NULL},
};

static PyTypeObject RecorderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "probe._hooks.Recorder",
    .tp_doc = "Per-module call recorder (C hot path of probe's hooks).",
    .tp_basicsize = sizeof(Recorder),
    .tp_itemsize = 0,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Recorder_init,
    .tp_dealloc = (destructor)Recorder_dealloc,
    .tp_traverse = (traverseproc)Recorder_traverse,
    .tp_clear = (inquiry)Recorder_clear,
    .tp_methods = Recorder_methods,
};

static struct PyModuleDef hooksmodule = {
    PyModuleDef_HEAD_INIT,
    .m_name = "probe._hooks",
    .m_doc = "C hot path of probe's per-call hooks.",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__hooks(void)
{
    if (PyType_Ready(&RecorderType) < 0)
        return NULL;
    shape_str = PyUnicode_InternFromString("shape");
    if (shape_str == NULL)
        return NULL;
    PyObject *m = PyModule_Create(&hooksmodule);
    if (m == NULL)
        return NULL;
    Py_INCREF(&RecorderType);
    if (PyModule_AddObject(m, "Recorder", (PyObject *)&RecorderType) < 0) {
        Py_DECREF(&RecorderType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
