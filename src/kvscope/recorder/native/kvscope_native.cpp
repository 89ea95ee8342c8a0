// The recorder's per-step reads in C++: the facts of every cache layer and the allocator counters.
//
// The Python hook makes ~6 C calls per cache layer (data_ptr, is_contiguous, shape, for K and V)
// and one `_cuda_memoryStats` call that builds ~300 Python objects; on a decode loop's cold
// caches that is most of the recorder's cost. Here each is one call that creates one object.
// Anything unusual (a tensor subclass, a tensor without storage, symbolic sizes) returns None and
// the Python path measures that step instead: this module is a fast path, never a second meaning.
#include <torch/csrc/autograd/python_variable.h>

#include <c10/core/Allocator.h>
#if __has_include(<c10/core/CachingDeviceAllocator.h>)
#include <c10/core/CachingDeviceAllocator.h>
#endif

#include <cstdint>
#include <string>
#include <vector>

namespace {

constexpr int64_t kShapeEnd = -1;  // facts.SHAPE_END
constexpr int64_t kContiguous = 1;  // facts.CONTIGUOUS

PyObject* g_keys = nullptr;
PyObject* g_values = nullptr;

// An owned reference, released on every way out (returns and C++ exceptions alike).
struct Owned {
  PyObject* object;
  explicit Owned(PyObject* o) : object(o) {}
  Owned(const Owned&) = delete;
  Owned& operator=(const Owned&) = delete;
  ~Owned() { Py_XDECREF(object); }
};

// A plain tensor (or Parameter) with storage and concrete sizes: its facts are read here.
bool readable(PyObject* obj) {
  if (!THPVariable_CheckExact(obj)) {
    return false;
  }
  const at::Tensor& t = THPVariable_Unpack(obj);
  if (!t.defined() || !t.has_storage()) {
    return false;
  }
  auto* impl = t.unsafeGetTensorImpl();
  return !impl->has_symbolic_sizes_strides() && !t.is_sparse();
}

int64_t address(const at::Tensor& t) {
  return static_cast<int64_t>(reinterpret_cast<intptr_t>(t.const_data_ptr()));
}

// 1 when contiguous, else the end address of the elements' span (recorder/storage.py: extent).
int64_t span_code(const at::Tensor& t, int64_t start) {
  if (t.is_contiguous()) {
    return kContiguous;
  }
  if (t.numel() == 0) {
    return start;
  }
  int64_t last = 0;
  auto sizes = t.sizes();
  auto strides = t.strides();
  for (size_t d = 0; d < sizes.size(); ++d) {
    last += (sizes[d] - 1) * strides[d];
  }
  return start + (last + 1) * static_cast<int64_t>(t.element_size());
}

void push_shape(std::vector<int64_t>& out, const at::Tensor& t) {
  for (int64_t size : t.sizes()) {
    out.push_back(size);
  }
  out.push_back(kShapeEnd);
}

// The records of measure._capture_fast, as native int64, appended to `out`: per layer whose `keys`
// is a tensor, `layer, k_start, k_code, v_start, v_code, *k_shape, -1, *v_shape, -1` (no values: 0,
// 0 and an empty shape). False when any layer needs the Python path (no Python error is left set).
bool capture_into(PyObject* layers, std::vector<int64_t>& out) {
  const Py_ssize_t count = PyList_GET_SIZE(layers);
  out.reserve(static_cast<size_t>(count) * 16);
  try {
    for (Py_ssize_t index = 0; index < count; ++index) {
      PyObject* layer = PyList_GET_ITEM(layers, index);
      Owned keys(PyObject_GetAttr(layer, g_keys));
      if (keys.object == nullptr) {
        PyErr_Clear();
        return false;
      }
      if (keys.object == Py_None) {  // a layer not filled yet (lazy init) is skipped
        continue;
      }
      Owned values(PyObject_GetAttr(layer, g_values));
      if (values.object == nullptr) {
        PyErr_Clear();
        return false;
      }
      const bool has_values = values.object != Py_None;
      if (!readable(keys.object) || (has_values && !readable(values.object))) {
        return false;
      }
      // `keys` and `values` hold references to both tensors for the rest of this iteration.
      const at::Tensor& k = THPVariable_Unpack(keys.object);
      const int64_t k_start = address(k);
      out.push_back(index);
      out.push_back(k_start);
      out.push_back(span_code(k, k_start));
      if (has_values) {
        const at::Tensor& v = THPVariable_Unpack(values.object);
        const int64_t v_start = address(v);
        out.push_back(v_start);
        out.push_back(span_code(v, v_start));
        push_shape(out, k);
        push_shape(out, v);
      } else {
        out.push_back(0);
        out.push_back(0);
        push_shape(out, k);
        out.push_back(kShapeEnd);
      }
    }
  } catch (const std::exception&) {  // a c10::Error from an unusual tensor: the Python path decides
    PyErr_Clear();
    return false;
  }
  return true;
}

PyObject* facts_bytes(const std::vector<int64_t>& out) {
  return PyBytes_FromStringAndSize(reinterpret_cast<const char*>(out.data()),
                                   static_cast<Py_ssize_t>(out.size() * sizeof(int64_t)));
}

// capture(layers: list) -> bytes | None: the records of `capture_into`, or None for the Python path.
PyObject* capture(PyObject* /*self*/, PyObject* layers) {
  if (!PyList_Check(layers)) {
    PyErr_SetString(PyExc_TypeError, "capture() takes a list of cache layers");
    return nullptr;
  }
  std::vector<int64_t> out;
  if (!capture_into(layers, out)) {
    Py_RETURN_NONE;
  }
  return facts_bytes(out);
}

constexpr int kReadingFields = 8;

// One device's allocator counters in allocator.AllocatorReading order. 0: read; 1: this torch has
// no device-allocator API or the allocator is not initialised; -1: a C++ error (message in `error`).
int read_allocator(long device, long long* values, std::string& error) {
#if __has_include(<c10/core/CachingDeviceAllocator.h>)
  try {
    auto* allocator = dynamic_cast<c10::DeviceAllocator*>(c10::GetAllocator(c10::DeviceType::CUDA));
    if (allocator == nullptr || !allocator->initialized()) {
      return 1;
    }
    const auto stats = allocator->getDeviceStats(static_cast<c10::DeviceIndex>(device));
    constexpr size_t all = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    values[0] = stats.allocated_bytes[all].current;
    values[1] = stats.reserved_bytes[all].current;
    values[2] = stats.active_bytes[all].current;
    values[3] = stats.inactive_split_bytes[all].current;
    values[4] = stats.num_alloc_retries;
    values[5] = stats.num_ooms;
    values[6] = stats.allocated_bytes[all].peak;
    values[7] = stats.reserved_bytes[all].peak;
    return 0;
  } catch (const std::exception& exc) {
    error = exc.what();
    return -1;
  }
#else
  (void)device;
  (void)values;
  (void)error;
  return 1;
#endif
}

PyObject* reading_tuple(const long long* v) {
  return Py_BuildValue("(LLLLLLLL)", v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]);
}

