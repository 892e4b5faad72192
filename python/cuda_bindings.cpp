// pybind11 bindings of the CUDA launchers (csrc/cuda/launch.h), compiled when the extension is
// built with nvcc. The params structs are bound in bindings.cpp; here each launcher takes one of
// them and the caller's stream as an integer (torch.cuda.current_stream().cuda_stream).
// Arguments are checked here, before anything reaches the device: a bad call is a ValueError,
// never a fault.
#include <pybind11/pybind11.h>

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda/launch.h"
#include "vtok/encode_split.h"
#include "vtok/index_math.h"
#include "vtok/params.h"
#include "vtok/params_check.h"

namespace py = pybind11;
using namespace vtok;

namespace {

void require(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument("vtok cuda: " + message);
}

void check_dtype(DType dtype) {
  require(dtype == DType::kFloat32 || dtype == DType::kFloat16 || dtype == DType::kBFloat16,
          "dtype must be float32, float16 or bfloat16 (float64 runs on the cpu and torch backends)");
}

void check_encode(const EncodeParams& p) {
  check_dtype(p.dtype);
  const char* error = encode_params_error(p);
  require(error == nullptr, error != nullptr ? error : "");
  if (p.pool == Pool::kAttn) {
    // Varlen: whether any video has a residual token is known on the device only.
    require(p.lse != nullptr || p.cu_frames != nullptr || p.num_groups == 0, "attn pooling needs lse");
    require(p.channels / p.num_heads <= cuda::kMaxHeadDim,
            "attention heads wider than " + std::to_string(cuda::kMaxHeadDim) + " channels are not supported");
  }
}

void check_expand_sizes(int64_t batch, int64_t frames, int64_t patches, int64_t channels, int64_t groups,
                        int64_t frames_per_token) {
  require(batch >= 1 && frames >= 1 && patches >= 1 && channels >= 1,
          "batch, num_frames, num_patches and channels must be >= 1");
  require(frames_per_token >= 1, "frames_per_token must be >= 1");
  require(groups == num_groups(frames, frames_per_token), "num_groups must be ceil((num_frames - 1) / frames_per_token)");
}

void* as_stream(std::uintptr_t stream) { return reinterpret_cast<void*>(stream); }

cuda::FwdDesign fwd_design(const std::string& name) {
  if (name == "tiles") return cuda::FwdDesign::kTiles;
  if (name == "warps") return cuda::FwdDesign::kWarps;
  throw std::invalid_argument("vtok cuda: unknown forward design '" + name + "' (expected 'tiles' or 'warps')");
}

#define VTOK_OFFSET(dict, cls, field) dict[#field] = offsetof(cls, field)

py::dict params_layout() {
  py::dict layout;
  {
    py::dict f;
    VTOK_OFFSET(f, EncodeParams, x);
    VTOK_OFFSET(f, EncodeParams, x_stride_b);
    VTOK_OFFSET(f, EncodeParams, x_stride_t);
    VTOK_OFFSET(f, EncodeParams, x_stride_n);
    VTOK_OFFSET(f, EncodeParams, batch);
    VTOK_OFFSET(f, EncodeParams, num_frames);
    VTOK_OFFSET(f, EncodeParams, num_patches);
    VTOK_OFFSET(f, EncodeParams, channels);
    VTOK_OFFSET(f, EncodeParams, dtype);
    VTOK_OFFSET(f, EncodeParams, key_index);
    VTOK_OFFSET(f, EncodeParams, cu_frames);
    VTOK_OFFSET(f, EncodeParams, cu_tokens);
    VTOK_OFFSET(f, EncodeParams, pool);
    VTOK_OFFSET(f, EncodeParams, query);
    VTOK_OFFSET(f, EncodeParams, num_heads);
    VTOK_OFFSET(f, EncodeParams, frames_per_token);
    VTOK_OFFSET(f, EncodeParams, spatial);
    VTOK_OFFSET(f, EncodeParams, grid_h);
    VTOK_OFFSET(f, EncodeParams, grid_w);
    VTOK_OFFSET(f, EncodeParams, out_h);
    VTOK_OFFSET(f, EncodeParams, out_w);
    VTOK_OFFSET(f, EncodeParams, num_key_tokens);
    VTOK_OFFSET(f, EncodeParams, num_groups);
    VTOK_OFFSET(f, EncodeParams, sequence);
    VTOK_OFFSET(f, EncodeParams, lse);
    VTOK_OFFSET(f, EncodeParams, residual32);
    VTOK_OFFSET(f, EncodeParams, workspace);
    VTOK_OFFSET(f, EncodeParams, workspace_elems);
    layout["EncodeParams"] = py::make_tuple(sizeof(EncodeParams), f);
  }
  {
    py::dict f;
    VTOK_OFFSET(f, EncodeBwdParams, fwd);
    VTOK_OFFSET(f, EncodeBwdParams, grad_sequence);
    VTOK_OFFSET(f, EncodeBwdParams, grad_x);
    VTOK_OFFSET(f, EncodeBwdParams, grad_query);
    VTOK_OFFSET(f, EncodeBwdParams, workspace);
    VTOK_OFFSET(f, EncodeBwdParams, workspace_elems);
    layout["EncodeBwdParams"] = py::make_tuple(sizeof(EncodeBwdParams), f);
  }
  {
    py::dict f;
    VTOK_OFFSET(f, ExpandParams, key_tokens);
    VTOK_OFFSET(f, ExpandParams, key_stride_b);
    VTOK_OFFSET(f, ExpandParams, key_stride_n);
    VTOK_OFFSET(f, ExpandParams, residual_tokens);
    VTOK_OFFSET(f, ExpandParams, res_stride_b);
    VTOK_OFFSET(f, ExpandParams, res_stride_g);
    VTOK_OFFSET(f, ExpandParams, batch);
    VTOK_OFFSET(f, ExpandParams, num_frames);
    VTOK_OFFSET(f, ExpandParams, num_patches);
    VTOK_OFFSET(f, ExpandParams, channels);
    VTOK_OFFSET(f, ExpandParams, num_groups);
    VTOK_OFFSET(f, ExpandParams, frames_per_token);
    VTOK_OFFSET(f, ExpandParams, key_index);
    VTOK_OFFSET(f, ExpandParams, dtype);
    VTOK_OFFSET(f, ExpandParams, frames);
    layout["ExpandParams"] = py::make_tuple(sizeof(ExpandParams), f);
  }
  {
    py::dict f;
    VTOK_OFFSET(f, ExpandBwdParams, grad_frames);
    VTOK_OFFSET(f, ExpandBwdParams, batch);
    VTOK_OFFSET(f, ExpandBwdParams, num_frames);
    VTOK_OFFSET(f, ExpandBwdParams, num_patches);
    VTOK_OFFSET(f, ExpandBwdParams, channels);
    VTOK_OFFSET(f, ExpandBwdParams, num_groups);
    VTOK_OFFSET(f, ExpandBwdParams, frames_per_token);
    VTOK_OFFSET(f, ExpandBwdParams, key_index);
    VTOK_OFFSET(f, ExpandBwdParams, dtype);
    VTOK_OFFSET(f, ExpandBwdParams, grad_key_tokens);
    VTOK_OFFSET(f, ExpandBwdParams, grad_residual_tokens);
    layout["ExpandBwdParams"] = py::make_tuple(sizeof(ExpandBwdParams), f);
  }
  return layout;
}

}  // namespace

