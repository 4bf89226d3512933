// Torch-free, CUDA-free tests of the multi-tensor launcher's plan (csrc/cuda/launch_plan.h): random calls, cut
// with random small limits and with the real ones, replayed block by block through locate_block as the kernel
// does. For every plan: each chunk of each tensor is handed to exactly one block, in order; each tensor's step
// advances exactly once, in the launch that holds its last chunk; no launch has zero blocks or breaks its limits;
// in a call with index bases or quantization row lengths, every slot carries its own tensor's.
// A GPU reaches the mid-tensor split only at 2^20 chunks (2^36 elements); here the addresses are fake, so it
// costs nothing.
#include <algorithm>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "check.h"
#include "cuda/launch_plan.h"

namespace ft = fused_train::cuda;

namespace {

// A call's tensors: only the sizes are real. Tensor i of list k lives at a fake address that encodes (i, k).
struct FakeTensors {
  std::vector<int64_t> numels;
  bool with_steps = false;
  int64_t size() const { return static_cast<int64_t>(numels.size()); }
  int64_t numel(int64_t i) const { return numels[i]; }
  void* address(int k, int64_t i) const { return reinterpret_cast<void*>(static_cast<uintptr_t>((i + 1) * 16 + k)); }
  bool has_steps() const { return with_steps; }
  float* step(int64_t i) const { return reinterpret_cast<float*>(static_cast<uintptr_t>((i + 1) * 16 + 15)); }
  uint64_t index_base(int64_t i) const { return static_cast<uint64_t>(i + 1) * 0x9e3779b97f4a7c15ull; }
  int64_t quant_row(int64_t i) const { return 300 + 7 * i; }
};

int64_t tensor_of(const void* address) { return static_cast<int64_t>(reinterpret_cast<uintptr_t>(address) / 16) - 1; }
int64_t chunks_of(int64_t numel) { return (numel + ft::kChunkSize - 1) / ft::kChunkSize; }

// Plans `tensors` with the given limits and checks everything above; `what` names the case in failures.
template <int Depth, bool kIndexBases = false, bool kQuantRows = false>
void check_plan(const FakeTensors& tensors, int max_tensors, int64_t max_blocks, const std::string& what) {
  const int64_t n = tensors.size();
  std::vector<int64_t> advanced(n, 0);
  int64_t last_tensor = -1, last_chunk = -1;  // the (tensor, chunk) order the blocks must follow
  int64_t blocks_seen = 0, launches = 0;
  bool ordered = true;
  const auto check_launch = [&](const ft::TensorListMetadata<Depth, kIndexBases, kQuantRows>& m, int64_t n_blocks) {
    ++launches;
    FT_CHECK_MSG(n_blocks >= 1 && n_blocks <= max_blocks, what, ": launch ", launches, " has ", n_blocks, " blocks");
    FT_CHECK_MSG(m.n_tensors >= 1 && m.n_tensors <= max_tensors, what, ": launch ", launches, " has ", m.n_tensors,
                 " tensors");
    FT_CHECK_MSG(m.n_finished == m.n_tensors || m.n_finished == m.n_tensors - 1, what, ": n_finished ", m.n_finished,
                 " of ", m.n_tensors);
    FT_CHECK(m.block_start[0] == 0);
    FT_CHECK_MSG(m.block_start[m.n_tensors] == n_blocks, what, ": the slots end at block ", m.block_start[m.n_tensors],
                 ", the launch at ", n_blocks);
    for (int s = 0; s < m.n_tensors; ++s) {
      FT_CHECK_MSG(m.block_start[s] < m.block_start[s + 1], what, ": slot ", s, " has no block");
      // The slot's tensor ends in this launch exactly when its last block holds the tensor's last chunk.
      const ft::BlockLocation last = ft::locate_block(m, m.block_start[s + 1] - 1);
      const int64_t t = tensor_of(m.addresses[0][s]);
      const bool ends_here = last.begin + std::max<int64_t>(last.n, 1) >= m.numel[s] || m.numel[s] == 0;
      FT_CHECK_MSG(ends_here == (s < m.n_finished), what, ": tensor ", t, " ends here: ", ends_here, ", slot ", s,
                   " of n_finished ", m.n_finished);
      if (s < m.n_finished) ++advanced[t];
    }
    for (int64_t b = 0; b < n_blocks; ++b) {
      const ft::BlockLocation loc = ft::locate_block(m, b);
      if (loc.slot < 0 || loc.slot >= m.n_tensors) {
        FT_CHECK_MSG(false, what, ": block ", b, " located in slot ", loc.slot);
        return;
      }
      const int64_t t = tensor_of(m.addresses[0][loc.slot]);
      for (int k = 1; k < Depth; ++k) FT_CHECK(m.addresses[k][loc.slot] == tensors.address(k, t));
      FT_CHECK(m.numel[loc.slot] == tensors.numel(t));
      FT_CHECK(m.steps[loc.slot] == (tensors.with_steps ? tensors.step(t) : nullptr));
      if constexpr (kIndexBases) FT_CHECK(m.index_base[loc.slot] == tensors.index_base(t));
      if constexpr (kQuantRows) FT_CHECK(m.quant_row[loc.slot] == tensors.quant_row(t));
      const int64_t numel = tensors.numel(t);
      const int64_t chunk = loc.begin / ft::kChunkSize;
      FT_CHECK(loc.begin % ft::kChunkSize == 0);
      FT_CHECK_MSG(loc.n == std::min(ft::kChunkSize, numel - loc.begin), what, ": block ", b, " has n ", loc.n,
                   " at ", loc.begin, " of ", numel);
      FT_CHECK_MSG(loc.n > 0 || (numel == 0 && tensors.with_steps), what, ": an empty block for tensor ", t);
      // Strictly after the previous block's (tensor, chunk), and nothing skipped: one block per chunk.
      const bool next_chunk = t == last_tensor && chunk == last_chunk + 1;
      bool next_tensor = t > last_tensor && chunk == 0;
      for (int64_t u = last_tensor + 1; next_tensor && u < t; ++u) {
        next_tensor = tensors.numel(u) == 0 && !tensors.with_steps;  // skipped tensors must have had no work
      }
      const bool previous_done =
          last_tensor < 0 || last_chunk == std::max<int64_t>(chunks_of(tensors.numel(last_tensor)), 1) - 1;
      if (!(next_chunk || (next_tensor && previous_done)) && ordered) {
        ordered = false;
        FT_CHECK_MSG(false, what, ": block ", b, " of launch ", launches, " has (tensor ", t, ", chunk ", chunk,
                     ") after (", last_tensor, ", ", last_chunk, ")");
      }
      last_tensor = t;
      last_chunk = chunk;
      ++blocks_seen;
    }
  };
  ft::plan_launches<Depth, kIndexBases, kQuantRows>(tensors, max_tensors, max_blocks, check_launch);
  // After the last block: every remaining tensor must have been workless, the last one finished.
  int64_t expected_blocks = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t chunks = chunks_of(tensors.numel(i));
    expected_blocks += chunks > 0 ? chunks : (tensors.with_steps ? 1 : 0);
    // Every tensor with a block is finished in exactly one launch (the launcher advances its step there).
    const int64_t expected = chunks > 0 || tensors.with_steps ? 1 : 0;
    FT_CHECK_MSG(advanced[i] == expected, what, ": tensor ", i, " finishes in ", advanced[i], " launches");
  }
  FT_CHECK_MSG(blocks_seen == expected_blocks, what, ": ", blocks_seen, " blocks for ", expected_blocks, " chunks");
  if (expected_blocks == 0) FT_CHECK_MSG(launches == 0, what, ": ", launches, " launches with nothing to do");
}

