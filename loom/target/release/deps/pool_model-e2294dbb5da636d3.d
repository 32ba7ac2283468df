/work/main/loom/target/release/deps/pool_model-e2294dbb5da636d3.d: tests/pool_model.rs

/work/main/loom/target/release/deps/pool_model-e2294dbb5da636d3: tests/pool_model.rs

tests/pool_model.rs:
