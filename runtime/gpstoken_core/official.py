"""The official GPSToken constants (configs/gpstoken_*.yaml of the official code), each defined once.

Released checkpoints were trained with these values, so they are the defaults everywhere: the tokenizer
config (``gpstoken.config``), the partition (``gpstoken_core.partition``), the splat op, the CLI, the
exporter and the benchmarks import them from here. The tile side is ``gpstoken_core.tiling.TILE``.
The C++ side keeps its own copies where it needs a default (``kDefaultSupport`` in
plugins/tensorrt/splat_plugin_rules.h, ``Options`` in plugins/include/gpstoken/partition.h); they
must match these.
"""

from __future__ import annotations

SUPPORT = 3.0  # gps_dmax: Gaussians are cut at |dx| <= SUPPORT sigma_x, |dy| <= SUPPORT sigma_y (paper: 5)
TOKENS_PER_TILE = 128  # gps_num of GPSToken-M128: tokens per TILE x TILE tile
PARTITION_LAMBDA = 2.5  # gps_adaptive_w: the partition's entropy exponent lambda
MIN_REGION = 8  # adaptive_minhw: the partition splits no region side below this (the paper says 4)
