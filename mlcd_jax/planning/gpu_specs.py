# ruff: noqa: E501  (the specs' long lines are XLA's)
"""GPU targets for planning: XLA's GpuTargetConfigProto specs, as text.

Copied from XLA (github.com/openxla/xla, Apache License 2.0, Copyright The OpenXLA Authors),
xla/backends/gpu/target_config/specs/<file>.txtpb at the commit named beside each, without the
license header; nothing else changed. XLA compiles for a GPU it does not see from such a spec
(`jax.experimental.topologies.get_topology_desc(platform="cuda", target_config=...)`).
`target_config` leaves out fields that the XLA of some jax this project supports cannot parse
(jax 0.10.2's refuses `collective_memory_granularity`, the alignment of collective buffers; XLA
then uses its default).
"""

from __future__ import annotations

import re

# Fields XLA added after some jax release this project supports.
NEWER_FIELDS = ("collective_memory_granularity",)

# name: (XLA's file, commit)
SOURCES = {
    "h100": ("h100_sxm.txtpb", "0774019d97e77dc433ce97604295f6fc0f5b3b65"),
    "h200": ("h200.txtpb", "4336d12e0706168f6a382ddb231f3a83853b0657"),
    "b200": ("b200.txtpb", "300ec95ab85fa9f40af388054f7d43707407cb52"),
    "a100-80g": ("a100_sxm_80.txtpb", "4336d12e0706168f6a382ddb231f3a83853b0657"),
}

