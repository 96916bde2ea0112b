"""Build checks that need no GPU.

1. Every ``csrc/cuda/*.cu`` compiles with ``nvcc -c`` against the installed torch's
   headers, with the flags CMakeLists.txt uses (C++17, -O3, --use_fast_math but for
   reparameterize.cu, --expt-relaxed-constexpr, -DVAE_FAST_WITH_CUDA), for sm_90 only
   to keep it quick.
   Machines without a GPU (this one, CI) never build the CUDA kernels, so without
   this check CUDA code could rot unseen. Skipped where nvcc is missing. The compiles
   run in the background from the start of the session (tests/cuda_compile.py, which
   also says which headers a CPU-only setup stands in for); these tests run last.
2. The CUDA row driver's index mapping (csrc/cuda/row_plan.h, host-device code with no
   CUDA headers), compiled with the host compiler and walked over every block, team
   and lane of thousands of planned grids: each element visited exactly once, every
   vector access aligned. The kernels themselves run only on a GPU (tests/test_cuda.py).
3. The CUDA architecture list (csrc/cuda/cuda_arch.cmake) through torch's own
   selection macro, as find_package(Torch) runs it for a CUDA torch, and nvcc
   accepting the flags that come out.
4. The built extension reports the CPU capability this machine should get.
5. The ops have CUDA kernels registered exactly when the extension was built with CUDA.
6. One glue per op (csrc/<op>.cpp, for every device), kernels only in csrc/cpu/ and
   csrc/cuda/, and the glue compiles as a CUDA build compiles it (-DVAE_FAST_WITH_CUDA).
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path

import cuda_compile
import pytest
import torch
from cuda_compile import CUDA_SOURCES, NVCC, ROOT
from torch.utils.cpp_extension import include_paths


@pytest.fixture(scope="session")
def compiled():
    """The compiles cuda_compile.start() began with the session; skips without nvcc."""
    if NVCC is None:
        pytest.skip("nvcc is not installed")
    return cuda_compile.start()


def _own_warnings(output: str) -> list[str]:
    """Compiler warnings located in our sources (torch's headers have their own)."""
    return [
        line
        for line in output.splitlines()
        if "warning" in line.lower() and ("csrc/" in line or "tests/" in line)
    ]


@pytest.mark.slow
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=[s.name for s in CUDA_SOURCES])
def test_cuda_source_compiles(compiled, source: Path) -> None:
    futures, notes = compiled
    returncode, output = futures[source.name].result()
    assert returncode == 0, f"nvcc failed on {source.name} ({'; '.join(notes)}):\n{output[-8000:]}"
    assert not _own_warnings(output), "\n".join(_own_warnings(output))


# --------------------------------------------------------------------------- one glue per op
# Each op's glue (checks, layout, allocation, output_mask, empty inputs) is written once,
# in csrc/<op>.cpp, for every device; csrc/cpu/ and csrc/cuda/ hold kernels only, which
# the glue reaches through its op's kernel table (csrc/common/dispatch.h, kernels.h).
OP_FAMILIES = ["bernoulli", "gaussian", "kl", "reparameterize", "elbo", "iwae"]
GLUE_SOURCES = [ROOT / "csrc" / f"{op}.cpp" for op in OP_FAMILIES]
KERNEL_DIRS = [ROOT / "csrc" / "cpu", ROOT / "csrc" / "cuda"]


def test_one_glue_per_op() -> None:
    for glue in GLUE_SOURCES:
        text = glue.read_text()
        assert "VAE_FAST_REGISTER_GLUE(" in text, f"{glue.name} does not register its glue"
        assert "VAE_FAST_DEFINE_KERNEL(" in text, f"{glue.name} defines no kernel table"
        for kernels in KERNEL_DIRS:
            assert not (kernels / glue.name).exists(), f"a second glue: {kernels.name}/{glue.name}"


@pytest.mark.parametrize("path", [p for d in KERNEL_DIRS for p in sorted(d.iterdir())],
                         ids=lambda p: f"{p.parent.name}/{p.name}")  # fmt: skip
