// An empty Python module: importing gpstoken._C loads this library, whose static initializers
// register the gpstoken:: torch operators. torch is imported first by gpstoken/_ext.py.
#include <Python.h>

static struct PyModuleDef gpstoken_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&gpstoken_c_module); }
