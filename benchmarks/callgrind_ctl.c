/*
 * benchmarks/overhead.py --instructions: marks the stretch of a process that callgrind counts.
 * Built at run time by the benchmark (cc and valgrind's headers), never part of the package.
 *   start()      instrumentation on, counters zeroed
 *   stop(name)   counters dumped under `name`, instrumentation off
 * Outside valgrind both are no-ops (the client requests are a few no-op instructions).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <valgrind/callgrind.h>

static PyObject *
start(PyObject *self, PyObject *unused)
{
    CALLGRIND_START_INSTRUMENTATION;
    CALLGRIND_ZERO_STATS;
    Py_RETURN_NONE;
}

static PyObject *
stop(PyObject *self, PyObject *args)
{
    const char *name;
    if (!PyArg_ParseTuple(args, "s", &name))
        return NULL;
    CALLGRIND_DUMP_STATS_AT(name);
    CALLGRIND_STOP_INSTRUMENTATION;
    Py_RETURN_NONE;
}

static PyObject *
running(PyObject *self, PyObject *unused)
{
    return PyBool_FromLong(RUNNING_ON_VALGRIND);
}

static PyMethodDef methods[] = {
    {"start", start, METH_NOARGS, "instrumentation on, counters zeroed"},
    {"stop", stop, METH_VARARGS, "stop(name): dump the counters under name, instrumentation off"},
    {"running", running, METH_NOARGS, "whether this process runs under valgrind"},
    {NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "callgrind_ctl", NULL, -1, methods};

PyMODINIT_FUNC
PyInit_callgrind_ctl(void)
{
    return PyModule_Create(&module);
}