// allocator_stats(device: int) -> tuple of 8 ints, or None where this torch has no device allocator API.
// The order of allocator.AllocatorReading: allocated, reserved, active, inactive_split (bytes, current),
// alloc_retries, num_ooms, peak allocated, peak reserved.
PyObject* allocator_stats(PyObject* /*self*/, PyObject* arg) {
  const long device = PyLong_AsLong(arg);
  if (device == -1 && PyErr_Occurred()) {
    return nullptr;
  }
  long long values[kReadingFields];
  std::string error;
  const int status = read_allocator(device, values, error);
  if (status < 0) {
    PyErr_SetString(PyExc_RuntimeError, error.c_str());
    return nullptr;
  }
  if (status > 0) {
    Py_RETURN_NONE;
  }
  return reading_tuple(values);
}

PyMethodDef methods[] = {
    {"capture", capture, METH_O, "Facts of every cache layer as native int64 records, or None."},
    {"allocator_stats", allocator_stats, METH_O, "Allocator counters of one CUDA device, or None."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

// torch's builder names the module (TORCH_EXTENSION_NAME): `kvscope_native_<hash>`, with a version
// suffix when a process builds the same name twice.
#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME kvscope_native
#endif
#define KVSCOPE_CAT(a, b) a##b
#define KVSCOPE_INIT(name) KVSCOPE_CAT(PyInit_, name)
#define KVSCOPE_STR2(x) #x
#define KVSCOPE_STR(x) KVSCOPE_STR2(x)

PyMODINIT_FUNC KVSCOPE_INIT(TORCH_EXTENSION_NAME)(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, KVSCOPE_STR(TORCH_EXTENSION_NAME), nullptr, -1, methods};
  g_keys = PyUnicode_InternFromString("keys");
  g_values = PyUnicode_InternFromString("values");
  return PyModule_Create(&module);
}
