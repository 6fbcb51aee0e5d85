//! Shared pieces of vmdev's fuzz targets (see `fuzz_targets/` and the README's "Fuzzing").

pub mod model_ops;
