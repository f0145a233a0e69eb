// pybind11 bindings of fm_engine._C. No libtorch: every function takes raw device pointers (as
// integers), element counts, a dtype code and the CUDA stream handle, so the extension does not
// depend on the torch version. The Python side (fm_engine/ops/_cuda.py) validates and wraps them.
#include <pybind11/pybind11.h>

#include "relu2.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "fm_engine CUDA kernels (raw-pointer interface; use fm_engine.ops instead)";
  m.def("relu2_forward", &fm_engine::relu2_forward, py::arg("x"), py::arg("y"), py::arg("n"), py::arg("dtype"),
        py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def("relu2_backward", &fm_engine::relu2_backward, py::arg("x"), py::arg("dy"), py::arg("dx"), py::arg("n"),
        py::arg("dtype"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
}