// Sizes that sit on and around chunk boundaries, plus empty tensors.
int64_t draw_numel(std::mt19937_64& rng) {
  const int64_t c = ft::kChunkSize;
  switch (rng() % 8) {
    case 0: return 0;
    case 1: return 1 + static_cast<int64_t>(rng() % 7);
    case 2: return c - 1;
    case 3: return c;
    case 4: return c + 1;
    case 5: return static_cast<int64_t>(rng() % (5 * c));
    default: return static_cast<int64_t>(1 + rng() % 20) * c - static_cast<int64_t>(rng() % 3);
  }
}

template <int Depth, bool kIndexBases = false, bool kQuantRows = false>
void check_random_plans(uint64_t seed, int cases) {
  std::mt19937_64 rng(seed);
  constexpr int kMax = ft::TensorListMetadata<Depth, kIndexBases, kQuantRows>::kMaxTensors;
  for (int c = 0; c < cases; ++c) {
    FakeTensors tensors;
    tensors.with_steps = rng() % 2 == 0;
    const int n = static_cast<int>(rng() % 40);
    for (int i = 0; i < n; ++i) tensors.numels.push_back(draw_numel(rng));
    // Small limits, so tensors split across launches often, and now and then the real ones.
    const int max_tensors = rng() % 4 == 0 ? kMax : 1 + static_cast<int>(rng() % 6);
    const int64_t max_blocks = rng() % 4 == 0 ? ft::kMaxBlocksPerLaunch : 1 + static_cast<int64_t>(rng() % 9);
    check_plan<Depth, kIndexBases, kQuantRows>(tensors, max_tensors, max_blocks,
                      ft_test::concat("seed ", seed, " case ", c, " (", n, " tensors, max_tensors ", max_tensors,
                                      ", max_blocks ", max_blocks, ")"));
  }
}