SPECS = {
    "h100": """\
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 84942979072
  shared_memory_per_block_optin: 232448
  cuda_compute_capability {
    major: 9
    feature_extension: ACCELERATED_FEATURES
  }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  scalar_unit_description {
    rate_infos {
      key: 4
      value {
        clock_rate_ghz: 1.98
        units_per_core: 64
        ops_per_clock: 1
      }
    }
    rate_infos {
      key: 8
      value {
        clock_rate_ghz: 1.98
        units_per_core: 64
        ops_per_clock: 1
      }
    }
    rate_infos {
      key: 10
      value {
        clock_rate_ghz: 1.98
        units_per_core: 128
        ops_per_clock: 2
      }
    }
    rate_infos {
      key: 11
      value {
        clock_rate_ghz: 1.98
        units_per_core: 128
        ops_per_clock: 1
      }
    }
    rate_infos {
      key: 12
      value {
        clock_rate_ghz: 1.98
        units_per_core: 64
        ops_per_clock: 1
      }
    }
    rate_infos {
      key: 16
      value {
        clock_rate_ghz: 1.98
        units_per_core: 128
        ops_per_clock: 2
      }
    }
  }
  matrix_unit_description {
    rate_infos {
      key: 2
      value {
        clock_rate_ghz: 1.8295201
        units_per_core: 4
        ops_per_clock: 1024
      }
    }
    rate_infos {
      key: 6
      value {
        clock_rate_ghz: 1.8295201
        units_per_core: 4
        ops_per_clock: 1024
      }
    }
    rate_infos {
      key: 10
      value {
        clock_rate_ghz: 1.8295201
        units_per_core: 4
        ops_per_clock: 512
      }
    }
    rate_infos {
      key: 11
      value {
        clock_rate_ghz: 1.8295201
        units_per_core: 4
        ops_per_clock: 256
      }
    }
    rate_infos {
      key: 12
      value {
        clock_rate_ghz: 1.98
        units_per_core: 4
        ops_per_clock: 32
      }
    }
    rate_infos {
      key: 16
      value {
        clock_rate_ghz: 1.8295201
        units_per_core: 4
        ops_per_clock: 512
      }
    }
    rate_infos {
      key: 19
      value {
        clock_rate_ghz: 1.8295201
        units_per_core: 4
        ops_per_clock: 1024
      }
    }
    rate_infos {
      key: 20
      value {
        clock_rate_ghz: 1.8295201
        units_per_core: 4
        ops_per_clock: 1024
      }
    }
    rate_infos {
      key: 23
      value {
        clock_rate_ghz: 1.8295201
        units_per_core: 4
        ops_per_clock: 1024
      }
    }
    rate_infos {
      key: 24
      value {
        clock_rate_ghz: 1.8295201
        units_per_core: 4
        ops_per_clock: 1024
      }
    }
    rate_infos {
      key: 25
      value {
        clock_rate_ghz: 1.8295201
        units_per_core: 4
        ops_per_clock: 1024
      }
    }
    rate_infos {
      key: 28
      value {
        clock_rate_ghz: 1.8295201
        units_per_core: 4
        ops_per_clock: 1024
      }
    }
    rate_infos {
      key: 29
      value {
        clock_rate_ghz: 1.8295201
        units_per_core: 4
        ops_per_clock: 1024
      }
    }
    rate_infos {
      key: 33
      value {
        clock_rate_ghz: 1.8295201
        units_per_core: 4
        ops_per_clock: 1024
      }
    }
    rate_infos {
      key: 35
      value {
        clock_rate_ghz: 1.8295201
        units_per_core: 4
        ops_per_clock: 1024
      }
    }
    rate_infos {
      key: 36
      value {
        clock_rate_ghz: 1.8295201
        units_per_core: 4
        ops_per_clock: 1024
      }
    }
  }
  thread_dim_limit_x: 1024
  thread_dim_limit_y: 1024
  thread_dim_limit_z: 64
  device_vendor: "NVIDIA Corporation"
  platform_version: "Compute Capability 9.0a"
  model_str: "sm_9.0a with 84942979072B RAM, 132 cores, 1980000KHz clock, 2619000KHz mem clock, 52428800B L2$"
  device_address_bits: 64
  pcie_bandwidth: 34359738368
  ecc_enabled: true
  name: "NVIDIA H100 80GB HBM3"
  driver_version: "13.0.0"
  runtime_version: "12.8.0"
  compile_time_toolkit_version: "12.8.0"
  dnn_version: "9.10.0"
  cub_version: "3.1.2"
  device_interconnect_info {
    active_links: 18
  }
  collective_memory_granularity: 2097152
}
platform_name: "CUDA"
dnn_version_info {
  major: 8
  minor: 9
  patch: 4
}
device_description_str: "NVIDIA H100 80GB HBM3"
""",
    "h200": """\
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 4800000000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 151397597184
  shared_memory_per_block_optin: 232448
  cuda_compute_capability {
    major: 9
    feature_extension: ACCELERATED_FEATURES
  }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  scalar_unit_description {
    rate_infos {
      key: 4
      value {
        clock_rate_ghz: 1.98
        units_per_core: 64
        ops_per_clock: 1
      }
    }
    rate_infos {
      key: 8
      value {
        clock_rate_ghz: 1.98
        units_per_core: 64
        ops_per_clock: 1
      }
    }
    rate_infos {
      key: 10
      value {
        clock_rate_ghz: 1.98
        units_per_core: 128
        ops_per_clock: 2
      }
    }
    rate_infos {
      key: 11
      value {
        clock_rate_ghz: 1.98
        units_per_core: 128
        ops_per_clock: 1
      }
    }
    rate_infos {
      key: 12
      value {
        clock_rate_ghz: 1.98
        units_per_core: 64
        ops_per_clock: 1
      }
    }
    rate_infos {
      key: 16
      value {
        clock_rate_ghz: 1.98
        units_per_core: 128
        ops_per_clock: 2
      }
    }
  }
  matrix_unit_description {
    rate_infos {
      key: 2
      value {
        clock_rate_ghz: 1.8295201
        units_per_core: 4
        ops_per_clock: 1024
      }
    }
    rate_infos {
      key: 6
      value {
        clock_rate_ghz: 1.8295201
        units_per_core: 4
        ops_per_clock: 1024
      }
    }
    rate_infos {
      key: 10
      value {
        clock_rate_ghz: 1.8295201
        units_per_core: 4
        ops_per_clock: 512
      }
    }
    rate_infos {
      key: 11
      value {
        clock_rate_ghz: 1.8295201
        units_per_core: 4
        ops_per_clock: 256
      }
    }
    rate_infos {
      key: 12
      value {
        clock_rate_ghz: 1.98
        units_per_core: 4
        ops_per_clock: 32
      }
    }
    rate_infos {
      key: 16
      value {
        clock_rate_ghz: 1.8295201
        units_per_core: 4
        ops_per_clock: 512
      }
    }
    rate_infos {
      key: 19
      value {
        clock_rate_ghz: 1.8295201
        units_per_core: 4
        ops_per_clock: 1024
      }
    }
    rate_infos {
      key: 20
      value {
        clock_rate_ghz: 1.8295201
        units_per_core: 4
        ops_per_clock: 1024
      }
    }
    rate_infos {
      key: 23
      value {
        clock_rate_ghz: 1.8295201
        units_per_core: 4
        ops_per_clock: 1024
      }
    }
    rate_infos {
      key: 24
      value {
        clock_rate_ghz: 1.8295201
        units_per_core: 4
        ops_per_clock: 1024
      }
    }
    rate_infos {
      key: 25
      value {
        clock_rate_ghz: 1.8295201
        units_per_core: 4
        ops_per_clock: 1024
      }
    }
    rate_infos {
      key: 28
      value {
        clock_rate_ghz: 1.8295201
        units_per_core: 4
        ops_per_clock: 1024
      }
    }
    rate_infos {
      key: 29
      value {
        clock_rate_ghz: 1.8295201
        units_per_core: 4
        ops_per_clock: 1024
      }
    }
    rate_infos {
      key: 33
      value {
        clock_rate_ghz: 1.8295201
        units_per_core: 4
        ops_per_clock: 1024
      }
    }
    rate_infos {
      key: 35
      value {
        clock_rate_ghz: 1.8295201
        units_per_core: 4
        ops_per_clock: 1024
      }
    }
    rate_infos {
      key: 36
      value {
        clock_rate_ghz: 1.8295201
        units_per_core: 4
        ops_per_clock: 1024
      }
    }
  }
  thread_dim_limit_x: 1024
  thread_dim_limit_y: 1024
  thread_dim_limit_z: 64
  device_vendor: "NVIDIA Corporation"
  platform_version: "Compute Capability 9.0a"
  model_str: "sm_9.0a with 151397597184B RAM, 132 cores, 1980000KHz clock, 3750000KHz mem clock, 52428800B L2$"
  device_address_bits: 64
  pcie_bandwidth: 34359738368
  ecc_enabled: true
  name: "NVIDIA H200 141GB HBM3e"
  driver_version: "13.0.0"
  runtime_version: "12.8.0"
  compile_time_toolkit_version: "12.8.0"
  dnn_version: "9.10.0"
  cub_version: "3.1.2"
  device_interconnect_info {
    active_links: 18
  }
  collective_memory_granularity: 2097152
}
platform_name: "CUDA"
dnn_version_info {
  major: 9
  minor: 10
  patch: 0
}
device_description_str: "NVIDIA H200 141GB HBM3e"
""",
    "b200": """\
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 148
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 7672320000000
  l2_cache_size: 132644864
  clock_rate_ghz: 1.965
  device_memory_size: 191514411008
  shared_memory_per_block_optin: 232448
  cuda_compute_capability {
    major: 10
    feature_extension: ACCELERATED_FEATURES
  }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  scalar_unit_description {
    rate_infos {
      key: 4
      value {
        clock_rate_ghz: 1.965
        units_per_core: 64
        ops_per_clock: 1
      }
    }
    rate_infos {
      key: 8
      value {
        clock_rate_ghz: 1.965
        units_per_core: 64
        ops_per_clock: 1
      }
    }
    rate_infos {
      key: 10
      value {
        clock_rate_ghz: 1.965
        units_per_core: 128
        ops_per_clock: 1
      }
    }
    rate_infos {
      key: 11
      value {
        clock_rate_ghz: 1.965
        units_per_core: 128
        ops_per_clock: 1
      }
    }
    rate_infos {
      key: 12
      value {
        clock_rate_ghz: 1.965
        units_per_core: 64
        ops_per_clock: 1
      }
    }
    rate_infos {
      key: 16
      value {
        clock_rate_ghz: 1.965
        units_per_core: 128
        ops_per_clock: 1
      }
    }
  }
  matrix_unit_description {
    rate_infos {
      key: 2
      value {
        clock_rate_ghz: 1.8353101
        units_per_core: 4
        ops_per_clock: 2048
      }
    }
    rate_infos {
      key: 6
      value {
        clock_rate_ghz: 1.8353101
        units_per_core: 4
        ops_per_clock: 2048
      }
    }
    rate_infos {
      key: 10
      value {
        clock_rate_ghz: 1.8353101
        units_per_core: 4
        ops_per_clock: 1024
      }
    }
    rate_infos {
      key: 11
      value {
        clock_rate_ghz: 1.8353101
        units_per_core: 4
        ops_per_clock: 512
      }
    }
    rate_infos {
      key: 12
      value {
        clock_rate_ghz: 1.965
        units_per_core: 4
        ops_per_clock: 16
      }
    }
    rate_infos {
      key: 16
      value {
        clock_rate_ghz: 1.8353101
        units_per_core: 4
        ops_per_clock: 1024
      }
    }
    rate_infos {
      key: 19
      value {
        clock_rate_ghz: 1.8353101
        units_per_core: 4
        ops_per_clock: 2048
      }
    }
    rate_infos {
      key: 20
      value {
        clock_rate_ghz: 1.8353101
        units_per_core: 4
        ops_per_clock: 2048
      }
    }
    rate_infos {
      key: 23
      value {
        clock_rate_ghz: 1.8353101
        units_per_core: 4
        ops_per_clock: 2048
      }
    }
    rate_infos {
      key: 24
      value {
        clock_rate_ghz: 1.8353101
        units_per_core: 4
        ops_per_clock: 2048
      }
    }
    rate_infos {
      key: 25
      value {
        clock_rate_ghz: 1.8353101
        units_per_core: 4
        ops_per_clock: 2048
      }
    }
    rate_infos {
      key: 28
      value {
        clock_rate_ghz: 1.8353101
        units_per_core: 4
        ops_per_clock: 2048
      }
    }
    rate_infos {
      key: 29
      value {
        clock_rate_ghz: 1.8353101
        units_per_core: 4
        ops_per_clock: 2048
      }
    }
    rate_infos {
      key: 32
      value {
        clock_rate_ghz: 1.8353101
        units_per_core: 4
        ops_per_clock: 4096
      }
    }
    rate_infos {
      key: 33
      value {
        clock_rate_ghz: 1.8353101
        units_per_core: 4
        ops_per_clock: 2048
      }
    }
    rate_infos {
      key: 35
      value {
        clock_rate_ghz: 1.8353101
        units_per_core: 4
        ops_per_clock: 2048
      }
    }
    rate_infos {
      key: 36
      value {
        clock_rate_ghz: 1.8353101
        units_per_core: 4
        ops_per_clock: 2048
      }
    }
  }
  thread_dim_limit_x: 1024
  thread_dim_limit_y: 1024
  thread_dim_limit_z: 64
  device_vendor: "NVIDIA Corporation"
  platform_version: "Compute Capability 10.0a"
  model_str: "sm_10.0a with 191514411008B RAM, 148 cores, 1965000KHz clock, 3996000KHz mem clock, 132644864B L2$"
  device_address_bits: 64
  pcie_bandwidth: 68719476736
  ecc_enabled: true
  name: "NVIDIA B200"
  driver_version: "13.0.0"
  runtime_version: "12.8.0"
  compile_time_toolkit_version: "12.8.0"
  dnn_version: "9.10.0"
  cub_version: "3.1.2"
  device_interconnect_info {
    active_links: 18
  }
  collective_memory_granularity: 2097152
}
platform_name: "CUDA"
dnn_version_info {
  major: 9
  minor: 7
}
device_description_str: "NVIDIA B200"
""",
    "a100-80g": """\
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 167936
  threads_per_core_limit: 2048
  core_count: 108
  fpus_per_core: 64
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 2039040000000
  l2_cache_size: 41943040
  clock_rate_ghz: 1.41
  device_memory_size: 85100068864
  shared_memory_per_block_optin: 166912
  cuda_compute_capability {
    major: 8
    feature_extension: NONE
  }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  dnn_version: "8.9.4"
  thread_dim_limit_x: 1024
  thread_dim_limit_y: 1024
  thread_dim_limit_z: 64
}
platform_name: "CUDA"
dnn_version_info {
  major: 8
  minor: 9
  patch: 4
}
device_description_str: "NVIDIA A100-SXM4-80GB"
""",
}