void bind_cuda(py::module_& m) {
  // The workspace comes as arguments: EncodeParams is bound in bindings.cpp, which the CPU-only
  // build shares, without the CUDA forward's scratch fields.
  m.def(
      "cuda_encode_fwd",
      [](EncodeParams p, std::uintptr_t stream, std::uintptr_t workspace, int64_t workspace_elems,
         const std::string& design) {
        check_encode(p);
        const cuda::FwdDesign d = fwd_design(design);
        p.workspace = reinterpret_cast<float*>(workspace);
        p.workspace_elems = workspace_elems;
        py::gil_scoped_release release;
        cuda::encode_fwd(p, as_stream(stream), d);
      },
      py::arg("params"), py::arg("stream"), py::arg("workspace") = 0, py::arg("workspace_elems") = 0,
      py::arg("design") = "tiles",
      "encode forward on the GPU (varlen when params.cu_frames != 0), enqueued on `stream`; a workspace "
      "of cuda_encode_fwd_workspace_elems floats when a frame's patch rows are split over blocks or warps; "
      "design: 'tiles' or 'warps' (launch.h FwdDesign)");
  m.def(
      "cuda_encode_bwd",
      [](const EncodeBwdParams& bp, std::uintptr_t stream) {
        check_encode(bp.fwd);
        require(bp.grad_sequence != nullptr && bp.grad_x != nullptr, "grad_sequence and grad_x must be set");
        if (bp.fwd.pool == Pool::kAttn)
          require(bp.grad_query != nullptr && bp.workspace != nullptr,
                  "attn backward needs grad_query and workspace (cuda_encode_bwd_workspace_elems floats)");
        py::gil_scoped_release release;
        cuda::encode_bwd(bp, as_stream(stream));
      },
      py::arg("params"), py::arg("stream"), "encode backward on the GPU, enqueued on `stream`");
  m.def(
      "cuda_expand_fwd",
      [](const ExpandParams& p, std::uintptr_t stream) {
        check_dtype(p.dtype);
        check_expand_sizes(p.batch, p.num_frames, p.num_patches, p.channels, p.num_groups, p.frames_per_token);
        require(p.key_tokens != nullptr && p.frames != nullptr && p.key_index != nullptr &&
                    (p.num_groups == 0 || p.residual_tokens != nullptr),
                "key_tokens, residual_tokens, key_index and frames must be device pointers");
        py::gil_scoped_release release;
        cuda::expand_fwd(p, as_stream(stream));
      },
      py::arg("params"), py::arg("stream"));
  m.def(
      "cuda_expand_bwd",
      [](const ExpandBwdParams& p, std::uintptr_t stream) {
        check_dtype(p.dtype);
        check_expand_sizes(p.batch, p.num_frames, p.num_patches, p.channels, p.num_groups, p.frames_per_token);
        require(p.grad_frames != nullptr && p.grad_key_tokens != nullptr && p.key_index != nullptr &&
                    (p.num_groups == 0 || p.grad_residual_tokens != nullptr),
                "grad_frames, grad_key_tokens, grad_residual_tokens and key_index must be device pointers");
        py::gil_scoped_release release;
        cuda::expand_bwd(p, as_stream(stream));
      },
      py::arg("params"), py::arg("stream"));
  m.def("cuda_encode_fwd_workspace_elems", &encode_fwd_workspace_elems, py::arg("batch"), py::arg("groups"),
        py::arg("splits"), py::arg("channels"), py::arg("heads"), py::arg("attn"), py::arg("tile_blocks"),
        "floats of workspace the forward needs (vtok/encode_split.h)");
  m.def(
      "cuda_encode_split",
      [](int64_t tiles, int64_t segments, int64_t batch, int64_t groups, int64_t fill_blocks, bool tile_blocks) {
        const EncodeSplit s = encode_split(tiles, segments, batch, groups, fill_blocks, tile_blocks);
        return py::make_tuple(s.splits, s.groups_per_block, s.chunks);
      },
      py::arg("tiles"), py::arg("segments"), py::arg("batch"), py::arg("groups"), py::arg("fill_blocks"),
      py::arg("tile_blocks"), "(splits, groups_per_block, chunks) of the forward's grid (vtok/encode_split.h)");
  m.def("cuda_encode_bwd_workspace_elems", &cuda::encode_bwd_workspace_elems, py::arg("batch"),
        py::arg("num_patches"), py::arg("channels"), py::arg("lse_elems"),
        "floats of workspace the attn backward needs");
  m.def(
      "cuda_encode_plan",
      [](const EncodeParams& p, bool backward, std::uintptr_t grad_sequence, std::uintptr_t grad_x) {
        const cuda::PlanInfo info = cuda::encode_plan(p, backward, reinterpret_cast<const void*>(grad_sequence),
                                                      reinterpret_cast<const void*>(grad_x));
        return py::make_tuple(info.vec, info.lanes, info.vecs_per_lane, info.seg_vecs, info.num_segments);
      },
      py::arg("params"), py::arg("backward") = false, py::arg("grad_sequence") = 0, py::arg("grad_x") = 0,
      "(vector width, lanes, vecs_per_lane, seg_vecs, num_segments) the launchers use");
  m.def(
      "cuda_encode_fwd_grid",
      [](const EncodeParams& p, const std::string& design) {
        const cuda::FwdGrid g = cuda::encode_fwd_grid(p, fwd_design(design));
        return py::make_tuple(g.splits, g.groups_per_item, g.chunks, g.blocks);
      },
      py::arg("params"), py::arg("design") = "tiles",
      "(splits, groups per block or warp, chunks, blocks) of the forward's residual launch");
  m.def("cuda_params_layout", &params_layout, "{struct: (sizeof, {field: offsetof})} of the params structs");
  m.attr("cuda_max_head_dim") = cuda::kMaxHeadDim;
}
