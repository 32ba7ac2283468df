//! Nothing here: the model lives in `tests/pool_model.rs`.