def names() -> tuple[str, ...]:
    return tuple(SPECS)


def target_config(name: str) -> str:
    """The spec of GPU `name` (one of `names()`) without NEWER_FIELDS."""
    return re.sub(rf"^\s*({'|'.join(NEWER_FIELDS)}):.*\n", "", SPECS[name], flags=re.M)


def field(name: str, key: str) -> float | None:
    """A number from GPU `name`'s spec (the first `key: value`), e.g. memory_bandwidth."""
    m = re.search(rf"^\s*{key}: ([0-9.e+]+)$", SPECS[name], flags=re.M)
    return float(m.group(1)) if m else None


def matrix_peak_flops(name: str, dtype_key: int = 16) -> float | None:
    """Peak dense matmul FLOP/s of GPU `name` for an XLA PrimitiveType (16 = BF16) from the
    spec's matrix units: 2 × clock × units per core × ops per clock × cores; None where the
    spec has no matrix units."""
    matrix = SPECS[name].partition("matrix_unit_description")[2]
    block = re.search(rf"rate_infos {{\s*key: {dtype_key}\s*value {{([^}}]*)}}", matrix)
    cores = field(name, "core_count")
    if not block or not cores:
        return None
    get = lambda k: float(re.search(rf"{k}: ([0-9.]+)", block.group(1)).group(1))
    return 2 * get("clock_rate_ghz") * 1e9 * get("units_per_core") * get("ops_per_clock") * cores
