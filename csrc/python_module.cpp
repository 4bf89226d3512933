// The Python module fused_train._C. Importing it loads this library, which runs the op registrations
// (registration.cpp); the ops are then reached through torch.ops.fused_train. The module itself holds one
// function, the eager loss's entry point below.
//
// _cross_entropy_loss(input, target, weight, reduction, ignore_index, label_smoothing, lse_square_scale,
// opmath_loss) calls fused_train::cross_entropy_loss through the dispatcher, as torch.ops would, without the
// boxed Python op call: that call (parse the arguments against the schema, box them, unbox them for the kernel)
// cost about 5 µs of the tutorial's 64×10 loss, whose kernels take about 3 µs. fused_train.nn.functional calls
// it only when no __torch_function__ override or mode is active (else the op itself, which honours them);
// everything below the op (autograd, dispatch modes, devices) is the dispatcher's as before.
#ifndef FUSED_TRAIN_NO_PYTHON  // the CMake build is a plain C++ library
#include <Python.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <optional>

namespace fused_train {
namespace {

const auto& cross_entropy_loss_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fused_train::cross_entropy_loss", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, int64_t, int64_t,
                            double, double, bool)>();
  return op;
}

const at::Tensor& tensor_argument(PyObject* obj, const char* name) {
  TORCH_CHECK_TYPE(THPVariable_Check(obj), "cross_entropy: ", name, " must be a Tensor, got ", Py_TYPE(obj)->tp_name);
  return THPVariable_Unpack(obj);
}

// A conversion's TypeError becomes one naming the argument; any other error (an OverflowError, or one
// raised by the object's own __index__ / __float__) propagates as it is.
[[noreturn]] void raise_conversion_error(PyObject* obj, const char* name, const char* expected) {
  if (!PyErr_ExceptionMatches(PyExc_TypeError)) throw python_error();
  PyErr_Clear();
  TORCH_CHECK_TYPE(false, "cross_entropy: ", name, " must be ", expected, ", got ", Py_TYPE(obj)->tp_name);
}

int64_t int_argument(PyObject* obj, const char* name) {
  // ints and anything with __index__ (numpy integers), not bools: as the op's schema
  TORCH_CHECK_TYPE(!PyBool_Check(obj), "cross_entropy: ", name, " must be an int, got bool");
  const long long v = PyLong_AsLongLong(obj);
  if (v == -1 && PyErr_Occurred()) raise_conversion_error(obj, name, "an int");
  return v;
}

double float_argument(PyObject* obj, const char* name) {
  // As torch's own argument parser: a 0-dim tensor that needs no gradient is read as its value.
  TORCH_CHECK_TYPE(!THPVariable_Check(obj) ||
                       (THPVariable_Unpack(obj).dim() == 0 && !THPVariable_Unpack(obj).requires_grad()),
                   "cross_entropy: ", name, " must be a float or a 0-dim tensor that does not require grad");
  const double v = PyFloat_AsDouble(obj);
  if (v == -1.0 && PyErr_Occurred()) raise_conversion_error(obj, name, "a float");
  return v;
}

PyObject* cross_entropy_loss(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == 8, "_cross_entropy_loss takes 8 positional arguments, got ", nargs);
  const at::Tensor& input = tensor_argument(args[0], "input");
  const at::Tensor& target = tensor_argument(args[1], "target");
  std::optional<at::Tensor> weight;
  if (args[2] != Py_None) weight = tensor_argument(args[2], "weight");
  const int64_t reduction = int_argument(args[3], "reduction");
  const int64_t ignore_index = int_argument(args[4], "ignore_index");
  const double label_smoothing = float_argument(args[5], "label_smoothing");
  const double lse_square_scale = float_argument(args[6], "lse_square_scale");
  const int opmath_loss = PyObject_IsTrue(args[7]);
  if (opmath_loss < 0) throw python_error();
  at::Tensor loss;
  {
    // As torch's own bindings: other Python threads (data loading) run while the kernels do.
    const pybind11::gil_scoped_release no_gil;
    loss = cross_entropy_loss_op().call(input, target, weight, reduction, ignore_index, label_smoothing,
                                        lse_square_scale, opmath_loss == 1);
  }
  return THPVariable_Wrap(std::move(loss));
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"_cross_entropy_loss", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&cross_entropy_loss)),
     METH_FASTCALL, "fused_train::cross_entropy_loss with positional arguments (fused_train.nn.functional's)."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace
}  // namespace fused_train

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, fused_train::methods,
                                          nullptr,               nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
#endif