def test_kernel_dirs_hold_kernels_only(path: Path) -> None:
    """No op registration, argument check or output_mask in the device directories."""
    text = path.read_text()
    for needle in ("TORCH_LIBRARY", "output_mask", "op_checks.h", "check_like(", "check_float("):
        where = path.relative_to(ROOT)
        assert needle not in text, f"{needle} in {where}: glue belongs in csrc/<op>.cpp"


@pytest.mark.slow
def test_glue_compiles_for_cuda() -> None:
    """A CUDA build compiles the glue with -DVAE_FAST_WITH_CUDA (which also registers it
    for the CUDA key); this machine's build never does, so check it with the host compiler.
    One file stands for all: what the macro adds (VAE_FAST_REGISTER_GLUE's CUDA block) is
    the same in each, and each compile of torch's headers costs ~6 CPU-seconds."""
    glue = ROOT / "csrc" / "elbo.cpp"
    cxx = _host_compiler()
    if cxx is None:
        pytest.skip("no host C++ compiler")
    abi = int(torch.compiled_with_cxx11_abi())
    flags = [
        "-std=c++17",
        "-fsyntax-only",
        "-DVAE_FAST_WITH_CUDA",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
    ]
    includes = [f"-I{d}" for d in (ROOT / "csrc", *include_paths())]
    build = subprocess.run(
        [cxx, *flags, *includes, str(glue)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert build.returncode == 0, build.stderr[-4000:]


# --------------------------------------------------------------------------- row driver geometry

# Walks planned grids the way rows_kernel does (csrc/cuda/rows.cuh: run_task and
# finish_split_rows call the same row_plan.h functions). 3000 random shapes (rows and
# columns log-uniform, vector widths 1..8, any misalignment, with and without
# per-column sums, GPUs of 1 to 1056 resident blocks) plus edge shapes.
ROW_PLAN_CHECK = r"""
// Walks every block, team and lane of planned row-driver grids the way rows_kernel
// does (csrc/cuda/rows.cuh: run_task, finish_split_rows), on the host: every element
// must be visited exactly once, every vector access aligned and inside its segment,
// every split row partial written once, and with per-column sums every lane must
// see the same columns in every row. Prints one line per failure; exits 1 on any.
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "cuda/row_plan.h"

using namespace vae_fast::cuda;

static int failures = 0;
#define EXPECT(cond, ...)                                                          \
  do {                                                                             \
    if (!(cond)) {                                                                 \
      if (++failures <= 20) {                                                      \
        std::printf("FAIL rows=%lld cols=%lld vec=%d misalign=%d per_column=%d ",  \
                    (long long)rows, (long long)cols, mode.vec, mode.misalign,     \
                    (int)per_column);                                              \
        std::printf("resident=%lld: ", (long long)resident);                       \
        std::printf(__VA_ARGS__);                                                  \
        std::printf("\n");                                                         \
      }                                                                            \
      return;                                                                      \
    }                                                                              \
  } while (0)

// The host's rule (vector_mode in cuda/math.cuh): per-column sums need aligned rows.
static VectorMode mode_for(int vec, int misalign, int64_t cols, bool per_column) {
  if (per_column && (misalign != 0 || cols % vec != 0)) return {1, 0};
  return {vec, vec > 1 ? misalign : 0};
}

// x_rows > 0: x shared by the samples, read at row % x_rows (the multi-sample elbo).
static void check(int64_t rows, int64_t cols, VectorMode mode, bool per_column, int64_t resident,
                  int64_t x_rows = 0) {
  const RowGrid g = plan_rows(rows, cols, mode, per_column, resident);
  EXPECT(g.tx >= 1 && (g.tx & (g.tx - 1)) == 0 && g.tx * g.ty == kBlockThreads,
         "team shape %d x %d", g.tx, g.ty);
  EXPECT(g.tx <= kWarp || g.ty == 1, "a block-wide team shares its block");
  EXPECT((rows == 0) == (g.blocks() == 0), "%lld blocks", (long long)g.blocks());
  EXPECT(g.blocks() <= INT32_MAX, "grid too large");
  EXPECT(g.split_cols > 0 && g.split_cols % g.vec == 0, "split_cols %lld", (long long)g.split_cols);
  EXPECT(g.splits >= 1 && (cols == 0 ? g.splits == 1 : (g.splits - 1) * g.split_cols < cols),
         "%d splits of %lld columns", g.splits, (long long)g.split_cols);
  if (per_column) {
    EXPECT(g.split_cols <= int64_t(g.tx) * g.vec, "per-column: more than a vector per lane");
  }
  std::vector<uint8_t> seen(size_t(rows * cols), 0);
  std::vector<uint8_t> partial(g.splits > 1 ? size_t(rows * g.splits) : 0, 0);
  for (int64_t block = 0; block < g.blocks(); ++block) {
    const int32_t split = g.split_of(block);
    const int64_t row_block = g.row_block_of(block);
    for (int team = 0; team < g.ty; ++team) {
      for (int lane = 0; lane < g.tx; ++lane) {
        for (int64_t first = row_block * g.ty; first < rows; first += g.row_stride()) {
          const int64_t row = first + team;
          if (row >= rows) continue;
          const Segment s = row_segment(g, row, split);
          EXPECT(s.begin <= s.body_begin && s.body_begin <= s.body_end && s.body_end <= s.end,
                 "segment %lld %lld %lld %lld", (long long)s.begin, (long long)s.body_begin,
                 (long long)s.body_end, (long long)s.end);
          EXPECT(g.vec == 1 || (s.body_begin - s.begin < g.vec && s.end - s.body_end < g.vec),
                 "edges longer than a vector");
          bool bad = false;
          for_each_access(
              s, g.vec, lane, g.tx,
              [&](int64_t col) {
                bad |= (g.misalign + row * cols + col) % g.vec != 0;
                if (x_rows > 0) bad |= (g.misalign + row % x_rows * cols + col) % g.vec != 0;
                bad |= col < s.body_begin || col + g.vec > s.body_end;
                if (per_column) bad |= col != s.begin + int64_t(lane) * g.vec;
                if (col >= 0 && col + g.vec <= cols) {
                  for (int i = 0; i < g.vec; ++i) seen[size_t(row * cols + col + i)]++;
                }
              },
              [&](int64_t col) {
                bad |= col < s.begin || col >= s.end || (col >= s.body_begin && col < s.body_end);
                if (per_column) bad |= g.vec != 1 || col != s.begin + lane;
                if (col >= 0 && col < cols) seen[size_t(row * cols + col)]++;
              });
          EXPECT(!bad, "row %lld lane %d: a misplaced access", (long long)row, lane);
          if (g.splits > 1 && lane == 0) partial[size_t(g.partial_index(0, row, split))]++;
        }
      }
    }
  }
  for (size_t i = 0; i < seen.size(); ++i) {
    EXPECT(seen[i] == 1, "element (%lld, %lld) visited %d times", (long long)(i / cols),
           (long long)(i % cols), seen[i]);
  }
  for (size_t i = 0; i < partial.size(); ++i) {
    EXPECT(partial[i] == 1, "partial %zu written %d times", i, partial[i]);
  }
}

int main() {
  const int64_t residents[] = {132 * 8, 132 * 4, 108 * 8, 80 * 6, 1, 7};
  const int vecs[] = {1, 2, 4, 8};
  int64_t shapes = 0;
  auto all_modes = [&](int64_t rows, int64_t cols, int64_t resident) {
    for (int vec : vecs) {
      for (int per_column = 0; per_column < 2; ++per_column) {
        for (int m : {0, vec / 2, vec - 1}) {
          check(rows, cols, mode_for(vec, m, cols, per_column), per_column, resident);
        }
      }
    }
    ++shapes;
  };
  // Edge shapes: empty, one element, one long row, one-column rows, the benchmark sizes.
  const int64_t edges[][2] = {{0, 0},      {0, 784},      {5, 0},     {1, 1},
                              {1, 3000000}, {2000000, 1},  {256, 49152}, {4096, 12288},
                              {8192, 784},  {33, 13},      {4096, 33},  {1, 40000},
                              {2, 30000},   {3, 8191},     {7, 2049 * 8 + 3}};
  for (const auto& e : edges) all_modes(e[0], e[1], 132 * 8);
  std::mt19937_64 rng(1234);
  for (int i = 0; i < 3000; ++i) {
    // log-uniform rows and cols, at most ~400k elements each
    const int64_t rows = int64_t(std::exp2(std::uniform_real_distribution<double>(0, 12)(rng))) - 1;
    int64_t cols = int64_t(std::exp2(std::uniform_real_distribution<double>(0, 17)(rng)));
    if (rows * cols > 400000) cols = 400000 / std::max<int64_t>(rows, 1);
    const int64_t resident = residents[rng() % 6];
    const int vec = vecs[rng() % 4];
    const int m = int(rng() % vec);
    const bool per_column = rng() % 3 == 0;
    check(rows, cols, mode_for(vec, m, cols, per_column), per_column, resident);
    ++shapes;
  }
  // x shared by K samples: B x cols of x under K * B rows, each mode made safe for it
  // (with_shared_x), B * cols both a multiple of the vector width and not.
  for (int i = 0; i < 500; ++i) {
    const int64_t batch = 1 + int64_t(rng() % 64);
    const int64_t samples = 2 + int64_t(rng() % 3);
    const int64_t cols = 1 + int64_t(rng() % 2100);
    const int vec = vecs[rng() % 4];
    const int m = int(rng() % vec);
    const bool per_column = rng() % 3 == 0;
    const int64_t rows = samples * batch;
    const VectorMode mode = with_shared_x(mode_for(vec, m, cols, per_column), cols, batch);
    check(rows, cols, mode, per_column, residents[rng() % 6], batch);
    ++shapes;
  }
  std::printf("%lld shapes, %d failures\n", (long long)shapes, failures);
  return failures == 0 ? 0 : 1;
}
"""


def _host_compiler() -> str | None:
    return next(
        (c for c in (os.environ.get("CXX"), "g++", "c++", "clang++") if c and shutil.which(c)), None
    )


def test_row_plan_visits_every_element_once(tmp_path: Path) -> None:
    cxx = _host_compiler()
    if cxx is None:
        pytest.skip("no host C++ compiler")
    (tmp_path / "row_plan_check.cpp").write_text(ROW_PLAN_CHECK)
    exe = tmp_path / "row_plan_check"
    build = subprocess.run(
        [cxx, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", f"-I{ROOT / 'csrc'}",
         str(tmp_path / "row_plan_check.cpp"), "-o", str(exe)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "3515 shapes, 0 failures" in run.stdout


# --------------------------------------------------------------------------- CUDA architectures

# csrc/cuda/cuda_arch.cmake's list fed to torch's own torch_cuda_get_nvcc_gencode_flag,
# as find_package(Torch) does for a CUDA torch (the CPU wheel ships the same CMake
# files). A CUDA configure needs a CUDA torch, which this machine lacks: the list and
# the flags torch derives from it are what decides the build.
ARCH_SCRIPT = """
include({root}/csrc/cuda/cuda_arch.cmake)
include({torch}/Caffe2/public/utils.cmake)
set(CUDA_VERSION ${{NVCC_VERSION}})
include({torch}/Caffe2/Modules_CUDA_fix/upstream/FindCUDA/select_compute_arch.cmake)
vae_fast_cuda_arch_list(TORCH_CUDA_ARCH_LIST "${{NVCC_VERSION}}")
torch_cuda_get_nvcc_gencode_flag(flags)
message("FLAGS=${{flags}}")
"""


def _cmake() -> str | None:
    found = shutil.which("cmake")
    if found is None:
        try:
            import cmake

            found = str(Path(cmake.CMAKE_BIN_DIR) / "cmake")
        except ImportError:
            return None
    return found


def _arch_flags(tmp_path: Path, env_list: str | None, cmake_list: str | None, nvcc: str = "13.0"):
    cmake = _cmake()
    if cmake is None:
        pytest.skip("cmake is not installed")
    script = tmp_path / "arch.cmake"
    script.write_text(ARCH_SCRIPT.format(root=ROOT, torch=torch.utils.cmake_prefix_path))
    env = {k: v for k, v in os.environ.items() if k != "TORCH_CUDA_ARCH_LIST"}
    if env_list is not None:
        env["TORCH_CUDA_ARCH_LIST"] = env_list
    defines = [f"-DNVCC_VERSION={nvcc}"]
    if cmake_list is not None:
        defines.append(f"-DTORCH_CUDA_ARCH_LIST={cmake_list}")
    proc = subprocess.run(
        [cmake, *defines, "-P", str(script)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    out = proc.stdout + proc.stderr
    flags = next(
        (line[6:].split(";") for line in out.splitlines() if line.startswith("FLAGS=")), None
    )
    return proc.returncode, flags, out


@pytest.mark.parametrize(
    "env_list, cmake_list, want",
    [
        (None, None, ["sm_80", "sm_90"]),  # the default
        ("9.0", None, ["sm_90"]),  # the environment variable
        ("8.0 9.0+PTX", None, ["sm_80", "sm_90", "compute_90"]),  # torch's spelling
        ("9.0", "8.6;Hopper", ["sm_86", "sm_90"]),  # -D wins over the environment
    ],
)
def test_cuda_arch_list_selects_the_architectures(
    tmp_path: Path, env_list, cmake_list, want
) -> None:
    rc, flags, out = _arch_flags(tmp_path, env_list, cmake_list)
    assert rc == 0 and flags is not None, out
    codes = [f.split("code=")[1] for f in flags if "code=" in f]
    assert codes == want, out
    if NVCC is not None:
        # nvcc takes them (nvcc 13 rejects the compute_50 of torch's fallback list).
        (tmp_path / "k.cu").write_text("__global__ void k(float* p) { p[threadIdx.x] = 1.f; }\n")
        proc = subprocess.run(
            [str(NVCC), "-c", str(tmp_path / "k.cu"), "-o", str(tmp_path / "k.o"), *flags],
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-4000:]


def test_cuda_arch_list_refuses_what_nvcc_13_dropped(tmp_path: Path) -> None:
    rc, _, out = _arch_flags(tmp_path, "7.0;9.0", None)
    assert rc != 0 and "7.5 and newer" in out
    rc, _, out = _arch_flags(tmp_path, "7.0;9.0", None, nvcc="12.8")
    assert rc == 0, out


# --------------------------------------------------------------------------- the built extension


def _import_extension():
    try:
        from vae_fast import _C
    except ImportError as error:
        pytest.skip(f"vae_fast._C is not built ({error})")
    return _C


def _cpu_flags() -> set[str] | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return None


def test_cpu_capability() -> None:
    """AVX-512 kernels on an x86 CPU with avx512f/bw/vl/dq, AVX2 ones with AVX2 and FMA,
    the portable ones otherwise; ATEN_CPU_CAPABILITY caps the choice, as for ATen."""
    _C = _import_extension()
    if platform.machine().lower() not in ("x86_64", "amd64"):
        expected = "DEFAULT"
    else:
        flags = _cpu_flags()
        if flags is None:
            pytest.skip("cannot read the CPU's flags")
        expected = "DEFAULT"
        if {"avx2", "fma"} <= flags:
            expected = "AVX2"
        if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
            expected = "AVX512"
        cap = os.environ.get("ATEN_CPU_CAPABILITY")
        if cap == "default":
            expected = "DEFAULT"
        elif cap == "avx2" and expected == "AVX512":
            expected = "AVX2"
    assert _C.cpu_capability() == expected


OPS = [
    "bernoulli_log_prob",
    "_bernoulli_log_prob_backward",
    "gaussian_log_prob",
    "_gaussian_log_prob_backward",
    "gaussian_kl",
    "_gaussian_kl_backward",
    "reparameterize",
    "_reparameterize_backward",
    "elbo",
    "_elbo_into_recon",
    "iwae",
]


@pytest.mark.parametrize("op", OPS)
def test_kernels_registered(op: str) -> None:
    """CPU kernels always; CUDA kernels exactly when built with CUDA."""
    _C = _import_extension()
    name = f"vae_fast::{op}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA") == bool(_C.with_cuda)
