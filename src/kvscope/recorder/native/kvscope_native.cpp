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
PyObject* g_layers = nullptr;
PyObject* g_input_ids = nullptr;
PyObject* g_decoder_input_ids = nullptr;

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

// One device's allocator counters in telemetry.AllocatorReading order. 0: read; 1: this torch has
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

// The object a weak reference points to (a new reference), or nullptr when it is dead.
PyObject* referent(PyObject* ref) {
#if PY_VERSION_HEX >= 0x030D0000
  PyObject* object = nullptr;
  if (PyWeakref_GetRef(ref, &object) < 0) {
    PyErr_Clear();
    return nullptr;
  }
  return object;
#else
  PyObject* object = PyWeakref_GetObject(ref);
  if (object == nullptr) {
    PyErr_Clear();
    return nullptr;
  }
  if (object == Py_None) {
    return nullptr;
  }
  Py_INCREF(object);
  return object;
#endif
}

// step(output, kwargs, lane) -> (batch, tokens, facts, reading | None) | None
//
// The whole per-step read of a decode step in one call, for the steps after the first of a
// generation whose cache is known (steps.StepRecorder sets up `lane` from a step measured the long
// way): lane = (attribute of the model output that carries the cache, weak reference to that cache,
// id of its `layers` list, that list's length, CUDA device or -1). It checks that the output carries
// the same cache with the same list, reads (batch, tokens) from `kwargs["input_ids"]`, the layers'
// facts (`capture_into`) and the allocator counters. None whenever anything differs from what the
// lane says or needs the Python path: the caller then measures that step the long way.
PyObject* step(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 3 || !PyTuple_Check(args[2]) || PyTuple_GET_SIZE(args[2]) != 5) {
    PyErr_SetString(PyExc_TypeError, "step() takes (output, kwargs, lane)");
    return nullptr;
  }
  PyObject* output = args[0];
  PyObject* kwargs = args[1];
  PyObject* lane = args[2];
  PyObject* attr = PyTuple_GET_ITEM(lane, 0);
  PyObject* cache_ref = PyTuple_GET_ITEM(lane, 1);
  const long long layers_id = PyLong_AsLongLong(PyTuple_GET_ITEM(lane, 2));
  const Py_ssize_t layer_count = PyLong_AsSsize_t(PyTuple_GET_ITEM(lane, 3));
  const long device = PyLong_AsLong(PyTuple_GET_ITEM(lane, 4));
  if (PyErr_Occurred() || !PyWeakref_Check(cache_ref) || !PyDict_Check(kwargs)) {
    PyErr_Clear();
    Py_RETURN_NONE;
  }
  Owned cache(PyObject_GetAttr(output, attr));
  if (cache.object == nullptr) {
    PyErr_Clear();
    Py_RETURN_NONE;
  }
  {
    Owned expected(referent(cache_ref));
    if (expected.object != cache.object) {
      Py_RETURN_NONE;
    }
  }
  Owned layers(PyObject_GetAttr(cache.object, g_layers));
  if (layers.object == nullptr) {
    PyErr_Clear();
    Py_RETURN_NONE;
  }
  if (!PyList_Check(layers.object) || PyList_GET_SIZE(layers.object) != layer_count ||
      static_cast<long long>(reinterpret_cast<intptr_t>(layers.object)) != layers_id) {
    Py_RETURN_NONE;
  }
  PyObject* decoder_ids = PyDict_GetItemWithError(kwargs, g_decoder_input_ids);  // borrowed
  const bool no_decoder_ids = decoder_ids == nullptr || decoder_ids == Py_None;
  PyObject* ids = no_decoder_ids && !PyErr_Occurred() ? PyDict_GetItemWithError(kwargs, g_input_ids) : nullptr;
  if (PyErr_Occurred()) {
    PyErr_Clear();
    Py_RETURN_NONE;
  }
  if (ids == nullptr || !THPVariable_Check(ids)) {  // encoder-decoder or embeddings: the long way
    Py_RETURN_NONE;
  }
  long long batch = 0;
  long long tokens = 0;
  try {
    const at::Tensor& t = THPVariable_Unpack(ids);
    if (!t.defined() || t.unsafeGetTensorImpl()->has_symbolic_sizes_strides() || t.dim() < 2) {
      Py_RETURN_NONE;
    }
    batch = t.size(0);
    tokens = t.size(1);
  } catch (const std::exception&) {
    PyErr_Clear();
    Py_RETURN_NONE;
  }
  std::vector<int64_t> out;
  if (!capture_into(layers.object, out)) {
    Py_RETURN_NONE;
  }
  Owned facts(facts_bytes(out));
  if (facts.object == nullptr) {
    return nullptr;
  }
  if (device < 0) {
    return Py_BuildValue("(LLOO)", batch, tokens, facts.object, Py_None);
  }
  long long values[kReadingFields];
  std::string error;
  const int status = read_allocator(device, values, error);
  if (status != 0) {  // no native allocator API (or an error): the long way reads the counters
    Py_RETURN_NONE;
  }
  Owned reading(reading_tuple(values));
  if (reading.object == nullptr) {
    return nullptr;
  }
  return Py_BuildValue("(LLOO)", batch, tokens, facts.object, reading.object);
}

// allocator_stats(device: int) -> tuple of 8 ints, or None where this torch has no device allocator API.
// The order of telemetry.AllocatorReading: allocated, reserved, active, inactive_split (bytes, current),
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
    {"step", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(step)), METH_FASTCALL,
     "One decode step's (batch, tokens, facts, allocator reading) along a known lane, or None."},
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
  g_layers = PyUnicode_InternFromString("layers");
  g_input_ids = PyUnicode_InternFromString("input_ids");
  g_decoder_input_ids = PyUnicode_InternFromString("decoder_input_ids");
  return PyModule_Create(&module);
}