FT_TEST(random_plans_depth2) { check_random_plans<2>(1, 3000); }
FT_TEST(random_plans_depth4) { check_random_plans<4>(2, 3000); }
FT_TEST(random_plans_depth5) { check_random_plans<5>(3, 3000); }
FT_TEST(random_plans_with_index_bases) {  // stochastic rounding of shards: Adam's and SGD's seeded launches
  check_random_plans<5, true>(4, 3000);
  check_random_plans<3, true>(5, 3000);
}
FT_TEST(random_plans_with_quant_rows) {  // the 8-bit ops' launches, with and without rounding offsets
  check_random_plans<6, false, true>(6, 3000);
  check_random_plans<7, true, true>(7, 3000);
}

// A launch's metadata fits the kernel parameters beside the functor's budget at every depth the ops use, with
// index bases and quantization row lengths and without; each costs its slots 8 bytes, nothing in launches without.
template <int Depth>
constexpr bool metadata_fits() {
  return sizeof(ft::TensorListMetadata<Depth, false>) + ft::kFunctorParamBytes <= ft::kKernelParamBytes &&
         sizeof(ft::TensorListMetadata<Depth, true>) + ft::kFunctorParamBytes <= ft::kKernelParamBytes &&
         sizeof(ft::TensorListMetadata<Depth, false, true>) + ft::kFunctorParamBytes <= ft::kKernelParamBytes &&
         sizeof(ft::TensorListMetadata<Depth, true, true>) + ft::kFunctorParamBytes <= ft::kKernelParamBytes;
}
static_assert(metadata_fits<2>() && metadata_fits<3>() && metadata_fits<4>() && metadata_fits<5>() &&
              metadata_fits<6>() && metadata_fits<7>() && metadata_fits<9>());
static_assert(ft::TensorListMetadata<5, true>::kMaxTensors == ft::max_tensors_per_launch(6) &&
              ft::TensorListMetadata<5, false>::kMaxTensors == 63 &&
              ft::TensorListMetadata<6, false, true>::kMaxTensors == ft::max_tensors_per_launch(7) &&
              ft::TensorListMetadata<7, true, true>::kMaxTensors == ft::max_tensors_per_launch(9));

// The real limits: a tensor of more than 2^20 chunks continues in a second launch, mid-tensor, and the
// tensors around it keep their places; 106 small tensors overflow the 105 slots of a depth-2 launch.
FT_TEST(real_limits_split_a_huge_tensor) {
  const int64_t huge = ft::kMaxBlocksPerLaunch * ft::kChunkSize + 3 * ft::kChunkSize + 7;  // 2^20 + 4 chunks
  for (const bool steps : {false, true}) {
    FakeTensors tensors;
    tensors.with_steps = steps;
    tensors.numels = {5, 0, huge, ft::kChunkSize, 0, 1};
    check_plan<4>(tensors, ft::TensorListMetadata<4>::kMaxTensors, ft::kMaxBlocksPerLaunch, "huge tensor");
    int launches = 0;
    ft::plan_launches<4>(tensors, ft::TensorListMetadata<4>::kMaxTensors, ft::kMaxBlocksPerLaunch,
                         [&](const ft::TensorListMetadata<4>& m, int64_t n_blocks) {
                           ++launches;
                           if (launches == 2) {  // continues the huge tensor at chunk 2^20 - 1 or 2^20 - 2
                             FT_CHECK(tensor_of(m.addresses[0][0]) == 2);
                             FT_CHECK(m.first_chunk > 0);
                             FT_CHECK(n_blocks >= 5);
                           }
                         });
    FT_CHECK_MSG(launches == 2, "launches: ", launches);
  }
  FakeTensors many;
  many.with_steps = true;
  many.numels.assign(106, 3);
  check_plan<2>(many, ft::TensorListMetadata<2>::kMaxTensors, ft::kMaxBlocksPerLaunch, "106 tensors");
}

FT_TEST(limits_out_of_range_are_refused) {
  FakeTensors tensors;
  tensors.numels = {1};
  const auto none = [](const ft::TensorListMetadata<2>&, int64_t) {};
  FT_CHECK_THROWS(ft::plan_launches<2>(tensors, 0, 4, none), "limits out of range");
  FT_CHECK_THROWS(ft::plan_launches<2>(tensors, ft::TensorListMetadata<2>::kMaxTensors + 1, 4, none),
                  "limits out of range");
  FT_CHECK_THROWS(ft::plan_launches<2>(tensors, 4, 0, none), "limits out of range");
  FT_CHECK_THROWS(ft::plan_launches<2>(tensors, 4, ft::kMaxBlocksPerLaunch + 1, none), "limits out of range");
}

}  // namespace

int main(int argc, char** argv) { return ft_test::run_tests(argc > 1 ? argv[1] : ""); }
