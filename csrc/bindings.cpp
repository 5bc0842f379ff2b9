// pybind11 bindings of mpskern._C. Tensors cross as raw device pointers plus sizes and element strides
// (the module does not link PyTorch); the Python side (mpskern.cuda_backend) validates and packs them.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "common/kernel_info.h"
#include "decode_attention/decode_attention.h"

namespace py = pybind11;
using namespace mpskern;

namespace {

template <typename Ptr>
Ptr as_ptr(std::uintptr_t v) {
  return reinterpret_cast<Ptr>(v);
}

py::dict to_dict(const KernelInfo& k) {
  py::dict d;
  d["name"] = k.name;
  d["registers"] = k.registers;
  d["static_smem"] = k.static_smem;
  d["dynamic_smem"] = k.dynamic_smem;
  d["block_size"] = k.block_size;
  d["grid_size"] = k.grid_size;
  d["blocks_per_sm"] = k.blocks_per_sm;
  d["num_sms"] = k.num_sms;
  d["max_threads_per_sm"] = k.max_threads_per_sm;
  d["theoretical_occupancy"] = k.theoretical_occupancy;
  d["binary_version"] = k.binary_version;
  return d;
}

void decode_attention_py(std::uintptr_t q, int64_t q_stride_b, int64_t q_stride_h, std::uintptr_t k_cache,
                         std::uintptr_t v_cache, int num_pages, std::uintptr_t block_table, int max_pages,
                         std::uintptr_t seq_lens, std::uintptr_t out, int64_t out_stride_b, int64_t out_stride_h, std::uintptr_t o_partial,
                         std::uintptr_t lse, int batch, int heads, int kv_heads, int head_dim, int page_size,
                         int num_splits, int tokens_per_split, int head_chunks, int heads_per_chunk, float scale,
                         int dtype, std::uintptr_t stream) {
  DecodeParams p{};
  p.q = as_ptr<const void*>(q);
  p.q_stride_b = q_stride_b;
  p.q_stride_h = q_stride_h;
  p.k_cache = as_ptr<const void*>(k_cache);
  p.v_cache = as_ptr<const void*>(v_cache);
  p.num_pages = num_pages;
  p.block_table = as_ptr<const int*>(block_table);
  p.max_pages = max_pages;
  p.seq_lens = as_ptr<const int*>(seq_lens);
  p.out = as_ptr<void*>(out);
  p.out_stride_b = out_stride_b;
  p.out_stride_h = out_stride_h;
  p.o_partial = as_ptr<float*>(o_partial);
  p.lse = as_ptr<float*>(lse);
  p.batch = batch;
  p.heads = heads;
  p.kv_heads = kv_heads;
  p.head_dim = head_dim;
  p.page_size = page_size;
  p.num_splits = num_splits;
  p.tokens_per_split = tokens_per_split;
  p.head_chunks = head_chunks;
  p.heads_per_chunk = heads_per_chunk;
  p.scale = scale;
  decode_attention(p, static_cast<DType>(dtype), as_ptr<cudaStream_t>(stream));
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "mpskern CUDA kernels (raw-pointer API; use mpskern.ops)";
  m.def("decode_attention", &decode_attention_py, py::kw_only(), py::arg("q"), py::arg("q_stride_b"),
        py::arg("q_stride_h"), py::arg("k_cache"), py::arg("v_cache"), py::arg("num_pages"), py::arg("block_table"),
        py::arg("max_pages"), py::arg("seq_lens"), py::arg("out"), py::arg("out_stride_b"), py::arg("out_stride_h"), py::arg("o_partial"),
        py::arg("lse"), py::arg("batch"), py::arg("heads"), py::arg("kv_heads"), py::arg("head_dim"),
        py::arg("page_size"), py::arg("num_splits"), py::arg("tokens_per_split"), py::arg("head_chunks"),
        py::arg("heads_per_chunk"), py::arg("scale"), py::arg("dtype"), py::arg("stream"));
  m.def(
      "decode_attention_info",
      [](int dtype, int head_dim, int heads_per_chunk, int page_size, long long grid, int num_splits) {
        return to_dict(
            decode_attention_info(static_cast<DType>(dtype), head_dim, heads_per_chunk, page_size, grid, num_splits));
      },
      py::kw_only(), py::arg("dtype"), py::arg("head_dim"), py::arg("heads_per_chunk"), py::arg("page_size"),
      py::arg("grid_size") = 0, py::arg("num_splits") = 1);
  m.def(
      "decode_combine_info",
      [](int dtype, long long grid) { return to_dict(decode_combine_info(static_cast<DType>(dtype), grid)); },
      py::kw_only(), py::arg("dtype"), py::arg("grid_size") = 0);
  m.def("decode_attention_tile_tokens", &decode_attention_tile_tokens);
}
