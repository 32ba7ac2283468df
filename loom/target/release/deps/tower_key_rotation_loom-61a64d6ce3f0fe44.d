/work/main/loom/target/release/deps/tower_key_rotation_loom-61a64d6ce3f0fe44.d: src/lib.rs

/work/main/loom/target/release/deps/libtower_key_rotation_loom-61a64d6ce3f0fe44.rlib: src/lib.rs

/work/main/loom/target/release/deps/libtower_key_rotation_loom-61a64d6ce3f0fe44.rmeta: src/lib.rs

src/lib.rs:
