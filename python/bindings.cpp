// pybind11 bindings of the framework-free core: module vtok_kernels._C.
//
// Pointers cross as Python ints (tensor.data_ptr()), so this module never links libtorch; the
// Python backends keep the tensors alive for the duration of each call. Launchers release the
// GIL while the kernels run.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "cpu/kernels.h"
#include "vtok/params.h"

namespace py = pybind11;
using namespace vtok;

#ifdef VTOK_WITH_CUDA
void bind_cuda(py::module_& m);
#endif

#ifndef VTOK_CUDA_ARCHS
#define VTOK_CUDA_ARCHS ""
#endif
#ifndef VTOK_PTXAS_LOG_DIR
#define VTOK_PTXAS_LOG_DIR ""
#endif
#ifndef VTOK_CXX_COMPILER
#define VTOK_CXX_COMPILER ""
#endif
#ifndef VTOK_CUDA_COMPILER
#define VTOK_CUDA_COMPILER ""
#endif

// A pointer field read and written as an integer address.
#define VTOK_POINTER(cls, field)                                                        \
  def_property(                                                                         \
      #field, [](const cls& s) { return reinterpret_cast<std::uintptr_t>(s.field); },   \
      [](cls& s, std::uintptr_t v) {                                                     \
        s.field = reinterpret_cast<decltype(s.field)>(v);                               \
      })

#define VTOK_FIELD(cls, field) def_readwrite(#field, &cls::field)

PYBIND11_MODULE(_C, m) {
  m.doc() = "vtok_kernels core: CPU (OpenMP) kernels, and CUDA kernels when built with nvcc";

  py::enum_<Pool>(m, "Pool").value("mean", Pool::kMean).value("attn", Pool::kAttn);
  py::enum_<DType>(m, "DType")
      .value("float32", DType::kFloat32)
      .value("float16", DType::kFloat16)
      .value("bfloat16", DType::kBFloat16)
      .value("float64", DType::kFloat64);

  // dynamic_attr: the Python side hangs the tensors a params object points into on it, so they
  // outlive the call.
  py::class_<EncodeParams>(m, "EncodeParams", py::dynamic_attr())
      .def(py::init<>())
      .VTOK_POINTER(EncodeParams, x)
      .VTOK_FIELD(EncodeParams, x_stride_b)
      .VTOK_FIELD(EncodeParams, x_stride_t)
      .VTOK_FIELD(EncodeParams, x_stride_n)
      .VTOK_FIELD(EncodeParams, batch)
      .VTOK_FIELD(EncodeParams, num_frames)
      .VTOK_FIELD(EncodeParams, num_patches)
      .VTOK_FIELD(EncodeParams, channels)
      .VTOK_FIELD(EncodeParams, dtype)
      .VTOK_POINTER(EncodeParams, key_index)
      .VTOK_POINTER(EncodeParams, cu_frames)
      .VTOK_POINTER(EncodeParams, cu_tokens)
      .VTOK_FIELD(EncodeParams, pool)
      .VTOK_POINTER(EncodeParams, query)
      .VTOK_FIELD(EncodeParams, num_heads)
      .VTOK_FIELD(EncodeParams, frames_per_token)
      .VTOK_FIELD(EncodeParams, spatial)
      .VTOK_FIELD(EncodeParams, grid_h)
      .VTOK_FIELD(EncodeParams, grid_w)
      .VTOK_FIELD(EncodeParams, out_h)
      .VTOK_FIELD(EncodeParams, out_w)
      .VTOK_FIELD(EncodeParams, num_key_tokens)
      .VTOK_FIELD(EncodeParams, num_groups)
      .VTOK_POINTER(EncodeParams, sequence)
      .VTOK_POINTER(EncodeParams, lse)
      .VTOK_POINTER(EncodeParams, residual32);

  py::class_<EncodeBwdParams>(m, "EncodeBwdParams", py::dynamic_attr())
      .def(py::init<>())
      .VTOK_FIELD(EncodeBwdParams, fwd)
      .VTOK_POINTER(EncodeBwdParams, grad_sequence)
      .VTOK_POINTER(EncodeBwdParams, grad_x)
      .VTOK_POINTER(EncodeBwdParams, grad_query)
      .VTOK_POINTER(EncodeBwdParams, workspace)
      .VTOK_FIELD(EncodeBwdParams, workspace_elems);

  py::class_<ExpandParams>(m, "ExpandParams", py::dynamic_attr())
      .def(py::init<>())
      .VTOK_POINTER(ExpandParams, key_tokens)
      .VTOK_FIELD(ExpandParams, key_stride_b)
      .VTOK_FIELD(ExpandParams, key_stride_n)
      .VTOK_POINTER(ExpandParams, residual_tokens)
      .VTOK_FIELD(ExpandParams, res_stride_b)
      .VTOK_FIELD(ExpandParams, res_stride_g)
      .VTOK_FIELD(ExpandParams, batch)
      .VTOK_FIELD(ExpandParams, num_frames)
      .VTOK_FIELD(ExpandParams, num_patches)
      .VTOK_FIELD(ExpandParams, channels)
      .VTOK_FIELD(ExpandParams, num_groups)
      .VTOK_FIELD(ExpandParams, frames_per_token)
      .VTOK_POINTER(ExpandParams, key_index)
      .VTOK_FIELD(ExpandParams, dtype)
      .VTOK_POINTER(ExpandParams, frames);

  py::class_<ExpandBwdParams>(m, "ExpandBwdParams", py::dynamic_attr())
      .def(py::init<>())
      .VTOK_POINTER(ExpandBwdParams, grad_frames)
      .VTOK_FIELD(ExpandBwdParams, batch)
      .VTOK_FIELD(ExpandBwdParams, num_frames)
      .VTOK_FIELD(ExpandBwdParams, num_patches)
      .VTOK_FIELD(ExpandBwdParams, channels)
      .VTOK_FIELD(ExpandBwdParams, num_groups)
      .VTOK_FIELD(ExpandBwdParams, frames_per_token)
      .VTOK_POINTER(ExpandBwdParams, key_index)
      .VTOK_FIELD(ExpandBwdParams, dtype)
      .VTOK_POINTER(ExpandBwdParams, grad_key_tokens)
      .VTOK_POINTER(ExpandBwdParams, grad_residual_tokens);

  auto release = py::call_guard<py::gil_scoped_release>();
  m.def("cpu_encode_fwd", &cpu::encode_fwd, py::arg("params"), py::arg("num_threads"), release,
        "encode forward (batched, or varlen when params.cu_frames != 0) on the CPU");
  m.def("cpu_encode_bwd", &cpu::encode_bwd, py::arg("params"), py::arg("num_threads"), release,
        "encode backward: grad_x (and grad_query for attn) from the saved sequence and lse");
  m.def("cpu_expand_fwd", &cpu::expand_fwd, py::arg("params"), py::arg("num_threads"), release);
  m.def("cpu_expand_bwd", &cpu::expand_bwd, py::arg("params"), py::arg("num_threads"), release);
  m.def("cpu_isa", &cpu::selected_isa, "instruction-set variant the CPU kernels run");
  m.attr("cpu_isas_compiled") = std::string(cpu::compiled_isas());

#ifdef _OPENMP
  m.attr("built_with_openmp") = true;
#else
  m.attr("built_with_openmp") = false;
#endif
#ifdef VTOK_WITH_CUDA
  m.attr("built_with_cuda") = true;
#else
  m.attr("built_with_cuda") = false;
#endif
  m.attr("cuda_archs") = std::string(VTOK_CUDA_ARCHS);
  m.attr("ptxas_log_dir") = std::string(VTOK_PTXAS_LOG_DIR);
  m.attr("cxx_compiler") = std::string(VTOK_CXX_COMPILER);
  m.attr("cuda_compiler") = std::string(VTOK_CUDA_COMPILER);

#ifdef VTOK_WITH_CUDA
  bind_cuda(m);
#endif
}
